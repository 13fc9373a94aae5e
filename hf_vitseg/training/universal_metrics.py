"""Streaming metrics of mask transformers (`eomt`, `pmt`) for `Trainer(batch_eval_metrics=True)` and plain loops.

One `compute_metrics` per task, each keeping only running counts between batches (never the logits):

- `"semantic"`: mean IoU, pixel and mean accuracy and per-class IoU (`iou_<class>`) through the semantic models'
  `ConfusionMatrix` (`training/metrics.py`), on `post_process_semantic_segmentation`'s class maps;
- `"panoptic"`: PQ, SQ, RQ and per-class PQ (`pq_<class>`) through `mask_metrics.PanopticQuality`, on
  `post_process_panoptic_segmentation`'s segments;
- `"instance"`: COCO mask AP, AP50, AP75 through `mask_metrics.MaskAP` (pycocotools), on
  `post_process_instance_segmentation`'s segments, and PQ, SQ, RQ of its instance id map (the non-overlapping
  instances; PQ as nuclei segmentation reports it).

Ground truth reaches the metric as two tensors per batch, built by `encode_mask_targets` from the batch's
`mask_labels` / `class_labels` (so that `Trainer` can pad, gather and detach them like any label tensor):
`target_ids` (B, H, W) int64 with `i + 1` where mask `i` lies, 0 where no mask lies (background: counted) and a
negative value on void pixels (`ignore_index` in the batch's `labels`, padding, `Trainer`'s -100 padding), and
`target_classes` (B, N_max) int64, -100 past an image's own masks.

Void and background: void pixels count for nothing (IoU; PQ's void rule; for AP a predicted instance lying mostly on
void is dropped, as PQ drops such a false positive, and the others are cut there).
Pixels in no ground-truth mask that are not void are background: a predicted segment there is a false positive
(PQ) and its pixels count against its IoU (AP). For PQ the background, and the pixels no predicted segment
claims, are scored as one extra class, `num_labels`, that never enters the reported means.

Panoptic post-processing (transformers' algorithm) gives every pixel to one of the kept segments: panoptic data
names its background as a class (stuff), as COCO panoptic does. Instance data whose background is no class (nuclei)
is measured with `"instance"`, which reports PQ too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .metrics import TRAINER_PAD_INDEX, ConfusionMatrix

__all__ = [
    "TASKS",
    "UniversalSegmentationMetrics",
    "check_task",
    "compute_universal_metrics",
    "decode_mask_targets",
    "encode_mask_targets",
    "pack_mask_targets",
    "unpack_mask_targets",
]

TASKS = ("semantic", "instance", "panoptic")
VOID = -1


def check_task(task: str | None, mask_model: bool) -> str:
    """The evaluation task of a run: `task` checked against the model (a pixel head measures `"semantic"` only; a
    mask transformer any of `universal_metrics.TASKS`), default `"semantic"`."""
    if task is None:
        return "semantic"
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}.")
    if task != "semantic" and not mask_model:
        raise ValueError(f"task={task!r} needs a mask-transformer model (head 'eomt' or 'pmt'); pixel heads "
                         "segment semantically. Train one with head='eomt' or head='pmt'.")
    return task


def encode_mask_targets(mask_labels, class_labels, void: torch.Tensor | None = None,
                        size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image target lists -> `(target_ids, target_classes)` (see the module docstring).

    Args:
        mask_labels: list (B) of (N_i, H, W) float {0, 1} masks (the processor's / collator's `mask_labels`).
        class_labels: list (B) of (N_i,) class ids.
        void: optional (B, H, W) bool, True on pixels that carry no label (ignore, padding).
        size: (H, W) when every image has no mask (then the masks cannot tell it).
    """
    batch = len(mask_labels)
    if len(class_labels) != batch:
        raise ValueError(f"{batch} mask_labels for {len(class_labels)} class_labels.")
    if size is None:
        shapes = {tuple(m.shape[-2:]) for m in mask_labels if m.ndim == 3}
        if void is not None:
            shapes.add(tuple(void.shape[-2:]))
        if len(shapes) != 1:
            raise ValueError(f"The batch's masks have sizes {sorted(shapes)}; pad them to one size (the collator).")
        size = shapes.pop()
    device = mask_labels[0].device if batch else None
    target_ids = torch.zeros((batch, *size), dtype=torch.int64, device=device)
    most = max((len(c) for c in class_labels), default=0)
    target_classes = torch.full((batch, most), TRAINER_PAD_INDEX, dtype=torch.int64, device=device)
    for index, (masks, classes) in enumerate(zip(mask_labels, class_labels)):
        if len(masks) != len(classes):
            raise ValueError(f"Image {index}: {len(masks)} masks for {len(classes)} class labels.")
        for number, mask in enumerate(masks):
            target_ids[index][mask.to(device) > 0.5] = number + 1
        target_classes[index, : len(classes)] = classes.to(device=device, dtype=torch.int64)
    if void is not None:
        target_ids[void.to(device=device, dtype=torch.bool)] = VOID
    return target_ids, target_classes


def pack_mask_targets(mask_labels, class_labels, num_labels: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-image target lists -> one `(B, H, W)` int64 map that crops, flips and stacks like a semantic label map
    (the frozen-backbone feature cache keeps `pmt`'s targets this way): `n * num_labels + class` on the pixels of
    an image's `n`-th mask (`n` from 1), -1 on pixels of no mask. `unpack_mask_targets` gives the lists back
    (without the masks a crop removed entirely)."""
    target_ids, target_classes = encode_mask_targets(mask_labels, class_labels, size=size)
    classes = target_classes.clamp(min=0)
    pixel_class = torch.gather(classes, 1, (target_ids - 1).clamp(min=0).flatten(1)).view_as(target_ids) \
        if classes.shape[1] else torch.zeros_like(target_ids)
    return torch.where(target_ids > 0, target_ids * num_labels + pixel_class, torch.full_like(target_ids, -1))


def unpack_mask_targets(packed: torch.Tensor, num_labels: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`pack_mask_targets`'s map -> `(mask_labels, class_labels)`: per image, `(N, H, W)` float masks of the masks
    still present and their `(N,)` classes."""
    mask_labels, class_labels = [], []
    for image in packed.long():
        values = torch.unique(image[image >= 0])
        mask_labels.append((image[None] == values[:, None, None]).float())
        class_labels.append(values % num_labels)
    return mask_labels, class_labels


def decode_mask_targets(target_ids: torch.Tensor, target_classes: torch.Tensor) -> list[dict[str, Any]]:
    """`encode_mask_targets`'s tensors -> per image `{"masks": (N, H, W) bool, "labels": (N,), "void": (H, W) bool}`
    (masks that the void or another mask covered entirely are dropped)."""
    images = []
    for ids, classes in zip(target_ids, target_classes):
        classes = classes[classes != TRAINER_PAD_INDEX]
        numbers = torch.arange(1, len(classes) + 1, device=ids.device)
        masks = ids[None] == numbers[:, None, None]
        present = masks.flatten(1).any(dim=1)
        images.append({"masks": masks[present], "labels": classes[present], "void": ids < 0})
    return images


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


class UniversalSegmentationMetrics:
    """Streaming `compute_metrics` for `Trainer` (with `batch_eval_metrics=True`) on a mask transformer; build it
    with `compute_universal_metrics`.

    Called as `metrics(eval_pred, compute_result=...)` with `eval_pred.predictions = (class_queries_logits,
    masks_queries_logits)` and `eval_pred.label_ids = (target_ids, target_classes)` (what
    `SegmentationTrainer.prediction_step` returns for a mask model). Each call counts its batch; the call with
    `compute_result=True` returns the flat metrics and resets. `update(outputs, target_ids, target_classes)` and
    `compute()` serve a plain loop.
    """

    def __init__(self, processor, task: str, num_labels: int, id2label: Mapping[int | str, str] | None = None,
                 threshold: float | None = None, mask_threshold: float = 0.5,
                 overlap_mask_area_threshold: float = 0.8, label_ids_to_fuse=None):
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}.")
        self.processor = processor
        self.task = task
        self.num_labels = num_labels
        id2label = id2label or {}
        self.label_names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(num_labels)]
        # the post-processing's own defaults (transformers': 0.8 panoptic, 0.5 instance) unless given
        self.post_kwargs: dict[str, Any] = {"mask_threshold": mask_threshold}
        if threshold is not None:
            self.post_kwargs["threshold"] = threshold
        if task != "semantic":
            self.post_kwargs["overlap_mask_area_threshold"] = overlap_mask_area_threshold
        if task == "panoptic" and label_ids_to_fuse is not None:
            self.post_kwargs["label_ids_to_fuse"] = set(label_ids_to_fuse)
        self.reset()

    def reset(self) -> None:
        """Drop the counts (also of an evaluation interrupted before its last batch)."""
        from .mask_metrics import MaskAP, PanopticQuality

        self.confusion = self.quality = self.average_precision = None
        if self.task == "semantic":
            self.confusion = ConfusionMatrix(self.num_labels, ignore_index=-1)
            return
        self.quality = PanopticQuality(self.num_labels + 1)  # + the background class (module docstring)
        if self.task == "instance":
            self.average_precision = MaskAP(self.num_labels)

    # -- one batch -------------------------------------------------------------------------------------------------
    def update(self, outputs, target_ids: torch.Tensor, target_classes: torch.Tensor) -> None:
        """Count one batch: `outputs` has `class_queries_logits` and `masks_queries_logits` (a model output)."""
        target_ids, target_classes = _as_tensor(target_ids).long(), _as_tensor(target_classes).long()
        size = tuple(target_ids.shape[-2:])
        outputs = SimpleNamespace(
            class_queries_logits=_as_tensor(outputs.class_queries_logits).float(),
            masks_queries_logits=_as_tensor(outputs.masks_queries_logits).float(),
        )
        target_sizes = [size] * len(target_ids)
        targets = decode_mask_targets(target_ids, target_classes)
        if self.task == "semantic":
            predictions = self.processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
            for prediction, target, ids in zip(predictions, targets, target_ids):
                label_map = torch.full(size, -1, dtype=torch.int64)
                for mask, label in zip(target["masks"].cpu(), target["labels"].cpu()):
                    label_map[mask] = label
                self.confusion.update(_as_tensor(prediction).long().cpu(), label_map)
        else:
            post_process = getattr(self.processor, f"post_process_{self.task}_segmentation")
            self.update_results(post_process(outputs, target_sizes=target_sizes, **self.post_kwargs), target_ids,
                                target_classes)

    def update_results(self, results: list[dict], target_ids: torch.Tensor, target_classes: torch.Tensor) -> None:
        """Count one batch of already post-processed segments (task instance / panoptic): `results` in
        `post_process_instance_segmentation`'s / `post_process_panoptic_segmentation`'s format, one per image, each
        `segmentation` of the targets' size; e.g. `hf_vitseg.inference.sliding_window_instances`'."""
        if self.task == "semantic":
            raise ValueError("update_results counts instance or panoptic segments; task semantic counts the model "
                             "outputs (update).")
        target_ids, target_classes = _as_tensor(target_ids).long(), _as_tensor(target_classes).long()
        if len(results) != len(target_ids):
            raise ValueError(f"Got {len(results)} results for {len(target_ids)} targets; pass one per image.")
        for result, target in zip(results, decode_mask_targets(target_ids, target_classes)):
            if tuple(_as_tensor(result["segmentation"]).shape) != tuple(target_ids.shape[-2:]):
                raise ValueError(f"A segmentation of shape {tuple(_as_tensor(result['segmentation']).shape)} for "
                                 f"targets of size {tuple(target_ids.shape[-2:])}; post-process to the targets' size.")
            (self._update_panoptic if self.task == "panoptic" else self._update_instance)(result, target)

    def _update_panoptic(self, result, target) -> None:
        """PQ of one image's segments (`post_process_panoptic_segmentation`'s, or the instance id map)."""
        background = self.num_labels
        pred = _as_tensor(result["segmentation"]).long().cpu()
        segments = [{"id": int(s["id"]), "label_id": int(s["label_id"])} for s in result["segments_info"]]
        listed = torch.tensor([s["id"] for s in segments], dtype=torch.int64)
        unassigned_id = int(max([0, *listed.tolist(), int(pred.max()) if pred.numel() else 0])) + 1
        unassigned = ~torch.isin(pred, listed)
        pred = pred.masked_fill(unassigned, unassigned_id)
        if unassigned.any():
            segments.append({"id": unassigned_id, "label_id": background})
        gt = torch.zeros(pred.shape, dtype=torch.int64)  # 0: void
        gt_segments = []
        for number, (mask, label) in enumerate(zip(target["masks"].cpu(), target["labels"].cpu()), start=2):
            gt[mask] = number
            gt_segments.append({"id": number, "label_id": int(label)})
        in_background = (gt == 0) & ~target["void"].cpu()
        if in_background.any():
            gt[in_background] = 1
            gt_segments.append({"id": 1, "label_id": background})
        self.quality.update(pred, segments, gt, gt_segments)

    def _update_instance(self, result, target) -> None:
        """Mask AP of one image's instances, and PQ of its instance id map (instances painted in score order, a
        later one winning an overlap: the non-overlapping segmentation PQ is defined on, as for nuclei)."""
        from .mask_metrics import masks_from_segmentation

        segmentation = _as_tensor(result["segmentation"]).long().cpu()
        masks, scores, labels = masks_from_segmentation(segmentation, result["segments_info"])
        # void pixels count for nothing: an instance lying mostly on void is dropped (panopticapi's rule for a
        # false positive), the others are cut there
        void = target["void"].cpu()
        area = masks.flatten(1).sum(dim=1)
        keep = (masks & void).flatten(1).sum(dim=1) <= 0.5 * area
        masks, scores, labels = masks[keep] & ~void, scores[keep], labels[keep]
        self.average_precision.update(masks, scores, labels, target["masks"].cpu(), target["labels"].cpu())
        self._update_panoptic(result, target)

    def sync(self, accelerator=None) -> UniversalSegmentationMetrics:
        """Merge the counts of every process (an `accelerate.Accelerator`'s), so each holds them all; a no-op in
        one process. Call it once per evaluation, before `compute`."""
        if accelerator is None or accelerator.num_processes == 1:
            return self
        from accelerate.utils import gather_object

        if self.confusion is not None:
            self.confusion.sync(accelerator)
            return self
        for name in ("quality", "average_precision"):
            if getattr(self, name) is not None:
                parts = gather_object([getattr(self, name)])
                for part in parts[1:]:
                    parts[0].merge(part)
                setattr(self, name, parts[0])
        return self

    # -- Trainer's interface ---------------------------------------------------------------------------------------
    def __call__(self, eval_pred, compute_result: bool = True) -> dict[str, float]:
        predictions, labels = eval_pred[0], eval_pred[1]
        class_logits, mask_logits = predictions[0], predictions[1]
        target_ids, target_classes = labels[0], labels[1]
        self.update(SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits),
                    target_ids, target_classes)
        if not compute_result:
            return {}
        metrics = self.compute()
        self.reset()
        return metrics

    def compute(self) -> dict[str, float]:
        """The flat metrics of everything counted since the last reset (see `compute_universal_metrics`)."""
        if self.task == "semantic":
            results = self.confusion.compute()
            metrics = {name: results[name] for name in ("mean_iou", "pixel_accuracy", "mean_accuracy")}
            metrics.update({f"iou_{name}": value for name, value in zip(self.label_names, results["per_class_iou"])})
            return metrics
        metrics = {}
        if self.task == "instance":
            results = self.average_precision.compute()
            metrics.update(map=results["map"], map_50=results["map_50"], map_75=results["map_75"])
            metrics.update({f"ap_{name}": value for name, value in zip(self.label_names, results["per_class_map"])})
        results = self.quality.compute()
        # PQ over the real classes (the background class K left out)
        pq, sq, rq = (np.asarray(results[f"per_class_{m}"][: self.num_labels], dtype=np.float64)
                      for m in ("pq", "sq", "rq"))
        occurring = ~np.isnan(pq)  # tp + fp + fn > 0 (panopticapi averages over these)
        if occurring.any():
            sq_occurring = np.nan_to_num(sq[occurring], nan=0.0)  # a class with no true positive: SQ 0
            metrics.update(pq=float(pq[occurring].mean()), sq=float(sq_occurring.mean()),
                           rq=float(np.nan_to_num(rq[occurring], nan=0.0).mean()))
        else:
            metrics.update(pq=math.nan, sq=math.nan, rq=math.nan)
        metrics.update({f"pq_{name}": float(value) for name, value in zip(self.label_names, pq)})
        return metrics


def compute_universal_metrics(processor, task: str, num_labels: int, id2label=None, **post_process_kwargs):
    """A streaming `compute_metrics` for `Trainer(batch_eval_metrics=True)` on a mask transformer.

    Returns flat floats: `"semantic"`: `mean_iou`, `pixel_accuracy`, `mean_accuracy`, `iou_<class>`;
    `"panoptic"`: `pq`, `sq`, `rq` (means over the classes that occur, as panopticapi), `pq_<class>`;
    `"instance"`: `map`, `map_50`, `map_75` (COCO mask AP), `ap_<class>`, and `pq`, `sq`, `rq`, `pq_<class>` of
    the instance id map.

    Args:
        processor: the `ViTSegImageProcessor` whose post-processing turns outputs into predictions.
        task: `"semantic"`, `"instance"` or `"panoptic"`.
        num_labels, id2label: the model's classes.
        **post_process_kwargs: `threshold`, `mask_threshold`, `overlap_mask_area_threshold`, `label_ids_to_fuse`
            for the post-processing (transformers' defaults otherwise).
    """
    return UniversalSegmentationMetrics(processor, task, num_labels, id2label, **post_process_kwargs)
