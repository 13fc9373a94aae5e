"""DINOv2's linear-probe protocol on ADE20K (`scene_parse_150`), with hf-vitseg's training and evaluation.

Reproduces the semantic-segmentation linear evaluation of Oquab et al., "DINOv2: Learning Robust Visual
Features without Supervision" (TMLR 2024), section 7.4 / table 10, as its released mmsegmentation configs
(`dinov2_vit{s,b}14_ade20k_{linear,ms}_config.py`) run it:

- frozen backbone; a BatchNorm + 1x1 conv head (`linear`) on the patch tokens after the backbone's final
  norm: the last layer (`--mode linear`) or the last four layers concatenated (`--mode ms`);
- AdamW, lr 1e-3, weight decay 1e-4, 1500 linear warm-up iterations then poly (power 1) decay to 0 over 40k
  iterations, batch 16 (`hf_vitseg.training.recipes.linear_probe`);
- images resized to a short side of 512, random rescale in [0.5, 2.0], random 512x512 crops (518 for patch
  14: DINOv2 pads to a patch multiple), horizontal flip, photometric jitter; ADE20K's label 0 ("other") is
  ignored (`do_reduce_labels=True`), leaving 150 classes;
- evaluation on the validation split by sliding windows of the crop size at stride 341; `--mode ms` adds
  multi-scale (ratios 1.0, 1.32, 1.73, 2.28, 3.0) and flip test-time augmentation.

Published mIoU to reproduce (table 10 of the paper, DINOv2 weights from the Hub):

| backbone | linear | +ms |
|---|---|---|
| ViT-S/14 (`facebook/dinov2-small`) | 44.3 | 47.2 |
| ViT-B/14 (`facebook/dinov2-base`) | 47.3 | 51.3 |

This needs the Hugging Face Hub (weights and the ~1 GB dataset) and a GPU: 40k iterations of batch 16 at
518x518 are days on a CPU. Commands:

    python benchmarks/ade20k_linear.py --backbone facebook/dinov2-small --mode linear --output-dir runs/vits14_linear
    python benchmarks/ade20k_linear.py --backbone facebook/dinov2-base --mode ms --output-dir runs/vitb14_ms
    # any local copy in scene_parse_150 format (a `save_to_disk` folder or a `load_dataset`-able folder with
    # `image` and `annotation` columns, splits `train` and `validation`), a few iterations:
    python benchmarks/ade20k_linear.py --dataset path/to/ade --backbone path/to/backbone --max-steps 10 \\
        --output-dir /tmp/ade

Differences from the mmsegmentation pipeline, all small: metrics are computed on the processor's resized
grid rather than the original label resolution; mmseg's crop re-draws a crop in which one class covers more
than 75% (`cat_max_ratio`), this crop does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PUBLISHED_MIOU = {  # Oquab et al. 2024, table 10 (ADE20K, linear evaluation)
    "ViT-S/14": {"linear": 44.3, "ms": 47.2},
    "ViT-B/14": {"linear": 47.3, "ms": 51.3},
}
MS_RATIOS = (1.0, 1.32, 1.73, 2.28, 3.0)
NUM_ADE_CLASSES = 150


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="facebook/dinov2-small",
                        help="Hub id or local folder of a plain HF ViT model (default facebook/dinov2-small)")
    parser.add_argument("--dataset", default="scene_parse_150",
                        help="Hub name or local folder in scene_parse_150 format (image + annotation columns)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="validation")
    parser.add_argument("--mode", choices=["linear", "ms"], default="linear",
                        help="linear: last layer, single-scale test; ms: last four layers, multi-scale + flip test")
    parser.add_argument("--max-steps", type=int, default=40_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=1500, help="of the 40k schedule; scaled with --max-steps")
    parser.add_argument("--crop", type=int, default=512,
                        help="training crop and window (rounded up to a patch multiple)")
    parser.add_argument("--short-side", type=int, default=512, help="images are resized to this short side")
    parser.add_argument("--stride", type=int, default=341, help="sliding-window stride at evaluation")
    parser.add_argument("--ms-ratios", type=float, nargs="+", default=list(MS_RATIOS),
                        help="test scales of --mode ms")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N images only")
    parser.add_argument("--num-workers", type=int, default=4, help="dataloader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", required=True, help="checkpoints, final head and results.json")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    return parser


def reference_figure(backbone: str, mode: str) -> float | None:
    """The published mIoU for this backbone and mode, when the backbone is one of the paper's."""
    name = backbone.lower()
    size = "ViT-S/14" if "dinov2-small" in name else "ViT-B/14" if "dinov2-base" in name else None
    return PUBLISHED_MIOU[size][mode] if size else None


def build_processor(patch_size: int, short_side: int):
    from hf_vitseg import ViTSegImageProcessor

    return ViTSegImageProcessor(patch_size=patch_size, do_resize=True, size={"shortest_edge": short_side},
                                do_reduce_labels=True)


def evaluate_ms(model, dataset, processor, crop: int, stride: int, ratios, device) -> dict:
    """Multi-scale + flip sliding-window evaluation (`hf_vitseg.inference.predict_logits`), streaming mIoU."""
    import torch

    from hf_vitseg.inference import predict_logits
    from hf_vitseg.training.metrics import ConfusionMatrix

    matrix = ConfusionMatrix(model.config.num_labels, model.config.ignore_index)
    model.to(device).eval()
    raw = dataset.with_format(None)
    for index in range(len(raw)):
        row = raw[index]
        inputs = processor(images=[row["image"]], segmentation_maps=[row["annotation"]], return_tensors="pt")
        with torch.inference_mode():
            log_probs = predict_logits(model, inputs["pixel_values"].to(device), scales=ratios, flip=True,
                                       sliding_window={"crop_size": crop, "stride": stride})
        matrix.update(log_probs.argmax(1).cpu(), inputs["labels"])
    metrics = matrix.compute()
    return {"mean_iou": metrics["mean_iou"], "pixel_accuracy": metrics["pixel_accuracy"],
            "mean_accuracy": metrics["mean_accuracy"], "num_images": len(raw)}


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import torch
    from transformers import AutoConfig

    from hf_vitseg.data.datasets import load_hf_dataset
    from hf_vitseg.training import evaluate_model, train
    from hf_vitseg.training.recipes import linear_probe

    output_dir = Path(args.output_dir)
    backbone_config = AutoConfig.from_pretrained(args.backbone)
    patch_size, num_layers = backbone_config.patch_size, backbone_config.num_hidden_layers
    layers = [num_layers] if args.mode == "linear" else list(range(num_layers - 3, num_layers + 1))
    warmup = min(args.warmup_steps, max(args.max_steps - 1, 0))
    recipe = linear_probe(patch_size=patch_size, lr=args.lr, weight_decay=args.weight_decay, crop_size=args.crop,
                          max_steps=args.max_steps, batch_size=args.batch_size, warmup_steps=warmup)
    crop = recipe.crop_size
    if args.stride > crop:
        raise SystemExit(f"--stride {args.stride} is larger than the window {crop}: pixels would go unseen.")

    train_dataset = load_hf_dataset(args.dataset, split=args.train_split)
    eval_dataset = load_hf_dataset(args.dataset, split=args.eval_split)
    if args.eval_limit:
        eval_dataset = eval_dataset.select(range(min(args.eval_limit, len(eval_dataset))))
    processor = build_processor(patch_size, args.short_side)
    model = recipe.build_model(args.backbone, num_labels=NUM_ADE_CLASSES, backbone_out_indices=layers)
    print(f"backbone {args.backbone}, layers {layers}, crop {crop}, {args.max_steps} iterations of batch "
          f"{args.batch_size}, {len(train_dataset)} training / {len(eval_dataset)} evaluation images", flush=True)

    started = time.perf_counter()
    model, train_metrics = train(
        model, train_dataset, None, output_dir=output_dir, processor=processor, recipe=recipe,
        crop_size=crop, max_steps=args.max_steps, batch_size=args.batch_size,
        augment={"scale_range": (0.5, 2.0), "hflip": True, "photometric": True}, seed=args.seed,
        save_steps=max(args.max_steps // 10, 1), overwrite_output_dir=args.overwrite,
        dataloader_num_workers=args.num_workers, save_total_limit=1,
    )
    train_seconds = time.perf_counter() - started
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    if args.mode == "linear":
        metrics = evaluate_model(model, eval_dataset, processor=processor, sliding_window=True,
                                 crop_size=crop, stride=args.stride, device=device)
    else:
        metrics = evaluate_ms(model, eval_dataset, processor, crop, args.stride, args.ms_ratios, device)
    eval_seconds = time.perf_counter() - started

    reference = reference_figure(args.backbone, args.mode)
    result = {
        "command": "python benchmarks/ade20k_linear.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "backbone": args.backbone, "mode": args.mode, "layers": layers, "recipe": recipe.to_dict(),
        "eval_stride": args.stride, "ms_ratios": args.ms_ratios if args.mode == "ms" else None,
        "mean_iou": 100 * metrics["mean_iou"], "pixel_accuracy": 100 * metrics["pixel_accuracy"],
        "num_eval_images": metrics["num_images"], "published_mean_iou": reference,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "train_loss": train_metrics.get("train_loss"),
    }
    (output_dir / "results.json").write_text(json.dumps(result, indent=1))
    gap = f" (published: {reference})" if reference is not None else ""
    print(f"ADE20K mIoU ({args.mode}): {result['mean_iou']:.1f}{gap} on {metrics['num_images']} images; "
          f"wrote {output_dir / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
