# Copyright 2025 The hf-vitseg Authors. Licensed under the Apache License, Version 2.0.
"""Mean IoU for semantic segmentation, as an `evaluate` module that loads without the Hub.

A drop-in for the Hub's `evaluate.load("mean_iou")`: same arguments, same result keys. Load it
with `hf_vitseg.training.metrics.load_mean_iou_metric()`, or `evaluate.load(<this folder>)`.

`evaluate` copies this one file into its modules cache and imports it from there, so it must stay
self-contained: numpy, datasets and evaluate only, no relative imports, one import per line
(`evaluate` finds the dependencies to check by reading `import` lines).
"""

from typing import Dict, Optional

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
IoU of a class is the number of pixels both predicted and labelled as that class, divided by the
number of pixels predicted or labelled as that class. Mean IoU averages it over the classes that
appear in the predictions or the labels; classes that appear in neither are NaN and left out.
Counts are summed over all images before dividing (dataset-level IoU, as mmsegmentation does).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2D int arrays):
        Predicted class maps, each (height, width); images may differ in size.
    references (`list` of 2D int arrays):
        Label maps, each the size of its prediction.
    num_labels (`int`):
        Number of classes. Labels other than `ignore_index` must lie in [0, num_labels).
    ignore_index (`int`):
        Label value of pixels left out of the evaluation.
    nan_to_num (`int`, *optional*):
        If given, NaN entries of the results are replaced by this value.
    label_map (`dict`, *optional*):
        Maps old label values to new ones before evaluation (applied to the original labels).
    reduce_labels (`bool`, *optional*, defaults to `False`):
        Label 0 (background) becomes `ignore_index` and every other label is lowered by 1
        (ADE20k convention).

Returns:
    mean_iou (`float`): IoU averaged over the classes present in predictions or labels.
    mean_accuracy (`float`): per-class accuracy averaged over the classes present in the labels.
    overall_accuracy (`float`): correctly predicted pixels / evaluated pixels.
    per_category_iou (`ndarray` of shape `(num_labels,)`): NaN for classes absent from both.
    per_category_accuracy (`ndarray` of shape `(num_labels,)`): NaN for classes absent from the labels.

Examples:
    >>> from hf_vitseg.training.metrics import load_mean_iou_metric
    >>> mean_iou = load_mean_iou_metric()
    >>> predictions = [np.array([[1, 2], [3, 4], [5, 255]])]
    >>> references = [np.array([[0, 3], [5, 4], [6, 255]])]
    >>> results = mean_iou.compute(predictions=predictions, references=references, num_labels=10, ignore_index=255)
"""

_CITATION = """\
@software{MMSegmentation_Contributors_OpenMMLab_Semantic_Segmentation_2020,
author = {{MMSegmentation Contributors}},
license = {Apache-2.0},
month = {7},
title = {{OpenMMLab Semantic Segmentation Toolbox and Benchmark}},
url = {https://github.com/open-mmlab/mmsegmentation},
year = {2020}
}"""


def _prepare_labels(
    label: np.ndarray, ignore_index: int, label_map: Optional[Dict[int, int]], reduce_labels: bool
) -> np.ndarray:
    if label_map:
        remapped = label.copy()
        for old_id, new_id in label_map.items():
            remapped[label == old_id] = new_id
        label = remapped
    if reduce_labels:
        label = np.where((label == 0) | (label == ignore_index), ignore_index, label - 1)
    return label


def _check_range(values: np.ndarray, num_labels: int, what: str, ignore_index: int) -> None:
    bad = (values < 0) | (values >= num_labels)
    if bad.any():
        raise ValueError(
            f"{what} must lie in [0, {num_labels}) (num_labels={num_labels}) or equal "
            f"ignore_index={ignore_index}; found {np.unique(values[bad])[:10].tolist()}"
        )


def confusion_matrix(
    predictions,
    references,
    num_labels: int,
    ignore_index: int,
    label_map: Optional[Dict[int, int]] = None,
    reduce_labels: bool = False,
) -> np.ndarray:
    """(num_labels, num_labels) int64 counts; rows are labels, columns predictions."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    for prediction, reference in zip(predictions, references):
        prediction = np.asarray(prediction, dtype=np.int64)
        reference = _prepare_labels(np.asarray(reference, dtype=np.int64), ignore_index, label_map, reduce_labels)
        if prediction.shape != reference.shape:
            raise ValueError(f"prediction of shape {prediction.shape} for a label map of shape {reference.shape}")
        valid = reference != ignore_index
        reference, prediction = reference[valid], prediction[valid]
        _check_range(reference, num_labels, "labels", ignore_index)
        _check_range(prediction, num_labels, "predictions", ignore_index)
        matrix += np.bincount(reference * num_labels + prediction, minlength=num_labels**2).reshape(num_labels, -1)
    return matrix


def _nanmean(values: np.ndarray) -> float:
    # np.nanmean warns on an all-NaN slice; an evaluation with no valid pixel is simply NaN
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")


def metrics_from_confusion_matrix(matrix: np.ndarray) -> Dict[str, object]:
    matrix = matrix.astype(np.float64)
    true_positive = np.diag(matrix)
    label_area = matrix.sum(axis=1)
    union = label_area + matrix.sum(axis=0) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 -> NaN marks an absent class
        iou = true_positive / union
        accuracy = true_positive / label_area
        overall_accuracy = true_positive.sum() / matrix.sum()
    return {
        "mean_iou": _nanmean(iou),
        "mean_accuracy": _nanmean(accuracy),
        "overall_accuracy": float(overall_accuracy),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VitSegMeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # (height, width) maps as nested int sequences, as the Hub's mean_iou declared them
            # before it switched to datasets.Image(); uint16 also rejects negative values early.
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
            reference_urls=[
                "https://github.com/open-mmlab/mmsegmentation/blob/71c201b1813267d78764f306a297ca717827c4bf/mmseg/core/evaluation/metrics.py"
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int,
        nan_to_num: Optional[int] = None,
        label_map: Optional[Dict[int, int]] = None,
        reduce_labels: bool = False,
    ):
        matrix = confusion_matrix(predictions, references, num_labels, ignore_index, label_map, reduce_labels)
        results = metrics_from_confusion_matrix(matrix)
        if nan_to_num is not None:
            results = {name: np.nan_to_num(value, nan=nan_to_num) for name, value in results.items()}
        return results
