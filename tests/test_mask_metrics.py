"""Panoptic quality against torchmetrics (a maintained implementation of panopticapi's rules) on random
panoptic fixtures with void regions; panopticapi's void / crowd / threshold rules by hand; mask AP through
pycocotools on a hand-computed case."""

import builtins

import numpy as np
import pytest
import torch

from hf_vitseg.training.mask_metrics import MaskAP, PanopticQuality, masks_from_segmentation, segments_from_masks

NUM_LABELS = 4


def random_panoptic_pair(rng, height=24, width=28, num_segments=7):
    """A ground-truth panoptic image (id map + segments, with void pixels) and a prediction made from it by
    shifting, relabelling, dropping and adding segments; ids start at 0 on the prediction side and at 1 on the
    target side (0 = void)."""
    target = np.zeros((height, width), dtype=np.int64)
    for segment_id in range(1, num_segments + 1):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
        h, w = rng.integers(3, 10), rng.integers(3, 10)
        target[y : y + h, x : x + w] = segment_id
    target[rng.random((height, width)) < 0.05] = 0  # scattered void pixels
    target[:, :3] = 0  # and a void band
    target_ids = [i for i in np.unique(target) if i != 0]
    target_segments = [{"id": int(i), "label_id": int(rng.integers(NUM_LABELS))} for i in target_ids]

    pred = np.full((height, width), -1, dtype=np.int64)
    pred_segments = []
    for k, segment in enumerate(target_segments):
        if rng.random() < 0.15:
            continue  # missed
        mask = np.roll(target == segment["id"], shift=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
        pred[mask] = k
        label = segment["label_id"] if rng.random() < 0.8 else int(rng.integers(NUM_LABELS))
        pred_segments.append({"id": k, "label_id": label, "score": 0.9, "was_fused": False})
    for extra in range(2):  # false alarms, one of them partly on the void band
        y, x = rng.integers(0, height - 5), rng.integers(0, width - 5)
        pred[y : y + 5, x : x + 5] = 100 + extra
        pred_segments.append({"id": 100 + extra, "label_id": int(rng.integers(NUM_LABELS)), "score": 0.5})
    # every pixel predicted (the rest is one more segment): torchmetrics also discounts predicted-void pixels
    # from the union, which panopticapi (and PanopticQuality) do not; with no predicted void both agree
    pred[rng.random((height, width)) < 0.03] = 200
    pred[pred == -1] = 200
    pred_segments.append({"id": 200, "label_id": int(rng.integers(NUM_LABELS)), "score": 0.3})
    pred_segments = [s for s in pred_segments if (pred == s["id"]).any()]
    return pred, pred_segments, target, target_segments


def to_torchmetrics(segmentation, segments, void_category):
    """(H, W, 2) [category, instance] as torchmetrics wants; unlisted pixels get the void category."""
    out = np.full((*segmentation.shape, 2), fill_value=0, dtype=np.int64)
    out[..., 0] = void_category
    for segment in segments:
        mask = segmentation == segment["id"]
        out[mask, 0] = segment["label_id"]
        out[mask, 1] = segment["id"] + 1000  # instance ids need not be small; keep them distinct from void's 0
    return torch.from_numpy(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_panoptic_quality_matches_torchmetrics(seed):
    tm_detection = pytest.importorskip("torchmetrics.detection", reason="the reference PQ is torchmetrics' (dev extra)")
    rng = np.random.default_rng(seed)
    images = [random_panoptic_pair(rng) for _ in range(4)]
    void = NUM_LABELS  # a category that is neither thing nor stuff: torchmetrics' void
    settings = dict(
        things=set(range(NUM_LABELS)), stuffs=set(), allow_unknown_preds_category=True, return_sq_and_rq=True
    )
    reference = tm_detection.PanopticQuality(**settings, return_per_class=True)
    reference_overall = tm_detection.PanopticQuality(**settings)
    ours, first_half, second_half = (
        PanopticQuality(NUM_LABELS),
        PanopticQuality(NUM_LABELS),
        PanopticQuality(NUM_LABELS),
    )
    for index, (pred, pred_segments, target, target_segments) in enumerate(images):
        for metric in (reference, reference_overall):
            metric.update(
                to_torchmetrics(pred, pred_segments, void)[None], to_torchmetrics(target, target_segments, void)[None]
            )
        ours.update(torch.from_numpy(pred), pred_segments, target, target_segments)
        (first_half if index < 2 else second_half).update(pred, pred_segments, target, target_segments)

    # the fixture exercises every branch: matches, misses, false alarms, and a class with all three
    assert ours.true_positives.sum() > 0 and ours.false_positives.sum() > 0 and ours.false_negatives.sum() > 0
    np.testing.assert_array_equal(ours.true_positives, reference.true_positives.numpy())
    np.testing.assert_array_equal(ours.false_positives, reference.false_positives.numpy())
    np.testing.assert_array_equal(ours.false_negatives, reference.false_negatives.numpy())
    np.testing.assert_allclose(ours.iou_sum, reference.iou_sum.numpy(), rtol=1e-6)  # torchmetrics divides in float32

    result = ours.compute()
    per_class = reference.compute()  # (num_classes, 3): pq, sq, rq
    occurring = (ours.true_positives + ours.false_positives + ours.false_negatives) > 0
    np.testing.assert_allclose(np.array(result["per_class_pq"])[occurring], per_class[occurring, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(np.array(result["per_class_rq"])[occurring], per_class[occurring, 2].numpy(), atol=1e-6)
    pq, sq, rq = reference_overall.compute().tolist()
    assert result["pq"] == pytest.approx(pq, abs=1e-6)
    assert result["sq"] == pytest.approx(sq, abs=1e-6)
    assert result["rq"] == pytest.approx(rq, abs=1e-6)
    # streaming: two accumulators merged count the same as one
    merged = first_half.merge(second_half).compute()
    assert merged["pq"] == pytest.approx(result["pq"], abs=1e-6)
    ours.reset()
    assert np.isnan(ours.compute()["pq"])


def square(size, y0, y1, x0, x1, value=1, base=None):
    image = np.zeros((size, size), dtype=np.int64) if base is None else base
    image[y0:y1, x0:x1] = value
    return image


def test_panoptic_quality_void_crowd_and_threshold_rules():
    """panopticapi's rules, counted by hand on 10x10 images."""
    metric = PanopticQuality(num_labels=2, thing_ids=[0])
    # 1. a prediction covering its target (4x4 = 16 px) plus 8 void pixels: union excludes void -> IoU 1
    target = square(10, 0, 4, 0, 4)  # id 1, the rest of the image is void (0, unlisted)
    pred = square(10, 0, 4, 0, 6, value=7)
    metric.update(pred, [{"id": 7, "label_id": 0}], target, [{"id": 1, "label_id": 0}])
    assert (metric.true_positives[0], metric.iou_sum[0]) == (1, 1.0)
    # 2. a false alarm lying mostly on void is not counted; one on labelled background is
    target = square(10, 0, 10, 0, 10, value=2)
    target[:, :5] = 0  # left half void
    pred = np.full((10, 10), -1)
    pred[0:4, 0:3] = 1  # 12 px on void
    pred[0:4, 3:4] = 1  # 4 px on the stuff segment: 12/16 on void -> ignored
    pred[6:10, 6:10] = 2  # 16 px on the stuff segment (class 1): a class-0 false positive
    metric.update(pred, [{"id": 1, "label_id": 0}, {"id": 2, "label_id": 0}], target, [{"id": 2, "label_id": 1}])
    assert metric.false_positives[0] == 1 and metric.false_negatives[1] == 1
    # 3. IoU exactly 0.5 does not match (strictly greater): a target of 8 px, a prediction on 4 of them
    target = square(10, 0, 2, 0, 4, value=5)
    pred = square(10, 0, 1, 0, 4, value=3, base=np.full((10, 10), -1))
    before = metric.true_positives[0]
    metric.update(pred, [{"id": 3, "label_id": 0}], target, [{"id": 5, "label_id": 0, "iscrowd": 0}])
    assert metric.true_positives[0] == before and metric.false_negatives[0] == 1 and metric.false_positives[0] == 2
    # 4. crowd: an unmatched crowd region is no false negative, a prediction on it no false positive
    target = square(10, 0, 5, 0, 10, value=9)
    pred = square(10, 0, 3, 0, 3, value=4, base=np.full((10, 10), -1))
    metric.update(pred, [{"id": 4, "category_id": 0}], target, [{"id": 9, "category_id": 0, "iscrowd": 1}])
    assert (metric.false_negatives[0], metric.false_positives[0]) == (1, 2)
    # 5. unassigned predicted pixels (-1) stay in the union (panopticapi; torchmetrics would drop them):
    # a target of 8 px, 5 predicted, 3 unassigned -> IoU 5/8 = 0.625, not 1
    unassigned = PanopticQuality(num_labels=1)
    target = square(10, 0, 2, 0, 4, value=1)
    pred = np.full((10, 10), -1)
    pred[0, 0:4], pred[1, 0] = 0, 0
    unassigned.update(pred, [{"id": 0, "label_id": 0}], target, [{"id": 1, "label_id": 0}])
    assert unassigned.compute()["sq"] == pytest.approx(0.625)

    result = metric.compute()
    # class 0: tp 1 (IoU 1), fp 2, fn 1 -> SQ 1, RQ 1 / (1 + 1.5) = 0.4; class 1: fn 1 -> PQ 0, SQ NaN
    assert result["per_class_pq"][0] == pytest.approx(0.4) and result["per_class_rq"][0] == pytest.approx(0.4)
    assert result["per_class_pq"][1] == 0.0 and np.isnan(result["per_class_sq"][1])
    assert (
        result["pq"] == pytest.approx(0.2) and result["pq_things"] == pytest.approx(0.4) and result["pq_stuff"] == 0.0
    )


def test_panoptic_quality_rejects_bad_input():
    metric = PanopticQuality(num_labels=2)
    seg = np.zeros((4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="target_sizes"):
        metric.update(np.zeros((4, 5), dtype=np.int64), [], seg, [])
    with pytest.raises(TypeError, match="integer segment ids"):
        metric.update(seg.astype(float), [], seg, [])
    with pytest.raises(ValueError, match=r"label 2, outside \[0, 2\)"):
        metric.update(seg, [{"id": 0, "label_id": 2}], seg, [])
    with pytest.raises(ValueError, match="twice"):
        metric.update(seg, [], seg, [{"id": 1, "label_id": 0}, {"id": 1, "label_id": 1}])
    with pytest.raises(ValueError, match="num_labels"):
        PanopticQuality(num_labels=0)


def test_segments_from_masks_and_back():
    masks = torch.zeros(2, 6, 6)
    masks[0, :3] = 1
    masks[1, 4:] = 1
    segmentation, segments = segments_from_masks(masks, torch.tensor([1, 0]))
    assert segments == [{"id": 1, "label_id": 1}, {"id": 2, "label_id": 0}]
    assert (segmentation[3] == 0).all()  # in no mask: void
    back_masks, scores, labels = masks_from_segmentation(segmentation, segments)
    assert torch.equal(back_masks, masks.bool()) and labels.tolist() == [1, 0] and scores.tolist() == [1.0, 1.0]
    metric = PanopticQuality(num_labels=2)
    metric.update(segmentation, segments, segmentation, segments)
    assert metric.compute()["pq"] == 1.0


def test_mask_ap_hand_computed():
    """One target of 8 px; detection A (score 0.9) covers 5 of them (IoU 0.625), detection B (score 0.8) covers
    it exactly. IoU thresholds 0.50, 0.55, 0.60: A is a true positive -> AP 1. Thresholds 0.65..0.95 (7): A is a
    false positive ranked first, B the true positive -> precision 1/2 at every recall -> AP 0.5.
    AP = (3 * 1 + 7 * 0.5) / 10 = 0.65, AP50 = 1, AP75 = 0.5."""
    target = np.zeros((1, 16, 16), dtype=bool)
    target[0, 2:4, 2:6] = True
    det_a = np.zeros_like(target)
    det_a[0, 2:4, 2:4] = True
    det_a[0, 2, 4] = True
    for max_detections in (2, 100):  # pycocotools' own summary says -1 for AP at 0.50:0.95 unless maxDets is 100
        metric = MaskAP(num_labels=3, max_detections=max_detections)
        metric.update(np.concatenate([det_a, target]), torch.tensor([0.9, 0.8]), [1, 1], torch.from_numpy(target), [1])
        result = metric.compute()
        assert result["map"] == pytest.approx(0.65) and result["mar"] == pytest.approx(1.0)
    assert (result["map_50"], result["map_75"]) == (pytest.approx(1.0), pytest.approx(0.5))
    assert result["per_class_map"][1] == pytest.approx(0.65) and np.isnan(result["per_class_map"][0])
    assert result["map_small"] == pytest.approx(0.65) and np.isnan(result["map_large"])

    # a second image, predicted perfectly with probabilities (thresholded at 0.5): streams into the same AP
    second = np.zeros((2, 10, 12), dtype=np.float32)
    second[0, :4, :4], second[1, 5:, 5:] = 0.9, 0.7
    metric.update(second, [0.99, 0.98], [2, 2], second > 0.5, [2, 2])
    result = metric.compute()
    assert result["per_class_map"][2] == pytest.approx(1.0) and result["per_class_map"][1] == pytest.approx(0.65)
    assert result["map"] == pytest.approx((1.0 + 0.65) / 2)

    other = MaskAP(num_labels=3)
    other.update(np.zeros((0, 8, 8), dtype=bool), [], [], np.ones((1, 8, 8), dtype=bool), [0])
    assert other.compute()["map"] == 0.0  # nothing detected
    merged = metric.merge(other).compute()
    assert merged["per_class_map"][0] == 0.0 and merged["per_class_map"][2] == pytest.approx(1.0)
    metric.reset()
    assert np.isnan(metric.compute()["map"])


def test_mask_ap_rejects_bad_input_and_names_missing_pycocotools(monkeypatch):
    metric = MaskAP(num_labels=2)
    masks = np.zeros((1, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="target_sizes"):
        metric.update(np.zeros((1, 4, 5), dtype=bool), [0.5], [0], masks, [0])
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        metric.update(masks, [0.5], [5], masks, [0])
    with pytest.raises(ValueError, match="1 scores for 2 masks"):
        metric.update(np.zeros((2, 4, 4), dtype=bool), [0.5], [0, 0], masks, [0])
    with pytest.raises(ValueError, match="non-finite"):
        metric.update(masks, [float("nan")], [0], masks, [0])

    real_import = builtins.__import__

    def no_pycocotools(name, *args, **kwargs):
        if name.startswith("pycocotools"):
            raise ImportError("No module named 'pycocotools'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pycocotools)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        MaskAP(num_labels=2)
