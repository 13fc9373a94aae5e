"""Instance and panoptic metrics that stream: panoptic quality (PQ, SQ, RQ) and COCO mask AP.

- `PanopticQuality`: PQ / SQ / RQ, overall and per class, as the COCO panoptic API (panopticapi's
  `pq_compute`) defines them: a predicted and a ground-truth segment of the same class match when
  their IoU exceeds 0.5; ground-truth pixels listed in no segment are void, and a predicted segment
  lying more than half on void (or on a crowd region of its class) is not a false positive. Only
  per-class counts are kept between images (tp, fp, fn, summed IoU), so it streams and merges by
  summing.
- `MaskAP`: COCO mask AP, AP50, AP75 through pycocotools' `COCOeval(iouType="segm")`, the reference
  implementation. Masks are kept run-length encoded between `update` and `compute`.

Both take what `ViTSegImageProcessor.post_process_panoptic_segmentation` /
`post_process_instance_segmentation` return (transformers' formats) on the prediction side. Ground
truth is an id map with its segments (`segments_from_masks` turns per-image `mask_labels` /
`class_labels` into one).

Example:

    pq, ap = PanopticQuality(num_labels=2), MaskAP(num_labels=2)
    for image, target in data:
        result = processor.post_process_panoptic_segmentation(model(**inputs), target_sizes=[size])[0]
        pq.update(result["segmentation"], result["segments_info"], target["segmentation"], target["segments_info"])
        ...
    print(pq.compute()["pq"])
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

IOU_THRESHOLD = 0.5  # panopticapi's matching threshold: unique matches, since two segments cannot both exceed it


def _as_numpy(array, name: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    return array


def _integer_map(array, name: str) -> np.ndarray:
    array = _as_numpy(array, name)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a (H, W) map of segment ids, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integer segment ids, got {array.dtype}")
    return array.astype(np.int64, copy=False)


def _segment_label(segment: Mapping[str, Any]) -> int:
    # transformers' post-processing says "label_id", COCO panoptic JSON says "category_id"
    for key in ("label_id", "category_id"):
        if key in segment:
            return int(segment[key])
    raise KeyError(f"a segment needs a 'label_id' (or 'category_id'), got keys {sorted(segment)}")


def _segments_table(
    segments_info: Sequence[Mapping[str, Any]], num_labels: int, name: str
) -> dict[int, tuple[int, bool]]:
    """{segment id: (label, is_crowd)}, checked."""
    table = {}
    for segment in segments_info:
        segment_id, label = int(segment["id"]), _segment_label(segment)
        if segment_id in table:
            raise ValueError(f"{name} lists segment id {segment_id} twice")
        if not 0 <= label < num_labels:
            raise ValueError(
                f"{name}: segment {segment_id} has label {label}, outside [0, {num_labels}) (num_labels={num_labels})"
            )
        table[segment_id] = (label, bool(segment.get("iscrowd", False)))
    return table


def segments_from_masks(masks, labels) -> tuple[torch.Tensor, list[dict[str, int]]]:
    """Per-image binary masks (N, H, W) and their classes (N,) -> (segmentation, segments_info).

    The ground-truth side of `PanopticQuality.update`, from the processor's `mask_labels` /
    `class_labels` of one image: segment `i + 1` is mask `i`; pixels in no mask (ignore, padding) get
    id 0 and no segment, i.e. void. Masks are expected not to overlap; where they do, the later one wins.
    """
    masks = _as_numpy(masks, "masks")
    labels = _as_numpy(labels, "labels").reshape(-1)
    if masks.ndim != 3 or masks.shape[0] != labels.shape[0]:
        raise ValueError(f"masks must be (N, H, W) with one label each; got masks {masks.shape}, labels {labels.shape}")
    segmentation = np.zeros(masks.shape[1:], dtype=np.int64)
    for index, mask in enumerate(masks):
        segmentation[mask > 0.5] = index + 1
    segments_info = [{"id": index + 1, "label_id": int(label)} for index, label in enumerate(labels)]
    return torch.from_numpy(segmentation), segments_info


class PanopticQuality:
    """Streaming panoptic quality (Kirillov et al., 2019) with panopticapi's matching and void rules.

    `update` once per image; `compute` returns

    - `pq`, `sq`, `rq`: means over the classes that occur (tp + fp + fn > 0) in predictions or ground
      truth, as panopticapi averages;
    - `per_class_pq`, `per_class_sq`, `per_class_rq`: lists of `num_labels` floats, NaN for a class
      that never occurs (SQ is NaN for a class with no true positive);
    - with `thing_ids` given: `pq_things`, `sq_things`, `rq_things`, `pq_stuff`, `sq_stuff`, `rq_stuff`.

    PQ treats things and stuff alike; stuff segments must already be one per class (the post-processing's
    `label_ids_to_fuse`, and the ground truth's own layout). The counts (`true_positives`,
    `false_positives`, `false_negatives`, `iou_sum`, per class) merge across processes by summing (`merge`).

    Args:
        num_labels: K, the number of real classes (labels lie in [0, K)).
        thing_ids: class ids that are countable things; the rest are stuff. Only used to split the report.
    """

    def __init__(self, num_labels: int, thing_ids: Sequence[int] | None = None):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.thing_ids = None if thing_ids is None else sorted({int(i) for i in thing_ids})
        if self.thing_ids is not None and any(not 0 <= i < num_labels for i in self.thing_ids):
            raise ValueError(f"thing_ids must lie in [0, {num_labels}), got {self.thing_ids}")
        self.reset()

    def reset(self) -> None:
        self.true_positives = np.zeros(self.num_labels, dtype=np.int64)
        self.false_positives = np.zeros(self.num_labels, dtype=np.int64)
        self.false_negatives = np.zeros(self.num_labels, dtype=np.int64)
        self.iou_sum = np.zeros(self.num_labels, dtype=np.float64)

    def update(self, pred_segmentation, pred_segments_info, target_segmentation, target_segments_info) -> None:
        """Count one image.

        Args:
            pred_segmentation: (H, W) integer segment ids, e.g. `post_process_panoptic_segmentation(...)[i]
                ["segmentation"]`; pixels whose id is in no segment of `pred_segments_info` (-1 there) are
                unassigned.
            pred_segments_info: list of {"id", "label_id"} (other keys, e.g. "score", are ignored).
            target_segmentation: (H, W) integer segment ids of the ground truth; ids listed in no
                segment (e.g. 0 from `segments_from_masks`, or ignore pixels) are void.
            target_segments_info: list of {"id", "label_id" or "category_id", optional "iscrowd"}.
        """
        pred = _integer_map(pred_segmentation, "pred_segmentation")
        target = _integer_map(target_segmentation, "target_segmentation")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred_segmentation of shape {pred.shape} for target_segmentation of shape {target.shape} "
                "(post-process with target_sizes=[the label size])"
            )
        pred_table = _segments_table(pred_segments_info, self.num_labels, "pred_segments_info")
        target_table = _segments_table(target_segments_info, self.num_labels, "target_segments_info")

        # Dense indices: 0 = void / unassigned, i + 1 = the i-th listed segment.
        pred_ids, target_ids = list(pred_table), list(target_table)
        pred_index = _dense_index(pred, pred_ids)
        target_index = _dense_index(target, target_ids)
        num_pred, num_target = len(pred_ids) + 1, len(target_ids) + 1
        # overlap[t, p]: pixels of target segment t (0 = void) and predicted segment p (0 = none)
        overlap = np.bincount((target_index * num_pred + pred_index).ravel(), minlength=num_target * num_pred)
        overlap = overlap.reshape(num_target, num_pred)
        pred_area = overlap.sum(axis=0)
        target_area = overlap.sum(axis=1)

        pred_labels = np.array([pred_table[i][0] for i in pred_ids], dtype=np.int64)
        target_labels = np.array([target_table[i][0] for i in target_ids], dtype=np.int64)
        target_crowd = np.array([target_table[i][1] for i in target_ids], dtype=bool)

        pred_matched = np.zeros(len(pred_ids), dtype=bool)
        target_matched = np.zeros(len(target_ids), dtype=bool)
        targets, preds = np.nonzero(overlap[1:, 1:])
        for t, p in zip(targets, preds):
            if target_crowd[t] or target_labels[t] != pred_labels[p]:
                continue
            intersection = overlap[t + 1, p + 1]
            # the predicted pixels on void count neither way
            union = pred_area[p + 1] + target_area[t + 1] - intersection - overlap[0, p + 1]
            iou = intersection / union
            if iou > IOU_THRESHOLD:
                label = target_labels[t]
                self.true_positives[label] += 1
                self.iou_sum[label] += iou
                pred_matched[p] = target_matched[t] = True

        crowd_by_label = {}
        for t, label in enumerate(target_labels):
            if target_crowd[t]:
                crowd_by_label[label] = t  # panopticapi keeps one crowd region per class (the last)
            elif not target_matched[t]:
                self.false_negatives[label] += 1

        for p, label in enumerate(pred_labels):
            if pred_matched[p] or pred_area[p + 1] == 0:
                continue
            ignored = overlap[0, p + 1]
            if label in crowd_by_label:
                ignored += overlap[crowd_by_label[label] + 1, p + 1]
            if ignored / pred_area[p + 1] > IOU_THRESHOLD:
                continue
            self.false_positives[label] += 1

    def merge(self, other: PanopticQuality) -> PanopticQuality:
        """Add another accumulator's counts (e.g. gathered from another process)."""
        if other.num_labels != self.num_labels:
            raise ValueError(f"cannot merge counts of {other.num_labels} classes into {self.num_labels}")
        self.true_positives += other.true_positives
        self.false_positives += other.false_positives
        self.false_negatives += other.false_negatives
        self.iou_sum += other.iou_sum
        return self

    def _summary(self, classes: np.ndarray) -> tuple[float, float, float]:
        tp, fp, fn = self.true_positives[classes], self.false_positives[classes], self.false_negatives[classes]
        occurring = (tp + fp + fn) > 0
        if not occurring.any():
            return float("nan"), float("nan"), float("nan")
        tp, fp, fn, iou_sum = tp[occurring], fp[occurring], fn[occurring], self.iou_sum[classes][occurring]
        sq = np.divide(iou_sum, tp, out=np.zeros_like(iou_sum), where=tp > 0)
        rq = tp / (tp + 0.5 * fp + 0.5 * fn)
        return float((sq * rq).mean()), float(sq.mean()), float(rq.mean())

    def compute(self) -> dict[str, Any]:
        """PQ, SQ, RQ (floats; NaN when nothing occurred) and the per-class lists; see the class docstring."""
        tp, fp, fn = self.true_positives, self.false_positives, self.false_negatives
        with np.errstate(invalid="ignore", divide="ignore"):
            sq = self.iou_sum / tp
            rq = tp / (tp + 0.5 * fp + 0.5 * fn)
            pq = np.where(tp > 0, sq * rq, np.where(tp + fp + fn > 0, 0.0, np.nan))
        pq_all, sq_all, rq_all = self._summary(np.arange(self.num_labels))
        results: dict[str, Any] = {
            "pq": pq_all,
            "sq": sq_all,
            "rq": rq_all,
            "per_class_pq": pq.tolist(),
            "per_class_sq": sq.tolist(),
            "per_class_rq": rq.tolist(),
        }
        if self.thing_ids is not None:
            things = np.array(self.thing_ids, dtype=np.int64)
            stuff = np.setdiff1d(np.arange(self.num_labels), things)
            for name, classes in (("things", things), ("stuff", stuff)):
                values = self._summary(classes)
                results.update({f"{metric}_{name}": value for metric, value in zip(("pq", "sq", "rq"), values)})
        return results


def _dense_index(segmentation: np.ndarray, segment_ids: list[int]) -> np.ndarray:
    """Map segment ids to 1..len(segment_ids) in listed order; any other value to 0."""
    if not segment_ids:
        return np.zeros(segmentation.shape, dtype=np.int64)
    ids = np.array(segment_ids, dtype=np.int64)
    order = np.argsort(ids)
    sorted_ids = ids[order]
    position = np.clip(np.searchsorted(sorted_ids, segmentation), 0, len(ids) - 1)
    found = sorted_ids[position] == segmentation
    return np.where(found, order[position] + 1, 0)


def _import_pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError(
            "MaskAP needs pycocotools (the COCO reference evaluation): pip install pycocotools "
            "(or pip install 'hf-vitseg[metrics]')"
        ) from error
    return mask_utils, COCO, COCOeval


def _binary_masks(masks, name: str) -> np.ndarray:
    masks = _as_numpy(masks, name)
    if masks.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) binary masks, got shape {masks.shape}")
    if masks.dtype != bool:
        if np.issubdtype(masks.dtype, np.floating) and not np.isfinite(masks).all():
            raise ValueError(f"{name} holds non-finite values")
        masks = masks > 0.5
    return masks


class MaskAP:
    """Streaming COCO mask AP through pycocotools' `COCOeval(iouType="segm")`.

    `update` once per image with the predicted binary masks, scores and labels (e.g. from
    `post_process_instance_segmentation(..., return_binary_maps=True)`, or `masks_from_segmentation`)
    and the ground-truth masks and labels; masks are stored run-length encoded. `compute` returns
    `map` (AP at IoU 0.50:0.95), `map_50`, `map_75`, `map_small`, `map_medium`, `map_large`, `mar`
    (recall at `max_detections`, COCO's AR@100 by default) and `per_class_map` (list of `num_labels`), NaN where
    COCO has nothing to measure (-1 in pycocotools' summary: no ground truth).

    Args:
        num_labels: K, the number of real classes (labels lie in [0, K)).
        max_detections: detections kept per image, by score (COCO's 100; raise it for images with more
            instances than that).
    """

    def __init__(self, num_labels: int, max_detections: int = 100):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {max_detections}")
        _import_pycocotools()  # fail at construction, not after a whole evaluation
        self.num_labels = num_labels
        self.max_detections = max_detections
        self.reset()

    def reset(self) -> None:
        self.images: list[dict[str, int]] = []
        self.targets: list[dict[str, Any]] = []
        self.predictions: list[dict[str, Any]] = []

    def _check_labels(self, labels, count: int, name: str) -> np.ndarray:
        labels = _as_numpy(labels, name).reshape(-1).astype(np.int64)
        if labels.shape[0] != count:
            raise ValueError(f"{name}: {labels.shape[0]} labels for {count} masks")
        if ((labels < 0) | (labels >= self.num_labels)).any():
            found = sorted(set(labels.tolist()))[:10]
            raise ValueError(f"{name} must lie in [0, {self.num_labels}) (num_labels={self.num_labels}), got {found}")
        return labels

    def update(self, pred_masks, pred_scores, pred_labels, target_masks, target_labels, target_iscrowd=None) -> None:
        """Add one image: predicted (N, H, W) masks (bool, or probabilities thresholded at 0.5), (N,)
        scores and (N,) labels; ground-truth (M, H, W) masks and (M,) labels; optional (M,) crowd flags."""
        mask_utils, _, _ = _import_pycocotools()
        pred_masks, target_masks = _binary_masks(pred_masks, "pred_masks"), _binary_masks(target_masks, "target_masks")
        if pred_masks.shape[1:] != target_masks.shape[1:]:
            raise ValueError(
                f"pred_masks of size {pred_masks.shape[1:]} for target_masks of size {target_masks.shape[1:]} "
                "(post-process with target_sizes=[the label size])"
            )
        pred_labels = self._check_labels(pred_labels, len(pred_masks), "pred_labels")
        target_labels = self._check_labels(target_labels, len(target_masks), "target_labels")
        pred_scores = _as_numpy(pred_scores, "pred_scores").reshape(-1).astype(np.float64)
        if pred_scores.shape[0] != len(pred_masks):
            raise ValueError(f"pred_scores: {pred_scores.shape[0]} scores for {len(pred_masks)} masks")
        if not np.isfinite(pred_scores).all():
            raise ValueError("pred_scores holds non-finite values")
        iscrowd = (
            np.zeros(len(target_masks), dtype=bool)
            if target_iscrowd is None
            else _as_numpy(target_iscrowd, "target_iscrowd").reshape(-1).astype(bool)
        )

        image_id = len(self.images) + 1
        height, width = target_masks.shape[1:]
        self.images.append({"id": image_id, "height": int(height), "width": int(width)})
        # COCO's ids must be > 0 (0 means "unmatched" inside COCOeval): classes are stored as label + 1
        for rle, label, crowd in zip(_encode(mask_utils, target_masks), target_labels, iscrowd):
            self.targets.append(
                {
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": int(crowd),
                }
            )
        for rle, label, score in zip(_encode(mask_utils, pred_masks), pred_labels, pred_scores):
            self.predictions.append(
                {"image_id": image_id, "category_id": int(label) + 1, "segmentation": rle, "score": float(score)}
            )

    def compute(self) -> dict[str, Any]:
        """Run COCOeval over every image seen; see the class docstring for the keys."""
        _, COCO, COCOeval = _import_pycocotools()
        names = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
        nan = float("nan")
        if not self.targets:
            return {**dict.fromkeys(names, nan), "mar": nan, "per_class_map": [nan] * self.num_labels}
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": self.images,
            "categories": [{"id": label + 1} for label in range(self.num_labels)],
            "annotations": [{**target, "id": index + 1} for index, target in enumerate(self.targets)],
        }
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            ground_truth.createIndex()
            if not self.predictions:  # loadRes cannot take an empty list: nothing detected is AP 0
                return self._no_detections()
            detections = ground_truth.loadRes([dict(p) for p in self.predictions])
            evaluator = COCOeval(ground_truth, detections, iouType="segm")
            evaluator.params.maxDets = [1, 10, self.max_detections]
            evaluator.evaluate()
            evaluator.accumulate()
        return _summary(evaluator, self.num_labels)

    def _no_detections(self) -> dict[str, Any]:
        present = {target["category_id"] - 1 for target in self.targets if not target["iscrowd"]}
        areas = [target["area"] for target in self.targets if not target["iscrowd"]]
        small = any(a < 32**2 for a in areas)
        medium = any(32**2 <= a < 96**2 for a in areas)
        large = any(a >= 96**2 for a in areas)
        nan = float("nan")
        return {
            "map": 0.0,
            "map_50": 0.0,
            "map_75": 0.0,
            "map_small": 0.0 if small else nan,
            "map_medium": 0.0 if medium else nan,
            "map_large": 0.0 if large else nan,
            "mar": 0.0,
            "per_class_map": [0.0 if k in present else nan for k in range(self.num_labels)],
        }

    def merge(self, other: MaskAP) -> MaskAP:
        """Append another accumulator's images (e.g. gathered from another process)."""
        if other.num_labels != self.num_labels:
            raise ValueError(f"cannot merge {other.num_labels} classes into {self.num_labels}")
        offset = len(self.images)
        self.images += [{**image, "id": image["id"] + offset} for image in other.images]
        self.targets += [{**t, "image_id": t["image_id"] + offset} for t in other.targets]
        self.predictions += [{**p, "image_id": p["image_id"] + offset} for p in other.predictions]
        return self


def _summary(evaluator, num_labels: int) -> dict[str, Any]:
    """COCOeval's summary numbers at `maxDets[-1]` detections per image, read from `evaluator.eval` (pycocotools'
    own `summarize` hard-codes 100 detections for AP at 0.50:0.95 and reports -1 for any other `maxDets`)."""
    # precision: [IoU thresholds, recall points, classes, area ranges (all, small, medium, large), max detections];
    # recall: [IoU thresholds, classes, area ranges, max detections]; -1 where a class has no ground truth
    precision = evaluator.eval["precision"][..., -1]
    recall = evaluator.eval["recall"][..., -1]
    thresholds = evaluator.params.iouThrs

    def mean(values: np.ndarray) -> float:
        values = values[values > -1]
        return float(values.mean()) if values.size else float("nan")

    at = {iou: int(np.argmin(np.abs(thresholds - iou))) for iou in (0.5, 0.75)}
    return {
        "map": mean(precision[:, :, :, 0]),
        "map_50": mean(precision[at[0.5], :, :, 0]),
        "map_75": mean(precision[at[0.75], :, :, 0]),
        "map_small": mean(precision[:, :, :, 1]),
        "map_medium": mean(precision[:, :, :, 2]),
        "map_large": mean(precision[:, :, :, 3]),
        "mar": mean(recall[:, :, 0]),
        "per_class_map": [mean(precision[:, :, k, 0]) for k in range(num_labels)],
    }


def _encode(mask_utils, masks: np.ndarray) -> list[dict[str, Any]]:
    if len(masks) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def masks_from_segmentation(segmentation, segments_info) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(segmentation, segments_info) of one image -> (N, H, W) bool masks, (N,) scores, (N,) labels.

    Turns a panoptic or instance post-processing result into `MaskAP.update`'s prediction arguments
    (a segment without a "score" gets 1.0).
    """
    segmentation = torch.as_tensor(_integer_map(segmentation, "segmentation"))
    if not segments_info:
        return torch.zeros((0, *segmentation.shape), dtype=torch.bool), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    masks = torch.stack([segmentation == int(segment["id"]) for segment in segments_info])
    scores = torch.tensor([float(segment.get("score", 1.0)) for segment in segments_info])
    labels = torch.tensor([_segment_label(segment) for segment in segments_info], dtype=torch.long)
    return masks, scores, labels
