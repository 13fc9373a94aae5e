"""Segmentation metrics against a brute-force per-class count, in every way they can be fed."""

import inspect
import socket

import evaluate  # noqa: F401  (load_mean_iou_metric imports it lazily; a slow import, done at collection)
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import EvalPrediction

from hf_vitseg.training.metrics import (
    ConfusionMatrix,
    compute_segmentation_metrics,
    load_mean_iou_metric,
    preprocess_logits_for_metrics,
)

NUM_LABELS = 6
IGNORE_INDEX = 255
ABSENT, ONLY_LABELLED, ONLY_PREDICTED = 3, 4, 5  # classes 0, 1, 2 are in both labels and predictions
SEEDS = [0, 1, 2, 3]
HUB_KEYS = {"mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy"}


def brute_force(predictions, labels, num_labels=NUM_LABELS, ignore_index=IGNORE_INDEX):
    """Metrics over all pixels of all images, one class at a time."""
    prediction = np.concatenate([np.ravel(p) for p in predictions])
    label = np.concatenate([np.ravel(lab) for lab in labels])
    valid = label != ignore_index
    iou, accuracy = [], []
    for c in range(num_labels):
        predicted, labelled = (prediction == c) & valid, (label == c) & valid
        intersection, union = (predicted & labelled).sum(), (predicted | labelled).sum()
        iou.append(intersection / union if union else np.nan)
        accuracy.append(intersection / labelled.sum() if labelled.sum() else np.nan)
    return {
        "mean_iou": np.nanmean(iou),
        "per_class_iou": np.array(iou),
        "pixel_accuracy": (prediction == label)[valid].mean(),
        "mean_accuracy": np.nanmean(accuracy),
        "per_class_accuracy": np.array(accuracy),
    }


def class_map(logits, size):
    """The upsampling the metrics promise: bilinear, align_corners=False, then argmax."""
    logits = torch.as_tensor(logits)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1).numpy()


def random_batches(seed):
    """Batches of coarse logits and full-size labels, with sizes that vary between batches
    (one batch at the label resolution, one at a non-integer ratio)."""
    rng = np.random.default_rng(seed)
    batches = []
    shapes = [((2, 16, 20), (4, 5)), ((3, 12, 14), (5, 6)), ((1, 8, 8), (8, 8))]  # (B, H, W), logits' (h, w)
    for (batch_size, height, width), (logit_h, logit_w) in shapes:
        logits = rng.normal(size=(batch_size, NUM_LABELS, logit_h, logit_w)).astype(np.float32)
        logits[:, [ABSENT, ONLY_LABELLED]] = -1e4  # never predicted
        labels = rng.choice([0, 1, 2, ONLY_LABELLED], size=(batch_size, height, width))
        labels[rng.random(labels.shape) < 0.15] = IGNORE_INDEX
        batches.append((logits, labels))
    predictions = [class_map(logits, labels.shape[-2:]) for logits, labels in batches]
    assert (np.concatenate([p.ravel() for p in predictions]) == ONLY_PREDICTED).any()
    return batches, predictions


def assert_matches(actual, expected):
    for key in ("mean_iou", "pixel_accuracy", "mean_accuracy"):
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-12, err_msg=key)


@pytest.mark.parametrize("seed", SEEDS)
def test_streaming_metrics_match_brute_force(seed):
    batches, predictions = random_batches(seed)
    expected = brute_force(predictions, [labels for _, labels in batches])
    id2label = {i: f"c{i}" for i in range(NUM_LABELS)}
    compute_metrics = compute_segmentation_metrics(NUM_LABELS, IGNORE_INDEX, id2label=id2label)
    inputs = [
        batches[0],  # numpy
        ((torch.from_numpy(batches[1][0]),), torch.from_numpy(batches[1][1])),  # torch, logits in a tuple
        (batches[2][0], torch.from_numpy(batches[2][1])),  # mixed
    ]
    for step, (logits, labels) in enumerate(inputs):
        metrics = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels), compute_result=step == 2)
    assert_matches(metrics, expected)
    per_class_iou = [metrics[f"iou_c{i}"] for i in range(NUM_LABELS)]
    np.testing.assert_allclose(per_class_iou, expected["per_class_iou"], rtol=1e-12)
    assert np.isnan(per_class_iou[ABSENT]) and per_class_iou[ONLY_LABELLED] == per_class_iou[ONLY_PREDICTED] == 0
    assert all(isinstance(value, float) for value in metrics.values())


@pytest.mark.parametrize("seed", SEEDS)
def test_confusion_matrix_matches_brute_force_and_merges(seed):
    batches, predictions = random_batches(seed)
    labels = [torch.from_numpy(labels) for _, labels in batches]
    expected = brute_force(predictions, labels)
    whole, first, rest = ConfusionMatrix(NUM_LABELS), ConfusionMatrix(NUM_LABELS), ConfusionMatrix(NUM_LABELS)
    for index, (prediction, label) in enumerate(zip(predictions, labels)):
        whole.update(torch.from_numpy(prediction), label)
        (first if index == 0 else rest).update(torch.from_numpy(prediction).to(torch.uint8), label)
    results = whole.compute()
    assert_matches(results, expected)
    for key in ("per_class_iou", "per_class_accuracy"):
        np.testing.assert_allclose(results[key], expected[key], rtol=1e-12)
    assert np.isnan(results["per_class_accuracy"][ONLY_PREDICTED])
    assert torch.equal(first.merge(rest).matrix, whole.matrix)  # what a cross-process sum does
    assert torch.equal(ConfusionMatrix(NUM_LABELS).merge(whole.matrix).matrix, whole.matrix)


@pytest.mark.parametrize("batch_eval_metrics", [True, False])
def test_trainer_evaluate_matches_brute_force(tmp_path, batch_eval_metrics):
    class CoarseSegmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Conv2d(3, NUM_LABELS, kernel_size=4, stride=4)

        def forward(self, pixel_values, labels=None):
            logits = self.classifier(pixel_values)
            return {"loss": logits.mean(), "logits": logits}

    torch.manual_seed(0)
    model = CoarseSegmenter()
    pixel_values = torch.randn(5, 3, 16, 20)
    labels = torch.randint(0, NUM_LABELS, (5, 16, 20))
    labels[:, :3] = IGNORE_INDEX
    dataset = [{"pixel_values": x, "labels": y} for x, y in zip(pixel_values, labels)]
    with torch.no_grad():
        predictions = class_map(model(pixel_values)["logits"], (16, 20))

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path),
            batch_eval_metrics=batch_eval_metrics,
            per_device_eval_batch_size=2,
            report_to=[],
            use_cpu=True,
        ),
        compute_metrics=compute_segmentation_metrics(NUM_LABELS, IGNORE_INDEX),
        preprocess_logits_for_metrics=None if batch_eval_metrics else preprocess_logits_for_metrics,
    )
    for _ in range(2):  # a second evaluation starts from zero counts
        metrics = trainer.evaluate(dataset)
        expected = brute_force(predictions, labels.numpy())
        np.testing.assert_allclose(metrics["eval_mean_iou"], expected["mean_iou"], rtol=1e-12)
        np.testing.assert_allclose(metrics["eval_pixel_accuracy"], expected["pixel_accuracy"], rtol=1e-12)
        np.testing.assert_allclose(metrics["eval_iou_1"], expected["per_class_iou"][1], rtol=1e-12)


def test_compute_result_false_until_true_then_reset():
    compute_metrics = compute_segmentation_metrics(NUM_LABELS, IGNORE_INDEX)
    assert "compute_result" in inspect.signature(compute_metrics).parameters  # what Trainer checks
    for seed in SEEDS[:2]:  # two evaluations in a row: the second must not see the first's counts
        batches, predictions = random_batches(seed)
        for step, (logits, labels) in enumerate(batches):
            is_last = step == len(batches) - 1
            metrics = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels), compute_result=is_last)
            if not is_last:
                assert metrics == {}
        assert_matches(metrics, brute_force(predictions, [labels for _, labels in batches]))


def test_absent_class_is_nan_and_left_out_of_the_mean():
    confusion_matrix = ConfusionMatrix(num_labels=3)
    confusion_matrix.update(torch.tensor([[0, 1, 1, 1, 2]]), torch.tensor([[0, 0, 1, 1, IGNORE_INDEX]]))
    results = confusion_matrix.compute()
    assert np.isnan(results["per_class_iou"][2]) and np.isnan(results["per_class_accuracy"][2])
    assert results["mean_iou"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # not divided by 3
    assert results["mean_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert results["pixel_accuracy"] == pytest.approx(3 / 4)


def test_out_of_range_labels_raise():
    confusion_matrix = ConfusionMatrix(num_labels=5, ignore_index=IGNORE_INDEX)
    with pytest.raises(ValueError, match=r"ignore_index=255.*\[-1, 7\]"):
        confusion_matrix.update(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[0, 7, 255], [-1, 4, 7]]))
    with pytest.raises(TypeError, match="argmax"):
        confusion_matrix.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    # -100 is the Trainer's padding, not a label: the Trainer-facing callable ignores it
    metrics = compute_segmentation_metrics(5)((np.zeros((1, 1, 3), dtype=np.int64), np.array([[[0, -100, 1]]])))
    assert metrics["pixel_accuracy"] == 0.5


def test_preprocess_logits_for_metrics():
    logits = torch.randn(2, NUM_LABELS, 3, 5)
    labels = torch.zeros(2, 12, 20, dtype=torch.long)
    class_maps = preprocess_logits_for_metrics((logits, "hidden states"), labels)
    assert class_maps.shape == (2, 12, 20) and class_maps.dtype == torch.int64
    np.testing.assert_array_equal(class_maps.numpy(), class_map(logits, (12, 20)))
    assert torch.equal(preprocess_logits_for_metrics(logits, None), logits.argmax(1))


def test_sync_sums_over_torch_distributed():
    confusion_matrix = ConfusionMatrix(num_labels=2)
    confusion_matrix.update(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]))
    before = confusion_matrix.matrix.clone()
    assert torch.equal(confusion_matrix.sync().matrix, before)  # not initialised: a no-op
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        assert torch.equal(confusion_matrix.sync().matrix, before)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def mean_iou_module():
    """Loaded with every socket refused: loading the packaged module must not touch the network.
    Attempts are recorded as well as refused, in case a library swallows the error and falls back."""
    attempts = []

    def refuse(address):
        attempts.append(address)
        raise OSError(f"network access while loading the metric: {address}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_EVALUATE_OFFLINE", "1")
        # name resolution comes first, and fails here anyway: refusing connect alone would see nothing
        patch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: refuse(host))
        patch.setattr(socket.socket, "connect", lambda sock, address: refuse(address))
        patch.setattr(socket.socket, "connect_ex", lambda sock, address: refuse(address))
        module = load_mean_iou_metric(keep_in_memory=True)
    assert attempts == []
    return module


@pytest.mark.parametrize("seed", SEEDS)
def test_evaluate_module_matches_brute_force(mean_iou_module, seed):
    batches, predictions = random_batches(seed)
    for prediction, (_, labels) in zip(predictions, batches):
        mean_iou_module.add_batch(predictions=list(prediction), references=list(labels))
    results = mean_iou_module.compute(num_labels=NUM_LABELS, ignore_index=IGNORE_INDEX)
    expected = brute_force(predictions, [labels for _, labels in batches])
    assert set(results) == HUB_KEYS
    np.testing.assert_allclose(results["mean_iou"], expected["mean_iou"], rtol=1e-12)
    np.testing.assert_allclose(results["mean_accuracy"], expected["mean_accuracy"], rtol=1e-12)
    np.testing.assert_allclose(results["overall_accuracy"], expected["pixel_accuracy"], rtol=1e-12)
    np.testing.assert_allclose(results["per_category_iou"], expected["per_class_iou"], rtol=1e-12)
    np.testing.assert_allclose(results["per_category_accuracy"], expected["per_class_accuracy"], rtol=1e-12)


def test_evaluate_module_reproduces_hub_example(mean_iou_module):
    """The example of the Hub mean_iou's documentation, with its published numbers."""
    predicted = [
        np.array([[1, 2], [3, 4], [5, 255]]),
        np.array([[2, 7], [9, 2], [3, 6]]),
        np.array([[2, 2, 3], [8, 2, 4], [3, 255, 2]]),
    ]
    actual = [
        np.array([[0, 3], [5, 4], [6, 255]]),
        np.array([[1, 7], [9, 2], [3, 6]]),
        np.array([[1, 2, 2], [8, 2, 1], [3, 255, 1]]),
    ]
    results = mean_iou_module.compute(predictions=predicted, references=actual, num_labels=10, ignore_index=255)
    assert results["mean_iou"] == pytest.approx(0.4775)
    assert results["mean_accuracy"] == pytest.approx(0.5916666666666666)
    assert results["overall_accuracy"] == pytest.approx(0.5263157894736842)
    np.testing.assert_allclose(results["per_category_iou"], [0, 0, 0.375, 0.4, 0.5, 0, 0.5, 1, 1, 1])


def test_evaluate_module_reduce_labels_and_range_check(mean_iou_module):
    rng = np.random.default_rng(0)
    references = [rng.integers(0, 4, size=(6, 7)) for _ in range(2)]
    predictions = [rng.integers(0, 3, size=(6, 7)) for _ in range(2)]
    reduced = [np.where(r == 0, IGNORE_INDEX, r - 1) for r in references]
    results = mean_iou_module.compute(
        predictions=predictions, references=references, num_labels=3, ignore_index=IGNORE_INDEX, reduce_labels=True
    )
    expected = brute_force(predictions, reduced, num_labels=3)
    np.testing.assert_allclose(results["per_category_iou"], expected["per_class_iou"], rtol=1e-12)
    with pytest.raises(ValueError, match=r"ignore_index=255.*\[3\]"):
        mean_iou_module.compute(
            predictions=predictions, references=references, num_labels=3, ignore_index=IGNORE_INDEX
        )
