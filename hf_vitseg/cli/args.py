"""What every `hf-vitseg` command shares: argument types that check a value as argparse reads it (so a bad
value stops the command before anything is loaded), the checks of `--model` / `--backbone` / `--device`,
the `-v` switch for transformers' own progress bars, and the one way a command reports a user error (one
line on stderr naming the flag, exit status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path


class CliError(ValueError):
    """A user error whose message is already written for the command line (it names the flag)."""


# Python argument spellings in messages of the library functions, and the flag that sets each on the
# command line: a CLI user must read the flag, never the Python argument.
PYTHON_TO_FLAG = {
    "on_unmatched='warn'": "--skip-unmatched",
    "mask_suffix=": "--mask-suffix ",
    "set mask_suffix,": "set --mask-suffix,",
    "Check the folders, image_glob and mask_suffix": "Check the folders and --mask-suffix",
    "images_dir=": "images folder ",
    "masks_dir=": "masks folder ",
    "image_glob=": "pattern ",
    "image_column=...": "--image-column NAME",
    "annotation_column=...": "--annotation-column NAME",
    "do_reduce_labels=True on the processor (and reduce_labels=True here)": "--reduce-labels",
    "resume=True (--resume)": "--resume",
    "overwrite_output_dir=True (--overwrite-output-dir)": "--overwrite-output-dir",
    "overwrite_output_dir (--overwrite-output-dir)": "--overwrite-output-dir",
    "resume and overwrite_output_dir exclude each other": "--resume and --overwrite-output-dir exclude each other",
    "Pass resume=True to take the last complete one": "Pass --resume without a path to take the last complete one",
    "output_dir (--output-dir)": "--output-dir",
    "another output_dir": "another --output-dir",
    "crop_size (": "--crop-size (",
    "Set num_labels to the number of classes, mark unlabelled pixels with ignore_index":
        "Set --num-labels to the number of classes, mark unlabelled pixels with --ignore-index",
    "Drop resume (--resume)": "Drop --resume",
    "pass resume=True": "pass --resume",
    "sliding_window needs crop_size": "--sliding-window needs --crop-size",
    "or pass instance_class for one class for all": "or pass --instance-class for one class for all",
    "task='instance'": "--task instance",
    "task='panoptic'": "--task panoptic",
    "task='semantic'": "--task semantic",
    "sliding_window is for pixel heads": "--sliding-window is for pixel heads",
    "train_dataset: ": "training data: ",
    "eval_dataset: ": "evaluation data: ",
    "heads (--heads)": "--heads",
    "num_labels (--num-labels) or id2label (--id2label)": "--num-labels or --id2label",
    "a smaller crop_size (--crop-size)": "a smaller --crop-size",
}


# -- argument types ------------------------------------------------------------------------------------------------
def bounded_number(kind, text: str, test, wanted: str):
    """`kind(text)`, finite and passing `test`, else an argparse error saying what was `wanted`."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value) or not test(value):
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, steps)."""
    return bounded_number(int, text, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (worker counts)."""
    return bounded_number(int, text, lambda v: v >= 0, "an integer >= 0")


def finite_float(text: str) -> float:
    """Any finite number (no nan / inf)."""
    return bounded_number(float, text, lambda v: True, "a finite number")


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, epochs, scales)."""
    return bounded_number(float, text, lambda v: v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (weight decay)."""
    return bounded_number(float, text, lambda v: v >= 0, "a finite number >= 0")


def unit_float(text: str) -> float:
    """A finite number in [0, 1] (overlay alpha)."""
    return bounded_number(float, text, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def fraction(text: str) -> float:
    """A finite number in (0, 1] (layer decay)."""
    return bounded_number(float, text, lambda v: 0 < v <= 1, "a number in (0, 1]")


def ratio(text: str) -> float:
    """A finite number in [0, 1) (warm-up ratio)."""
    return bounded_number(float, text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def json_value(text: str):
    """A JSON value given inline or as the path of a .json file."""
    path = Path(text)
    if text.endswith(".json") and path.is_file():
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text[:80]!r}") from error


def json_object(text: str) -> dict:
    """A JSON object (`{...}`) given inline or as the path of a .json file."""
    value = json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"channels\": 256}}', got {text[:80]!r}")
    return value


def size_pair(values: list[int] | None, flag: str) -> tuple[int, int] | None:
    """`N` or `H W` from the command line as `(H, W)`, each >= 1."""
    if values is None:
        return None
    if len(values) not in (1, 2):
        raise CliError(f"{flag} takes one or two numbers (N or H W), got {len(values)}.")
    if min(values) < 1:
        raise CliError(f"{flag} must be positive, got {' '.join(map(str, values))}.")
    return (values[0], values[-1])


def add_data_flags(group) -> None:
    """The data flags `train` and `evaluate` share (besides their image / mask folders and splits)."""
    group.add_argument("--mask-suffix", default="", help="what a mask's file name adds to its image's, e.g. _mask")
    group.add_argument("--skip-unmatched", action="store_true",
                       help="skip images without a mask and masks without an image (with a warning) instead of "
                            "stopping")
    group.add_argument("--dataset", help="Hub id, local dataset or save_to_disk folder (instead of the folders)")
    group.add_argument("--image-column", default="image")
    group.add_argument("--annotation-column", default="annotation")
    group.add_argument("--reduce-labels", action="store_true",
                       help="0 means 'unlabelled' (ADE20K): 0 becomes the ignore index, the rest shift down by one")
    group.add_argument("--binary-masks", action="store_true",
                       help="masks stored as 0 / 255 (black / white): 255 becomes class 1 (use with --num-labels 2)")
    group.add_argument("--instance-masks", action="store_true",
                       help="the mask folders hold instance-id maps (0 = background, one id per object; PNG or TIFF), "
                            "for mask transformers (--head eomt / pmt)")
    group.add_argument("--instance-class", type=non_negative_int, default=None, metavar="ID",
                       help="with --instance-masks: the class of every instance (default 0)")
    group.add_argument("--class-map-suffix", default=None, metavar="SUFFIX",
                       help="with --instance-masks: each mask's classes from the JSON file beside it whose name ends "
                            "so instead of the mask's extension, e.g. .json: {\"<instance id>\": <class id>}")


def add_channel_flags(group) -> None:
    """The input-channel flags of a fresh model (`train --backbone`): channel count and per-channel statistics."""
    group.add_argument("--num-channels", type=positive_int, default=None, metavar="K",
                       help="input channels when not RGB (1 = grayscale, 4, 13 = Sentinel-2, ...): the pretrained "
                            "patch embedding is adapted (timm's rule), images are taken with K channels as they are")
    group.add_argument("--image-mean", type=finite_float, nargs="+", default=None, metavar="M",
                       help="per-channel mean on the [0, 1] scale, one value per channel (or one for all)")
    group.add_argument("--image-std", type=positive_float, nargs="+", default=None, metavar="S",
                       help="per-channel standard deviation, as --image-mean")
    group.add_argument("--image-stats", choices=["auto"], default=None,
                       help="auto: compute --image-mean / --image-std from the training images (one pass; logged, "
                            "and saved in the model's config and image processor)")


CHANNEL_FLAGS = ("--num-channels", "--image-mean", "--image-std", "--image-stats")


def channel_settings(args, train_dataset) -> dict:
    """`num_channels`, `image_mean`, `image_std` for `from_pretrained_backbone` from the channel flags (only those
    given; `--image-stats auto` computes the statistics from `train_dataset`, printing them on stderr).

    Raises:
        CliError: statistics of the wrong length, only one of --image-mean / --image-std, or --image-stats with
            either (naming the flags); an image the channel count does not fit.
    """
    settings = {}
    if args.num_channels is not None:
        settings["num_channels"] = args.num_channels
    channels = args.num_channels or 3
    if args.image_stats and (args.image_mean or args.image_std):
        raise CliError("--image-stats auto computes --image-mean and --image-std from the training images; give "
                       "either --image-stats auto or both values, not both.")
    if (args.image_mean is None) != (args.image_std is None):
        given, missing = ("--image-mean", "--image-std") if args.image_std is None else ("--image-std", "--image-mean")
        raise CliError(f"{given} needs {missing} too (one value per channel each), or use --image-stats auto.")
    if args.image_mean is not None:
        for flag, values in (("--image-mean", args.image_mean), ("--image-std", args.image_std)):
            if len(values) not in (1, channels):
                raise CliError(f"{flag} has {len(values)} values for {channels} input channel(s) (--num-channels "
                               f"{channels}); give {channels} (one per channel) or 1 (for all).")
        settings["image_mean"] = list(args.image_mean) * (channels if len(args.image_mean) == 1 else 1)
        settings["image_std"] = list(args.image_std) * (channels if len(args.image_std) == 1 else 1)
    elif args.image_stats == "auto":
        from ..data.channels import channel_statistics
        from ..modeling import ViTSegImageProcessor

        try:
            mean, std = channel_statistics(train_dataset, ViTSegImageProcessor(num_channels=channels))
        except (ValueError, ImportError) as error:
            raise CliError(f"--image-stats auto: {cli_message(error)}") from error
        count = f"{len(train_dataset)} " if hasattr(train_dataset, "__len__") else ""
        print(f"hf-vitseg: --image-stats auto: {count}training images, {channels} channel(s): "
              f"image_mean {mean}, image_std {std} (saved in the model's config and image processor)",
              file=sys.stderr)
        settings["image_mean"], settings["image_std"] = mean, std
    return settings


def load_dataset_from_args(args, images_dir, masks_dir, split, role: str):
    """The dataset the command line names: an image folder pair or `--dataset` with a split; `--binary-masks`
    applied. `role` is the flags' prefix (`train`, `eval`, or `""` for `--images` / `--masks`)."""
    from ..data.datasets import binary_masks, load_hf_dataset, load_image_folder, load_instance_folder

    flag = f"--{role}-" if role else "--"
    instance_masks = getattr(args, "instance_masks", False)
    for option in ("instance_class", "class_map_suffix"):
        if getattr(args, option, None) is not None and not instance_masks:
            raise CliError(f"--{option.replace('_', '-')} describes instance masks; add --instance-masks (or drop it).")
    if instance_masks and args.binary_masks:
        raise CliError("--binary-masks and --instance-masks exclude each other: instance masks hold one id per object.")
    if args.dataset:
        if instance_masks:
            raise CliError("--instance-masks reads image folders; a --dataset says its annotations are instance maps "
                           "with an 'instance_classes' column (hf_vitseg.data.datasets.load_instance_folder).")
        if images_dir or masks_dir:
            raise CliError(f"Give either --dataset or {flag}images/{flag}masks, not both.")
        source = Path(args.dataset).expanduser()
        if not source.exists() and _looks_like_local_path(args.dataset):
            raise CliError(f"--dataset {args.dataset}: no such folder. Check the path.")
        try:
            dataset = load_hf_dataset(
                args.dataset, split=split, image_column=args.image_column, annotation_column=args.annotation_column
            )
        except (ValueError, OSError) as error:
            raise CliError(f"--dataset {args.dataset}: {cli_message(error)}") from error
    else:
        if not (images_dir and masks_dir):
            raise CliError(f"Give {flag}images DIR and {flag}masks DIR (or --dataset NAME).")
        for what, folder in (("images", images_dir), ("masks", masks_dir)):
            if not Path(folder).is_dir():
                problem = "is a file, not" if Path(folder).exists() else "no such"
                raise CliError(f"{flag}{what} {folder}: {problem} folder.")
        unmatched = "warn" if args.skip_unmatched else "error"
        if instance_masks:
            dataset = load_instance_folder(
                images_dir, masks_dir, instance_class=0 if args.instance_class is None else args.instance_class,
                class_map_suffix=args.class_map_suffix, mask_suffix=args.mask_suffix, on_unmatched=unmatched)
        else:
            dataset = load_image_folder(images_dir, masks_dir, mask_suffix=args.mask_suffix, on_unmatched=unmatched)
    return binary_masks(dataset) if args.binary_masks else dataset


def add_training_data_flags(group) -> None:
    """The data flags of the commands that train (`train`, `compare`): training and evaluation image folders or
    `--dataset` with its splits, the shared data flags (`add_data_flags`), the training crop."""
    group.add_argument("--train-images", help="folder of training images")
    group.add_argument("--train-masks", help="folder of training masks, paired with the images by file name")
    group.add_argument("--eval-images", help="folder of evaluation images")
    group.add_argument("--eval-masks", help="folder of evaluation masks")
    add_data_flags(group)
    group.add_argument("--train-split", default="train")
    group.add_argument("--eval-split", default=None, help="e.g. validation (default: no evaluation)")
    group.add_argument("--crop-size", type=positive_int, nargs="+", metavar="N",
                       help="training crop: N or H W, patch multiples")


def add_label_flags(group, ignore_index_note: str = "") -> None:
    """The class flags of a fresh head (`train --backbone`, `compare`): `--num-labels`, `--id2label`,
    `--ignore-index` (`ignore_index_note` ends the latter's help)."""
    group.add_argument("--num-labels", type=positive_int, help="number of classes (or give --id2label)")
    group.add_argument("--id2label", type=json_object, metavar="JSON",
                       help='class names: \'{"0": "bg", "1": "cell"}\' or a .json file')
    group.add_argument("--ignore-index", type=int, default=None,
                       help=f"label value that carries no label (default: 255{ignore_index_note})")


# -- paths, models, devices ----------------------------------------------------------------------------------------
def _looks_like_local_path(value: str) -> bool:
    """A Hub repo id is `name` or `owner/name`; anything else (`./x`, `/x`, `~/x`, `a/b/c`, `C:\\x`) is a path."""
    return value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1 or os.path.isabs(value)


def model_source(value: str, flag: str) -> str:
    """Check `--model` / `--backbone`: an existing folder, or something that can only be a Hub repo id.

    Raises:
        CliError: a path that does not exist, a file where a folder is expected, or a Hub id while the Hub
            is switched off (`HF_HUB_OFFLINE=1`).
    """
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise CliError(f"{flag} {value}: is a file; give the folder a model was saved to (save_pretrained).")
    if _looks_like_local_path(value):
        raise CliError(f"{flag} {value}: no such folder. Check the path.")
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        raise CliError(
            f"{flag} {value}: no such local folder, and HF_HUB_OFFLINE=1 keeps it from being read from the Hub. "
            "Give the path of a saved folder (or unset HF_HUB_OFFLINE to download it)."
        )
    return value


def add_window_flags(parser) -> None:
    """`--crop-size` and `--stride` of sliding-window inference, as `predict` and `app` take them."""
    parser.add_argument("--crop-size", type=positive_int, nargs="+", metavar="N",
                        help="window height [width], multiples of the patch size (default: the backbone's "
                             "image_size, rounded down to the patch size)")
    parser.add_argument("--stride", type=positive_int, nargs="+", metavar="N",
                        help="step between windows, height [width] (default: 2/3 of the window)")


def check_instance_masks_for(args, mask_model: bool, what: str) -> None:
    """`--instance-masks` is for mask transformers: a pixel head reading instance ids would see every background
    pixel (id 0) as unlabelled, never learn or be scored on it. One message for train and evaluate."""
    if getattr(args, "instance_masks", False) and not mask_model:
        raise CliError(f"--instance-masks is for mask transformers (--head eomt / pmt); {what} is a pixel head, for "
                       "which the background (id 0) would be ignored. For 0 / instance-id masks use --binary-masks "
                       "(background 0, every object 1) instead.")


def check_model_folder(value: str, flag: str) -> None:
    """A saved model folder given to `flag` is a complete ViTSeg model before anything loads it: `config.json`
    with model_type `vitseg` (or a LoRA folder's config), safetensors weights only (no pickle), none of them
    truncated; the error names the file."""
    from ..hub.loading import check_model_folder as check
    from ..training.lora import VITSEG_CONFIG_FILE

    folder = Path(value)
    if not folder.is_dir():
        return  # a Hub id: checked by the download
    if (folder / "adapter_config.json").is_file() and (folder / VITSEG_CONFIG_FILE).is_file():
        return  # a LoRA folder: `load_lora` reads it
    try:
        check(folder)  # the model type too: hub.loading.check_vitseg_model_type
    except (ValueError, OSError) as error:
        raise CliError(f"{flag} {value}: {error}") from error


@contextlib.contextmanager
def loading(flag: str, value, errors: tuple[type[Exception], ...] = (OSError,)) -> None:
    """Within the block, a failure to load what `flag` names (a Hub id that does not exist or cannot be
    reached, a folder transformers cannot read; `errors`: the exceptions meant, e.g. also `ValueError` for a
    model of another type) is a `CliError` that starts with the flag and its value."""
    try:
        yield
    except CliError:
        raise
    except errors as error:
        raise CliError(f"{flag} {value}: {error}") from error


def check_device(device: str | None, flag: str = "--device") -> str:
    """`device` (default: cuda when available, else cpu), refused when this torch cannot use it."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise CliError(f"{flag} {device}: not a device name; use cpu, cuda, cuda:1, mps, ...") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"{flag} {device}: this torch has no CUDA device ({torch.__version__}); use --device cpu.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise CliError(f"{flag} {device}: there are only {torch.cuda.device_count()} CUDA device(s).")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"{flag} {device}: MPS is not available here; use --device cpu.")
    return device


# -- verbosity ----------------------------------------------------------------------------------------------------
def add_verbose(parser: argparse.ArgumentParser) -> None:
    """The shared `-v/--verbose` switch."""
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show transformers' own progress bars (loading weights, writing shards) and logs")


@contextlib.contextmanager
def transformers_progress(verbose: bool):
    """Within the block, transformers' and huggingface_hub's own bars ("Loading weights", "Writing model
    shards") are hidden unless `verbose`; the previous setting comes back afterwards."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.enable_progress_bar() if verbose else logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.enable_progress_bar() if was_enabled else logging.disable_progress_bar()


# -- errors ------------------------------------------------------------------------------------------------------
def cli_message(error: BaseException | str) -> str:
    """An error's message for the command line: one line, Python argument names replaced by their flags."""
    text = str(error)
    for python, flag in PYTHON_TO_FLAG.items():
        text = text.replace(python, flag)
    return " ".join(text.split())


def report(command: str, error: BaseException | str) -> int:
    """Print `hf-vitseg COMMAND: error: MESSAGE` as one line on stderr; returns the exit status 1."""
    print(f"hf-vitseg {command}: error: {cli_message(error)}", file=sys.stderr)
    return 1
