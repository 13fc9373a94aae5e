"""`hf-vitseg predict IMAGE... --model M --out DIR`: label maps as PNG and colour overlays with a legend.

For each image `name.ext` it writes `DIR/name_labels.png`, the class id of every pixel (8-bit grayscale, or
16-bit when the model has more than 256 labels), and `DIR/name_overlay.png`, the image blended with the class
colours and a legend of the classes present. Large images: `--sliding-window` (with `--crop-size`, `--stride`,
`--blend`); test-time augmentation: `--scales 0.75 1 1.25` and `--flip`.

A mask transformer (head eomt / pmt) with `--task instance` or `--task panoptic` writes, per image,
`DIR/name_segments.png` (16-bit: 0 where no segment lies, segment `k` where the `k`-th listed segment lies),
`DIR/name_segments.json` (its segments: `id`, `label_id`, `label`, `score`, `was_fused`) and `DIR/name_overlay.png`
(every segment in its own colour with its outline, and a legend); `--threshold` is the least score a segment keeps
(default: the post-processing's, 0.5 instance, 0.8 panoptic). Without `--task` (or with `semantic`) it writes the
label map and overlay as for any model. `--task instance --sliding-window --crop-size N` finds instances window by
window (N: the crop the model was trained at; windows half a window apart unless `--stride`; each instance comes
from the window nearest its centre, `hf_vitseg.inference.sliding_window_instances`): a mask transformer's queries,
trained on crops, miss most objects of an image many crops large when asked for all of them at once.

Every image is decoded before the model loads, so an unreadable file stops the run before anything is written;
the output folder is held by one run at a time (a second run into it fails at once), an earlier run's outputs
are replaced only with `--overwrite`, and a file predict did not write is never replaced. An image larger than
`MAX_PLAIN_TOKENS` patch tokens (about 1800 x 1800 pixels at patch size 14) is predicted with sliding windows even
without `--sliding-window`, with a one-line notice: one attention pass over all its tokens grows with their square.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .args import (
    CliError,
    add_window_flags,
    check_device,
    check_model_folder,
    loading,
    model_source,
    non_negative_int,
    positive_float,
    positive_int,
    report,
    size_pair,
    unit_float,
)

# Above this many patch tokens (after the processor, at the largest --scales) one image is predicted with sliding
# windows even without --sliding-window: self-attention grows with the square of the tokens. Measured with a
# ViT-S/14 on 2 CPU cores: 10,000 tokens 88 s in one pass vs 113 s in 518-pixel windows, 22,500 tokens 375 s vs
# 229 s; a 6000 x 4000 photo (~120,000 tokens) did not finish one pass in 300 s.
MAX_PLAIN_TOKENS = 16_384


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                        help="image files (any format PIL reads; TIFF with every channel, via tifffile)")
    parser.add_argument("--model", required=True, help="a saved model folder or a Hub repo id")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    parser.add_argument("--sliding-window", action="store_true", help="predict window by window (large images; a mask "
                        "transformer's instances with --task instance)")
    add_window_flags(parser)
    parser.add_argument("--blend", choices=["uniform", "gaussian"], default="gaussian",
                        help="how overlapping windows are averaged (default: gaussian)")
    parser.add_argument("--window-batch-size", type=positive_int, default=1, help="windows per forward pass")
    parser.add_argument("--scales", type=positive_float, nargs="+", default=[1.0], metavar="S",
                        help="test-time scales, e.g. 0.75 1 1.25 (probabilities are averaged)")
    parser.add_argument("--flip", action="store_true", help="also predict the mirrored image (test-time augmentation)")
    parser.add_argument("--alpha", type=unit_float, default=0.5, help="weight of the class colours in the overlay")
    parser.add_argument("--display-channels", type=non_negative_int, nargs="+", default=None, metavar="C",
                        help="which image channels the overlay shows: three (as red, green, blue) or one (grey), "
                             "counted from 0 (default: the first three, or the first for fewer than 3)")
    parser.add_argument("--task", choices=["semantic", "instance", "panoptic"], default=None,
                        help="mask transformers (head eomt / pmt): instance or panoptic segments (segment map, "
                             "segments JSON, instance overlay) instead of the class map (default semantic)")
    parser.add_argument("--threshold", type=unit_float, default=None,
                        help="with --task instance / panoptic: the least score a segment keeps (default 0.5 / 0.8)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier predict run in --out (never other files)")


def read_image(path: str | Path) -> Image.Image | np.ndarray:
    """Open and fully decode an image: a PIL image (EXIF orientation applied), or for TIFF files a NumPy array with
    every channel (`hf_vitseg.data.channels.read_image_file`); a `ValueError` naming the file if it cannot be."""
    from ..data.channels import read_image_file

    try:
        return read_image_file(path)
    except ImportError as error:  # a TIFF that needs tifffile
        raise ValueError(str(error)) from error


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


def segment_output_paths(images: list[Path], out: Path) -> list[tuple[Path, Path, Path]]:
    """`(segments.png, overlay.png, segments.json)` for each image (`--task instance / panoptic`)."""
    return [(labels.with_name(f"{image.stem}_segments.png"), overlay, labels.with_name(f"{image.stem}_segments.json"))
            for image, (labels, overlay) in zip(images, output_paths(images, out))]


def predict_segments(model, processor, image, task: str, threshold: float | None = None, device=None,
                     sliding_window: dict | None = None, large_image_window: dict | None = None):
    """Instance or panoptic segments of one image, at its size: `(segment_map, segments)`, the map `(H, W)` int32
    with 0 where no segment lies and `k` on the `k`-th segment of `segments` (transformers' `segments_info`
    entries, `id` renumbered to `k`). Padding is cut exactly (the processor's `input_boxes`).

    With `sliding_window` (`crop_size`, `stride`, `batch_size`), or `large_image_window` and an image of more than
    `MAX_PLAIN_TOKENS` patch tokens (with a one-line notice), instances are found window by window
    (`hf_vitseg.inference.sliding_window_instances`) at the processor's resolution, and the segment map is resized
    to the image by nearest neighbour when the processor resized it. Panoptic segments are whole-image only (stuff
    spans windows): `sliding_window` with task panoptic is a `ValueError`."""
    import torch

    height, width = image_size(image, processor)
    inputs = processor(image, return_input_sizes=True, return_tensors="pt")
    inputs.pop("input_sizes")
    input_boxes = inputs.pop("input_boxes")
    parameter = next(model.parameters())
    device = parameter.device if device is None else torch.device(device)
    pixel_values = inputs["pixel_values"]
    kwargs = {} if threshold is None else {"threshold": threshold}
    if task == "panoptic" and sliding_window is not None:
        raise ValueError("panoptic segments are predicted from whole images (a stuff segment spans windows); use "
                         "task instance for sliding windows, or drop sliding_window.")
    tokens = pixel_values.shape[-2] * pixel_values.shape[-1] // model.size_divisor ** 2
    if task == "instance" and sliding_window is None and large_image_window is not None and tokens > MAX_PLAIN_TOKENS:
        _notice_large_image(width, height, tokens, large_image_window)
        sliding_window = large_image_window
    if sliding_window is not None:
        from ..inference.sliding_window import sliding_window_instances

        result = sliding_window_instances(
            model, processor, pixel_values, crop_size=sliding_window["crop_size"], stride=sliding_window["stride"],
            batch_size=sliding_window.get("batch_size", 1), input_boxes=input_boxes, device=device, **kwargs)[0]
    else:
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values.to(device, parameter.dtype))
        post_process = getattr(processor, f"post_process_{task}_segmentation")
        result = post_process(outputs, target_sizes=[(height, width)], input_boxes=input_boxes,
                              padded_size=tuple(pixel_values.shape[-2:]), **kwargs)[0]
    segmentation = torch.as_tensor(result["segmentation"]).long().cpu().numpy()
    if segmentation.shape != (height, width):  # windows: found at the processor's size, which resized the image
        segmentation = np.asarray(Image.fromarray(segmentation.astype(np.int32)).resize((width, height),
                                                                                        Image.Resampling.NEAREST))
    segment_map = np.zeros(segmentation.shape, dtype=np.int32)
    segments = []
    for number, info in enumerate(result["segments_info"], start=1):
        segment_map[segmentation == int(info["id"])] = number
        segments.append({**{key: (value.item() if hasattr(value, "item") else value) for key, value in info.items()},
                         "id": number})
    return segment_map, segments


def label_map_image(label_map: np.ndarray, num_labels: int) -> Image.Image:
    """The label map as an 8-bit grayscale image, or 16-bit when there are more than 256 labels."""
    if num_labels <= 256:
        return Image.fromarray(label_map.astype(np.uint8), mode="L")
    if num_labels > 65536:
        raise ValueError(f"{num_labels} labels do not fit a 16-bit PNG.")
    return Image.fromarray(label_map.astype(np.uint16))  # mode I;16, saved as a 16-bit PNG


def predict_label_map(model, processor, image: Image.Image | np.ndarray, scales=(1.0,), flip=False,
                      sliding_window=None, device=None, large_image_window=None) -> np.ndarray:
    """The `(height, width)` class-id map of one image (PIL, or an array in the processor's layout rule), at the
    image's size.

    Plain inference unless `scales` / `flip` / `sliding_window` ask for more (see
    `hf_vitseg.inference.predict_logits`). The processor's padding is cut away exactly. With
    `large_image_window` (sliding-window settings), an image of more than `MAX_PLAIN_TOKENS` patch tokens (at
    the largest scale) is predicted window by window, with a one-line notice on stderr. A mask transformer (head
    eomt / pmt) predicts whole images (its semantic post-processing; `large_image_window` unused) and refuses
    `sliding_window`, `scales` and `flip` with a `ValueError`.
    """
    import torch

    from ..inference.tta import predict_logits

    height, width = image_size(image, processor)
    inputs = processor(image, return_input_sizes=True, return_tensors="pt")
    inputs.pop("input_sizes")
    input_boxes = inputs.pop("input_boxes")  # the exact geometry, for padded and centre-cropped inputs alike
    pixel_values = inputs["pixel_values"]
    parameter = next(model.parameters())
    device = parameter.device if device is None else torch.device(device)
    if getattr(model.config, "is_mask_transformer", False):  # eomt / pmt: whole images, semantic post-processing
        if sliding_window is not None or tuple(scales) != (1.0,) or flip:
            raise ValueError("sliding_window is for pixel heads: a mask transformer (head eomt / pmt) predicts whole "
                             "images, without sliding windows or test-time augmentation (scales, flip). Drop them.")
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values.to(device, parameter.dtype))
        return processor.post_process_semantic_segmentation(
            outputs, target_sizes=[(height, width)], input_boxes=input_boxes,
            padded_size=tuple(pixel_values.shape[-2:]),
        )[0].cpu().numpy()
    tokens = pixel_values.shape[-2] * pixel_values.shape[-1] * max(scales) ** 2 // model.size_divisor ** 2
    if sliding_window is None and large_image_window is not None and tokens > MAX_PLAIN_TOKENS:
        _notice_large_image(width, height, tokens, large_image_window)
        sliding_window = large_image_window
    if sliding_window is None and tuple(scales) == (1.0,) and not flip:
        with torch.no_grad():
            logits = model(pixel_values=pixel_values.to(device, parameter.dtype)).logits.float().cpu()
    else:
        logits = predict_logits(model, pixel_values.to(parameter.dtype), scales=tuple(scales), flip=flip,
                                sliding_window=sliding_window, device=device).float().cpu()
    label_map = processor.post_process_semantic_segmentation(
        logits, target_sizes=[(height, width)], input_boxes=input_boxes,
        padded_size=tuple(pixel_values.shape[-2:]),
    )[0]
    return label_map.numpy()


def _notice_large_image(width: int, height: int, tokens: float, window: dict) -> None:
    """The one-line notice that an image too large for one pass is predicted in windows."""
    from tqdm.auto import tqdm

    crop = "x".join(map(str, window["crop_size"]))
    tqdm.write(f"hf-vitseg predict: {width}x{height} is {int(tokens):,} patch tokens (more than {MAX_PLAIN_TOKENS:,}): "
               f"predicting it in sliding {crop} windows (--sliding-window --crop-size to choose).", file=sys.stderr)


def image_size(image: Image.Image | np.ndarray, processor) -> tuple[int, int]:
    """`(height, width)` of a PIL image, or of an array read by the processor's channel-layout rule."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return tuple(processor.image_channels_first(image).shape[1:])


def display_image(image: Image.Image | np.ndarray, processor) -> Image.Image | np.ndarray:
    """What an overlay shows of `image`: a PIL image as it is; an array channels-last (`(H, W, C)`, the processor's
    layout rule), in its own dtype, for `overlay(..., display_channels=...)` to pick from."""
    if isinstance(image, Image.Image):
        return image
    return np.moveaxis(processor.image_channels_first(image), 0, -1)


def _sliding_window_settings(args, model, force: bool = False,
                             stride_fraction: tuple[int, int] = (2, 3)) -> dict | None:
    """The sliding-window settings `args` ask for (`force`: the defaults even without `--sliding-window`); without
    `--stride`, windows `numerator / denominator` (`stride_fraction`) of a window apart."""
    if not (args.sliding_window or force):
        if args.crop_size or args.stride:
            raise ValueError("--crop-size and --stride need --sliding-window.")
        return None
    divisor = model.size_divisor
    crop = size_pair(args.crop_size, "--crop-size")
    if crop is None:
        image_size = getattr(model.config.backbone_config, "image_size", 518)
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        crop = (max(divisor, image_size // divisor * divisor),) * 2
    stride = size_pair(args.stride, "--stride") or tuple(max(1, side * stride_fraction[0] // stride_fraction[1])
                                                         for side in crop)
    from ..inference.sliding_window import check_window

    try:  # before the first image: the flags' error, not the image's
        check_window(crop, stride, divisor)
    except ValueError as error:
        raise CliError(str(error).replace("crop_size (", "--crop-size (").replace("stride (", "--stride (")) from None
    return {"crop_size": crop, "stride": stride, "blend": args.blend, "batch_size": args.window_batch_size}


# In --out: the lock a run holds while it writes, and the list of the files predict wrote there.
LOCK_FILE = ".hf_vitseg_predict.lock"
OUTPUTS_MANIFEST = ".hf_vitseg_predict.json"


@contextlib.contextmanager
def claim_output_folder(out: Path, paths: list[Path], overwrite: bool = False):
    """Hold the output folder `out` for one run that writes `paths` (files in `out`), or raise at once.

    The claim is a lock file created with `O_EXCL`, so of two runs into one folder the second fails. Files
    of an earlier run (listed in `OUTPUTS_MANIFEST`) are an error unless `overwrite`; then those this run does
    not rewrite are deleted when it succeeds, so the folder never mixes two runs' outputs. A file at one of
    `paths` that predict did not write is never replaced.

    Args:
        out: the output folder (`--out`), created if needed (and removed again if the run writes nothing).
        paths: the files the run will write.
        overwrite: `--overwrite`: replace an earlier run's outputs.
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise FileExistsError(f"--out {out} is in use by another hf-vitseg predict run ({_lock_owner(lock)}); wait "
                              f"for it to end or choose another --out.") from None
    with os.fdopen(descriptor, "w") as handle:
        handle.write(str(os.getpid()))
    manifest = out / OUTPUTS_MANIFEST
    names = [path.name for path in paths]
    earlier = _read_outputs(manifest)
    succeeded = False
    try:
        foreign = [name for name in names if (out / name).exists() and name not in earlier]
        if foreign:
            raise FileExistsError(f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''} already exist in "
                                  f"--out {out} and hf-vitseg predict did not write them; move them away or choose "
                                  "another --out.")
        if earlier and not overwrite:
            raise FileExistsError(f"{', '.join(earlier[:5])}{' ...' if len(earlier) > 5 else ''} already exist in "
                                  f"--out {out}, from an earlier predict run; pass --overwrite to replace them, or "
                                  "choose another --out.")
        # claimed before they are written: a run killed midway leaves outputs an --overwrite can still remove
        _write_outputs(manifest, earlier + [name for name in names if name not in earlier])
        yield
        succeeded = True
    finally:
        if succeeded:
            for name in earlier:
                if name not in names:
                    (out / name).unlink(missing_ok=True)
            _write_outputs(manifest, names)
        else:
            left = [name for name in dict.fromkeys(earlier + names) if (out / name).exists()]
            _write_outputs(manifest, left) if left else manifest.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()


def _read_outputs(manifest: Path) -> list[str]:
    """The files an earlier run recorded in `manifest` that are still there (plain names, nothing else)."""
    try:
        names = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [n for n in names if isinstance(n, str) and n == Path(n).name and (manifest.parent / n).is_file()]


def _write_outputs(manifest: Path, names: list[str]) -> None:
    temporary = manifest.with_name(manifest.name + ".tmp")
    temporary.write_text(json.dumps({"files": names}, indent=1) + "\n")
    os.replace(temporary, manifest)


def _lock_owner(lock: Path) -> str:
    """Who holds `lock`, for the message: its process, and whether that process still runs."""
    try:
        pid = int(lock.read_text())
    except (OSError, ValueError):
        return f"lock file {lock}"
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return f"process {pid}, which no longer runs: if no run is writing there, delete {lock}"
    except OSError:  # PermissionError: another user's process, running
        pass
    return f"process {pid}"


def run(args: argparse.Namespace) -> int:
    """Run `predict`; returns 0 on success, 1 (with the reason on stderr) on bad input."""
    try:
        if args.out.exists() and not args.out.is_dir():
            raise CliError(f"--out {args.out}: is a file; give a folder (created if needed).")
        paths = (segment_output_paths if args.task in ("instance", "panoptic") else output_paths)(
            list(args.images), args.out)
        with claim_output_folder(args.out, [p for pair in paths for p in pair], overwrite=args.overwrite):
            return _run(args)
    except (ValueError, OSError) as error:
        return report("predict", error)


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..hub.loading import load_image_processor, load_model
    from ..inference.overlays import check_display_channels, overlay

    paths = output_paths(list(args.images), args.out)  # the folder is claimed for them (`run`)
    for path in args.images:  # decode everything first: fail before loading the model or writing anything
        read_image(path)
    # every argument is checked before the model loads
    source = model_source(args.model, "--model")
    check_model_folder(source, "--model")
    device = check_device(args.device)
    if not args.sliding_window and (args.crop_size or args.stride):
        raise CliError("--crop-size and --stride need --sliding-window.")
    size_pair(args.crop_size, "--crop-size")
    size_pair(args.stride, "--stride")

    if args.threshold is not None and args.task not in ("instance", "panoptic"):
        raise CliError("--threshold is the least score of an instance / panoptic segment: add --task instance or "
                       "--task panoptic (a mask transformer's), or drop it.")

    with loading("--model", source, errors=(OSError, ValueError)):  # ValueError: e.g. a Hub model of another type
        model = load_model(source, device=device)
    processor = load_image_processor(source, model)
    if getattr(model.config, "is_mask_transformer", False):
        return _run_mask_model(args, model, processor, device)
    if args.task not in (None, "semantic"):
        raise CliError(f"--task {args.task} needs a mask transformer (head eomt or pmt); --model {args.model} has head "
                       f"{model.config.head!r}, which segments semantically. Drop --task.")
    if args.display_channels is not None:  # before the first image: the flag's error, not the image's
        try:
            check_display_channels(args.display_channels, processor.num_channels)
        except ValueError as error:
            raise CliError(f"--display-channels: {error}") from None
    sliding_window = _sliding_window_settings(args, model)
    large_image_window = _sliding_window_settings(args, model, force=True)
    num_labels = model.config.num_labels
    args.out.mkdir(parents=True, exist_ok=True)
    progress = tqdm(list(zip(args.images, paths)), desc="predict", unit="image", file=sys.stderr)
    for image_path, (labels_path, overlay_path) in progress:
        image = read_image(image_path)
        try:
            label_map = predict_label_map(model, processor, image, scales=args.scales, flip=args.flip,
                                          sliding_window=sliding_window, device=device,
                                          large_image_window=large_image_window)
        except ValueError as error:  # e.g. the processor refusing the pixels: name the file
            raise ValueError(f"{image_path}: {error}") from error
        label_map_image(label_map, num_labels).save(labels_path)
        picture = overlay(display_image(image, processor), label_map, alpha=args.alpha,
                          id2label=model.config.id2label, ignore_index=None, display_channels=args.display_channels)
        picture.save(overlay_path)
        tqdm.write(f"{image_path} -> {labels_path}, {overlay_path}", file=sys.stdout)
    return 0


def _run_mask_model(args: argparse.Namespace, model, processor, device) -> int:
    """`predict` for a mask transformer: the class map (semantic) or segments (instance / panoptic) of whole images."""
    from tqdm.auto import tqdm

    from ..inference.overlays import check_display_channels, overlay, overlay_instances

    task = args.task or "semantic"
    refused = [flag for flag, used in (("--scales", args.scales != [1.0]), ("--flip", args.flip)) if used]
    if refused:
        raise CliError(f"{', '.join(refused)}: a mask transformer (head {model.config.head}) predicts without "
                       "test-time augmentation. Drop them.")
    if args.sliding_window and task != "instance":
        raise CliError(f"--sliding-window with a mask transformer (head {model.config.head}) finds instances window "
                       f"by window: add --task instance, or drop --sliding-window (--task {task} predicts whole "
                       "images).")
    # instances in windows: half a window apart by default, so an object up to half a window across is whole in
    # the window nearest its centre (`sliding_window_instances`)
    sliding_window = _sliding_window_settings(args, model, stride_fraction=(1, 2))
    large_image_window = _sliding_window_settings(args, model, force=True, stride_fraction=(1, 2))
    if args.display_channels is not None:
        try:
            check_display_channels(args.display_channels, processor.num_channels)
        except ValueError as error:
            raise CliError(f"--display-channels: {error}") from None
    id2label = model.config.id2label
    images = list(args.images)
    paths = segment_output_paths(images, args.out) if task != "semantic" else output_paths(images, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    progress = tqdm(list(zip(images, paths)), desc="predict", unit="image", file=sys.stderr)
    for image_path, written in progress:
        image = read_image(image_path)
        shown = display_image(image, processor)
        try:
            if task == "semantic":
                label_map = predict_label_map(model, processor, image, device=device)
            else:
                segment_map, segments = predict_segments(model, processor, image, task, args.threshold, device,
                                                         sliding_window=sliding_window,
                                                         large_image_window=large_image_window)
        except ValueError as error:  # e.g. the processor refusing the pixels: name the file
            raise ValueError(f"{image_path}: {error}") from error
        if task == "semantic":
            label_map_image(label_map, model.config.num_labels).save(written[0])
            overlay(shown, label_map, alpha=args.alpha, id2label=id2label, ignore_index=None,
                    display_channels=args.display_channels).save(written[1])
        else:
            segments_path, overlay_path, json_path = written
            Image.fromarray(segment_map.astype(np.uint16)).save(segments_path)  # 16-bit: up to 65535 segments
            for segment in segments:
                segment["label"] = str(id2label.get(segment["label_id"], segment["label_id"]))
            temporary = json_path.with_name(json_path.name + ".tmp")
            temporary.write_text(json.dumps({"task": task, "segments": segments}, indent=1) + "\n")
            os.replace(temporary, json_path)
            overlay_instances(shown, segment_map, segments, id2label=id2label, alpha=args.alpha, legend=True,
                              display_channels=args.display_channels).save(overlay_path)
        tqdm.write(f"{image_path} -> {', '.join(str(path) for path in written)}", file=sys.stdout)
    return 0
