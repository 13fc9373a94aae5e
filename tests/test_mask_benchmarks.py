"""The fast parts of the mask-transformer benchmarks, so they cannot rot: the instance split (the accuracy table's
split with instance ids), scoring, watershed and connected components, `instances.py --quick` and `mask_speed.py` on
tiny models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import instances  # noqa: E402
from benchmarks.data import nuclei_split  # noqa: E402


def discs(size: int = 64, seed: int = 0):
    """A uint16 image of five bright discs (two of them touching, one cut by the middle line) and its instance map."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    centres = [(16, 14), (16, 25), (44, 44), (48, 16), (30, 32)]  # the first two touch; the last on the middle line
    for index, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = index
    image = np.where(labels > 0, 3000, 500) + rng.integers(0, 100, (size, size))
    return image.astype(np.uint16), labels


@pytest.mark.parametrize("scale", [1, 2])
def test_instance_split_is_the_accuracy_tables_split_with_ids(scale):
    image, labels = discs()
    data = instances.instance_split(scale, image=image, instances=labels)
    reference = nuclei_split(scale, image=image, mask=labels > 0)
    np.testing.assert_array_equal(data.split.test_image, reference.test_image)
    np.testing.assert_array_equal(data.test_instances > 0, reference.test_mask > 0)
    # ids renumbered per half from 1; a disc cut by the middle line is one instance on each side
    assert sorted(np.unique(data.train_instances)) == list(range(data.train_instances.max() + 1))
    assert data.train_instances.max() == 4 and data.test_instances.max() == 2
    tiles = data.train_tiles(16 * scale)
    assert [t[0].shape for t in tiles] == [(16 * scale, 16 * scale)] * len(tiles)
    np.testing.assert_array_equal(tiles[0][1] > 0, reference.train_tiles(16 * scale)[0][1] > 0)
    # the other fold: trained on the (mirrored) right half, tested on the mirrored left half
    swapped = instances.instance_split(scale, image=image, instances=labels, swap_halves=True)
    np.testing.assert_array_equal(swapped.test_instances > 0, (data.train_instances > 0)[:, ::-1])
    np.testing.assert_array_equal(swapped.train_instances > 0, (data.test_instances > 0)[:, ::-1])
    assert (swapped.train_instances.max(), swapped.test_instances.max()) == (2, 4)
    with pytest.raises(ValueError, match="even image width"):
        instances.instance_split(scale, image=image[:, :63], instances=labels[:, :63], swap_halves=True)


def test_scores_of_a_perfect_a_merged_and_an_empty_prediction():
    _, labels = discs()
    perfect = instances.evaluate(labels, {i: 1.0 for i in range(1, 6)}, labels)
    assert (perfect["pq"], perfect["rq"], perfect["ap50"], perfect["num_instances"]) == (1.0, 1.0, 1.0, 5)
    # the two touching discs merged into one component: it matches the larger of the two (IoU just above 0.5, the
    # later disc owns the shared pixels), the other is missed: 4 true positives, 1 false negative
    merged, scores = instances.connected_components((labels > 0).astype(float))
    assert merged.max() == 4 and set(scores.values()) == {1.0}
    result = instances.evaluate(merged, scores, labels)
    assert result["rq"] == pytest.approx(4 / (4 + 0.5 * 1))
    empty = instances.evaluate(np.zeros_like(labels), {}, labels)
    assert (empty["pq"], empty["ap50"]) == (0.0, 0.0)
    # where the nuclei go: the merged component matches one disc, the other is counted as merged, not missed
    assert perfect["errors"] == {"matched": 5, "merged": 0, "missed": 0, "other": 0, "false": 0,
                                 "false_on_background": 0}
    assert result["errors"] == {"matched": 4, "merged": 1, "missed": 0, "other": 0, "false": 0,
                                "false_on_background": 0}
    assert empty["errors"]["missed"] == 5 and empty["errors"]["matched"] == 0


def test_error_breakdown_tells_missed_split_and_false_nuclei_apart():
    _, labels = discs()
    prediction = labels.copy()
    prediction[labels == 3] = 0  # disc 3 not found
    columns = np.broadcast_to(np.arange(labels.shape[1]), labels.shape)
    for piece, (low, high) in enumerate(((0, 14), (14, 18), (18, 64)), start=10):  # disc 4 (columns 10-22) in thirds
        prediction[(labels == 4) & (columns >= low) & (columns < high)] = piece
    prediction[58:62, 2:6] = 7  # a blob on the background
    errors = instances.error_breakdown(prediction, labels)
    assert errors == {"matched": 3, "merged": 0, "missed": 1, "other": 1, "false": 4, "false_on_background": 1}


def test_score_instances_scores_either_half():
    image, labels = discs()
    data = instances.instance_split(1, image=image, instances=labels)
    for half, truth in (("train", data.train_instances), ("test", data.test_instances)):
        ids = [i for i in np.unique(truth) if i > 0]
        masks = np.stack([truth == i for i in ids])
        result = instances.score_instances(truth, {i: 1.0 for i in ids}, masks, [1.0] * len(ids), data, half=half)
        assert (result["pq"], result["ap50"], result["fg_iou"], result["num_instances"]) == (1.0, 1.0, 1.0, len(ids))
    # the training half's instances scored against the test half: a shape mismatch is not silently scored
    with pytest.raises(ValueError):
        instances.score_instances(data.train_instances[:, :5], {}, np.zeros((0, 64, 5), bool), [], data)


def test_targets_take_each_kinds_best_row():
    rows = [{"name": "watershed", "kind": "watershed", "pq_mean": 0.5},
            {"name": "dpt + cc", "kind": "semantic", "pq_mean": 0.67},
            {"name": "unet + cc", "kind": "semantic", "pq_mean": 0.64},
            {"name": "eomt, 400 steps", "kind": "eomt", "pq_mean": 0.61},
            {"name": "eomt, 1000 steps", "kind": "eomt", "pq_mean": 0.58},
            {"name": "pmt", "kind": "pmt", "pq_mean": 0.45}, {"name": "pmt, failed", "kind": "pmt", "error": "x"}]
    targets = {t["target"]: t for t in instances.check_targets(rows)}
    beat_semantic = targets["pmt or eomt beats the best semantic head + components on PQ"]
    assert not beat_semantic["met"] and beat_semantic["evidence"] == "eomt, 400 steps 0.610 vs dpt + cc 0.670"
    assert targets["eomt beats the classical baseline on PQ"]["met"]
    assert targets["pmt beats the classical baseline on PQ"]["met"] is False  # 0.45 < 0.5: missed
    rows[-2]["pq_mean"] = 0.7
    assert instances.check_targets(rows)[0]["met"]  # pmt's 0.7 beats dpt's 0.67
    # a ceiling row (components of the true foreground) is context, never a competitor in the targets
    rows.append({"name": "ceiling", "kind": "ceiling", "pq_mean": 0.95})
    assert instances.check_targets(rows)[0]["met"]
    assert "test: right half" in instances.format_table([], 2)
    assert "test: left half" in instances.format_table([], 2, swap_halves=True)


def test_watershed_splits_touching_discs_that_components_merge():
    pytest.importorskip("skimage", reason="the watershed baseline needs scikit-image (benchmarks / dev extra)")
    image, labels = discs()
    gray = image.astype(np.float32) / image.max()
    split, scores = instances.watershed_instances(gray, threshold=0.5, min_distance=4)
    assert split.max() == 5 and len(scores) == 5
    assert instances.evaluate(split, scores, labels)["pq"] > 0.9


@pytest.mark.slow
def test_instances_quick_end_to_end(tiny_backbone_dir, tmp_path, monkeypatch):
    image, labels = discs(96)
    monkeypatch.setattr("hf_vitseg.demo.assets.load_stardist_instances", lambda: (image, labels))
    out = tmp_path / "quick.json"
    results = instances.main(["--quick", "--backbone", str(tiny_backbone_dir), "--rows", "watershed", "pmt", "eomt",
                              "--scale", "1", "--json", str(out)])
    rows = {r["kind"]: r for r in results["scales"]["1"]["rows"]}
    assert set(rows) == {"watershed", "pmt", "eomt"}
    for row in rows.values():
        assert "error" not in row, row
        assert 0.0 <= row["pq_mean"] <= 1.0 and 0.0 <= row["ap50_mean"] <= 1.0
    assert rows["pmt"]["runs"][0]["train_seconds"] > 0 and 0.0 <= rows["eomt"]["fg_iou_mean"] <= 1.0
    saved = json.loads(out.read_text())
    assert [r["kind"] for r in saved["scales"]["1"]["rows"]] == ["watershed", "pmt", "eomt"]
    with np.load(out.with_suffix(".npz")) as npz:
        assert npz["1|pmt"].shape == npz["1|truth"].shape == (96, 48)
    with pytest.raises(SystemExit, match="exists"):
        instances.main(["--quick", "--backbone", str(tiny_backbone_dir), "--rows", "watershed", "--json", str(out)])


@pytest.mark.slow
def test_seeds_run_apart_and_merge_into_one_row(tiny_backbone_dir, tmp_path, monkeypatch):
    image, labels = discs(96)
    monkeypatch.setattr("hf_vitseg.demo.assets.load_stardist_instances", lambda: (image, labels))
    files = []
    for first in (0, 1):
        files.append(tmp_path / f"seed{first}.json")
        instances.main(["--quick", "--backbone", str(tiny_backbone_dir), "--rows", "watershed", "pmt", "--scale", "1",
                        "--first-seed", str(first), "--json", str(files[-1])])
    # a semantic row (another kind of name in the .npz) in a third file
    files.append(tmp_path / "semantic.json")
    instances.main(["--quick", "--backbone", str(tiny_backbone_dir), "--rows", "ceiling", "semantic",
                    "--semantic-heads", "linear",
                    "--scale", "1", "--json", str(files[-1])])
    runs = [json.loads(f.read_text())["scales"]["1"]["rows"][1]["runs"] for f in files[:2]]
    assert [r[0]["seed"] for r in runs] == [0, 1]
    merged_path = tmp_path / "merged.json"
    merged = instances.main(["--merge", *map(str, files), "--json", str(merged_path), "--plot-dir",
                             str(tmp_path / "plots")])
    rows = {r["kind"]: r for r in merged["scales"]["1"]["rows"]}
    # every row's instance map is found, and it is its first seed's (the pmt map of the seed-0 file, not seed 1's)
    maps = instances.merged_maps(merged)["1"]
    assert set(maps) == {"truth", *(r["name"] for r in merged["scales"]["1"]["rows"])}
    with np.load(files[0].with_suffix(".npz")) as first, np.load(files[1].with_suffix(".npz")) as second:
        assert np.array_equal(maps[rows["pmt"]["name"]], first["1|pmt"])
        assert np.array_equal(maps["truth"], first["1|truth"]) and np.array_equal(second["1|truth"], first["1|truth"])
    ceiling = rows["ceiling"]  # components of the true foreground: nothing missed, nothing on background
    assert ceiling["runs"][0]["errors"]["missed"] == ceiling["train_half"]["errors"]["missed"] == 0
    assert ceiling["runs"][0]["errors"]["false_on_background"] == 0 and ceiling["pq_mean"] > 0.5
    for row in merged["scales"]["1"]["rows"]:  # recounted from the saved map = counted when the first seed ran
        assert row["first_seed_errors"] == row["runs"][0]["errors"], row["name"]
    with np.load(files[2].with_suffix(".npz")) as semantic:
        assert np.array_equal(maps[rows["semantic"]["name"]], semantic["1|linear + components"])
    for name in ("instances_pq_1x.png", "instances_1x.png"):
        with Image.open(tmp_path / "plots" / name) as png:
            assert png.format == "PNG" and min(png.size) > 200
    assert [run["seed"] for run in rows["pmt"]["runs"]] == [0, 1]
    assert rows["pmt"]["pq_mean"] == pytest.approx((runs[0][0]["pq"] + runs[1][0]["pq"]) / 2)
    assert rows["pmt"]["ap50_std"] == pytest.approx(np.std([runs[0][0]["ap50"], runs[1][0]["ap50"]], ddof=1))
    assert [t["target"] for t in merged["scales"]["1"]["targets"]] == [
        "pmt or eomt beats the best semantic head + components on PQ", "pmt beats the classical baseline on PQ"]
    assert json.loads(merged_path.read_text())["sources"] == [str(f) for f in files]
    assert len(rows["watershed"]["runs"]) == 1  # deterministic: in both files, one run
    with pytest.raises(SystemExit, match="pmt .* seed 0 is in two of the files"):
        instances.main(["--merge", str(files[0]), str(files[0])])
    other_region = json.loads(files[1].read_text())
    other_region["settings"]["region"] = 128
    (tmp_path / "other_region.json").write_text(json.dumps(other_region))
    with pytest.raises(SystemExit, match="--region / --swap-halves differ"):
        instances.main(["--merge", str(files[0]), str(tmp_path / "other_region.json")])


@pytest.mark.slow
def test_saved_models_are_scored_on_both_halves_and_a_threshold_sweep(tiny_backbone_dir, tmp_path, monkeypatch):
    image, labels = discs(96)
    monkeypatch.setattr("hf_vitseg.demo.assets.load_stardist_instances", lambda: (image, labels))
    models = tmp_path / "models"
    instances.main(["--quick", "--backbone", str(tiny_backbone_dir), "--rows", "pmt", "--scale", "1",
                    "--save-models", str(models), "--json", str(tmp_path / "run.json")])
    folder = str(models / "pmt_1x_seed0")
    out = tmp_path / "scored.json"
    results = instances.main(["--score-saved", folder, "--scale", "1", "--crop", "32", "--score-threshold", "0",
                              "--threshold-sweep", "0", "0.5", "--json", str(out)])[folder]
    assert set(results) == {"windows", "whole", "train_windows", "threshold_sweep"}
    truth = instances.instance_split(1)  # each half scored against its own instances
    assert truth.train_instances.max() != truth.test_instances.max()
    assert results["train_windows"]["num_true_instances"] == len(np.unique(truth.train_instances)) - 1
    assert results["windows"]["num_true_instances"] == len(np.unique(truth.test_instances)) - 1
    # the sweep's pass at the run's own threshold is the windows' result
    assert json.dumps(results["threshold_sweep"]["0"], sort_keys=True) == json.dumps(results["windows"],
                                                                                    sort_keys=True)  # NaN SQ too
    assert results["threshold_sweep"]["0.5"]["num_detections"] <= results["windows"]["num_detections"]
    assert json.loads(out.read_text())["models"][folder]["threshold_sweep"].keys() == {"0", "0.5"}


@pytest.mark.slow
def test_mask_speed_runs_on_a_tiny_config(tmp_path):
    from benchmarks import mask_speed

    out = tmp_path / "speed.json"
    results = mask_speed.main(["--sizes", "32", "--hidden-size", "32", "--layers", "4", "--heads", "2",
                               "--num-blocks", "2", "--num-queries", "5", "--repeats", "1", "--warmup", "0",
                               "--json", str(out)])
    row = results["sizes"]["32"]
    for key in ("eomt_forward_ratio", "eomt_train_step_ratio", "pmt_forward_over_backbone"):
        assert row[key] > 0
    assert json.loads(out.read_text())["sizes"]["32"]["forward_seconds"].keys() == {
        "transformers eomt", "ours eomt", "pmt", "pmt backbone alone"}
    with pytest.raises(SystemExit, match="multiples of the patch size"):
        mask_speed.main(["--sizes", "30"])


def test_paste_by_score_gives_pixels_to_the_higher_score_and_drops_mostly_covered_masks():
    masks = np.zeros((3, 4, 6), bool)
    masks[0, :, 4:] = True  # score 0.9: first, whole
    masks[1, :, 3:] = True  # score 0.7: only column 3 is still free, 1/3 < 0.8: dropped
    masks[2, :, :5] = True  # score 0.6: columns 0-3 free, 4/5 = 0.8: kept there
    pasted, scores = instances.paste_by_score(masks, [0.9, 0.7, 0.6])
    assert scores == {1: 0.9, 2: 0.6}
    assert (pasted[:, 4:] == 1).all() and (pasted[:, :4] == 2).all()
