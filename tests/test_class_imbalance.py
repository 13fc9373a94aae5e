"""Class imbalance: `class_weights` as a list or "auto" (median-frequency weights from one scan of the training
labels, stored resolved in the saved config), the focal loss beside cross-entropy and Dice, and per-class IoU in
the reports (evaluate's output, train's final metrics, the demo's metrics.json)."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest
import torch
from conftest import tiny_backbone_config, tiny_model
from PIL import Image
from torch.nn import functional as F

from hf_vitseg import ViTSegConfig
from hf_vitseg.modeling.losses import focal_loss, segmentation_loss
from hf_vitseg.training.class_weights import label_frequencies, median_frequency_weights

# -- the focal loss ----------------------------------------------------------------------------------------------


def random_batch(classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 6, 5, generator=generator) * 3
    labels = torch.randint(0, classes, (2, 6, 5), generator=generator)
    labels[0, :2] = 255  # ignored pixels
    return logits, labels


@pytest.mark.parametrize("weighted", [False, True])
def test_focal_loss_with_gamma_0_is_cross_entropy(weighted):
    logits, labels = random_batch()
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0]) if weighted else None
    expected = F.cross_entropy(logits, labels, weight=weight, ignore_index=255)
    torch.testing.assert_close(focal_loss(logits, labels, 255, gamma=0.0, weight=weight), expected)


def test_focal_loss_by_hand_and_it_discounts_easy_pixels():
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.5]]).T.reshape(1, 2, 1, 2)  # pixel 0 easy (class 0), pixel 1 hard
    labels = torch.tensor([[[0, 0]]])
    p = logits.softmax(1)[0, 0, 0]  # probability of class 0 at each pixel
    by_hand = (-(1 - p) ** 2 * p.log()).mean()
    torch.testing.assert_close(focal_loss(logits, labels, 255, gamma=2.0), by_hand)
    per_pixel_ce = -p.log()
    per_pixel_focal = -(1 - p) ** 2 * p.log()
    assert per_pixel_focal[0] / per_pixel_ce[0] < per_pixel_focal[1] / per_pixel_ce[1]  # the easy pixel counts less


def test_focal_loss_gradient_is_finite_where_a_pixel_is_certain():
    logits = torch.tensor([[[[80.0]], [[-80.0]]]], requires_grad=True)  # p(class 0) rounds to 1
    for gamma in (0.5, 2.0):
        focal_loss(logits, torch.tensor([[[0]]]), 255, gamma=gamma).backward()
        assert torch.isfinite(logits.grad).all()


def test_the_model_loss_follows_loss_type_class_weights_and_dice():
    logits, labels = random_batch(classes=3)
    weights = [0.2, 1.0, 4.0]
    config = ViTSegConfig(backbone_config=tiny_backbone_config("dinov2"), num_labels=3, loss_type="focal",
                          focal_gamma=1.5, class_weights=weights, dice_loss_weight=0.0)
    expected = focal_loss(logits, labels, 255, 1.5, torch.tensor(weights))
    torch.testing.assert_close(segmentation_loss(logits, labels, config), expected)
    config.loss_type = "cross_entropy"
    torch.testing.assert_close(segmentation_loss(logits, labels, config),
                               F.cross_entropy(logits, labels, weight=torch.tensor(weights), ignore_index=255))
    config.loss_type, config.dice_loss_weight = "focal", 0.5
    assert segmentation_loss(logits, labels, config) > expected  # Dice adds to the focal loss


def test_focal_loss_trains_a_model_end_to_end():
    from conftest import train_steps

    model = tiny_model(num_labels=3, loss_type="focal", class_weights=[1.0, 2.0, 3.0])
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, 3, (2, 32, 32))
    losses, _ = train_steps(model, x, y, steps=8)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


# -- config validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "message"), [
    ({"class_weights": "median"}, "'auto'"),
    ({"class_weights": [1.0, 2.0]}, "2 entries for 3 labels"),
    ({"class_weights": [1.0, -1.0, 1.0]}, ">= 0"),
    ({"class_weights": [1.0, float("nan"), 1.0]}, "finite"),
    ({"class_weights": [0.0, 0.0, 0.0]}, "not all 0"),
    ({"loss_type": "dice"}, "'cross_entropy' or 'focal'"),
    ({"loss_type": "focal", "focal_gamma": -1.0}, "focal_gamma"),
    ({"loss_type": "focal", "focal_gamma": float("inf")}, "focal_gamma"),
    ({"loss_type": "focal", "label_smoothing": 0.1}, "label_smoothing"),
])
def test_bad_loss_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        ViTSegConfig(backbone_config=tiny_backbone_config("dinov2"), num_labels=3, **settings)


def test_unresolved_auto_weights_stop_the_loss_with_the_fix():
    logits, labels = random_batch(classes=3)
    config = ViTSegConfig(backbone_config=tiny_backbone_config("dinov2"), num_labels=3, class_weights="auto")
    with pytest.raises(ValueError, match="median_frequency_weights"):
        segmentation_loss(logits, labels, config)


def test_loss_settings_survive_save_and_load(tmp_path):
    from hf_vitseg import ViTSegForSemanticSegmentation

    model = tiny_model(num_labels=3, loss_type="focal", focal_gamma=1.0, class_weights=[0.5, 1.0, 2.0])
    model.save_pretrained(tmp_path)
    config = ViTSegForSemanticSegmentation.from_pretrained(tmp_path).config
    assert (config.loss_type, config.focal_gamma, config.class_weights) == ("focal", 1.0, [0.5, 1.0, 2.0])


# -- median-frequency weights ------------------------------------------------------------------------------------


def masks_dataset(masks):
    return datasets.Dataset.from_dict({
        "image": [Image.fromarray(np.zeros((*m.shape, 3), np.uint8)) for m in masks],
        "annotation": [Image.fromarray(m.astype(np.uint8)) for m in masks],
    })


def test_median_frequency_weights_by_hand(caplog):
    a = np.zeros((4, 4), np.uint8)
    a[0, :] = 1  # image a: 12 px of class 0, 4 of class 1
    b = np.full((4, 4), 2, np.uint8)
    b[0, 0] = 1
    b[3, :] = 255  # image b: 11 px of class 2, 1 of class 1, 4 ignored
    dataset = masks_dataset([a, b])
    pixels, image_pixels = label_frequencies(dataset, 4, 255)
    assert pixels.tolist() == [12, 5, 11, 0] and image_pixels.tolist() == [16, 28, 12, 0]
    frequency = np.array([12 / 16, 5 / 28, 11 / 12])
    median = float(np.median(frequency))
    with caplog.at_level("INFO", logger="hf_vitseg.training.class_weights"):
        weights = median_frequency_weights(dataset, 4, 255, id2label={0: "bg", 1: "rare", 2: "big", 3: "never"})
    np.testing.assert_allclose(weights, [median / frequency[0], median / frequency[1], median / frequency[2], 1.0])
    assert weights[1] > weights[0] == 1 > weights[2]  # the rare class weighs more, the common one less
    assert "rare=" in caplog.text and "never" in caplog.text  # logged, and the absent class named


def test_median_frequency_weights_after_reduce_labels_and_bad_labels():
    ade = np.array([[0, 1], [2, 2]], np.uint8)  # 0 = "other" (ignored), 1 -> 0, 2 -> 1
    pixels, _ = label_frequencies(masks_dataset([ade]), 2, 255, reduce_labels=True)
    assert pixels.tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"labels \[5\]"):
        label_frequencies(masks_dataset([np.full((2, 2), 5, np.uint8)]), 3, 255)
    with pytest.raises(ValueError, match="no labelled pixel"):
        label_frequencies(masks_dataset([np.full((2, 2), 255, np.uint8)]), 3, 255)


def test_train_resolves_auto_and_saves_the_numbers(tmp_path):
    from hf_vitseg.training import train

    rng = np.random.default_rng(0)
    masks = [(rng.random((32, 32)) < 0.1).astype(np.uint8) for _ in range(2)]  # class 1 rare
    dataset = masks_dataset(masks)
    model = tiny_model(num_labels=2, class_weights="auto", loss_type="focal")
    train(model, dataset, dataset, output_dir=tmp_path / "run", max_steps=1, batch_size=2, use_cpu=True)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["class_weights"] == pytest.approx(median_frequency_weights(dataset, 2, 255))
    assert saved["class_weights"][1] > 1 > saved["class_weights"][0] and saved["loss_type"] == "focal"
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert {"eval_iou_LABEL_0", "eval_iou_LABEL_1"} <= set(results)  # per-class IoU in the final metrics


# -- the command line --------------------------------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{index}.png")
        Image.fromarray((rng.random((32, 32)) < 0.2).astype(np.uint8)).save(masks / f"{index}.png")
    return images, masks


def test_cli_class_weights_auto_and_focal_loss(tiny_backbone_dir, folders, tmp_path, capsys):
    from hf_vitseg.cli import main

    images, masks = folders
    out = tmp_path / "run"
    assert main(["train", "--backbone", str(tiny_backbone_dir), "--num-labels", "2", "--train-images", str(images),
                 "--train-masks", str(masks), "--eval-images", str(images), "--eval-masks", str(masks),
                 "--output-dir", str(out), "--max-steps", "1", "--batch-size", "2", "--crop-size", "32", "--cpu",
                 "--class-weights", "auto", "--loss", "focal", "--focal-gamma", "1.5"]) == 0
    captured = capsys.readouterr()
    weights_line = next(line for line in captured.err.splitlines() if line.startswith("--class-weights auto"))
    assert weights_line.count("=") == 2  # one weight per class, printed
    assert sum(line.startswith("eval_iou_") for line in captured.out.splitlines()) == 2  # per-class IoU
    saved = json.loads((out / "config.json").read_text())
    assert len(saved["class_weights"]) == 2 and saved["class_weights"][1] > saved["class_weights"][0]
    assert (saved["loss_type"], saved["focal_gamma"]) == ("focal", 1.5)

    assert main(["evaluate", "--model", str(out), "--images", str(images), "--masks", str(masks),
                 "--device", "cpu"]) == 0
    report = capsys.readouterr().out
    assert sum(line.startswith("iou_") for line in report.splitlines()) == 2  # evaluate: per-class IoU


@pytest.mark.parametrize(("flags", "message"), [
    (["--class-weights", "heavy"], "--class-weights heavy: give 'auto' or one number per class"),
    (["--class-weights", "1", "-2"], "--class-weights 1 -2: weights must be finite and >= 0"),
    (["--class-weights", "1", "2", "3"], "--class-weights: class_weights has 3 entries for 2 labels"),
    (["--focal-gamma", "2"], "--focal-gamma is the focal loss's exponent; add --loss focal"),
])
def test_cli_bad_loss_flags_are_one_line_naming_the_flag(tiny_backbone_dir, folders, tmp_path, capsys, flags,
                                                        message):
    from hf_vitseg.cli import main

    images, masks = folders
    status = main(["train", "--backbone", str(tiny_backbone_dir), "--num-labels", "2", "--train-images", str(images),
                   "--train-masks", str(masks), "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--cpu",
                   *flags])
    err = capsys.readouterr().err
    assert status == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "config.json").exists()
