"""Training augmentation for semantic segmentation, applied lazily with `datasets.Dataset.set_transform`.

`SegmentationTransform` turns a batch of `{"image", "annotation"}` (PIL images, arrays) into
`{"pixel_values", "labels"}` tensors. It converts with the `ViTSegImageProcessor`'s own rules (any PIL mode,
`do_reduce_labels`, its resize, mean and std), so training sees exactly what inference sees, and in train mode
adds random resize, random crop (padded with `ignore_index`), horizontal flip and light photometric jitter.
No torchvision: PIL for resizing, numpy for the rest.

Reproducibility. With `seed=None` the random draws come from torch's global generator, which
`transformers.set_seed` / `Trainer(seed=...)` seeds: the usual PyTorch behaviour, reproducible for one
uninterrupted run. With `seed=<int>` every sample's draws come from its own generator, derived from
`(seed, epoch, a hash of the sample's pixels)`: no state is carried from one sample to the next, so the result
does not depend on the order samples are drawn in, on which dataloader worker or process draws them, on the
number of processes, or on whether training was killed and resumed mid-epoch. The epoch comes from
`set_epoch(epoch)`, which `AugmentationEpochCallback` calls for `transformers.Trainer` (a plain loop calls
`set_augmentation_epoch(dataset, epoch)` itself); it is held in shared memory, so dataloader workers, persistent
or not, see it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback

from ..modeling.image_processing_vitseg import IGNORED_TARGET, reduce_labels, targets_to_labels, targets_to_masks
from .channels import decode_image

# "Light" jitter: each factor is drawn uniformly from [1 - s, 1 + s].
DEFAULT_PHOTOMETRIC = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2}
# ITU-R 601 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale use.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_UNSET_EPOCH = -1
# The optional column that says a dataset's annotations are instance-id maps, and each instance's class: per sample a
# dict {instance id: class id}, one class id for every instance, or either as JSON text (load_instance_folder).
INSTANCE_CLASSES_COLUMN = "instance_classes"
# How many samples a seeded transform remembers to notice that epochs repeat without set_epoch (memory stays O(1)).
_TRACKED_SAMPLES = 64
# The processor's per-sample steps this transform runs (so training sees exactly what inference sees).
_PROCESSOR_STEPS = (
    "process_image", "process_segmentation_map", "resized_size", "resize_sample", "normalize_sample",
    "crop_to_multiple", "padded_size", "pad_sample", "patch_size",
)


class SegmentationTransform:
    r"""
    A callable for `Dataset.set_transform`: `{"image": [...], "annotation": [...]}` in,
    `{"pixel_values": [(3, H, W) float32], "labels": [(H, W) int64]}` out.

    Every sample is converted by `processor`'s rules (`process_image`: any PIL mode or array layout to RGB on the
    0..255 scale; `process_segmentation_map`), labels are reduced when `processor.do_reduce_labels` is set, and
    the image is rescaled and normalised with the processor's settings.

    Train mode, per sample, in this order:

    1. random resize by a factor drawn uniformly from `scale_range`, relative to the size the processor's own
       resize gives (`processor.size` when `processor.do_resize`, else the original size); image bilinear (or
       `processor.resample`), labels nearest-neighbour, in one step from the original;
    2. random crop to `crop_size`; a side shorter than the crop is padded at the bottom / right (labels with
       `ignore_index`, the image with 0 after normalisation, i.e. the mean colour, as the processor pads);
    3. horizontal flip of image and labels together, with probability 1/2 (`hflip=True`);
    4. photometric jitter on the image only (`photometric=True`): brightness, contrast and saturation factors each
       drawn from [0.8, 1.2], applied in that order, clipped to the valid range.

    With `crop_size=None` the resized sample is instead padded (or centre-cropped, per
    `processor.size_divisor_mode`) to a patch multiple.

    With `augmentation` (an albumentations `Compose`, the convention of transformers' semantic-segmentation examples:
    `augmentation(image=..., mask=...)`), it replaces steps 1-4: each converted sample, resized as the processor
    resizes, goes through it as an `(H, W, C)` uint8 image (float32 in [0, 1] for images that are not 8-bit) and an
    `(H, W)` mask of class ids (labels reduced first when the processor says so); what comes out is normalised with
    the processor's mean and std (unless the Compose ends with `A.Normalize` with those same values, and optionally
    `ToTensorV2`, as transformers' examples do) and padded to `crop_size` (or the patch multiple) with `ignore_index`.
    Pixels that a geometric transform brings in from outside the image (padding, rotated corners) are labelled
    `ignore_index`, whatever the transform's `fill_mask` says: hf-vitseg tracks them in an extra mask. The Compose is
    copied, and reseeded for every sample from the same per-sample generator as the built-in steps, so `seed=`
    makes it reproducible too. Eval mode (`train=False`) is deterministic and gives, per
    sample, what `processor(images=[image], segmentation_maps=[mask])` gives: no augmentation, padded to the patch
    multiple; `SegmentationCollator` then pads the batch.

    Args:
        processor (`ViTSegImageProcessor`): provides the conversion, resize, normalisation, `patch_size`,
            `ignore_index` and `do_reduce_labels`.
        train (`bool`): augment (True) or not (False).
        crop_size (`int` or `(height, width)`, *optional*): training crop; both sides multiples of
            `processor.patch_size`. Ignored in eval mode (but still checked).
        scale_range (`(float, float)`, defaults to `(0.5, 2.0)`): range of the random resize factor.
        hflip (`bool`, defaults to `True`): random horizontal flip.
        photometric (`bool` or `dict`, defaults to `True`): light jitter; a dict such as
            `{"brightness": 0.1, "contrast": 0.3, "saturation": 0.0}` sets the strengths (each in [0, 1)).
        ignore_index (`int`, *optional*): label for padding and for reduced background; defaults to
            `processor.ignore_index`. Match the model config's `ignore_index`.
        seed (`int`, *optional*): makes every sample's augmentation a function of `(seed, epoch, its pixels)`;
            see the module docstring. `None` draws from torch's global generator.
        return_mask_labels (`bool`, *optional*): yield mask-classification targets, `mask_labels` `[(N, H, W)
            float32]` and `class_labels` `[(N,) int64]`, instead of `labels` (for `ViTSegForUniversalSegmentation`);
            default `processor.return_mask_labels`. A semantic map gives one mask per class present; when the batch
            has an `instance_classes` column (`load_instance_folder`), its annotations are instance-id maps and give
            one mask per instance (without `return_mask_labels`, each instance's class as `labels`). Targets go
            through the same resize, crop, flip and padding as labels (as one map of target indices, nearest-
            neighbour), so masks stay aligned with the image; a target the crop leaves no pixel of is dropped. With
            them comes `void_mask` `[(H, W) bool]`: the pixels to ignore (`ignore_index`, ignored instances, padding),
            which the model never sees and the metrics skip; background (instance id 0) is not void.
        augmentation (albumentations `BaseCompose` or `BasicTransform`, *optional*): replaces the built-in steps
            in train mode (see above; needs `pip install "hf-vitseg[augment]"`); `scale_range`, `hflip` and
            `photometric` must then stay at their defaults. Its output must fit `crop_size` when that is given.

    Example:

    ```python
    >>> transform = SegmentationTransform(processor, train=True, crop_size=(448, 448), seed=0)
    >>> train_dataset.set_transform(transform)
    >>> import albumentations as A  # or: an albumentations pipeline in place of the built-in steps
    >>> transform = SegmentationTransform(processor, train=True, crop_size=(448, 448), seed=0, augmentation=A.Compose(
    ...     [A.RandomResizedCrop((448, 448), scale=(0.3, 1.0)), A.HorizontalFlip(), A.Rotate(limit=30)]))
    >>> trainer = Trainer(..., train_dataset=train_dataset, data_collator=SegmentationCollator(14, 255),
    ...                   callbacks=[AugmentationEpochCallback(transform)])  # + remove_unused_columns=False
    ```
    """

    def __init__(
        self,
        processor,
        *,
        train: bool,
        crop_size: int | Sequence[int] | None = None,
        scale_range: Sequence[float] = (0.5, 2.0),
        hflip: bool = True,
        photometric: bool | Mapping[str, float] = True,
        ignore_index: int | None = None,
        seed: int | None = None,
        return_mask_labels: bool | None = None,
        augmentation=None,
    ):
        missing = [name for name in _PROCESSOR_STEPS if not hasattr(processor, name)]
        if missing:
            raise TypeError(
                f"SegmentationTransform needs a ViTSegImageProcessor (or one with the same methods); "
                f"{type(processor).__name__} lacks {', '.join(missing)}. Build one with "
                "hf_vitseg.ViTSegImageProcessor(patch_size=..., image_mean=..., image_std=...)."
            )
        self.processor = processor
        self.train = bool(train)
        self.patch_size = int(processor.patch_size)
        self.crop_size = _check_crop_size(crop_size, self.patch_size)
        self.scale_range = _check_scale_range(scale_range)
        self.hflip = bool(hflip)
        self.photometric = _check_photometric(photometric)
        self.ignore_index = int(processor.ignore_index if ignore_index is None else ignore_index)
        if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"`seed` must be a non-negative int or None, got {seed!r}.")
        self.seed = None if seed is None else int(seed)
        self.augmentation = _check_augmentation(augmentation, self.scale_range, self.hflip, self.photometric)
        self._normalize = None if self.augmentation is None else self._check_normalize_step()
        if return_mask_labels is None:
            return_mask_labels = bool(getattr(processor, "return_mask_labels", False))
        self.return_mask_labels = bool(return_mask_labels)
        if self.return_mask_labels and not hasattr(processor, "segmentation_map_to_targets"):
            raise TypeError(
                f"return_mask_labels needs an image processor with segmentation_map_to_targets; "
                f"{type(processor).__name__} lacks it (saved by an older hf-vitseg?). Build one with "
                "hf_vitseg.ViTSegImageProcessor(...)."
            )
        # Shared memory: `set_epoch` in the main process reaches dataloader workers, even persistent ones.
        self._epoch = torch.full((), _UNSET_EPOCH, dtype=torch.int64).share_memory_()
        # The first few samples seen while no epoch is set: seeing one again means an epoch repeats (see warning).
        self._seen_without_epoch: set[int] | None = set()

    def __repr__(self) -> str:
        if not self.train:
            return f"SegmentationTransform(train=False, ignore_index={self.ignore_index})"
        if self.augmentation is not None:
            return (f"SegmentationTransform(train=True, crop_size={self.crop_size}, "
                    f"augmentation={self.augmentation!r}, ignore_index={self.ignore_index}, seed={self.seed})")
        return (
            f"SegmentationTransform(train=True, crop_size={self.crop_size}, scale_range={self.scale_range}, "
            f"hflip={self.hflip}, photometric={self.photometric}, ignore_index={self.ignore_index}, seed={self.seed})"
        )

    # ----------------------------------------------------------------------------------------------
    # Epoch (seeded mode)
    # ----------------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        """The epoch set by `set_epoch`, or None if it was never set."""
        value = int(self._epoch.item())
        return None if value == _UNSET_EPOCH else value

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of `epoch` (seeded mode); call it before each epoch's dataloader is iterated."""
        if int(epoch) < 0:
            raise ValueError(f"`epoch` must be >= 0, got {epoch}.")
        self._epoch.fill_(int(epoch))

    # ----------------------------------------------------------------------------------------------
    # The transform
    # ----------------------------------------------------------------------------------------------

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list[torch.Tensor]]:
        """Transform one batch (the dict of lists that `set_transform` passes)."""
        if "image" not in batch:
            raise KeyError(
                f"The batch has no 'image' column (columns: {sorted(batch)}). Build the dataset with "
                "load_image_folder or load_hf_dataset(image_column=...), and with transformers.Trainer pass "
                "TrainingArguments(remove_unused_columns=False): otherwise Trainer drops 'image' and 'annotation' "
                "before this transform runs."
            )
        images = [decode_image(value) for value in batch["image"]]  # undecoded TIFFs ({"path", "bytes"}) too
        annotations = batch.get("annotation")
        if annotations is None and self.train:
            raise KeyError(
                f"Training needs an 'annotation' column; the batch has {sorted(batch)}. With transformers.Trainer "
                "pass TrainingArguments(remove_unused_columns=False)."
            )
        annotations = [None] * len(images) if annotations is None else list(annotations)
        if len(annotations) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(annotations)} annotations in one batch.")

        instance_classes = batch.get(INSTANCE_CLASSES_COLUMN)

        pixel_values, labels, mask_labels, class_labels, void_masks = [], [], [], [], []
        for position, (raw_image, raw_mask) in enumerate(zip(images, annotations)):
            mapping = None if instance_classes is None else instance_mapping(instance_classes[position])
            as_targets = self.return_mask_labels or mapping is not None
            image, mask = self._convert(raw_image, raw_mask, position, reduce=not as_targets)
            classes, fill = None, None
            if as_targets and mask is not None:
                # Targets travel as a target map through the same resize / crop / flip, padded with IGNORED_TARGET
                mask, classes = self.processor.segmentation_map_to_targets(mask, mapping, self.ignore_index)
                fill = IGNORED_TARGET
            if self.train:
                image, mask = self._augment(image, mask, self._generator(raw_image, raw_mask), fill)
            else:
                image, mask = self.processor.resize_sample(image, mask, self._scaled_size(image.shape[1:], 1.0))
                image = self.processor.normalize_sample(image)
                image, mask = self._pad_to_patch_grid(image, mask, fill)
            pixel_values.append(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)))
            if classes is not None and self.return_mask_labels:
                masks, kept_classes = targets_to_masks(mask, classes)
                mask_labels.append(torch.from_numpy(masks))
                class_labels.append(torch.from_numpy(kept_classes))
                void_masks.append(torch.from_numpy(mask == IGNORED_TARGET))
            elif classes is not None:
                labels.append(torch.from_numpy(targets_to_labels(mask, classes, self.ignore_index)))
            elif mask is not None:
                labels.append(torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64)))
        output = {"pixel_values": pixel_values}
        if labels:
            output["labels"] = labels
        if class_labels:
            output["mask_labels"], output["class_labels"] = mask_labels, class_labels
            output["void_mask"] = void_masks
        return output

    def _convert(self, raw_image, raw_mask, position: int, reduce: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw inputs -> `(3, H, W)` float32 on the 0..255 scale and `(H, W)` int64 (labels reduced if asked and
        `reduce`; mask targets reduce their own way, in `segmentation_map_to_targets`)."""
        try:
            image = self.processor.process_image(_from_list(raw_image))
            mask = None if raw_mask is None else self.processor.process_segmentation_map(_from_list(raw_mask))
        except (ValueError, TypeError) as error:
            raise type(error)(f"Sample {_describe(raw_image, raw_mask, position)}: {error}") from error
        if mask is None:
            if self.train:
                raise ValueError(
                    f"Sample {_describe(raw_image, raw_mask, position)} has no annotation; training needs one."
                )
            return image, None
        if image.shape[1:] != mask.shape:
            raise ValueError(
                f"Sample {_describe(raw_image, raw_mask, position)}: the image has size (H, W) = "
                f"{tuple(image.shape[1:])} but its annotation has size {tuple(mask.shape)}; they must match. "
                "Fix or remove that pair; `hf_vitseg.data.datasets.validate_dataset` lists the dataset index of "
                "the first such sample before training."
            )
        if self.processor.do_reduce_labels and reduce:
            mask = reduce_labels(mask, self.ignore_index)
        return image, mask

    def _generator(self, raw_image, raw_mask) -> np.random.Generator:
        if self.seed is None:
            # torch's global generator: seeded by transformers.set_seed, per worker by the DataLoader.
            return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        key = _content_key(raw_image, raw_mask)
        epoch = self.epoch
        if epoch is None:
            self._warn_if_repeated(key)
            epoch = 0
        return np.random.default_rng([self.seed, epoch, key])

    def _warn_if_repeated(self, key: int) -> None:
        if self._seen_without_epoch is None:
            return
        if key in self._seen_without_epoch:
            warnings.warn(
                "SegmentationTransform(seed=...) saw a sample a second time but set_epoch() was never called, so "
                "every epoch gets the same augmentation. With transformers.Trainer add "
                "`callbacks=[AugmentationEpochCallback(train_dataset)]`; in your own loop call "
                "`set_augmentation_epoch(train_dataset, epoch)` before each epoch.",
                stacklevel=3,
            )
            self._seen_without_epoch = None
        elif len(self._seen_without_epoch) < _TRACKED_SAMPLES:
            self._seen_without_epoch.add(key)

    def _augment(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, fill: int | None = None):
        if self.augmentation is not None:
            return self._albumentations(image, mask, rng, self.ignore_index if fill is None else fill)
        # Fixed order, photometric last: turning hflip or jitter off leaves a sample's scale and crop unchanged.
        scale = rng.uniform(*self.scale_range)
        out_hw = self._scaled_size(image.shape[1:], scale)
        crop_hw = self.crop_size if self.crop_size is not None else out_hw
        top = int(rng.integers(0, max(out_hw[0] - crop_hw[0], 0) + 1))
        left = int(rng.integers(0, max(out_hw[1] - crop_hw[1], 0) + 1))
        flip = rng.random() < 0.5
        factors = {name: rng.uniform(1.0 - strength, 1.0 + strength) for name, strength in self.photometric.items()}

        window = (top, left, min(crop_hw[0], out_hw[0] - top), min(crop_hw[1], out_hw[1] - left))
        # Only the crop window of the resized sample is computed: the same pixels, at the cost of the window alone.
        image, mask = self.processor.resize_sample(image, mask, out_hw, window=window)
        if self.hflip and flip:
            image, mask = image[:, :, ::-1], mask[:, ::-1]
        if factors:
            image = _jitter(image, factors)
        image = self.processor.normalize_sample(image)
        if self.crop_size is None:
            return self._pad_to_patch_grid(image, mask, fill)
        return self.processor.pad_sample(image, mask, self.crop_size, self.ignore_index if fill is None else fill)

    def _albumentations(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, fill: int):
        """The user's albumentations pipeline in place of the built-in steps (see the class docstring); `fill`
        labels padding and the pixels brought in from outside the image."""
        image, mask = self.processor.resize_sample(image, mask, self._scaled_size(image.shape[1:], 1.0))
        pixels = np.ascontiguousarray(np.asarray(image).transpose(1, 2, 0))  # (H, W, C) on the 0..255 scale
        eight_bit = bool(np.array_equal(pixels, np.round(pixels)))  # an 8-bit image, as transformers' examples pass
        if not eight_bit and self._normalize is not None:
            raise ValueError(
                "The albumentations Compose normalises (A.Normalize), but this image is not 8-bit, so it reaches the "
                "Compose as float32 in [0, 1], where A.Normalize's max_pixel_value=255 would be wrong: remove "
                "A.Normalize (hf-vitseg then normalises with the processor's image_mean and image_std)."
            )
        pixels = pixels.astype(np.uint8) if eight_bit else pixels / np.float32(255.0)
        inside = np.full(mask.shape, _INSIDE, dtype=np.uint8)  # marks the output pixels that come from the image
        self.augmentation.set_random_seed(int(rng.integers(0, 2**32)))
        out = self.augmentation(image=pixels, mask=_mask_for_albumentations(mask), masks=[inside])
        image = _as_numpy(out["image"], "image")
        if not isinstance(out["image"], torch.Tensor):  # ToTensorV2 gives (C, H, W); arrays are (H, W[, C])
            image = (image[..., None] if image.ndim == 2 else image).transpose(2, 0, 1)
        image = image.astype(np.float32)
        mask = np.rint(_as_numpy(out["mask"], "mask")).astype(np.int64)
        mask[_as_numpy(out["masks"][0], "mask") != _INSIDE] = fill
        if image.shape[1:] != mask.shape:
            raise ValueError(f"The albumentations Compose returned an image of size {image.shape[1:]} but a mask of "
                             f"size {mask.shape}; its transforms must move image and mask together.")
        if not np.isfinite(image).all():
            raise ValueError(f"The albumentations Compose returned an image with {int((~np.isfinite(image)).sum())} "
                             "NaN or infinite value(s); check its transforms (a division by a zero std, say).")
        if self._normalize is None:
            image = self.processor.normalize_sample(image if eight_bit else image * np.float32(255.0))
        if self.crop_size is None:
            return self._pad_to_patch_grid(image, mask, fill)
        if image.shape[1] > self.crop_size[0] or image.shape[2] > self.crop_size[1]:
            raise ValueError(
                f"The albumentations Compose returned a sample of size {tuple(image.shape[1:])}, larger than crop_size "
                f"{self.crop_size}: end it with a crop to at most that size (e.g. A.PadIfNeeded(*crop_size) then "
                "A.RandomCrop(*crop_size)), or raise crop_size."
            )
        return self.processor.pad_sample(image, mask, self.crop_size, fill)

    def _check_normalize_step(self):
        """The Compose's `A.Normalize` (or None); it must normalise as the processor does, which inference uses."""
        steps = [step for step in _albumentations_steps(self.augmentation) if type(step).__name__ == "Normalize"]
        if not steps:
            return None
        normalize, processor = steps[-1], self.processor
        wanted = {"mean": np.asarray(processor.image_mean, dtype=np.float64).ravel(),
                  "std": np.asarray(processor.image_std, dtype=np.float64).ravel()}
        given = {name: np.asarray(getattr(normalize, name), dtype=np.float64).ravel() for name in wanted}
        scale = float(normalize.max_pixel_value) * float(processor.rescale_factor)
        same = (getattr(normalize, "normalization", "standard") == "standard" and processor.do_normalize
                and processor.do_rescale and abs(scale - 1.0) < 1e-6
                and all(given[n].size in (1, wanted[n].size) and np.allclose(given[n], wanted[n]) for n in wanted))
        if not same:
            raise ValueError(
                f"The albumentations Compose normalises with A.Normalize(mean={given['mean'].tolist()}, "
                f"std={given['std'].tolist()}, max_pixel_value={normalize.max_pixel_value}), but the model's "
                f"processor, which inference uses, with image_mean={wanted['mean'].tolist()}, "
                f"image_std={wanted['std'].tolist()}: use the processor's values, or remove A.Normalize and let "
                "hf-vitseg normalise."
            )
        return normalize

    # ----------------------------------------------------------------------------------------------
    # The processor's steps, one sample at a time
    # ----------------------------------------------------------------------------------------------

    def _scaled_size(self, input_hw: tuple[int, int], scale: float) -> tuple[int, int]:
        """`scale` x the processor's resize result (its `size` when `do_resize`, else the input size)."""
        processor = self.processor
        base_hw = processor.resized_size(input_hw)
        return tuple(max(1, int(round(side * scale))) for side in base_hw)

    def _pad_to_patch_grid(self, image: np.ndarray, mask: np.ndarray | None, fill: int | None = None):
        """As the processor: centre-crop (size_divisor_mode="crop") or pad to a patch multiple / `pad_to_size`."""
        image, mask, _ = self.processor.crop_to_multiple(image, mask, self.patch_size)
        target_hw = self.processor.padded_size([image.shape[1:]], self.patch_size)
        return self.processor.pad_sample(image, mask, target_hw, self.ignore_index if fill is None else fill)


class AugmentationEpochCallback(TrainerCallback):
    """`transformers.Trainer` callback that tells seeded `SegmentationTransform`s the current epoch.

    Pass the training dataset(s) prepared with `prepare_datasets` / `set_transform`, or the transforms themselves:
    `Trainer(..., callbacks=[AugmentationEpochCallback(train_dataset)])`. Trainer calls `on_epoch_begin` before it
    builds the epoch's dataloader iterator, and on resume `state.epoch` (restored from the checkpoint) gives the
    interrupted epoch, so a resumed run gets the same augmentation as an uninterrupted one.
    """

    def __init__(self, *datasets_or_transforms):
        if not datasets_or_transforms:
            raise ValueError("AugmentationEpochCallback needs at least one dataset or SegmentationTransform.")
        self.transforms = [_find_transform(item) for item in datasets_or_transforms]

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is fractional (epoch + steps done / steps per epoch); it is None before the first step.
        epoch = math.floor((state.epoch or 0.0) + 1e-6)
        for transform in self.transforms:
            transform.set_epoch(epoch)


def set_augmentation_epoch(dataset_or_transform, epoch: int) -> None:
    """Call `set_epoch(epoch)` on a `SegmentationTransform` or on the one set on a dataset (for your own loop)."""
    _find_transform(dataset_or_transform).set_epoch(epoch)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

# The value of the extra mask that marks pixels coming from the image (albumentations fills the rest with fill_mask).
_INSIDE = 1
_DEFAULT_STEPS = {"scale_range": (0.5, 2.0), "hflip": True, "photometric": dict(DEFAULT_PHOTOMETRIC)}


def _check_augmentation(augmentation, scale_range, hflip, photometric):
    """A private copy of an albumentations transform, or None; the built-in steps' settings must be the defaults."""
    if augmentation is None:
        return None
    if not type(augmentation).__module__.startswith("albumentations"):
        raise TypeError(
            f"`augmentation` must be an albumentations transform such as A.Compose([...]) (pip install "
            f'"hf-vitseg[augment]"), got {type(augmentation).__name__}.'
        )
    changed = [name for name, value in (("scale_range", scale_range), ("hflip", hflip), ("photometric", photometric))
               if value != _DEFAULT_STEPS[name]]
    if changed:
        raise ValueError(
            f"`augmentation` replaces the built-in steps, so {', '.join(changed)} would be ignored: leave "
            f"{'it' if len(changed) == 1 else 'them'} at the default, or put the equivalent transform in the Compose."
        )
    return copy.deepcopy(augmentation)  # reseeded per sample: the caller's object is left as it was


def _albumentations_steps(transform):
    """Every transform in an albumentations Compose, nested ones (OneOf, SomeOf, Sequential) included."""
    yield transform
    for child in getattr(transform, "transforms", None) or ():
        yield from _albumentations_steps(child)


def _mask_for_albumentations(mask: np.ndarray) -> np.ndarray:
    """The mask in a dtype OpenCV moves exactly: uint8 / uint16 when the ids fit, else float32 (exact below 2**24)."""
    low, high = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
    for dtype in (np.uint8, np.uint16):
        if low >= 0 and high <= np.iinfo(dtype).max:
            return mask.astype(dtype)
    return mask.astype(np.float32)


def _as_numpy(value, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"The albumentations Compose returned a {type(value).__name__} as its {what}; expected an "
                        "array or a tensor.")
    return value



def instance_mapping(value):
    """One sample's `instance_classes` entry -> `instance_id_to_semantic_id` for the processor: `None` (the
    annotation is a semantic map), an int (the class of every instance) or a dict `{instance id: class id}`; JSON
    text (as `load_instance_folder` stores it) is decoded."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"Cannot read the instance classes {value[:80]!r} as JSON: {error}") from error
    is_class_id = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if value is None or isinstance(value, dict) or is_class_id:
        return value
    raise ValueError(
        f"An {INSTANCE_CLASSES_COLUMN!r} entry must be a dict {{instance id: class id}}, an int (the class of every "
        f"instance), JSON text of either, or None; got {value!r}."
    )


def _find_transform(item) -> SegmentationTransform:
    if isinstance(item, SegmentationTransform):
        return item
    transform = (getattr(item, "format", None) or {}).get("format_kwargs", {}).get("transform")
    if isinstance(transform, SegmentationTransform):
        return transform
    raise TypeError(
        f"Expected a SegmentationTransform or a datasets.Dataset whose transform is one (see prepare_datasets); got "
        f"{type(item).__name__} with transform {transform!r}."
    )


def _check_crop_size(crop_size, patch_size: int) -> tuple[int, int] | None:
    if crop_size is None:
        return None
    if isinstance(crop_size, (int, np.integer)):
        crop_size = (crop_size, crop_size)
    crop_size = tuple(crop_size)
    if len(crop_size) != 2 or not all(isinstance(side, (int, np.integer)) and side > 0 for side in crop_size):
        raise ValueError(f"`crop_size` must be a positive int or (height, width) of positive ints, got {crop_size!r}.")
    crop_size = (int(crop_size[0]), int(crop_size[1]))
    if crop_size[0] % patch_size or crop_size[1] % patch_size:
        lower = tuple(max(patch_size, side // patch_size * patch_size) for side in crop_size)
        upper = tuple(math.ceil(side / patch_size) * patch_size for side in crop_size)
        raise ValueError(
            f"crop_size {crop_size} is not a multiple of the processor's patch_size {patch_size} in both sides; "
            f"use for instance {upper} or {lower}."
        )
    return crop_size


def _check_scale_range(scale_range) -> tuple[float, float]:
    low, high = (float(value) for value in scale_range)
    if not (0 < low <= high) or not math.isfinite(high):
        raise ValueError(f"`scale_range` must be (low, high) with 0 < low <= high, got {tuple(scale_range)}.")
    return low, high


def _check_photometric(photometric) -> dict[str, float]:
    if photometric is True:
        return dict(DEFAULT_PHOTOMETRIC)
    if photometric is False or photometric is None:
        return {}
    if not isinstance(photometric, Mapping) or set(photometric) - set(DEFAULT_PHOTOMETRIC):
        raise ValueError(
            f"`photometric` must be True, False or a dict with keys among {sorted(DEFAULT_PHOTOMETRIC)}, got "
            f"{photometric!r}."
        )
    strengths = {name: float(photometric[name]) for name in DEFAULT_PHOTOMETRIC if name in photometric}
    bad = {name: value for name, value in strengths.items() if not 0.0 <= value < 1.0}
    if bad:
        raise ValueError(f"Photometric strengths must lie in [0, 1), got {bad}.")
    return {name: value for name, value in strengths.items() if value > 0}


def _jitter(image: np.ndarray, factors: Mapping[str, float]) -> np.ndarray:
    """Brightness, contrast, saturation (torchvision's definitions) on a `(3, H, W)` 0..255 image. Other channel
    counts (no colour): brightness, and contrast around the mean of all channels; saturation does not apply."""
    image = np.array(image, dtype=np.float32)  # a copy: the caller's array may be the processor's view

    def blend_towards(target, factor: float) -> None:  # image = target + factor * (image - target), clipped
        image[...] -= target
        image[...] *= np.float32(factor)
        image[...] += target
        np.clip(image, 0.0, 255.0, out=image)

    if "brightness" in factors:
        blend_towards(np.float32(0.0), factors["brightness"])
    rgb = image.shape[0] == 3
    if "contrast" in factors:
        blend_towards(np.float32((_luma(image) if rgb else image).mean()), factors["contrast"])
    if "saturation" in factors and rgb:
        blend_towards(_luma(image)[None], factors["saturation"])
    return image


def _luma(image: np.ndarray) -> np.ndarray:
    """`(3, H, W)` RGB -> `(H, W)` grey, ITU-R 601 weights."""
    return _LUMA[0] * image[0] + _LUMA[1] * image[1] + _LUMA[2] * image[2]


def _from_list(value):
    # Datasets whose columns are nested lists (not `datasets.Image`) hand over Python lists.
    return np.asarray(value) if isinstance(value, list) else value


def _content_key(raw_image, raw_mask) -> int:
    """A 64-bit hash of a sample's pixels (and shapes / modes): its identity for seeded augmentation."""
    digest = hashlib.sha1(usedforsecurity=False)  # fast; an identity, not a security measure
    for value in (raw_image, raw_mask):
        if value is None:
            continue
        if isinstance(value, Image.Image):
            digest.update(f"{value.mode}{value.size}".encode())
            digest.update(value.tobytes())
        else:
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            array = np.ascontiguousarray(value)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
    return int.from_bytes(digest.digest()[:8], "little")


def _describe(raw_image, raw_mask, position: int) -> str:
    files = [getattr(value, "filename", "") for value in (raw_image, raw_mask)]
    named = " / ".join(name for name in files if name)
    return f"at position {position} of this batch" + (f" ({named})" if named else "")


__all__ = [
    "AugmentationEpochCallback",
    "DEFAULT_PHOTOMETRIC",
    "INSTANCE_CLASSES_COLUMN",
    "SegmentationTransform",
    "instance_mapping",
    "set_augmentation_epoch",
]
