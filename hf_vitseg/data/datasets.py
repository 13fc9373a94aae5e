"""Datasets for semantic segmentation: `datasets.Dataset`s with an `image` and an `annotation` column.

- `load_image_folder(images_dir, masks_dir)`: a local folder of images and one of masks, paired by file name.
- `load_instance_folder(images_dir, masks_dir)`: the same with instance-id masks (and a class per instance), for
  mask-classification models (`ViTSegForUniversalSegmentation`).
- `load_hf_dataset(name_or_dataset)`: any Hugging Face dataset (or a `save_to_disk` folder), its image and mask
  columns renamed to `image` / `annotation` (the `scene_parse_150` names are the default).
- `validate_dataset(dataset, num_labels, ignore_index)`: scans every sample before training; a clear error names the
  first bad sample (undecodable or truncated image, NaN / inf pixels, size mismatch, out-of-range value,
  colour-coded mask, empty dataset, 0 / 255 masks that would ignore the foreground).
- `binary_masks(dataset)`: 0 / 255 masks mapped to class ids 0 / 1.
- `prepare_datasets(train, eval, processor, crop_size)`: sets the lazy `SegmentationTransform`s.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from io import BytesIO
from pathlib import Path

import datasets
import numpy as np
from PIL import ExifTags, Image

from ..modeling.image_processing_vitseg import ViTSegImageProcessor
from ..modeling.image_processing_vitseg import reduce_labels as _reduce_labels
from .augment import INSTANCE_CLASSES_COLUMN, SegmentationTransform, instance_mapping
from .channels import decode_image, is_tiff

IMAGE_COLUMN = "image"
ANNOTATION_COLUMN = "annotation"
# Files with any other extension (and hidden files) are not images: they are ignored, never paired or reported.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
# How many file names an unmatched-files report lists before summarising.
_MAX_LISTED = 20
# EXIF orientations that swap width and height (datasets applies exif_transpose when decoding).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
# Reads masks by the processor's rule (one channel of integer class indices).
_MASK_READER = ViTSegImageProcessor()


# --------------------------------------------------------------------------------------------------
# A local folder of images and masks
# --------------------------------------------------------------------------------------------------


def load_image_folder(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    *,
    image_glob: str = "*",
    mask_suffix: str = "",
    on_unmatched: str = "error",
) -> datasets.Dataset:
    r"""
    Pair images with masks by file name and return a `datasets.Dataset` with `image` and `annotation` columns
    (both `datasets.Image()` features, files read lazily from disk).

    An image `images_dir/<name>.<ext>` pairs with the mask `masks_dir/<name><mask_suffix>.<ext2>`: the names
    without extension must agree, the extensions may differ (`cat.jpg` <-> `cat.png`, or `cat_mask.png` with
    `mask_suffix="_mask"`). When `image_glob` reaches into subfolders (it contains `/` or `**`), the path relative
    to the folder is the name, so `train/cat.jpg` pairs with `masks_dir/train/cat.png`; otherwise only the top
    level of each folder is read. Images and masks may share one folder when
    `mask_suffix` is set: then the files ending in it are the masks.

    Only image files count (extensions in `IMAGE_EXTENSIONS`; hidden files skipped). Files without a partner are
    never dropped silently: `on_unmatched="error"` (default) raises a `ValueError` listing them and how to fix the
    pairing; `on_unmatched="warn"` skips them with a warning that lists them. A mask whose image exists but is
    excluded by `image_glob` is left out without a report (the glob chose that).

    Args:
        images_dir (`str` or `os.PathLike`): folder of images.
        masks_dir (`str` or `os.PathLike`): folder of masks (one channel of class indices: PIL modes `L`, `P`, `I`,
            `I;16`, `1`). May be `images_dir` when `mask_suffix` is set.
        image_glob (`str`, defaults to `"*"`): which images to take, relative to `images_dir` (`"*.jpg"`,
            `"**/*.png"`).
        mask_suffix (`str`, defaults to `""`): what a mask's name adds to its image's name, before the extension.
        on_unmatched (`str`, defaults to `"error"`): `"error"` or `"warn"`, see above.

    Returns:
        `datasets.Dataset` with one row per pair, sorted by name.

    Raises:
        `FileNotFoundError` for a missing folder; `ValueError` for unmatched files (`on_unmatched="error"`), two
        files with one name (`cat.jpg` and `cat.png`), or no pair at all.
    """
    if on_unmatched not in ("error", "warn"):
        raise ValueError(f'`on_unmatched` must be "error" or "warn", got {on_unmatched!r}.')
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for what, folder in (("images_dir", images_dir), ("masks_dir", masks_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} {str(folder)!r} is not an existing folder.")
    shared_folder = images_dir.resolve() == masks_dir.resolve()
    if shared_folder and not mask_suffix:
        raise ValueError(
            f"images_dir and masks_dir are the same folder ({str(images_dir)!r}), so images and masks cannot be told "
            "apart; pass mask_suffix (e.g. mask_suffix='_mask' for 'cat.png' + 'cat_mask.png') or move the masks."
        )

    # A glob that reaches into subfolders makes names relative paths, and subfolders are searched for masks.
    recursive = "**" in image_glob or "/" in image_glob
    every_file = "**/*" if recursive else "*"

    def is_mask_name(key: str) -> bool:
        return shared_folder and key.endswith(mask_suffix)

    all_image_keys = {_name_key(path, images_dir) for path in _image_files(images_dir, every_file)}
    all_image_keys = {key for key in all_image_keys if not is_mask_name(key)}
    images = _by_key(
        [path for path in _image_files(images_dir, image_glob) if not is_mask_name(_name_key(path, images_dir))],
        images_dir,
        "images",
    )
    mask_candidates = _image_files(masks_dir, every_file)
    if shared_folder:
        mask_candidates = [path for path in mask_candidates if is_mask_name(_name_key(path, masks_dir))]

    masks, unmatched_masks = {}, []
    for path in mask_candidates:
        key = _name_key(path, masks_dir)
        if mask_suffix and not key.endswith(mask_suffix):
            unmatched_masks.append(path)
            continue
        image_key = key[: len(key) - len(mask_suffix)]
        if image_key in images:
            masks.setdefault(image_key, []).append(path)
        elif image_key not in all_image_keys:
            unmatched_masks.append(path)
    duplicates = {key: paths for key, paths in masks.items() if len(paths) > 1}
    if duplicates:
        raise ValueError(_duplicates_message(duplicates, "masks"))

    keys = sorted(set(images) & set(masks))
    unmatched_images = [images[key] for key in sorted(set(images) - set(masks))]
    if unmatched_images or unmatched_masks:
        report = _unmatched_report(
            unmatched_images, sorted(unmatched_masks), images_dir, masks_dir, mask_suffix, all_image_keys
        )
        if on_unmatched == "error":
            raise ValueError(report + " Or pass on_unmatched='warn' to skip them with a warning.")
        warnings.warn(report + " Skipping them (on_unmatched='warn').", UserWarning, stacklevel=2)
    if not keys:
        raise ValueError(
            f"No image/mask pairs in images_dir {str(images_dir)!r} ({len(images)} image file(s) matching "
            f"image_glob={image_glob!r}) and masks_dir {str(masks_dir)!r} ({len(mask_candidates)} mask file(s)); "
            f"image files are those ending in {sorted(IMAGE_EXTENSIONS)}. Check the folders, image_glob and "
            "mask_suffix."
        )
    # TIFF images stay undecoded ({"path", "bytes"}): PIL cannot read multi-channel or float TIFFs, so every reader
    # decodes them with tifffile (hf_vitseg.data.channels.decode_image), keeping all channels and the dtype
    decode = not any(is_tiff(images[key]) for key in keys)
    features = datasets.Features({IMAGE_COLUMN: datasets.Image(decode=decode), ANNOTATION_COLUMN: datasets.Image()})
    return datasets.Dataset.from_dict(
        {IMAGE_COLUMN: [str(images[key]) for key in keys], ANNOTATION_COLUMN: [str(masks[key][0]) for key in keys]},
        features=features,
    )


def load_instance_folder(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    *,
    instance_class: int | None = 0,
    class_map_suffix: str | None = None,
    image_glob: str = "*",
    mask_suffix: str = "",
    on_unmatched: str = "error",
) -> datasets.Dataset:
    r"""
    A folder of images with instance masks: `load_image_folder`'s pairing, plus an `instance_classes` column that
    says each annotation is an instance-id map (0 = background) and gives each instance's class.

    Masks are one-channel instance-id images, PNG or TIFF (8, 16 or 32 bit, e.g. stardist / Cellpose label images):
    one id per object, 0 for background. `SegmentationTransform(..., return_mask_labels=True)` turns each into one
    binary mask per instance (for `ViTSegForUniversalSegmentation`), or, without `return_mask_labels`, into a semantic
    map of the instances' classes.

    Args:
        images_dir, masks_dir, image_glob, mask_suffix, on_unmatched: as for `load_image_folder`.
        instance_class (`int`, defaults to 0): the class of every instance, when there are no class maps.
        class_map_suffix (`str`, *optional*): read each mask's classes from the file beside it whose name is the
            mask's with its extension replaced by this suffix (`class_map_suffix=".json"`: `masks/cat.png` ->
            `masks/cat.json`), a JSON object `{"<instance id>": <class id>, ...}`. An id that the map does not name
            is an error when the mask is read, except 0 (background).

    Returns:
        `datasets.Dataset` with `image`, `annotation` and `instance_classes` (JSON text: the class map, or the one
        class) columns.

    Raises:
        `ValueError`: as `load_image_folder`, and for a missing or unreadable class map (all listed).
    """
    if class_map_suffix is None and instance_class is None:
        raise ValueError("Give instance_class (the class of every instance) or class_map_suffix (a map per mask).")
    valid_class = isinstance(instance_class, int) and not isinstance(instance_class, bool) and instance_class >= 0
    if class_map_suffix is None and not valid_class:
        raise ValueError(f"instance_class must be a class id >= 0, got {instance_class!r}.")
    dataset = load_image_folder(images_dir, masks_dir, image_glob=image_glob, mask_suffix=mask_suffix,
                                on_unmatched=on_unmatched)
    if class_map_suffix is None:
        return dataset.add_column(INSTANCE_CLASSES_COLUMN, [json.dumps(instance_class)] * len(dataset))
    mask_paths = dataset.cast_column(ANNOTATION_COLUMN, datasets.Image(decode=False))[ANNOTATION_COLUMN]
    entries, problems = [], []
    for value in mask_paths:
        class_file = Path(value["path"]).with_suffix(class_map_suffix)
        try:
            mapping = json.loads(class_file.read_text(encoding="utf-8"))
            if not isinstance(mapping, dict):
                raise ValueError("not a JSON object")
            entries.append(json.dumps({str(int(key)): _class_id(class_id) for key, class_id in mapping.items()}))
        except FileNotFoundError:
            problems.append(f"{class_file.name} (missing)")
        except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
            problems.append(f"{class_file.name} ({error})")
    if problems:
        listed = ", ".join(problems[:_MAX_LISTED]) + (f" ... and {len(problems) - _MAX_LISTED} more"
                                                       if len(problems) > _MAX_LISTED else "")
        raise ValueError(
            f"{len(problems)} class map(s) in {str(masks_dir)!r} are missing or unreadable: {listed}. Each mask needs "
            f"one, named like the mask with {class_map_suffix!r} for its extension, holding a JSON object "
            '{"<instance id>": <class id>}; or pass instance_class for one class for all.'
        )
    return dataset.add_column(INSTANCE_CLASSES_COLUMN, entries)


def _class_id(value) -> int:
    """A class map's class id: a whole number (`1` or `1.0`), else a `ValueError` (`int` would truncate 0.5 to 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError(f"class id {value!r} is not a whole number")
    return int(value)


def _image_files(folder: Path, pattern: str) -> list[Path]:
    return sorted(
        path
        for path in folder.glob(pattern)
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    )


def _name_key(path: Path, root: Path) -> str:
    """The pairing key: the path relative to its folder, without the extension."""
    return path.relative_to(root).with_suffix("").as_posix()


def _by_key(paths: list[Path], root: Path, what: str) -> dict[str, Path]:
    grouped: dict[str, list[Path]] = {}
    for path in paths:
        grouped.setdefault(_name_key(path, root), []).append(path)
    duplicates = {key: group for key, group in grouped.items() if len(group) > 1}
    if duplicates:
        raise ValueError(_duplicates_message(duplicates, what))
    return {key: group[0] for key, group in grouped.items()}


def _duplicates_message(duplicates: dict[str, list[Path]], what: str) -> str:
    examples = "; ".join(" and ".join(path.name for path in paths) for paths in list(duplicates.values())[:5])
    return (
        f"{len(duplicates)} name(s) occur more than once among the {what} with different extensions ({examples}), so "
        "the pairing is ambiguous; keep one file per name (or narrow image_glob, e.g. '*.png')."
    )


def _listing(paths: list[Path], root: Path) -> str:
    names = [path.relative_to(root).as_posix() for path in paths[:_MAX_LISTED]]
    more = f" ... and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
    return ", ".join(names) + more


def _unmatched_report(unmatched_images, unmatched_masks, images_dir, masks_dir, mask_suffix, image_keys) -> str:
    parts = [f"{len(unmatched_images)} image(s) without a mask and {len(unmatched_masks)} mask(s) without an image"]
    parts.append(f"(images_dir={str(images_dir)!r}, masks_dir={str(masks_dir)!r}, mask_suffix={mask_suffix!r}).")
    if unmatched_images:
        parts.append(f"Images without a mask: {_listing(unmatched_images, images_dir)}.")
    if unmatched_masks:
        parts.append(f"Masks without an image: {_listing(unmatched_masks, masks_dir)}.")
    example = "cat" + mask_suffix
    parts.append(f"An image 'cat.<ext>' pairs with the mask '{example}.<ext>' (the extensions may differ).")
    suggestion = _guess_mask_suffix(unmatched_masks, masks_dir, image_keys)
    if suggestion is not None and suggestion != mask_suffix:
        parts.append(f"The unmatched masks look like they need mask_suffix={suggestion!r}.")
    parts.append("Fix: set mask_suffix, or add / remove the listed files.")
    return " ".join(parts)


def _guess_mask_suffix(unmatched_masks: list[Path], masks_dir: Path, image_keys: set[str]) -> str | None:
    """The one suffix (possibly "") that would pair every unmatched mask with an image, if there is one."""
    if not unmatched_masks or not image_keys:
        return None
    candidates = Counter()
    checked = unmatched_masks[:50]
    for path in checked:
        key = _name_key(path, masks_dir)
        for cut in range(len(key), 0, -1):
            if key[:cut] in image_keys:
                candidates[key[cut:]] += 1
                break
    if len(candidates) == 1:
        suffix, count = candidates.most_common(1)[0]
        if count == len(checked):
            return suffix
    return None


# --------------------------------------------------------------------------------------------------
# A Hugging Face dataset
# --------------------------------------------------------------------------------------------------


def load_hf_dataset(
    dataset_or_name,
    split: str | None = None,
    image_column: str = IMAGE_COLUMN,
    annotation_column: str = ANNOTATION_COLUMN,
    **load_kwargs,
) -> datasets.Dataset:
    r"""
    A Hugging Face dataset with its image and mask columns renamed to `image` / `annotation`.

    Args:
        dataset_or_name: a Hub id or local path for `datasets.load_dataset` (e.g. `"scene_parse_150"`), a folder
            written by `save_to_disk` (read with `datasets.load_from_disk`), or an already loaded `Dataset` /
            `DatasetDict` (also the iterable kinds from `streaming=True`).
        split (`str`, *optional*): which split to take from a `DatasetDict` (or to load). May be left out when there
            is only one split. Must agree with the split of an already loaded single `Dataset`.
        image_column (`str`, defaults to `"image"`): the column holding images.
        annotation_column (`str`, defaults to `"annotation"`): the column holding segmentation maps (one channel of
            class indices). The defaults are `scene_parse_150`'s names; for ADE20K also set the processor's
            `do_reduce_labels=True` (its 0 means "other").
        load_kwargs: passed to `datasets.load_dataset` (e.g. `name=`, `revision=`, `streaming=True`).

    Returns:
        The split, with `image` and `annotation` columns; columns of file paths become `datasets.Image()`. A column
        that was already named `image` / `annotation` but is not the chosen one is dropped (with a warning).

    Raises:
        `ValueError` when a column is missing (listing the available ones), when `split` is missing or unknown
        (listing the splits), or when the split is empty.
    """
    if image_column == annotation_column:
        raise ValueError(f"image_column and annotation_column are both {image_column!r}; they must differ.")
    dataset = dataset_or_name
    loaded_by_name = isinstance(dataset_or_name, (str, os.PathLike))
    if loaded_by_name:
        path = Path(dataset_or_name)
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            if load_kwargs:
                raise ValueError(
                    f"{str(path)!r} is a save_to_disk folder; load_kwargs {sorted(load_kwargs)} do not apply."
                )
            dataset = _load_from_disk(path)
        else:
            dataset = datasets.load_dataset(str(dataset_or_name), split=split, **load_kwargs)
    elif load_kwargs:
        raise ValueError(f"load_kwargs {sorted(load_kwargs)} only apply when loading by name, not to a loaded dataset.")

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = list(dataset)
        if split is None:
            if len(splits) != 1:
                raise ValueError(f"The dataset has splits {splits}; pick one with split=...")
            split = splits[0]
        if split not in dataset:
            raise ValueError(f"No split {split!r}; the dataset has splits {splits}.")
        dataset = dataset[split]
    elif isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        own_split = getattr(dataset, "split", None)
        if not loaded_by_name and split is not None and own_split is not None and str(own_split) != split:
            raise ValueError(f"The dataset given is split {str(own_split)!r}, not {split!r}; pass the {split!r} split.")
    else:
        raise TypeError(
            "dataset_or_name must be a dataset name or path, a datasets.Dataset or a datasets.DatasetDict; got "
            f"{type(dataset).__name__}."
        )

    columns = _column_names(dataset)
    if columns is not None:
        missing = [
            f"{argument}={column!r}"
            for argument, column in (("image_column", image_column), ("annotation_column", annotation_column))
            if column not in columns
        ]
        if missing:
            raise ValueError(
                f"The dataset has no column {' / '.join(missing)}; its columns are {columns}. Pass the names of its "
                "image and mask columns as image_column=... and annotation_column=...."
            )
        for target, source in ((IMAGE_COLUMN, image_column), (ANNOTATION_COLUMN, annotation_column)):
            if target in columns and target not in (image_column, annotation_column):
                warnings.warn(
                    f"Dropping the dataset's own {target!r} column: {source!r} becomes {target!r}.",
                    UserWarning,
                    stacklevel=2,
                )
                dataset = dataset.remove_columns(target)
    if (image_column, annotation_column) != (IMAGE_COLUMN, ANNOTATION_COLUMN):
        # Through temporary names, so that swapped names ("image" <-> "annotation") do not collide.
        temporary = {image_column: "__vitseg_image", annotation_column: "__vitseg_annotation"}
        dataset = dataset.rename_columns(temporary)
        dataset = dataset.rename_columns({"__vitseg_image": IMAGE_COLUMN, "__vitseg_annotation": ANNOTATION_COLUMN})
    features = getattr(dataset, "features", None) or {}
    for column in (IMAGE_COLUMN, ANNOTATION_COLUMN):
        feature = features.get(column)
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            dataset = dataset.cast_column(column, datasets.Image())
    if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:
        raise ValueError(f"The dataset split {split!r} is empty.")
    return dataset


def _load_from_disk(path: Path):
    """`datasets.load_from_disk`, with a clear error for a saved dataset without rows (datasets itself fails on
    one with an IndexError from deep inside its table code)."""
    for state_file in sorted(path.glob("state.json")) + sorted(path.glob("*/state.json")):
        if not json.loads(state_file.read_text()).get("_data_files"):
            where = "" if state_file.parent == path else f" (split {state_file.parent.name!r})"
            raise ValueError(f"The saved dataset {str(path)!r}{where} is empty: it holds no rows (no data files).")
    return datasets.load_from_disk(str(path))


def _column_names(dataset) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if names is None and getattr(dataset, "features", None) is not None:
        names = list(dataset.features)
    return None if names is None else list(names)


# --------------------------------------------------------------------------------------------------
# Checks before training
# --------------------------------------------------------------------------------------------------


def validate_dataset(
    dataset,
    num_labels: int,
    ignore_index: int,
    reduce_labels: bool = False,
    max_samples: int | None = None,
    num_channels: int = 3,
) -> int:
    r"""
    Scan a dataset's masks before training and raise a clear error at the first bad sample.

    Checks: the dataset is not empty; it has `image` and `annotation` columns; every image decodes (a truncated
    file is named here, not mid-training) and holds no NaN / inf; every mask is one channel of integer class
    indices; every image has its mask's size; every mask value (after `reduce_labels`, if set: 0 becomes
    `ignore_index`, `v` becomes `v - 1`) lies in `[0, num_labels)` or equals `ignore_index`; and masks that hold
    only 0 and 255 with `num_labels=2`, `ignore_index=255` (black-and-white masks whose foreground would be
    ignored) are refused with the fix (`binary_masks`). Images and masks are decoded; any transform set on the
    dataset is bypassed.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): with `image` and `annotation` columns.
        num_labels (`int`): number of classes (the model config's `num_labels`).
        ignore_index (`int`): the label that is ignored (the config's / processor's `ignore_index`).
        reduce_labels (`bool`, defaults to `False`): the processor's `do_reduce_labels`.
        max_samples (`int`, *optional*): check only the first `max_samples` rows (for a quick look at big data).
        num_channels (`int`, defaults to 3): the model's input channels (`ViTSegConfig.num_channels`); with another
            count than 3 every image must have exactly that many channels (the image processor's rule).

    Returns:
        `int`: the number of samples checked.

    Raises:
        `ValueError` naming the sample index and the problem (sizes, values, shape), or an empty dataset.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
    columns = _column_names(dataset)
    if columns is not None:
        missing = [column for column in (IMAGE_COLUMN, ANNOTATION_COLUMN) if column not in columns]
        if missing:
            raise ValueError(
                f"The dataset has no {missing} column(s); its columns are {columns}. Load it with "
                "load_hf_dataset(..., image_column=..., annotation_column=...) or load_image_folder."
            )
    raw = dataset.with_format(None)
    features = getattr(raw, "features", None) or {}
    for column in (IMAGE_COLUMN, ANNOTATION_COLUMN):
        if isinstance(features.get(column), datasets.Image):
            raw = raw.cast_column(column, datasets.Image(decode=False))

    checked, values_seen = 0, set()
    for index, row in enumerate(raw):
        if max_samples is not None and index >= max_samples:
            break
        where = _where(index, row)
        image_hw = _check_image(row[IMAGE_COLUMN], where, num_channels)
        try:
            mask = _MASK_READER.process_segmentation_map(_decode(row[ANNOTATION_COLUMN], where))
        except (ValueError, TypeError) as error:
            raise type(error)(f"Sample {where}: {error}") from error
        if image_hw != mask.shape:
            raise ValueError(
                f"Sample {where}: the image has size (H, W) = {image_hw} but its annotation has size "
                f"{tuple(mask.shape)}; they must match. Fix or remove that pair (the mask must be drawn on the image "
                "at its full resolution)."
            )
        if row.get(INSTANCE_CLASSES_COLUMN) is not None:  # an instance map: check the classes its instances get
            try:
                _, classes = _MASK_READER.segmentation_map_to_targets(
                    mask, instance_mapping(row[INSTANCE_CLASSES_COLUMN]), ignore_index, reduce_labels)
            except (ValueError, TypeError) as error:
                raise type(error)(f"Sample {where}: {error}") from error
            bad = np.unique(classes[classes >= num_labels])
            if bad.size:
                raise ValueError(f"Sample {where}: instances of class(es) {bad.tolist()[:10]}, outside [0, "
                                 f"num_labels={num_labels}); fix the class map or num_labels.")
            checked += 1
            continue
        labels = _reduce_labels(mask, ignore_index) if reduce_labels else mask
        values = np.unique(labels)
        bad = values[((values < 0) | (values >= num_labels)) & (values != ignore_index)]
        if bad.size:
            raise ValueError(_bad_values_message(where, bad, values, mask, num_labels, ignore_index, reduce_labels))
        values_seen.update(values.tolist())
        checked += 1
    if checked == 0:
        raise ValueError(
            "The dataset is empty: there is nothing to train or evaluate on. Check the folder / split it came from."
        )
    if num_labels == 2 and ignore_index == 255 and 255 in values_seen and values_seen <= {0, 255}:
        # 0/255 black-and-white masks: 255 is the ignore index, so the foreground would never be learned
        raise ValueError(
            f"Every mask holds only 0 and 255 ({checked} checked) while num_labels=2 and ignore_index=255: the "
            "masks look binary with 255 for foreground, which would be ignored (foreground IoU 0). Map 255 to 1 "
            "first: binary_masks(dataset) from hf_vitseg.data.datasets, or --binary-masks on the command line."
        )
    return checked


def _bad_values_message(where, bad, values, raw_mask, num_labels, ignore_index, reduced) -> str:
    listed = ", ".join(str(int(value)) for value in bad[:10]) + (" ..." if bad.size > 10 else "")
    message = (
        f"Sample {where}: the mask holds value(s) {listed}{' after reduce_labels' if reduced else ''}, outside "
        f"[0, num_labels={num_labels}) and not ignore_index={ignore_index}."
    )
    raw_values = set(np.unique(raw_mask).tolist())
    if raw_values <= {0, 255} and num_labels == 2:
        hint = " The mask looks binary with 255 for foreground: divide it by 255 (or map 255 to 1) first."
    elif not reduced and int(values.max()) == num_labels and 0 in raw_values:
        hint = (
            " The values run one past num_labels: if 0 means 'unlabelled' (ADE20K / scene_parse_150), set "
            "do_reduce_labels=True on the processor (and reduce_labels=True here)."
        )
    else:
        hint = (
            " Set num_labels to the number of classes, mark unlabelled pixels with ignore_index, or remap the "
            "mask values to 0..num_labels-1."
        )
    return message + hint


def _where(index: int, row: dict) -> str:
    names = []
    for column in (IMAGE_COLUMN, ANNOTATION_COLUMN):
        value = row.get(column)
        if isinstance(value, dict) and value.get("path"):
            names.append(os.path.basename(value["path"]))
    return f"{index}" + (f" ({' / '.join(names)})" if names else "")


def _decode(value, where: str):
    """A stored image (dict of path / bytes, PIL image, array, nested list) -> PIL image or array."""
    if value is None:
        raise ValueError(f"Sample {where} has no value.")
    return decode_image(value)


def _check_image(value, where: str, num_channels: int = 3) -> tuple[int, int]:
    """(H, W) of a stored image, decoded in full so that a truncated or undecodable file, or non-finite pixel
    values (NaN / inf in a float image), stop the run here with the sample named rather than mid-training."""
    if isinstance(value, dict) and (is_tiff(value.get("path") or "") or num_channels != 3):
        try:
            value = decode_image(value)  # TIFF: tifffile, every channel kept
        except (ValueError, OSError, ImportError) as error:
            raise ValueError(f"Sample {where}: {error}") from error
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            source = BytesIO(value["bytes"])
        elif value.get("path") and os.path.isfile(value["path"]):
            source = value["path"]
        else:
            return _check_image(datasets.Image().decode_example(value), where)
        try:
            with Image.open(source) as image:
                image.load()
                width, height = image.size
                orientation = image.getexif().get(ExifTags.Base.Orientation)
                _check_finite(image, where)
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's errors for broken files
            raise ValueError(f"Sample {where}: the image cannot be decoded ({error}); the file is probably "
                             "truncated or corrupt. Replace or remove it.") from error
        return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)
    _check_finite(value, where)
    if num_channels != 3:  # no conversion: the image must have the model's channels (the processor's layout rule)
        try:
            return tuple(ViTSegImageProcessor(num_channels=num_channels).image_channels_first(value).shape[1:])
        except (ValueError, TypeError) as error:
            raise ValueError(f"Sample {where}: {error}") from error
    if isinstance(value, Image.Image):
        return value.size[::-1]
    array = np.asarray(value)
    # (H, W), (H, W, C) or (C, H, W): the processor's rule (channels last unless the first axis is a channel count).
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        return tuple(array.shape[1:])
    return tuple(array.shape[:2])


def _check_finite(image, where: str) -> None:
    """Refuse NaN / inf pixels: one makes every logit NaN and the prediction silently all class 0."""
    if isinstance(image, Image.Image):
        if image.mode not in ("F", "I;16F") and not image.mode.startswith("F"):
            return  # integer modes cannot hold NaN
        image = np.asarray(image)
    array = np.asarray(image)
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        count = int((~np.isfinite(array)).sum())
        raise ValueError(f"Sample {where}: the image holds {count} non-finite pixel value(s) (NaN or inf); "
                         "replace them (e.g. with 0) or remove the image.")


def binary_masks(dataset):
    """`dataset` with black-and-white masks (0 / 255) mapped to class ids 0 / 1; other values are left as they
    are (so the dataset check still reports them). For `num_labels=2` with masks saved as 0 / 255 images.

    Args:
        dataset (`datasets.Dataset`): with an `annotation` column.

    Returns:
        A new `datasets.Dataset` (masks decoded and re-encoded once; the dataset given is not changed).
    """
    def to_class_ids(batch):
        masks = []
        for mask in batch[ANNOTATION_COLUMN]:
            array = _MASK_READER.process_segmentation_map(mask)
            masks.append(Image.fromarray(np.where(array == 255, 1, array).astype(np.uint8)))
        return {ANNOTATION_COLUMN: masks}

    return dataset.with_format(None).map(to_class_ids, batched=True, batch_size=16, desc="--binary-masks: 255 -> 1")


# --------------------------------------------------------------------------------------------------
# Wiring for Trainer
# --------------------------------------------------------------------------------------------------


def prepare_datasets(train_dataset, eval_dataset, processor, crop_size, **augment_kwargs):
    r"""
    Return `(train_dataset, eval_dataset)` with lazy transforms set (copies, via `with_transform`; the inputs are
    left as they were).

    The training set gets `SegmentationTransform(processor, train=True, crop_size=crop_size, **augment_kwargs)`, the
    evaluation set `SegmentationTransform(processor, train=False, ignore_index=...)` (no augmentation). Either may
    be `None`. Both yield `{"pixel_values", "labels"}` per sample; batch them with `SegmentationCollator`. With
    `transformers.Trainer`, set `TrainingArguments(remove_unused_columns=False)` and, for seeded augmentation, add
    `AugmentationEpochCallback(train_dataset)`.

    Args:
        train_dataset, eval_dataset (`datasets.Dataset`, *optional*): with `image` / `annotation` columns.
        processor (`ViTSegImageProcessor`): conversion, resize, normalisation, `patch_size`, `ignore_index`.
        crop_size (`int` or `(height, width)`, *optional*): training crop, a multiple of `processor.patch_size`.
        augment_kwargs: `scale_range`, `hflip`, `photometric`, `augmentation`, `ignore_index`, `seed`,
            `return_mask_labels` (see `SegmentationTransform`); `ignore_index` and `return_mask_labels` apply to the
            evaluation set too (mask models evaluate on `mask_labels` / `class_labels`).

    Raises:
        `ValueError` for an empty dataset or a crop size that is not a patch multiple.
    """
    prepared = []
    if "train" in augment_kwargs:
        raise TypeError("prepare_datasets sets `train` itself (True for the training set, False for evaluation).")
    transforms = {
        "train": SegmentationTransform(processor, train=True, crop_size=crop_size, **augment_kwargs),
        "eval": SegmentationTransform(processor, train=False, ignore_index=augment_kwargs.get("ignore_index"),
                                      return_mask_labels=augment_kwargs.get("return_mask_labels")),
    }
    for role, dataset in (("train", train_dataset), ("eval", eval_dataset)):
        if dataset is None:
            prepared.append(None)
            continue
        columns = _column_names(dataset)
        if columns is not None and IMAGE_COLUMN not in columns:
            raise ValueError(
                f"The {role} dataset has no 'image' column; its columns are {columns}. Load it with "
                "load_hf_dataset(..., image_column=...) or load_image_folder."
            )
        if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:
            raise ValueError(f"The {role} dataset is empty; check the folder / split it came from.")
        prepared.append(dataset.with_transform(transforms[role]))
    return tuple(prepared)


__all__ = [
    "ANNOTATION_COLUMN",
    "IMAGE_COLUMN",
    "IMAGE_EXTENSIONS",
    "SegmentationTransform",
    "binary_masks",
    "load_hf_dataset",
    "load_image_folder",
    "load_instance_folder",
    "prepare_datasets",
    "validate_dataset",
]
