"""Semantic-segmentation metrics that stream: a confusion matrix accumulated batch by batch.

Three ways in, one definition of the numbers (dataset-level IoU: pixel counts are summed over all
images before dividing, as mmsegmentation and the Hub's `mean_iou` do):

- `compute_segmentation_metrics(num_labels)` -> `compute_metrics` for `transformers.Trainer`.
  With `TrainingArguments(batch_eval_metrics=True)` it sees one batch at a time and keeps only a
  `num_labels x num_labels` matrix, never the logits.
- `ConfusionMatrix` for a plain (Accelerate) loop: `update` per batch, `sync` once, `compute`.
- `load_mean_iou_metric()` -> an `evaluate` module with the Hub `mean_iou`'s arguments and keys,
  loaded from this package, so it works offline.

Absent classes: a class found neither in the predictions nor in the labels has IoU NaN and is left
out of `mean_iou`; a class absent from the labels has accuracy NaN and is left out of
`mean_accuracy`. A class only predicted (a false alarm) has IoU 0 and does count.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..modeling.head_base import resize

MEAN_IOU_MODULE_DIR = Path(__file__).parent / "vitseg_mean_iou"

# transformers.Trainer pads labels and predictions with -100 when it concatenates batches or
# gathers them across processes; such pixels carry no label.
TRAINER_PAD_INDEX = -100


class ConfusionMatrix:
    """Pixel counts of (label, prediction) pairs, accumulated over batches.

    `matrix[label, prediction]` is an int64 `(num_labels, num_labels)` tensor that lives on the device
    of the inputs last given to `update`. Pixels labelled `ignore_index` are not counted. Being a sum,
    it merges across processes by summing: `sync()` does so in place, or reduce `matrix` yourself
    (`accelerator.reduce(cm.matrix, "sum")`), or `merge` another instance.

    Example (Accelerate loop):

        cm = ConfusionMatrix(num_labels=150)
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"]).logits
            cm.update(preprocess_logits_for_metrics(logits, batch["labels"]), batch["labels"])
        metrics = cm.sync(accelerator).compute()

    With a distributed sampler, the last batch of some processes may repeat samples to even the
    batches out; those pixels are counted twice by `sync`. Feed `update` with
    `accelerator.gather_for_metrics(...)` outputs (and skip `sync`) when that matters.
    """

    def __init__(self, num_labels: int, ignore_index: int = 255):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_labels, num_labels, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch. `pred` and `target` are integer class maps of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"pred of shape {tuple(pred.shape)} for target of shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError(
                f"pred and target must be integer class maps, got {pred.dtype} and {target.dtype} "
                "(logits? upsample and argmax them first: preprocess_logits_for_metrics)"
            )
        self.matrix = self.matrix.to(pred.device)
        target = target.to(device=pred.device, dtype=torch.int64)
        valid = target != self.ignore_index
        target, pred = target[valid], pred[valid].to(torch.int64)
        self._check_range(target, "target")
        self._check_range(pred, "pred")
        counts = torch.bincount(target * self.num_labels + pred, minlength=self.num_labels**2)
        self.matrix += counts.view(self.num_labels, self.num_labels)

    def _check_range(self, values: torch.Tensor, name: str) -> None:
        out_of_range = (values < 0) | (values >= self.num_labels)
        if out_of_range.any():
            bad_values = torch.unique(values[out_of_range])[:10].tolist()
            raise ValueError(
                f"{name} values must lie in [0, {self.num_labels}) (num_labels={self.num_labels}) or equal "
                f"ignore_index={self.ignore_index}; found {bad_values}"
            )

    def compute(self) -> dict[str, Any]:
        """`mean_iou`, `pixel_accuracy`, `mean_accuracy` (floats) and `per_class_iou`,
        `per_class_accuracy` (lists of `num_labels` floats, NaN for absent classes)."""
        matrix = self.matrix.to("cpu", torch.float64)
        true_positive = matrix.diagonal()
        label_area = matrix.sum(dim=1)
        union = label_area + matrix.sum(dim=0) - true_positive
        # 0 / 0 gives NaN: the mark of a class absent from both (IoU) or from the labels (accuracy)
        iou = true_positive / union
        accuracy = true_positive / label_area
        return {
            "mean_iou": torch.nanmean(iou).item(),
            "per_class_iou": iou.tolist(),
            "pixel_accuracy": (true_positive.sum() / matrix.sum()).item(),
            "mean_accuracy": torch.nanmean(accuracy).item(),
            "per_class_accuracy": accuracy.tolist(),
        }

    def reset(self) -> None:
        self.matrix.zero_()

    def merge(self, other: ConfusionMatrix | torch.Tensor) -> ConfusionMatrix:
        """Add another matrix's counts (an instance, or a gathered/reduced `matrix` tensor)."""
        counts = other.matrix if isinstance(other, ConfusionMatrix) else other
        if counts.shape != self.matrix.shape:
            raise ValueError(f"cannot merge a {tuple(counts.shape)} matrix into a {tuple(self.matrix.shape)} one")
        self.matrix += counts.to(self.matrix.device, torch.int64)
        return self

    def sync(self, accelerator=None) -> ConfusionMatrix:
        """Sum the counts of all processes in place, so every process holds the global matrix.

        Uses `accelerator.reduce` when given an `accelerate.Accelerator`, else `torch.distributed`
        when it is initialised; a no-op in a single process. Call it once per evaluation: a second
        call would sum already summed counts.
        """
        if accelerator is not None:
            self.matrix = accelerator.reduce(self.matrix.to(accelerator.device), reduction="sum")
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            # NCCL only reduces CUDA tensors, and a process that saw no batch still holds a CPU matrix
            if torch.distributed.get_backend() == "nccl":
                self.matrix = self.matrix.to(torch.device("cuda", torch.cuda.current_device()))
            torch.distributed.all_reduce(self.matrix, op=torch.distributed.ReduceOp.SUM)
        return self


def _upsample_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) logits -> (B, H, W) int64 class map.

    Bilinear, `align_corners=False` (`head_base.resize`), as the loss and `post_process_semantic_segmentation`
    do. One image at a time, so that a single full-resolution logit map is alive at once (C x H x W floats).
    """
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits.argmax(dim=1)
    return torch.cat([resize(image[None].float(), size).argmax(dim=1) for image in logits])


def preprocess_logits_for_metrics(logits, labels) -> torch.Tensor:
    """Upsample logits to the label size and take the argmax: (B, C, h, w) -> (B, H, W) int64.

    Pass it as `Trainer(preprocess_logits_for_metrics=...)` when *not* using `batch_eval_metrics`.
    The Trainer then keeps every batch's class map until the end of evaluation instead of its
    logits: H x W int64 (8 bytes) per pixel instead of C x h x w floats, e.g. 8 bytes instead of
    37.5 per label pixel for 150 classes at stride 4, and no `C`-sized tensors in the
    cross-process gather. The trade-offs: the logits are gone (no probabilities, calibration or
    other target sizes afterwards), memory still grows with the size of the evaluation set (on
    the accelerator unless `eval_accumulation_steps` is set), and with few classes at full
    resolution the class map is no smaller than the logits. `batch_eval_metrics=True` with
    `compute_segmentation_metrics` keeps nothing but the confusion matrix and is preferred.

    Also the upsample+argmax step of a hand-written evaluation loop; `labels` may be `None` (then
    the class map stays at the logits' resolution). Logits given as a tuple (model outputs with
    hidden states) are taken from its first element.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    size = tuple(labels.shape[-2:]) if labels is not None else tuple(logits.shape[-2:])
    return _upsample_argmax(logits, size)


def _as_tensor(array, device: torch.device | None = None) -> torch.Tensor:
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
    return tensor.to(device) if device is not None else tensor


class SegmentationMetrics:
    """Streaming `compute_metrics` for `transformers.Trainer`; build it with
    `compute_segmentation_metrics`.

    Called as `metrics(eval_pred, compute_result=...)`. `eval_pred` is an `EvalPrediction` (or a
    `(predictions, labels)` pair) holding numpy arrays or torch tensors; predictions are (B, C, h, w)
    logits at any resolution (or a tuple whose first element they are), or (B, H, W) class maps
    from `preprocess_logits_for_metrics`; labels are (B, H, W). Every call counts its batch; a call
    with `compute_result=True` (the default, hence also the Trainer's single call without
    `batch_eval_metrics`) returns the metrics and resets, ready for the next evaluation. Label
    pixels equal to the Trainer's padding value -100 are ignored, like `ignore_index`.

    Returns a flat dict of floats: `mean_iou`, `pixel_accuracy`, `mean_accuracy` and one
    `iou_<label name>` per class (NaN for a class absent from both predictions and labels).
    """

    def __init__(self, num_labels: int, ignore_index: int = 255, id2label: Mapping[int | str, str] | None = None):
        self.confusion_matrix = ConfusionMatrix(num_labels, ignore_index)
        id2label = id2label or {}
        # configs loaded from JSON may key id2label by strings
        self.label_names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(num_labels)]

    def __call__(self, eval_pred, compute_result: bool = True) -> dict[str, float]:
        predictions, labels = eval_pred[0], eval_pred[1]
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        labels = _as_tensor(labels).long()
        predictions = _as_tensor(predictions, device=labels.device)
        if predictions.ndim == labels.ndim + 1:
            predictions = _upsample_argmax(predictions, tuple(labels.shape[-2:]))
        labels = labels.masked_fill(labels == TRAINER_PAD_INDEX, self.confusion_matrix.ignore_index)
        self.confusion_matrix.update(predictions, labels)
        if not compute_result:
            return {}
        results = self.confusion_matrix.compute()
        self.confusion_matrix.reset()
        metrics = {name: results[name] for name in ("mean_iou", "pixel_accuracy", "mean_accuracy")}
        metrics.update({f"iou_{name}": iou for name, iou in zip(self.label_names, results["per_class_iou"])})
        return metrics

    def reset(self) -> None:
        """Drop the counts of an evaluation that was interrupted before its last batch."""
        self.confusion_matrix.reset()


def compute_segmentation_metrics(
    num_labels: int, ignore_index: int = 255, id2label: Mapping[int | str, str] | None = None
) -> SegmentationMetrics:
    """A `compute_metrics` for `Trainer` that streams mean IoU, pixel and mean accuracy, per-class IoU.

    Example:

        trainer = Trainer(
            model=model,
            args=TrainingArguments(..., batch_eval_metrics=True),
            compute_metrics=compute_segmentation_metrics(
                model.config.num_labels, model.config.ignore_index, model.config.id2label
            ),
        )

    Also works without `batch_eval_metrics` (one call with everything), best together with
    `preprocess_logits_for_metrics`.
    """
    return SegmentationMetrics(num_labels, ignore_index, id2label)


def load_mean_iou_metric(**load_kwargs):
    """The `evaluate` mean IoU module shipped in this package (same arguments and result keys as
    the Hub's `mean_iou`), loaded from its local folder: no Hub access, works offline.

    `load_kwargs` go to `evaluate.load` (e.g. `keep_in_memory=True`, `experiment_id=...`).
    """
    import evaluate  # imported here: it is needed only for this, and costs seconds to import

    return evaluate.load(str(MEAN_IOU_MODULE_DIR), **load_kwargs)
