"""`hf-vitseg evaluate`: mean IoU, pixel accuracy, mean accuracy and per-class IoU of a saved model; for a mask
transformer (head eomt / pmt) with --task instance: COCO mask AP, AP50, AP75 and PQ; --task panoptic: PQ, SQ, RQ.

    hf-vitseg evaluate --model runs/nuclei --images data/val/images --masks data/val/masks
    hf-vitseg evaluate --model runs/eomt --task instance --instance-masks --images val/images --masks val/instances
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
    check_instance_masks_for,
    check_model_folder,
    cli_message,
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
    data.add_argument("--task", choices=["semantic", "instance", "panoptic"], default=None,
                      help="a mask transformer's metrics: mIoU (semantic, default), mask AP and PQ (instance), PQ "
                           "(panoptic)")
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
    from ..training.loading import is_mask_model, load_trainable_model, resolve_processor

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
        check_instance_masks_for(args, is_mask_model(model), f"--model {source}")
        processor = resolve_processor(None, model, source)
        if args.reduce_labels:
            processor.do_reduce_labels = True
        metrics = evaluate_model(
            model, dataset, processor=processor, batch_size=args.batch_size, sliding_window=args.sliding_window,
            crop_size=crop_size, stride=stride, blend=args.blend, device=device, task=args.task,
        )
    except (ValueError, OSError) as error:
        # the data check's advice names train's flags (--num-labels, --ignore-index), which evaluate has not: the
        # saved model fixes both, so the masks must fit it
        return report("evaluate", cli_message(error).replace(TRAIN_HINT, EVALUATE_HINT))
    print(json_metrics(metrics) if args.json else format_metrics(metrics))
    return 0


TRAIN_HINT = ("Set --num-labels to the number of classes, mark unlabelled pixels with --ignore-index, or remap the "
              "mask values to 0..num_labels-1.")
EVALUATE_HINT = ("The masks must hold the --model's class ids 0..num_labels-1 (or its ignore index): remap them, or "
                 "add --instance-masks if they hold instance ids (a mask transformer's), --binary-masks if they are "
                 "0/255.")


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
    summary = sorted((name for name in metrics if not _is_per_class(name)), key=_summary_order)
    per_class = [name for name in metrics if name not in summary]
    return "\n".join(f"{name:<{width}}  {show(metrics[name])}" for name in summary + per_class)


def _is_per_class(name: str) -> bool:
    """Per-class values (`iou_<class>`, a mask model's `pq_<class>` / `ap_<class>`) come after the summary."""
    name = name.removeprefix("eval_")
    return name.startswith(("iou_", "pq_", "ap_"))


_SUMMARY_KEYS = ("mean_iou", "pixel_accuracy", "mean_accuracy", "map", "map_50", "map_75", "pq", "sq", "rq", "loss")


def _summary_order(name: str) -> tuple[int, str]:
    for rank, key in enumerate(_SUMMARY_KEYS):
        if name.removeprefix("eval_") == key or name.endswith("_" + key) and key in ("mean_iou", "loss"):
            return rank, name
    return len(_SUMMARY_KEYS), name
