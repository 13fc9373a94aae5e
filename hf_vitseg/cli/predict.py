"""`hf-vitseg predict IMAGE... --model M --out DIR`: label maps as PNG and colour overlays with a legend.

For each image `name.ext` it writes `DIR/name_labels.png`, the class id of every pixel (8-bit grayscale, or
16-bit when the model has more than 256 labels), and `DIR/name_overlay.png`, the image blended with the class
colours and a legend of the classes present. Large images: `--sliding-window` (with `--crop-size`, `--stride`,
`--blend`); test-time augmentation: `--scales 0.75 1 1.25` and `--flip`.

Every image is decoded before the model loads, so an unreadable file stops the run before anything is written;
existing outputs are never replaced without `--overwrite`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (any format PIL reads)")
    parser.add_argument("--model", required=True, help="a saved model folder or a Hub repo id")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    parser.add_argument("--sliding-window", action="store_true", help="predict window by window (large images)")
    parser.add_argument("--crop-size", type=int, nargs="+", metavar="N",
                        help="window height [width], multiples of the patch size (default: the backbone's "
                             "image_size, rounded down to the patch size)")
    parser.add_argument("--stride", type=int, nargs="+", metavar="N",
                        help="step between windows, height [width] (default: 2/3 of the window)")
    parser.add_argument("--blend", choices=["uniform", "gaussian"], default="gaussian",
                        help="how overlapping windows are averaged (default: gaussian)")
    parser.add_argument("--window-batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                        help="test-time scales, e.g. 0.75 1 1.25 (probabilities are averaged)")
    parser.add_argument("--flip", action="store_true", help="also predict the mirrored image (test-time augmentation)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the class colours in the overlay")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def read_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image (EXIF orientation applied); a `ValueError` naming the file if it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image {path} does not exist.")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not halfway through the run
            return ImageOps.exif_transpose(image)
    except Exception as error:  # UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
        raise ValueError(f"Cannot decode image {path}: {error}") from error


def output_paths(images: list[Path], out: Path) -> list[tuple[Path, Path]]:
    """`(labels.png, overlay.png)` for each image; an error when two images would write the same files."""
    paths, owners = [], {}
    for image in images:
        if image.stem in owners:
            raise ValueError(f"{owners[image.stem]} and {image} would both write {out / image.stem}_*.png; "
                             "predict them into different --out folders.")
        owners[image.stem] = image
        paths.append((out / f"{image.stem}_labels.png", out / f"{image.stem}_overlay.png"))
    return paths


def label_map_image(label_map: np.ndarray, num_labels: int) -> Image.Image:
    """The label map as an 8-bit grayscale image, or 16-bit when there are more than 256 labels."""
    if num_labels <= 256:
        return Image.fromarray(label_map.astype(np.uint8), mode="L")
    if num_labels > 65536:
        raise ValueError(f"{num_labels} labels do not fit a 16-bit PNG.")
    return Image.fromarray(label_map.astype(np.uint16))  # mode I;16, saved as a 16-bit PNG


def _pair(values: list[int] | None, name: str) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2):
        raise ValueError(f"--{name} takes one or two integers, got {values}.")
    return (values[0], values[-1])


def predict_label_map(model, processor, image: Image.Image, scales=(1.0,), flip=False, sliding_window=None,
                      device=None) -> np.ndarray:
    """The `(height, width)` class-id map of one PIL image, at the image's size.

    Plain inference unless `scales` / `flip` / `sliding_window` ask for more (see
    `hf_vitseg.inference.predict_logits`). The processor's padding is cut away exactly.
    """
    import torch

    from ..inference.tta import predict_logits

    inputs = processor(image, return_input_sizes=True, return_tensors="pt")
    input_sizes = inputs.pop("input_sizes")
    pixel_values = inputs["pixel_values"]
    parameter = next(model.parameters())
    device = parameter.device if device is None else torch.device(device)
    if sliding_window is None and tuple(scales) == (1.0,) and not flip:
        with torch.no_grad():
            logits = model(pixel_values=pixel_values.to(device, parameter.dtype)).logits.float().cpu()
    else:
        logits = predict_logits(model, pixel_values.to(parameter.dtype), scales=tuple(scales), flip=flip,
                                sliding_window=sliding_window, device=device).float().cpu()
    label_map = processor.post_process_semantic_segmentation(
        logits, target_sizes=[(image.height, image.width)], input_sizes=input_sizes,
        padded_size=tuple(pixel_values.shape[-2:]),
    )[0]
    return label_map.numpy()


def _sliding_window_settings(args, model) -> dict | None:
    if not args.sliding_window:
        if args.crop_size or args.stride:
            raise ValueError("--crop-size and --stride need --sliding-window.")
        return None
    from ..export import size_divisor

    divisor = size_divisor(model)
    crop = _pair(args.crop_size, "crop-size")
    if crop is None:
        image_size = getattr(model.config.backbone_config, "image_size", 518)
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        crop = (max(divisor, image_size // divisor * divisor),) * 2
    stride = _pair(args.stride, "stride") or tuple(max(1, 2 * side // 3) for side in crop)
    return {"crop_size": crop, "stride": stride, "blend": args.blend, "batch_size": args.window_batch_size}


def run(args: argparse.Namespace) -> int:
    """Run `predict`; returns 0 on success, 1 (with the reason on stderr) on bad input."""
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"hf-vitseg predict: error: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..hub.loading import load_image_processor, load_model
    from ..inference.overlay import overlay

    paths = output_paths(list(args.images), args.out)
    if not args.overwrite:
        existing = [str(p) for pair in paths for p in pair if p.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(existing[:5])}{' ...' if len(existing) > 5 else ''} already "
                                  "exist; pass --overwrite to replace them, or choose another --out.")
    for path in args.images:  # decode everything first: fail before loading the model or writing anything
        read_image(path)
    if any(scale <= 0 for scale in args.scales):
        raise ValueError(f"--scales must be positive, got {args.scales}.")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device=device)
    processor = load_image_processor(args.model, model)
    sliding_window = _sliding_window_settings(args, model)
    num_labels = model.config.num_labels
    args.out.mkdir(parents=True, exist_ok=True)
    for image_path, (labels_path, overlay_path) in zip(args.images, paths):
        image = read_image(image_path)
        label_map = predict_label_map(model, processor, image, scales=args.scales, flip=args.flip,
                                      sliding_window=sliding_window, device=device)
        label_map_image(label_map, num_labels).save(labels_path)
        picture = overlay(image, label_map, alpha=args.alpha, id2label=model.config.id2label, ignore_index=None)
        picture.save(overlay_path)
        print(f"{image_path} -> {labels_path}, {overlay_path}")
    return 0
