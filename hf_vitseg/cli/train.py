"""`hf-vitseg train`: fine-tune a segmentation head (and optionally the backbone) with `transformers.Trainer`.

    hf-vitseg train --backbone facebook/dinov2-small --head linear \\
        --train-images data/train/images --train-masks data/train/masks \\
        --eval-images data/val/images --eval-masks data/val/masks \\
        --num-labels 3 --crop-size 448 --epochs 20 --output-dir runs/nuclei

    hf-vitseg train ... --output-dir runs/nuclei --resume      # after an interruption: continue from the last checkpoint

Everything is checked before the first step (see `hf_vitseg.training.train`); the final model folder loads
with `AutoModelForSemanticSegmentation.from_pretrained(dir, trust_remote_code=True)` and
`AutoImageProcessor.from_pretrained(dir, trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add `hf-vitseg train`'s arguments to `parser`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    model = parser.add_argument_group("model (one of --backbone / --model)")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--backbone", help="Hub id or folder of a pretrained HF backbone (DINOv2, ViT, ...): a fresh head on it")
    source.add_argument("--model", help="folder (or Hub id) of a saved ViTSeg model to fine-tune further")
    model.add_argument("--head", default=None, help="head name, see hf_vitseg.list_heads() (default: the recipe's, else linear)")
    model.add_argument("--head-kwargs", type=_json, default=None, metavar="JSON", help='e.g. \'{"channels": 256}\'')
    model.add_argument("--config", type=_json, default=None, metavar="JSON",
                       help='more ViTSegConfig settings, e.g. \'{"backbone_out_indices": [9, 12], "dice_loss_weight": 0.5}\'')
    model.add_argument("--num-labels", type=int, help="number of classes (or give --id2label)")
    model.add_argument("--id2label", type=_json, metavar="JSON", help='class names: \'{"0": "bg", "1": "cell"}\' or a .json file')
    model.add_argument("--ignore-index", type=int, default=255, help="label value that carries no label (default: 255)")
    model.add_argument("--freeze-backbone", action="store_true", help="train the head only")
    model.add_argument("--recipe", choices=["linear_probe", "full_finetune", "lora"],
                       help="a documented recipe (hf_vitseg.training.recipes): its settings fill what is not given")

    data = parser.add_argument_group("data (image folders or a Hugging Face dataset)")
    data.add_argument("--train-images", help="folder of training images")
    data.add_argument("--train-masks", help="folder of training masks, paired with the images by file name")
    data.add_argument("--eval-images", help="folder of evaluation images")
    data.add_argument("--eval-masks", help="folder of evaluation masks")
    data.add_argument("--mask-suffix", default="", help="what a mask's file name adds to its image's, e.g. _mask")
    data.add_argument("--dataset", help="Hub id, local dataset or save_to_disk folder (instead of the folders)")
    data.add_argument("--train-split", default="train")
    data.add_argument("--eval-split", default=None, help="e.g. validation (default: no evaluation)")
    data.add_argument("--image-column", default="image")
    data.add_argument("--annotation-column", default="annotation")
    data.add_argument("--reduce-labels", action="store_true",
                      help="0 means 'unlabelled' (ADE20K): 0 becomes ignore_index, the rest shift down by one")
    data.add_argument("--crop-size", type=int, nargs="+", metavar="N", help="training crop: N or H W, patch multiples")
    data.add_argument("--no-augment", action="store_true", help="no random resize, flip or colour jitter")

    run = parser.add_argument_group("training")
    run.add_argument("--output-dir", required=True, help="checkpoints and the final model go here")
    run.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                     help="continue from the last complete checkpoint in --output-dir (or from CHECKPOINT)")
    run.add_argument("--overwrite-output-dir", action="store_true",
                     help="delete a previous run in --output-dir (its checkpoints and saved model) first")
    run.add_argument("--epochs", type=float, default=None, help="default 3")
    run.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (wins over --epochs)")
    run.add_argument("--batch-size", type=int, default=8, help="per device")
    run.add_argument("--eval-batch-size", type=int, default=None)
    run.add_argument("--lr", type=float, default=None, help="learning rate (backbone base rate)")
    run.add_argument("--head-lr", type=float, default=None, help="head learning rate (default: --lr)")
    run.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay over backbone layers (1 = none)")
    run.add_argument("--weight-decay", type=float, default=None)
    run.add_argument("--warmup-ratio", type=float, default=None)
    run.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: each epoch)")
    run.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: each epoch)")
    run.add_argument("--save-total-limit", type=int, default=None, help="keep only the last N checkpoints")
    run.add_argument("--logging-steps", type=int, default=10)
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--num-workers", type=int, default=0, help="dataloader worker processes")
    run.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    run.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    run.add_argument("--report-to", default="none", help="none, tensorboard, wandb, ...")
    run.add_argument("--json", action="store_true", help="print the final metrics as JSON")


def run(args: argparse.Namespace) -> int:
    """Build the model and datasets from `args`, train, print the metrics; returns the exit status."""
    from .evaluate import format_metrics

    try:
        metrics = _train_from_args(args)
    except (ValueError, OSError) as error:  # bad input: the message says what and how to fix it
        print(f"hf-vitseg train: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(metrics))
    print(f"Saved the model and its image processor to {args.output_dir}", file=sys.stderr)
    return 0


def _train_from_args(args: argparse.Namespace) -> dict:
    from transformers import set_seed

    from ..modeling import ViTSegForSemanticSegmentation
    from ..training import recipes
    from .evaluate import load_dataset_from_args, size_pair
    from ..training.loading import load_trainable_model, resolve_processor
    from ..training.trainer import train

    set_seed(args.seed)  # the fresh head's initialisation
    if args.backbone:
        config_kwargs = {**(getattr(recipes, args.recipe)().model_kwargs if args.recipe else {}), **_config_kwargs(args)}
        recipe_head = config_kwargs.pop("head", "linear")
        head = args.head or recipe_head
        model = ViTSegForSemanticSegmentation.from_pretrained_backbone(
            args.backbone, head=head, **_label_kwargs(args), **config_kwargs
        )
        model_path = None
    else:
        model, model_path = load_trainable_model(args.model), args.model
        if args.freeze_backbone:
            model.freeze_backbone()
    processor = resolve_processor(None, model, model_path)
    if args.reduce_labels:
        processor.do_reduce_labels = True

    train_dataset = load_dataset_from_args(args, args.train_images, args.train_masks, args.train_split, "train")
    eval_dataset = None
    if args.eval_images or args.eval_masks or (args.dataset and args.eval_split):
        eval_dataset = load_dataset_from_args(args, args.eval_images, args.eval_masks, args.eval_split, "eval")

    training_args = {"dataloader_num_workers": args.num_workers, "use_cpu": args.cpu, "bf16": args.bf16}
    if args.save_total_limit is not None:
        training_args["save_total_limit"] = args.save_total_limit
    _, metrics = train(
        model, train_dataset, eval_dataset, output_dir=args.output_dir, processor=processor,
        crop_size=size_pair(args.crop_size, "--crop-size"),
        augment={"scale_range": (1.0, 1.0), "hflip": False, "photometric": False} if args.no_augment else None,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        lr=args.lr, head_lr=args.head_lr, layer_decay=args.layer_decay, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, eval_steps=args.eval_steps, save_steps=args.save_steps,
        logging_steps=args.logging_steps, seed=args.seed, resume=args.resume,
        overwrite_output_dir=args.overwrite_output_dir, recipe=args.recipe, report_to=args.report_to,
        **training_args,
    )
    return metrics


def _json(text: str):
    """A JSON value given inline or as the path of a .json file."""
    path = Path(text)
    if text.endswith(".json") and path.is_file():
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text[:80]!r}") from error


def _label_kwargs(args) -> dict:
    if args.id2label is not None:
        id2label = {int(k): str(v) for k, v in args.id2label.items()}
        if args.num_labels is not None and args.num_labels != len(id2label):
            raise ValueError(f"--num-labels {args.num_labels} disagrees with the {len(id2label)} classes of --id2label.")
        return {"id2label": id2label}
    if args.num_labels is None:
        raise ValueError("A fresh head needs the classes: pass --num-labels N or --id2label JSON.")
    return {"num_labels": args.num_labels}


def _config_kwargs(args) -> dict:
    kwargs = dict(args.config or {})
    kwargs["ignore_index"] = args.ignore_index
    if args.freeze_backbone:
        kwargs["freeze_backbone"] = True
    if args.head_kwargs is not None:
        kwargs["head_kwargs"] = args.head_kwargs
    return kwargs
