"""`hf-vitseg evaluate`: mean IoU, pixel accuracy, mean accuracy and per-class IoU of a saved model.

    hf-vitseg evaluate --model runs/nuclei --images data/val/images --masks data/val/masks
    hf-vitseg evaluate --model runs/ade --dataset scene_parse_150 --split validation --reduce-labels \\
        --sliding-window --crop-size 512 --json
"""

from __future__ import annotations

import argparse
import json
import math

from .args import (
    add_data_flags,
    check_device,
    check_model_folder,
    load_dataset_from_args,
    loading,
    model_source,
    positive_int,
    report,
    size_pair,
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add `hf-vitseg evaluate`'s arguments to `parser`."""
    parser.add_argument("--model", required=True, help="folder (or Hub id) of a saved ViTSeg model")
    data = parser.add_argument_group("data (image folders or a Hugging Face dataset)")
    data.add_argument("--images", help="folder of images")
    data.add_argument("--masks", help="folder of masks, paired with the images by file name")
    data.add_argument("--split", default="validation")
    add_data_flags(data)
    inference = parser.add_argument_group("inference")
    inference.add_argument("--sliding-window", action="store_true", help="infer window by window (needs --crop-size)")
    inference.add_argument("--crop-size", type=positive_int, nargs="+", metavar="N",
                           help="window: N or H W (the training crop)")
    inference.add_argument("--stride", type=positive_int, nargs="+", metavar="N",
                           help="window step: N or H W (default 2/3 of the window)")
    inference.add_argument("--blend", choices=["uniform", "gaussian"], default="uniform")
    inference.add_argument("--batch-size", type=positive_int, default=1)
    inference.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON (NaN as null)")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics; returns the exit status."""
    from ..training.evaluation import evaluate_model
    from ..training.loading import load_trainable_model, resolve_processor

    try:
        # every argument is checked before the model loads
        source = model_source(args.model, "--model")
        crop_size, stride = size_pair(args.crop_size, "--crop-size"), size_pair(args.stride, "--stride")
        if args.sliding_window and crop_size is None:
            raise ValueError("--sliding-window needs --crop-size (the size the model was trained at, e.g. 512).")
        if (crop_size or stride) and not args.sliding_window:
            raise ValueError("--crop-size and --stride need --sliding-window.")
        device = check_device(args.device)
        check_model_folder(source, "--model")
        dataset = load_dataset_from_args(args, args.images, args.masks, args.split, "")
        with loading("--model", source, errors=(OSError, ValueError)):  # ValueError: e.g. another model type
            model = load_trainable_model(source)
        processor = resolve_processor(None, model, source)
        if args.reduce_labels:
            processor.do_reduce_labels = True
        metrics = evaluate_model(
            model, dataset, processor=processor, batch_size=args.batch_size, sliding_window=args.sliding_window,
            crop_size=crop_size, stride=stride, blend=args.blend, device=device,
        )
    except (ValueError, OSError) as error:
        return report("evaluate", error)
    print(json_metrics(metrics) if args.json else format_metrics(metrics))
    return 0


def json_metrics(metrics: dict) -> str:
    """Metrics as strict JSON: NaN (a class absent from labels and predictions) becomes `null`."""
    clean = {name: None if isinstance(value, float) and not math.isfinite(value) else value
             for name, value in metrics.items()}
    return json.dumps(clean, indent=2, allow_nan=False)


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
