"""Batching for segmentation: samples of different sizes padded to one patch-aligned size, with semantic `labels` or
per-image lists of mask-classification targets (`mask_labels` / `class_labels`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate


class SegmentationCollator:
    r"""
    `data_collator` for `transformers.Trainer` (or `collate_fn` for a `DataLoader`): a list of
    `{"pixel_values": (3, H, W), "labels": (H, W)}` samples (tensors, numpy arrays or nested lists) in,
    `{"pixel_values": (B, 3, H', W') float32, "labels": (B, H', W') int64}` out.

    `H'` / `W'` are the largest height / width in the batch rounded up to `pad_multiple`; each sample sits top-left,
    images padded with 0 (the mean colour after normalisation, as `ViTSegImageProcessor` pads) and labels with
    `ignore_index`, so padding never reaches the loss. `labels` is optional (inference), but must be given for
    every sample or for none. Any other key is batched with `torch.utils.data.default_collate`.

    Mask-classification targets (`ViTSegForUniversalSegmentation`): samples with `mask_labels` `(N_i, H, W)` and
    `class_labels` `(N_i,)` (from `SegmentationTransform(..., return_mask_labels=True)`) come out as lists, one entry
    per image, as the model takes them: `mask_labels` `[(N_i, H', W')]` float32, padded with 0 (padding belongs to
    no target), and `class_labels` `[(N_i,)]` int64. `N_i` may be 0. Such a batch also carries `void_mask`
    `(B, H', W')` bool, the pixels the metrics skip: each sample's own `void_mask` `(H, W)` (ignored pixels; none
    when no sample gives one) and the batch padding, True. The model does not take it.

    Args:
        pad_multiple (`int`, defaults to 14): the backbone's patch size (14 for DINOv2, 16 for ViT / DeiT / SAM).
        ignore_index (`int`, defaults to 255): the model config's `ignore_index`.
    """

    def __init__(self, pad_multiple: int = 14, ignore_index: int = 255):
        if not isinstance(pad_multiple, int) or pad_multiple < 1:
            raise ValueError(f"`pad_multiple` must be a positive int, got {pad_multiple!r}.")
        self.pad_multiple = pad_multiple
        self.ignore_index = int(ignore_index)

    def __repr__(self) -> str:
        return f"SegmentationCollator(pad_multiple={self.pad_multiple}, ignore_index={self.ignore_index})"

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Pad and stack one batch."""
        if len(features) == 0:
            raise ValueError("SegmentationCollator got an empty batch.")
        images = []
        for index, feature in enumerate(features):
            if "pixel_values" not in feature:
                raise KeyError(f"Sample {index} of the batch has no 'pixel_values' (keys: {sorted(feature)}).")
            image = torch.as_tensor(feature["pixel_values"], dtype=torch.float32)
            if image.ndim != 3:
                raise ValueError(
                    f"Sample {index}: pixel_values must be (C, H, W), got shape {tuple(image.shape)}; one sample per "
                    "feature, e.g. from SegmentationTransform."
                )
            images.append(image)
        with_labels = ["labels" in feature and feature["labels"] is not None for feature in features]
        if any(with_labels) and not all(with_labels):
            missing = [index for index, has in enumerate(with_labels) if not has]
            raise ValueError(f"Samples {missing} of the batch have no 'labels' while others have; give all or none.")

        channels = {image.shape[0] for image in images}
        if len(channels) != 1:
            raise ValueError(f"The batch mixes images with {sorted(channels)} channels; convert all to RGB.")
        height = _round_up(max(image.shape[1] for image in images), self.pad_multiple)
        width = _round_up(max(image.shape[2] for image in images), self.pad_multiple)

        pixel_values = images[0].new_zeros((len(images), channels.pop(), height, width))
        for index, image in enumerate(images):
            pixel_values[index, :, : image.shape[1], : image.shape[2]] = image
        batch = {"pixel_values": pixel_values}

        if all(with_labels):
            labels = torch.full((len(images), height, width), self.ignore_index, dtype=torch.int64)
            for index, (feature, image) in enumerate(zip(features, images)):
                label = torch.as_tensor(feature["labels"], dtype=torch.int64)
                if tuple(label.shape) != tuple(image.shape[1:]):
                    raise ValueError(
                        f"Sample {index}: labels have shape {tuple(label.shape)} but pixel_values are "
                        f"{tuple(image.shape[1:])} (H, W); they must match."
                    )
                labels[index, : label.shape[0], : label.shape[1]] = label
            batch["labels"] = labels

        if any("mask_labels" in feature or "class_labels" in feature for feature in features):
            batch["mask_labels"], batch["class_labels"] = _mask_targets(features, images, (height, width))
        if "mask_labels" in batch or any(feature.get("void_mask") is not None for feature in features):
            batch["void_mask"] = _void_masks(features, images, (height, width))

        for key in features[0]:
            if key not in ("pixel_values", "labels", "mask_labels", "class_labels", "void_mask"):
                batch[key] = default_collate([feature[key] for feature in features])
        return batch


def _mask_targets(features, images, padded_hw) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-image `mask_labels` padded with 0 to `padded_hw`, and `class_labels`, checked against each other."""
    mask_labels, class_labels = [], []
    for index, (feature, image) in enumerate(zip(features, images)):
        if feature.get("mask_labels") is None or feature.get("class_labels") is None:
            raise ValueError(
                f"Sample {index} of the batch lacks 'mask_labels' or 'class_labels' while others have them; every "
                "sample needs both (SegmentationTransform(..., return_mask_labels=True) gives them)."
            )
        masks = torch.as_tensor(feature["mask_labels"], dtype=torch.float32)
        classes = torch.as_tensor(feature["class_labels"], dtype=torch.int64).reshape(-1)
        if masks.ndim != 3 or tuple(masks.shape[1:]) != tuple(image.shape[1:]) or len(masks) != len(classes):
            raise ValueError(
                f"Sample {index}: mask_labels have shape {tuple(masks.shape)} and class_labels {tuple(classes.shape)}, "
                f"but must be (N, H, W) and (N,) with (H, W) = {tuple(image.shape[1:])}, the pixel_values' size."
            )
        padded = masks.new_zeros((len(masks), *padded_hw))
        padded[:, : masks.shape[1], : masks.shape[2]] = masks
        mask_labels.append(padded)
        class_labels.append(classes)
    return mask_labels, class_labels


def _void_masks(features, images, padded_hw) -> torch.Tensor:
    """`(B, H', W')` bool: each sample's `void_mask` (all False when no sample has one), the padding True."""
    void = torch.ones((len(images), *padded_hw), dtype=torch.bool)
    given = any(feature.get("void_mask") is not None for feature in features)
    for index, (feature, image) in enumerate(zip(features, images)):
        if not given:
            void[index, : image.shape[1], : image.shape[2]] = False
            continue
        if feature.get("void_mask") is None:
            raise ValueError(f"Sample {index} of the batch has no 'void_mask' while others have; give all or none.")
        mask = torch.as_tensor(feature["void_mask"], dtype=torch.bool)
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise ValueError(f"Sample {index}: void_mask has shape {tuple(mask.shape)}, pixel_values "
                             f"{tuple(image.shape[1:])} (H, W); they must match.")
        void[index, : mask.shape[0], : mask.shape[1]] = mask
    return void


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


__all__ = ["SegmentationCollator"]
