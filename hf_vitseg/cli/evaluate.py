"""`hf-vitseg evaluate`: mean IoU, pixel accuracy, mean accuracy and per-class IoU of a saved model.

    hf-vitseg evaluate --model runs/nuclei --images data/val/images --masks data/val/masks
    hf-vitseg evaluate --model runs/ade --dataset scene_parse_150 --split validation --reduce-labels \\
        --sliding-window --crop-size 512 --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add `hf-vitseg evaluate`'s arguments to `parser`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("--model", required=True, help="folder (or Hub id) of a saved ViTSeg model")
    data = parser.add_argument_group("data (image folders or a Hugging Face dataset)")
    data.add_argument("--images", help="folder of images")
    data.add_argument("--masks", help="folder of masks, paired with the images by file name")
    data.add_argument("--mask-suffix", default="", help="what a mask's file name adds to its image's, e.g. _mask")
    data.add_argument("--dataset", help="Hub id, local dataset or save_to_disk folder (instead of the folders)")
    data.add_argument("--split", default="validation")
    data.add_argument("--image-column", default="image")
    data.add_argument("--annotation-column", default="annotation")
    data.add_argument("--reduce-labels", action="store_true", help="0 means 'unlabelled' (ADE20K)")
    inference = parser.add_argument_group("inference")
    inference.add_argument("--sliding-window", action="store_true", help="infer window by window (needs --crop-size)")
    inference.add_argument("--crop-size", type=int, nargs="+", metavar="N", help="window: N or H W (the training crop)")
    inference.add_argument("--stride", type=int, nargs="+", metavar="N", help="window step: N or H W (default 2/3 of the window)")
    inference.add_argument("--blend", choices=["uniform", "gaussian"], default="uniform")
    inference.add_argument("--batch-size", type=int, default=1)
    inference.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics; returns the exit status."""
    from ..training.evaluation import evaluate_model
    from ..training.loading import load_trainable_model, resolve_processor

    try:
        model = load_trainable_model(args.model)
        processor = resolve_processor(None, model, args.model)
        if args.reduce_labels:
            processor.do_reduce_labels = True
        dataset = load_dataset_from_args(args, args.images, args.masks, args.split, "")
        metrics = evaluate_model(
            model, dataset, processor=processor, batch_size=args.batch_size, sliding_window=args.sliding_window,
            crop_size=size_pair(args.crop_size, "--crop-size"), stride=size_pair(args.stride, "--stride"),
            blend=args.blend, device=args.device,
        )
    except (ValueError, OSError) as error:
        print(f"hf-vitseg evaluate: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(metrics))
    return 0


def load_dataset_from_args(args, images_dir, masks_dir, split, role: str):
    """The dataset the command line names: an image folder pair or `--dataset` with a split."""
    from ..data.datasets import load_hf_dataset, load_image_folder

    flag = f"--{role}-" if role else "--"
    if args.dataset:
        if images_dir or masks_dir:
            raise ValueError(f"Give either --dataset or {flag}images/{flag}masks, not both.")
        return load_hf_dataset(
            args.dataset, split=split, image_column=args.image_column, annotation_column=args.annotation_column
        )
    if not (images_dir and masks_dir):
        raise ValueError(f"Give {flag}images DIR and {flag}masks DIR (or --dataset NAME).")
    return load_image_folder(images_dir, masks_dir, mask_suffix=args.mask_suffix)


def format_metrics(metrics: dict) -> str:
    """Metrics as aligned `name  value` lines: the summary first, then per-class IoU (`-` for absent classes)."""
    def show(value):
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    width = max(len(name) for name in metrics)
    summary = sorted((name for name in metrics if "iou_" not in name or name.endswith("mean_iou")), key=_summary_order)
    per_class = [name for name in metrics if name not in summary]
    return "\n".join(f"{name:<{width}}  {show(metrics[name])}" for name in summary + per_class)


def _summary_order(name: str) -> tuple[int, str]:
    for rank, key in enumerate(("mean_iou", "pixel_accuracy", "mean_accuracy", "loss")):
        if name.endswith(key):
            return rank, name
    return 4, name


def size_pair(values: list[int] | None, flag: str) -> tuple[int, int] | None:
    """`N` or `H W` from the command line as `(H, W)`."""
    if values is None:
        return None
    if len(values) not in (1, 2):
        raise ValueError(f"{flag} takes one or two numbers (N or H W), got {len(values)}.")
    return (values[0], values[-1])
