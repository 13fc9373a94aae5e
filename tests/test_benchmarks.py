"""The fast parts of the benchmarks, so they cannot rot: the leak-free nuclei split, Otsu, the patch-grid
ceiling, `accuracy.py --quick` and `plots.py` on a tiny random backbone, and `ade20k_linear.py` end to end on a
tiny local dataset in scene_parse_150 format."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import data as bench_data  # noqa: E402


def synthetic_nuclei(size: int = 64, seed: int = 0):
    """A uint16 image with bright discs on a dim background, and its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(size // 8):
        cy, cx, r = rng.integers(4, size - 4), rng.integers(4, size - 4), rng.integers(2, 5)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image = np.where(mask, 3000, 500) + rng.integers(0, 200, (size, size))
    return image.astype(np.uint16), mask


# ------------------------------------------------------------------------------------------------ the split


def test_the_benchmarks_and_the_demo_share_one_nuclei_split():
    from hf_vitseg.demo import nuclei

    assert bench_data.nuclei_split is nuclei.nuclei_split and bench_data.resample is nuclei.resample


@pytest.mark.parametrize("scale", [1, 2])
def test_split_halves_do_not_overlap_and_cover_the_image(scale):
    image, mask = synthetic_nuclei(64)
    split = bench_data.nuclei_split(scale, image, mask)
    assert split.columns == {"train": (0, 32), "test": (32, 64)}
    assert split.train_image.shape == split.test_image.shape == (64 * scale, 32 * scale)
    # the test half is the right half and nothing else: its mask is the right half's, resampled
    np.testing.assert_array_equal(bench_data.resample(mask[:, 32:].astype(np.uint8), scale, nearest=True),
                                  split.test_mask)
    np.testing.assert_array_equal(bench_data.resample(mask[:, :32].astype(np.uint8), scale, nearest=True),
                                  split.train_mask)
    # every training tile lies inside the training half, and together they cover it
    covered = np.zeros(split.train_image.shape, bool)
    tile = 16 * scale
    for t_image, t_mask in split.train_tiles(tile, tile // 2):
        assert t_image.shape == t_mask.shape == (tile, tile)
    for y in bench_data.tile_starts(split.train_image.shape[0], tile, tile // 2):
        for x in bench_data.tile_starts(split.train_image.shape[1], tile, tile // 2):
            covered[y : y + tile, x : x + tile] = True
    assert covered.all()


def test_split_statistics_come_from_the_training_half_only():
    image, mask = synthetic_nuclei(64)
    split = bench_data.nuclei_split(2, image, mask)
    changed = image.copy()
    changed[:, 32:] = changed[:, 32:] * 3 + 1000  # a very different test half
    split_changed = bench_data.nuclei_split(2, changed, mask)
    assert split_changed.normalisation == split.normalisation
    np.testing.assert_array_equal(split_changed.train_image, split.train_image)
    low, high = np.percentile(image[:, :32], [1.0, 99.5])
    assert (split.normalisation.low, split.normalisation.high) == (pytest.approx(low), pytest.approx(high))
    # the test half is mapped with those statistics, not its own: a brighter test half stays brighter
    assert split_changed.test_image.mean() > split.test_image.mean()


def test_split_of_the_shipped_nuclei_image_and_region():
    split = bench_data.nuclei_split(1, region=128)
    assert split.train_image.shape == (128, 64) and split.test_image.shape == (128, 64)
    assert 0.0 <= split.train_image.min() and split.train_image.max() <= 1.0
    assert 0.02 < split.describe()["test_foreground"] < 0.6


def test_tile_starts_end_on_the_border_and_reject_bad_sizes():
    assert bench_data.tile_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert bench_data.tile_starts(32, 32, 16) == [0]
    with pytest.raises(ValueError, match="does not fit"):
        bench_data.tile_starts(20, 32, 16)


# ------------------------------------------------------------------------------------------------ Otsu, ceiling


def test_otsu_separates_a_bimodal_image():
    rng = np.random.default_rng(0)
    dark = rng.normal(0.2, 0.03, 5000)
    bright = rng.normal(0.7, 0.05, 2000)
    threshold = bench_data.otsu_threshold(np.concatenate([dark, bright]))
    assert 0.35 < threshold < 0.55  # the middle of the empty gap between the two modes
    assert (dark > threshold).mean() < 0.001 and (bright > threshold).mean() > 0.999


def test_otsu_maximises_the_between_class_variance():
    values = np.random.default_rng(1).random(500) ** 2
    threshold = bench_data.otsu_threshold(values, bins=64, value_range=(0.0, 1.0))

    def between(t):
        low, high = values[values <= t], values[values > t]
        return len(low) * len(high) * (low.mean() - high.mean()) ** 2 if len(low) and len(high) else -1

    cuts = np.linspace(0, 1, 65)[1:-1]
    assert between(threshold) == pytest.approx(max(between(t) for t in cuts))


def test_ceiling_is_exact_for_patch_aligned_masks_and_loses_small_objects():
    blocky = np.kron(np.array([[1, 0, 1], [0, 1, 0]]), np.ones((8, 8), np.uint8))
    ceiling = bench_data.patch_grid_ceiling(blocky, 8)
    # whole-patch objects survive (their borders blur by at most half a patch), a dot far smaller than a patch
    # vanishes: the cap of a head that decides per patch
    assert bench_data.foreground_iou(ceiling, blocky)[0] > 0.6
    dot = np.zeros((16, 16), np.uint8)
    dot[5:7, 5:7] = 1
    assert bench_data.patch_grid_ceiling(dot, 8).sum() == 0
    uniform = np.ones((20, 30), np.uint8)  # partial border patches count only their pixels inside the image
    np.testing.assert_array_equal(bench_data.patch_grid_ceiling(uniform, 8), uniform)


def test_ceiling_of_the_nuclei_test_half_matches_the_measured_figures():
    """DESIGN.md: the ground truth down to the 14-pixel grid and back scores about 0.62 at 1x, 0.88 at 2x."""
    scores = {}
    for scale in (1, 2):
        split = bench_data.nuclei_split(scale)
        ceiling = bench_data.patch_grid_ceiling(split.test_mask, 14)
        scores[scale] = bench_data.foreground_iou(ceiling, split.test_mask)[0]
    assert scores[1] == pytest.approx(0.62, abs=0.02) and scores[2] == pytest.approx(0.88, abs=0.02)


def test_foreground_iou():
    truth = np.array([[1, 1, 0, 0]])
    assert bench_data.foreground_iou(np.array([[1, 0, 0, 0]]), truth) == pytest.approx((0.5, (0.5 + 2 / 3) / 2))


def test_quokka_case_from_given_arrays():
    image = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:40] = True
    case = bench_data.quokka_case(20, image, mask)
    assert case.image.shape == (20, 30, 3) and case.image.dtype == np.float32
    assert case.mask.shape == (20, 30) and case.mask.sum() == 100


# ------------------------------------------------------------------------------------------------ accuracy.py


def test_cached_test_windows_give_the_models_own_predictions(tiny_backbone_dir):
    from benchmarks import accuracy

    model = accuracy.build_model(str(tiny_backbone_dir), "unet", [1, 2, 3, 4], seed=0).eval()
    pixels = torch.randn(3, 48, 40)
    windows = accuracy.TestWindows(str(tiny_backbone_dir), [1, 2, 3, 4], pixels, crop=24)
    direct = accuracy.predict(model, pixels, 24, 8)
    cached = accuracy.predict(windows.model_for(model, [1, 2, 3, 4]), pixels, 24, 8)
    np.testing.assert_array_equal(direct, cached)


def test_logistic_probe_as_a_linear_head_reproduces_the_fitted_logits(tiny_backbone_dir):
    from benchmarks import accuracy

    torch.manual_seed(0)
    pixels = torch.randn(4, 3, 16, 16)
    labels = (torch.rand(4, 16, 16) > 0.5).long()
    taps = accuracy.backbone_taps(str(tiny_backbone_dir), [3, 4], pixels)
    model = accuracy.probe_model(str(tiny_backbone_dir), [3, 4], taps, labels, patch_size=8, max_iter=20).eval()
    features = torch.cat([taps[3][0], taps[4][0]], dim=1)
    tokens = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    fraction = torch.nn.functional.avg_pool2d(labels[:, None].float(), 8)[:, 0]
    mean, var, weight, bias = accuracy.fit_logistic_probe(tokens, (fraction > 0.5).reshape(-1), max_iter=20)
    expected = ((tokens - mean) / torch.sqrt(var + 1e-5)) @ weight + bias
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits  # (4, 2, 2, 2)
    got = (logits[:, 1] - logits[:, 0]).reshape(-1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_batch_order_is_seeded_epoch_by_epoch():
    from benchmarks import accuracy

    order = accuracy.batch_order(10, 4, 5, seed=3)
    assert len(order) == 5 and all(len(b) == 4 for b in order)
    first_epoch = torch.cat(order)[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert all(torch.equal(a, b) for a, b in zip(order, accuracy.batch_order(10, 4, 5, seed=3)))


@pytest.mark.slow
def test_accuracy_quick_and_plots_end_to_end(tiny_backbone_dir, tmp_path):
    from benchmarks import accuracy, plots

    out = tmp_path / "quick.json"
    results = accuracy.main(["--quick", "--backbone", str(tiny_backbone_dir), "--heads", "linear", "unet",
                             "--scale", "1", "--finetune-top", "1", "--json", str(out)])
    rows = {r["name"]: r for r in results["scales"]["1"]["rows"]}
    best = max(("linear", "unet"), key=lambda name: rows[name]["fg_iou_mean"])  # --finetune-top 1 takes it
    assert set(rows) == {"otsu", "ceiling", "probe (last layer)", "probe (last 4)", "linear", "unet",
                         f"{best} + full fine-tune, layer decay", f"{best} + LoRA"}
    for row in rows.values():
        assert "error" not in row, row
        assert 0.0 <= row["fg_iou_mean"] <= 1.0 and 0.0 <= row["miou_mean"] <= 1.0
    assert rows["linear"]["layers"] == [1, 2, 3, 4] and rows["linear"]["runs"][0]["train_seconds"] > 0
    saved = json.loads(out.read_text())
    assert saved["scales"]["1"]["rows"][0]["name"] == "otsu"
    with np.load(out.with_suffix(".npz")) as npz:
        assert npz["1|linear"].shape == npz["1|truth"].shape == (96, 48)
    with pytest.raises(SystemExit, match="exists"):  # results are not overwritten unless asked
        accuracy.main(["--quick", "--backbone", str(tiny_backbone_dir), "--heads", "linear", "--json", str(out)])

    written = plots.main([str(out), "--out-dir", str(tmp_path / "png")])
    names = sorted(p.name for p in written)
    assert names == ["accuracy_vs_time_1x.png", "predictions_1x.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 500_000


def test_accuracy_rejects_an_unknown_head_and_a_bad_crop(tiny_backbone_dir):
    from benchmarks import accuracy

    with pytest.raises(SystemExit, match="unknown head 'nope'"):
        accuracy.main(["--quick", "--backbone", str(tiny_backbone_dir), "--heads", "nope"])
    with pytest.raises(SystemExit, match="multiple of the patch size 8"):
        accuracy.main(["--backbone", str(tiny_backbone_dir), "--heads", "linear", "--crop", "30"])


# ------------------------------------------------------------------------------------------------ ade20k_linear.py


def tiny_scene_parse(folder: Path, num_train: int = 4, num_eval: int = 2) -> Path:
    """A tiny dataset in scene_parse_150 format: `image` (RGB) and `annotation` (L, 0 = other, 1..150)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)

    def rows(count):
        images, annotations = [], []
        for _ in range(count):
            h, w = rng.integers(36, 60, 2)
            images.append(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
            annotations.append(Image.fromarray(rng.integers(0, 151, (h, w), dtype=np.uint8), mode="L"))
        return {"image": images, "annotation": annotations}

    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    dataset = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(rows(num_train), features=features),
        "validation": datasets.Dataset.from_dict(rows(num_eval), features=features),
    })
    dataset.save_to_disk(str(folder))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["linear", "ms"])
def test_ade20k_linear_end_to_end_on_a_tiny_local_dataset(tiny_backbone_dir, tmp_path, mode):
    from benchmarks import ade20k_linear

    dataset = tiny_scene_parse(tmp_path / "ade")
    out = tmp_path / "run"
    result = ade20k_linear.main([
        "--dataset", str(dataset), "--backbone", str(tiny_backbone_dir), "--mode", mode, "--max-steps", "2",
        "--batch-size", "2", "--crop", "32", "--short-side", "32", "--stride", "21", "--num-workers", "0",
        "--ms-ratios", "1.0", "1.5", "--output-dir", str(out),
    ])
    assert result["layers"] == ([4] if mode == "linear" else [1, 2, 3, 4])
    assert result["recipe"]["optimizer"]["lr"] == 1e-3 and result["recipe"]["training_args"]["max_steps"] == 2
    assert 0.0 <= result["mean_iou"] <= 100.0 and result["num_eval_images"] == 2
    assert json.loads((out / "results.json").read_text())["mode"] == mode
    assert (out / "model.safetensors").is_file()


def test_ade20k_reference_figures():
    from benchmarks import ade20k_linear

    assert ade20k_linear.reference_figure("facebook/dinov2-small", "linear") == 44.3
    assert ade20k_linear.reference_figure("facebook/dinov2-small", "ms") == 47.2
    assert ade20k_linear.reference_figure("facebook/dinov2-base", "linear") == 47.3
    assert ade20k_linear.reference_figure("facebook/dinov2-base", "ms") == 51.3
    assert ade20k_linear.reference_figure("some/other", "ms") is None


def test_plots_merge_a_finetune_only_run_into_the_first(tmp_path, capsys):
    from benchmarks import plots

    def run(names, kind, fg_iou=0.5):
        rows = [{"name": n, "kind": kind, "runs": [{"fg_iou": fg_iou, "miou": 0.6, "train_seconds": 2.0}],
                 "fg_iou_mean": fg_iou, "fg_iou_std": 0.0, "miou_mean": 0.6, "miou_std": 0.0,
                 "train_seconds_mean": 2.0, "train_seconds_std": 0.0} for n in names]
        return {"command": kind, "backbone": "tiny (notes)", "scales": {"2": {"rows": rows}}}

    (tmp_path / "a.json").write_text(json.dumps(run(["otsu", "linear", "conv"], "frozen")))
    (tmp_path / "b.json").write_text(json.dumps(run(["otsu", "linear + LoRA"], "lora")))
    (tmp_path / "c.json").write_text(json.dumps(run(["linear"], "rerun", fg_iou=0.7)))
    merged, predictions = plots.load_results(tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json")
    rows = merged["scales"]["2"]["rows"]
    assert [r["name"] for r in rows] == ["otsu", "linear", "conv", "linear + LoRA"]
    assert rows[1]["fg_iou_mean"] == 0.7 and rows[1]["kind"] == "rerun"  # the later run's row, in place
    assert merged["commands"] == ["frozen", "lora", "rerun"] and predictions == {}
    written = plots.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--table"])
    assert [p.name for p in written] == ["accuracy_vs_time_2x.png"]  # no .npz: no prediction grid
    assert "| linear + LoRA | lora |" in capsys.readouterr().out
    assert plots.short_name("upernet + full fine-tune, layer decay") == "upernet FT"


# -- benchmarks/heads.py ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_heads_benchmark_runs_every_row_kind(tmp_path):
    """A tiny input through the real script: a default row, the papers'-widths rows and the transformers peer
    (whose batch-1 training step needs its pool-scale-1 BatchNorm kept on running statistics)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import heads

    out = tmp_path / "heads.json"
    rows = heads.main(["--heads", "linear", "upernet", "--size", "56", "--repeats", "1", "--json", str(out)])
    names = [row["head"] for row in rows]
    assert names == ["linear", "upernet", 'upernet "paper"', 'upernet "paper", stride p',
                     "transformers UperNet (512)"]
    assert json.loads(out.read_text()) == rows
    by_name = {row["head"]: row for row in rows}
    # transformers' widths: our stride-p row and the peer have the same layer shapes, bar the peer's final conv
    assert abs(by_name['upernet "paper", stride p']["head_params_m"] - by_name["transformers UperNet (512)"][
        "head_params_m"]) < 0.1
    assert by_name['upernet "paper"']["head_params_m"] > by_name["upernet"]["head_params_m"]
    assert all(row["forward_ratio"] > 0 and row["train_step_ratio"] > 0 for row in rows)
