"""`hf-vitseg compare` / `compare_heads`: outputs, the recommendation rule, resuming, one backbone pass shared by all
heads, and the shared feature cache's selection, crops and flips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_backbone_config, tiny_model
from PIL import Image

from hf_vitseg import ViTSegConfig, ViTSegForSemanticSegmentation
from hf_vitseg.cli import main
from hf_vitseg.modeling.backbone_adapter import BackboneAdapter
from hf_vitseg.training import compare
from hf_vitseg.training.compare import compare_heads, recommend
from hf_vitseg.training.feature_cache import FeatureCache

TRAIN_SIZE, EVAL_SIZES = (32, 48), [(32, 32), (36, 44)]  # 36 x 44: padded to 40 x 48 by the processor


def _write_split(root: Path, count: int, sizes, seed: int) -> None:
    """Images whose brightness follows a 3-class mask drawn in 4-pixel blocks (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(count):
        height, width = sizes[i % len(sizes)]
        mask = rng.integers(0, 3, (height // 4 + 1, width // 4 + 1)).repeat(4, 0).repeat(4, 1)[:height, :width]
        image = mask[..., None] * 100 + rng.integers(0, 40, (height, width, 3))
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{i}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare_data")
    _write_split(root / "train", 4, [TRAIN_SIZE], seed=0)
    _write_split(root / "eval", 2, EVAL_SIZES, seed=1)
    return root


@pytest.fixture(scope="module")
def datasets_(folders):
    from hf_vitseg.data import load_image_folder

    return (load_image_folder(folders / "train" / "images", folders / "train" / "masks"),
            load_image_folder(folders / "eval" / "images", folders / "eval" / "masks"))


def _fake_measure(model, sample_size, device, repeats):
    """No timing in the tests that do not look at it (the timed passes run the backbone too)."""
    return {"head_params_m": 0.1, "gflops": 1.0, "head_gflops": 0.5, "backbone_gflops": 0.5,
            "forward_ratio": {"linear": 1.0, "mlp": 1.5}.get(model.config.head, 2.0), "measured_at": list(sample_size)}


def _run(tiny_backbone_dir, datasets_, output_dir, heads, **kwargs):
    settings = {"num_labels": 3, "crop_size": 16, "max_steps": 2, "batch_size": 2, "repeats": 1, "grid_images": 1,
                "progress": False, **kwargs}
    return compare_heads(str(tiny_backbone_dir), *datasets_, output_dir=output_dir, heads=heads, **settings)


def test_compare_command_writes_report_results_plot_grid_and_the_recommended_model(tiny_backbone_dir, folders,
                                                                                     tmp_path, capsys):
    out = tmp_path / "which-head"
    status = main(["compare", "--backbone", str(tiny_backbone_dir), *_cli_args(
        folders, out, heads="linear segformer", crop_size="16 24", max_steps="3", batch_size="2", grid_images="2"),
        "--cpu"])
    assert status == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    heads = {r["head"]: r for r in results["heads"]}
    assert list(heads) == ["linear", "segformer"]
    for r in heads.values():
        assert 0 <= r["miou"] <= 1 and len(r["per_class_iou"]) == 3
        assert r["head_params_m"] > 0 and r["gflops"] > r["head_gflops"] > 0 and r["forward_ratio"] > 0
        assert r["seconds"] >= r["train_seconds"] > 0 and r["measured_at"] == [16, 24]
    assert heads["segformer"]["head_params_m"] > heads["linear"]["head_params_m"]
    assert results["recommendation"] == recommend(results["heads"])
    assert results["cached_layers"] == [1, 2, 3, 4]

    report = (out / "report.md").read_text()
    assert "| linear | 1,2,3,4 |" in report and "| segformer | 1,2,3,4 |" in report
    assert f"**Recommendation: `{results['recommendation']['saved']}`**" in report
    assert results["recommendation"]["why"] in report
    for name in ("accuracy_vs_cost.png", "predictions.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100
    with Image.open(out / "predictions.png") as grid, Image.open(out / "accuracy_vs_cost.png") as plot:
        assert grid.height > 2 * EVAL_SIZES[0][0] and plot.height > 100  # two rows of image | truth | 2 heads

    # the recommended head, trained, as a model folder that loads (and pushes) like any saved model
    saved = results["recommendation"]["saved"]
    model = ViTSegForSemanticSegmentation.from_pretrained(out / "model")
    assert model.config.head == saved and (out / "model" / "preprocessor_config.json").is_file()
    from safetensors.torch import load_file

    trained = load_file(out / "heads" / saved / "head.safetensors")
    state = model.state_dict()
    assert trained and all(torch.equal(state[k], v) for k, v in trained.items())
    assert "recommended: " + saved in capsys.readouterr().out


def test_recommendation_is_the_fastest_head_within_one_miou_point_of_the_best():
    rows = [{"head": "upernet", "miou": 0.900, "forward_ratio": 1.9}, {"head": "segformer", "miou": 0.892,
            "forward_ratio": 1.2}, {"head": "linear", "miou": 0.880, "forward_ratio": 1.01},
            {"head": "unet", "error": "RuntimeError: out of memory"}]
    rec = recommend(rows)
    assert rec["most_accurate"] == "upernet" and rec["fastest_within_one_point"] == "segformer"
    assert rec["saved"] == "segformer" and "within 0.8 mIoU points" in rec["why"]
    rows[1]["miou"] = 0.889  # just outside one point: the best is also the fastest candidate
    rec = recommend(rows)
    assert rec["saved"] == rec["most_accurate"] == "upernet" and "no head within one mIoU point" in rec["why"]
    assert recommend([{"head": "unet", "error": "x"}]) is None


def test_the_backbone_runs_once_per_image_for_all_heads(tiny_backbone_dir, datasets_, tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "_measure", _fake_measure)
    images = []
    forward = BackboneAdapter.forward

    def counting(self, pixel_values, *args, **kwargs):
        images.append(pixel_values.shape[0])
        return forward(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(BackboneAdapter, "forward", counting)
    summary = _run(tiny_backbone_dir, datasets_, tmp_path / "out", ["linear", "mlp"])
    assert summary["taps"] == {"linear": [1, 2, 3, 4], "mlp": [4]} and summary["cached_layers"] == [1, 2, 3, 4]
    # one pass over the 4 training and 2 validation images, whatever the heads and steps
    assert sum(images) == len(datasets_[0]) + len(datasets_[1])
    assert all("error" not in r for r in summary["heads"])


def test_backbone_weights_are_read_once_and_each_head_is_built_as_from_pretrained_backbone(
        tiny_backbone_dir, datasets_, tmp_path, monkeypatch):
    from transformers import set_seed

    from hf_vitseg.modeling import modeling_vitseg

    monkeypatch.setattr(compare, "_measure", _fake_measure)
    reads, built = [], {}
    load = modeling_vitseg._load_backbone_state_dict
    monkeypatch.setattr(modeling_vitseg, "_load_backbone_state_dict", lambda *a, **k: reads.append(1) or load(*a, **k))
    train = compare._train

    def keeping(model, *args, **kwargs):
        built[model.config.head] = {k: v.clone() for k, v in model.state_dict().items()}  # before any step
        return train(model, *args, **kwargs)

    monkeypatch.setattr(compare, "_train", keeping)
    _run(tiny_backbone_dir, datasets_, tmp_path / "out", ["linear", "mlp", "segformer"])
    assert len(reads) == 1  # probe, tapper, three heads and the saved model all share one read of the checkpoint
    monkeypatch.setattr(modeling_vitseg, "_load_backbone_state_dict", load)
    for head, state in built.items():  # the same backbone weights and the same seeded head initialisation
        set_seed(0)
        reference = ViTSegForSemanticSegmentation.from_pretrained_backbone(
            str(tiny_backbone_dir), head=head, num_labels=3, freeze_backbone=True).state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state), head


def test_measure_counts_the_backbone_share_in_one_pass_as_bench_does(tiny_backbone_dir):
    from hf_vitseg.bench import BackboneOnly, gflops

    model = ViTSegForSemanticSegmentation.from_pretrained_backbone(str(tiny_backbone_dir), head="dpt",
                                                                     num_labels=3)
    measured = compare._measure(model, (16, 24), torch.device("cpu"), repeats=1)
    pixel_values = torch.randn(1, 3, 16, 24)
    assert measured["gflops"] == pytest.approx(gflops(model, pixel_values))
    assert measured["backbone_gflops"] > 0 and measured["head_gflops"] > 0
    assert measured["backbone_gflops"] == pytest.approx(gflops(BackboneOnly(model), pixel_values))
    assert measured["head_gflops"] == pytest.approx(measured["gflops"] - measured["backbone_gflops"])


def test_rerun_resumes_finished_heads_and_refuses_other_settings_or_foreign_folders(tiny_backbone_dir, datasets_,
                                                                                    tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "_measure", _fake_measure)
    trained = []
    train = compare._train

    def spy(model, *args, **kwargs):
        if model.config.head == "mlp" and spy.interrupt:
            raise KeyboardInterrupt
        trained.append(model.config.head)
        return train(model, *args, **kwargs)

    spy.interrupt = True
    monkeypatch.setattr(compare, "_train", spy)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # interrupted in the second head
        _run(tiny_backbone_dir, datasets_, out, ["linear", "mlp"])
    assert trained == ["linear"] and (out / "heads/linear/result.json").is_file()
    assert not (out / "heads/mlp").exists() and not (out / "results.json").exists()
    first = (out / "heads/linear/result.json").read_text()

    spy.interrupt = False
    summary = _run(tiny_backbone_dir, datasets_, out, ["linear", "mlp"])
    assert trained == ["linear", "mlp"]  # linear was not trained again
    assert (out / "heads/linear/result.json").read_text() == first
    assert [r["head"] for r in summary["heads"]] == ["linear", "mlp"]
    assert summary["recommendation"]["most_accurate"] in ("linear", "mlp")
    assert json.loads((out / "results.json").read_text())["heads"][0] == json.loads(first)

    with pytest.raises(ValueError, match=r"other settings \(max_steps: 2 there, 3 now\)"):
        _run(tiny_backbone_dir, datasets_, out, ["linear"], max_steps=3)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="did not write"):
        _run(tiny_backbone_dir, datasets_, foreign, ["linear"])
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"


def _cli_args(folders, output_dir, drop=(), **flags) -> list[str]:
    """`hf-vitseg compare` arguments for the tiny folders; `drop` leaves flags out, `flags` (`crop_size=...`)
    replace or add them."""
    given = {"--heads": ["linear"], "--train-images": [str(folders / "train/images")],
             "--train-masks": [str(folders / "train/masks")], "--eval-images": [str(folders / "eval/images")],
             "--eval-masks": [str(folders / "eval/masks")], "--num-labels": ["3"], "--max-steps": ["1"],
             "--output-dir": [str(output_dir)], "--repeats": ["1"]}
    given.update({"--" + k.replace("_", "-"): v.split() for k, v in flags.items()})
    return [item for flag, values in given.items() if flag not in drop for item in (flag, *values)]


@pytest.mark.parametrize("drop,flags,message", [
    ((), {"heads": "linear no_such_head"}, "--heads no_such_head: not a semantic head"),
    ((), {"heads": "eomt"}, "--heads eomt: not a semantic head"),
    ((), {"crop_size": "20"}, r"--crop-size \(20, 20\) must be positive multiples of the patch size 8"),
    ((), {"crop_size": "64"}, r"--crop-size \(64, 64\) is larger than the largest training image \(32, 48\)"),
    (("--eval-images", "--eval-masks"), {}, "give --eval-images and --eval-masks"),
    (("--num-labels",), {}, "--num-labels N or --id2label"),
    ((), {"max_steps": "0"}, "--max-steps: .*expected an integer >= 1"),
])
def test_bad_input_is_one_line_naming_the_flag(tiny_backbone_dir, folders, tmp_path, capsys, drop, flags, message):
    import re

    argv = ["compare", "--backbone", str(tiny_backbone_dir), *_cli_args(folders, tmp_path / "out", drop, **flags)]
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own checks (exit status 2)
        status = exit_.code
    err = capsys.readouterr().err.strip()
    assert status in (1, 2) and len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # nothing written: the same folder takes the corrected command


def test_foreign_output_dir_is_refused_naming_the_flag(tiny_backbone_dir, folders, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"user weights")
    status = main(["compare", "--backbone", str(tiny_backbone_dir), *_cli_args(folders, out)])
    err = capsys.readouterr().err
    assert status == 1 and "choose an empty or new --output-dir" in err
    assert (out / "model.safetensors").read_bytes() == b"user weights" and len(list(out.iterdir())) == 1


# -- the shared feature cache ------------------------------------------------------------------------------------
def _data(n=3, size=(32, 48)):
    generator = torch.Generator().manual_seed(3)
    return [{"pixel_values": torch.randn(3, *size, generator=generator),
             "labels": torch.randint(0, 3, size, generator=generator)} for _ in range(n)]


def test_one_cache_for_heads_with_different_taps_and_the_image(monkeypatch):
    linear = tiny_model("linear", backbone_out_indices=[2, 4], freeze_backbone=True)
    unet = tiny_model("unet", backbone_out_indices=[1, 2, 3, 4], freeze_backbone=True,
                      head_kwargs={"decoder_channels": [8, 8, 8, 8], "stem_channels": [4]})
    unet.backbone.load_state_dict(linear.backbone.state_dict())  # one backbone, two heads
    data = _data()
    calls = []
    forward = BackboneAdapter.forward
    monkeypatch.setattr(BackboneAdapter, "forward", lambda self, x, *a, **k: calls.append(len(x)) or
                        forward(self, x, *a, **k))
    cache = FeatureCache.build([linear, unet], data, batch_size=3)
    assert calls == [3] and cache.layers == [1, 2, 3, 4]
    assert cache.pixel_values is not None  # unet reads the image: "auto" keeps it for the whole cache
    monkeypatch.setattr(BackboneAdapter, "forward", forward)
    images = torch.stack([d["pixel_values"] for d in data])
    for model in (linear, unet):
        view = cache.for_model(model)
        assert view.layers == model.config.backbone_out_indices
        assert view.feature_maps[0].data_ptr() in [m.data_ptr() for m in cache.feature_maps]  # a view, no copy
        with torch.no_grad():
            expected = model.backbone(images)
        for got, want in zip(view.feature_maps, expected.feature_maps):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        model.eval()
        with torch.no_grad():  # decoding the shared cache's batch = the model's own forward
            from hf_vitseg.training.feature_cache import CachedBackboneModel

            torch.testing.assert_close(CachedBackboneModel(model, cache)(**cache.batch([0, 2])).logits,
                                       model(images[[0, 2]]).logits, rtol=1e-4, atol=1e-5)

    alone = FeatureCache.build(linear, data)  # the linear head alone: no image, and unet is told why
    assert alone.pixel_values is None
    with pytest.raises(ValueError, match=r"Layers \[1, 3\] are not in this feature cache"):
        alone.for_model(unet)
    with pytest.raises(ValueError, match="reads the image, but this feature cache holds none"):
        alone.for_model(tiny_model("unet", backbone_out_indices=[4], freeze_backbone=True,
                                   head_kwargs={"decoder_channels": [8, 8, 8, 8], "stem_channels": [4]}))
    other = tiny_model("mlp", seed=5, freeze_backbone=True)  # another random backbone
    with pytest.raises(ValueError, match="different weights"):
        FeatureCache.build([linear, other], data)


def test_cached_crops_and_flips_cut_maps_image_and_labels_at_the_same_place():
    """Exact where it can be: the image and labels of a crop are the cropped (and mirrored) image and labels,
    and the maps are the same window of the whole image's maps at their stride (mirrored with them)."""
    model = tiny_model("linear", backbone_out_indices=[2, 4], freeze_backbone=True)
    data = _data(n=4)
    cache = FeatureCache.build(model, data, keep_pixel_values=True)
    assert cache.crop_alignment == 8 and cache.image_size == (32, 48)
    images = torch.stack([d["pixel_values"] for d in data])
    labels = torch.stack([d["labels"] for d in data])
    with torch.no_grad():
        maps = model.backbone(images).feature_maps
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(6):
        indices = torch.tensor([0, 3, 1, 2])
        batch = cache.batch(indices, crop_size=(16, 24), hflip=True, generator=generator)
        assert batch["pixel_values"].shape == (4, 3, 16, 24) and batch["feature_maps"][0].shape[-2:] == (2, 3)
        for i, index in enumerate(indices.tolist()):
            matches = [(top, left, flip) for top in range(0, 17, 8) for left in range(0, 25, 8) for flip in (0, 1)
                       if torch.equal(_window(images[index], top, left, 16, 24, flip, 1), batch["pixel_values"][i])]
            assert len(matches) == 1
            top, left, flip = matches[0]
            seen.add(matches[0])
            assert torch.equal(batch["labels"][i], _window(labels[index], top, left, 16, 24, flip, 1))
            for got, full in zip(batch["feature_maps"], maps):
                torch.testing.assert_close(got[i], _window(full[index], top, left, 16, 24, flip, 8), rtol=1e-5,
                                           atol=1e-5)
    assert {f for *_, f in seen} == {0, 1} and len({(t, lf) for t, lf, _ in seen}) > 3  # random, not fixed
    assert torch.equal(cache.batch([1])["pixel_values"], images[[1]])  # no crop, no flip: the sample as cached
    with pytest.raises(ValueError, match="multiples of 8"):
        cache.batch([0], crop_size=12)
    with pytest.raises(ValueError, match="larger than the cached images"):
        cache.batch([0], crop_size=(40, 48))


def _window(t, top, left, height, width, flip, stride):
    part = t[..., top // stride: (top + height) // stride, left // stride: (left + width) // stride]
    return part.flip(-1) if flip else part


def test_linear_taps_the_last_four_layers_by_default_and_the_probe_recipe_the_last_one():
    from transformers import Dinov2Config

    from hf_vitseg.training.recipes import linear_probe

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=12, num_attention_heads=2, patch_size=8, image_size=32)
    assert ViTSegConfig(backbone_config=backbone, head="linear").backbone_out_indices == [9, 10, 11, 12]
    assert ViTSegConfig(backbone_config=backbone, head="upernet").backbone_out_indices == [3, 6, 9, 12]
    assert ViTSegConfig(backbone_config=backbone, head="mlp").backbone_out_indices == [12]
    probe = ViTSegConfig(backbone_config=backbone, **linear_probe().model_kwargs)
    assert probe.head == "linear" and probe.backbone_out_indices == [12]
    assert ViTSegConfig(backbone_config=tiny_backbone_config("dinov2"), head="linear").backbone_out_indices == [
        1, 2, 3, 4]
    # a hierarchical backbone's stages are not a ViT's last blocks: linear keeps the last stage (stride 32)
    assert ViTSegConfig(backbone_config=tiny_backbone_config("swin"), head="linear").backbone_out_indices == [4]


def test_nuclei_sample_as_image_folders_for_train_and_compare(tmp_path):
    from hf_vitseg.data import load_image_folder
    from hf_vitseg.demo.nuclei import nuclei_split, write_nuclei_folders

    counts = write_nuclei_folders(tmp_path / "nuclei", scale=1.0, tile=16, region=64)
    split = nuclei_split(1.0, region=64)
    assert counts == {"train": len(split.train_tiles(16)), "eval": 4 * 2}  # right half 64 x 32: 4 x 2 tiles
    train = load_image_folder(tmp_path / "nuclei/train/images", tmp_path / "nuclei/train/masks")
    image, mask = split.train_tiles(16)[1]
    assert len(train) == counts["train"]
    assert np.array_equal(np.asarray(train[1]["image"]), np.round(image * 255).astype(np.uint8))
    assert np.array_equal(np.asarray(train[1]["annotation"]), mask)
    with pytest.raises(FileExistsError, match="already holds files"):
        write_nuclei_folders(tmp_path / "nuclei", scale=1.0, tile=16, region=64)
