"""The CLI for mask transformers (issue 11 item 6): `hf-vitseg train --head eomt|pmt --task ...`, `evaluate --task`
and `predict --task instance|panoptic`, and their one-line errors naming the flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_mask_training import MASK_HEAD_KWARGS, make_instance_folder

from hf_vitseg.cli import main


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    root = tmp_path_factory.mktemp("instances")
    images, masks = make_instance_folder(root, num_images=2, size=48)
    return images, masks


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone_dir, instances):
    """`hf-vitseg train --head eomt --task instance` on the instance folder (4 steps): its folder and metrics."""
    images, masks = instances
    out = tmp_path_factory.mktemp("runs") / "eomt"
    code, printed = _main_json([
        "train", "--backbone", str(tiny_backbone_dir), "--head", "eomt", "--head-kwargs", json.dumps(MASK_HEAD_KWARGS),
        "--task", "instance", "--instance-masks", "--train-images", str(images), "--train-masks", str(masks),
        "--eval-images", str(images), "--eval-masks", str(masks), "--id2label", '{"0": "nucleus"}',
        "--max-steps", "4", "--batch-size", "2", "--eval-steps", "4", "--save-steps", "4", "--no-augment", "--cpu",
        "--output-dir", str(out), "--json",
    ])
    assert code == 0
    return out, printed


def _main_json(argv):
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    text = stdout.getvalue()
    return code, (json.loads(text[text.index("{"):]) if code == 0 and "--json" in argv else text)


def test_train_writes_a_universal_model_with_instance_metrics(trained):
    from hf_vitseg.modeling import ViTSegForUniversalSegmentation

    out, metrics = trained
    for name in ("eval_map", "eval_map_50", "eval_map_75", "eval_pq", "eval_ap_nucleus", "train_loss"):
        assert name in metrics
    config = json.loads((out / "config.json").read_text())
    assert config["head"] == "eomt" and config["id2label"] == {"0": "nucleus"}
    model = ViTSegForUniversalSegmentation.from_pretrained(out)
    assert model.attn_mask_probs.tolist() == [0.0, 0.0]  # annealed: the saved model runs plain attention


def test_evaluate_prints_ap_and_pq(trained, instances, capsys):
    out, _ = trained
    images, masks = instances
    code, metrics = _main_json(["evaluate", "--model", str(out), "--task", "instance", "--instance-masks",
                                "--images", str(images), "--masks", str(masks), "--json"])
    assert code == 0
    assert metrics["num_images"] == 2
    for name in ("map", "map_50", "map_75", "pq", "sq", "rq", "ap_nucleus", "pq_nucleus"):
        assert name in metrics
    # the table: the summary first, per-class values after
    assert main(["evaluate", "--model", str(out), "--task", "panoptic", "--instance-masks", "--images", str(images),
                 "--masks", str(masks)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["pq", "sq", "rq", "num_images", "pq_nucleus"]


@pytest.mark.parametrize("task", ["instance", "panoptic"])
def test_predict_writes_segments_json_and_overlay(trained, instances, tmp_path, task):
    out, _ = trained
    images, _ = instances
    image = images / "000.png"
    threshold = ["--threshold", "0"] if task == "instance" else []  # every query a segment: a barely trained model
    assert main(["predict", str(image), "--model", str(out), "--task", task, "--out", str(tmp_path), *threshold]) == 0
    segment_map = np.array(Image.open(tmp_path / "000_segments.png"))
    written = json.loads((tmp_path / "000_segments.json").read_text())
    assert written["task"] == task
    segments = written["segments"]
    assert [s["id"] for s in segments] == list(range(1, len(segments) + 1))
    assert all(s["label"] == "nucleus" and 0 <= s["score"] <= 1 for s in segments)
    assert segment_map.shape == (48, 48) and set(np.unique(segment_map)) <= set(range(len(segments) + 1))
    if task == "instance":
        assert segments  # threshold 0 keeps every non-empty mask
    overlay = Image.open(tmp_path / "000_overlay.png")
    assert overlay.width == 48 and overlay.height >= 48  # the legend below
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "000_overlay.png", "000_segments.json", "000_segments.png"]


def test_predict_semantic_from_a_mask_model(trained, instances, tmp_path):
    out, _ = trained
    images, _ = instances
    assert main(["predict", str(images / "001.png"), "--model", str(out), "--out", str(tmp_path)]) == 0
    labels = np.array(Image.open(tmp_path / "001_labels.png"))
    assert labels.shape == (48, 48) and set(np.unique(labels)) <= {0}


# -- one-line errors naming the flags -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    from conftest import tiny_model

    from hf_vitseg import ViTSegImageProcessor

    folder = tmp_path_factory.mktemp("pixel") / "linear"
    model = tiny_model("linear")
    model.save_pretrained(folder)
    ViTSegImageProcessor.for_model(model).save_pretrained(folder)
    return folder


def _error(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_errors_name_the_flags(trained, pixel_model, instances, tiny_backbone_dir, tmp_path, capsys):
    out, _ = trained
    images, masks = instances
    data = ["--train-images", str(images), "--train-masks", str(masks)]
    err = _error(["train", "--backbone", str(tiny_backbone_dir), "--head", "linear", "--task", "instance",
                  "--num-labels", "2", *data, "--output-dir", str(tmp_path / "a")], capsys)
    assert err.startswith("hf-vitseg train: error: --task instance needs a mask-transformer head") and "--head" in err
    err = _error(["train", "--backbone", str(tiny_backbone_dir), "--head", "eomt", "--instance-class", "1",
                  "--num-labels", "2", *data, "--output-dir", str(tmp_path / "b")], capsys)
    assert "--instance-class" in err and "--instance-masks" in err
    err = _error(["train", "--backbone", str(tiny_backbone_dir), "--head", "eomt", "--instance-masks",
                  "--binary-masks", "--num-labels", "2", *data, "--output-dir", str(tmp_path / "c")], capsys)
    assert "--binary-masks and --instance-masks" in err
    err = _error(["train", "--backbone", str(tiny_backbone_dir), "--head", "eomt", "--task", "instance",
                  "--num-labels", "1", *data, "--output-dir", str(tmp_path / "d")], capsys)  # ids 1, 2 read as classes
    assert err.endswith("Masks of instance ids (one id per object) need --instance-masks.")
    # a pixel head on instance ids would ignore every background pixel: refused, pointing to --binary-masks
    err = _error(["train", "--backbone", str(tiny_backbone_dir), "--head", "linear", "--instance-masks",
                  "--num-labels", "2", *data, "--output-dir", str(tmp_path / "e")], capsys)
    assert err.startswith("hf-vitseg train: error: --instance-masks is for mask transformers")
    assert "--binary-masks" in err
    err = _error(["evaluate", "--model", str(pixel_model), "--instance-masks", "--images", str(images), "--masks",
                  str(masks)], capsys)
    assert err.startswith("hf-vitseg evaluate: error: --instance-masks is for mask transformers")
    err = _error(["evaluate", "--model", str(pixel_model), "--task", "panoptic", "--images", str(images), "--masks",
                  str(masks)], capsys)
    assert err.startswith("hf-vitseg evaluate: error: --task panoptic needs a mask-transformer model")
    err = _error(["evaluate", "--model", str(out), "--sliding-window", "--crop-size", "32", "--instance-masks",
                  "--images", str(images), "--masks", str(masks)], capsys)
    assert "--sliding-window is for pixel heads" in err
    # instance-id masks without --instance-masks: evaluate has no --num-labels / --ignore-index to suggest
    err = _error(["evaluate", "--model", str(out), "--images", str(images), "--masks", str(masks)], capsys)
    assert "add --instance-masks if they hold instance ids" in err and "--num-labels" not in err
    image = str(images / "000.png")
    err = _error(["predict", image, "--model", str(out), "--threshold", "0.3", "--out", str(tmp_path / "p1")], capsys)
    assert "--threshold" in err and "--task instance" in err
    err = _error(["predict", image, "--model", str(pixel_model), "--task", "instance", "--out", str(tmp_path / "p2")],
                 capsys)
    assert "--task instance needs a mask transformer" in err
    err = _error(["predict", image, "--model", str(out), "--flip", "--out", str(tmp_path / "p3")], capsys)
    assert err.startswith("hf-vitseg predict: error: --flip: a mask transformer")
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c", "d", "e", "p1", "p2", "p3"))


def test_no_mask_annealing_keeps_the_models_attention(trained, instances, tmp_path, pixel_model, capsys):
    """Fine-tuning an annealed model further: --no-mask-annealing keeps its plain attention (probs stay 0); a
    pixel head refuses the flag."""
    from hf_vitseg.modeling import ViTSegForUniversalSegmentation

    out, _ = trained
    images, masks = instances
    data = ["--train-images", str(images), "--train-masks", str(masks), "--instance-masks"]
    assert main(["train", "--model", str(out), *data, "--task", "instance", "--no-mask-annealing", "--max-steps",
                 "1", "--batch-size", "2", "--no-augment", "--cpu", "--output-dir", str(tmp_path / "more")]) == 0
    assert ViTSegForUniversalSegmentation.from_pretrained(tmp_path / "more").attn_mask_probs.tolist() == [0.0, 0.0]
    capsys.readouterr()
    err = _error(["train", "--model", str(pixel_model), "--no-mask-annealing", "--train-images", str(images),
                  "--train-masks", str(masks), "--output-dir", str(tmp_path / "pixel")], capsys)
    assert "--no-mask-annealing is for mask transformers" in err
