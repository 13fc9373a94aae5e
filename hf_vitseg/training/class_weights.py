"""Class weights against class imbalance: median-frequency balancing from one scan of the training labels.

Median-frequency balancing (Eigen & Fergus, "Predicting Depth, Surface Normals and Semantic Labels with a Common
Multi-Scale Convolutional Architecture", ICCV 2015; SegNet uses it too): with `freq(c)` the pixels of class `c`
divided by the pixels of the images in which `c` appears, the weight of `c` is `median(freq) / freq(c)`, the
median over the classes that appear. Common classes get weights below 1, rare ones above. A class that never
appears in the training labels gets weight 1 (it is never a target, so its weight changes nothing) and a warning.

`ViTSegConfig(class_weights="auto")` asks `hf_vitseg.training.train` to compute them before the first step; the
config then holds the list, which is saved with the model.
"""

from __future__ import annotations

import logging

import datasets
import numpy as np

logger = logging.getLogger(__name__)


def label_frequencies(dataset, num_labels: int, ignore_index: int, reduce_labels: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
    """One scan of a dataset's `annotation` column (any transform on the dataset bypassed; labels as the model
    sees them: after `reduce_labels` when set).

    Returns:
        `(pixels, image_pixels)`, two int64 arrays of `num_labels`: the pixels of each class, and the labelled
        pixels of the images in which each class appears.

    Raises:
        ValueError: a label outside `[0, num_labels)` other than `ignore_index` (naming the sample), or no
            labelled pixel at all.
    """
    from ..data.datasets import _MASK_READER, ANNOTATION_COLUMN, _decode, _where
    from ..modeling.image_processing_vitseg import reduce_labels as reduce

    raw = dataset.with_format(None)
    features = getattr(raw, "features", None) or {}
    if isinstance(features.get(ANNOTATION_COLUMN), datasets.Image):
        raw = raw.cast_column(ANNOTATION_COLUMN, datasets.Image(decode=False))
    if getattr(raw, "column_names", None) and len(raw.column_names) > 1:
        raw = raw.select_columns([ANNOTATION_COLUMN])  # the images are not read
    pixels = np.zeros(num_labels, dtype=np.int64)
    image_pixels = np.zeros(num_labels, dtype=np.int64)
    for index, row in enumerate(raw):
        where = _where(index, row)
        mask = _MASK_READER.process_segmentation_map(_decode(row[ANNOTATION_COLUMN], where))
        if reduce_labels:
            mask = reduce(mask, ignore_index)
        labels = mask[mask != ignore_index]
        if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
            bad = sorted(set(np.unique(labels[(labels < 0) | (labels >= num_labels)]).tolist()))[:10]
            raise ValueError(f"Sample {where}: labels {bad} lie outside [0, {num_labels}) and are not the ignore "
                             f"index {ignore_index}.")
        counts = np.bincount(labels, minlength=num_labels)
        pixels += counts
        image_pixels[counts > 0] += labels.size
    if pixels.sum() == 0:
        raise ValueError("The training labels hold no labelled pixel (all are the ignore index): class weights "
                         "cannot be computed from them.")
    return pixels, image_pixels


def median_frequency_weights(dataset, num_labels: int, ignore_index: int = 255, reduce_labels: bool = False,
                             id2label: dict | None = None) -> list[float]:
    """Median-frequency class weights (module docstring) from one scan of `dataset`'s labels, logged (at INFO,
    and a warning naming classes that never appear).

    Args:
        dataset: a `datasets.Dataset` with an `annotation` column (what `train` takes).
        num_labels, ignore_index: the model's classes and ignored label.
        reduce_labels: the processor's `do_reduce_labels` (ADE20K-style 0 = "other").
        id2label: class names for the log.

    Returns:
        `num_labels` floats, each finite and > 0.
    """
    pixels, image_pixels = label_frequencies(dataset, num_labels, ignore_index, reduce_labels)
    present = pixels > 0
    frequency = np.divide(pixels, image_pixels, out=np.zeros(num_labels), where=present)
    median = float(np.median(frequency[present]))
    weights = [median / f if p else 1.0 for f, p in zip(frequency.tolist(), present.tolist())]
    names = [str((id2label or {}).get(c, c)) for c in range(num_labels)]
    logger.info("class_weights='auto' (median frequency, %d labelled pixels): %s", int(pixels.sum()),
                ", ".join(f"{name}={w:.4g}" for name, w in zip(names, weights)))
    absent = [name for name, p in zip(names, present.tolist()) if not p]
    if absent:
        logger.warning("class_weights='auto': classes %s never appear in the training labels (weight 1.0).",
                       ", ".join(absent[:20]) + (" ..." if len(absent) > 20 else ""))
    return weights


__all__ = ["label_frequencies", "median_frequency_weights"]
