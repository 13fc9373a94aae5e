"""`hf-vitseg bench` and `hf_vitseg.bench`, the one measuring implementation behind it, `benchmarks/heads.py` and
`hf-vitseg compare`'s forward ratio: rows, ratios, the prediction's cost, errors naming the flag. Times are never
asserted (a shared machine), only that each number is measured, positive and where it belongs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from hf_vitseg import bench
from hf_vitseg.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmark_script_measures_with_the_package():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import heads

    assert heads.measure_head is bench.measure_head and heads.BackboneOnly is bench.BackboneOnly
    assert heads.dinov2_small_config is bench.dinov2_small_config


def test_measure_head_row_and_forward_ratio():
    model = tiny_model("mlp", num_labels=4)
    reference = bench.BackboneOnly(model)
    x = torch.randn(1, 3, 32, 32)
    row = bench.measure_head(model, reference, x, repeats=2)
    assert set(row) == {"head_params_m", "gflops", "backbone_gflops", "forward_ratio", "train_step_ratio",
                        "backbone_forward_s"}
    head_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone.")) / 1e6
    assert bench.head_parameters_m(model) == pytest.approx(head_params) and head_params > 0
    assert row["head_params_m"] == round(head_params, 2)
    assert bench.gflops(model, x) > bench.gflops(reference, x) > 0  # the head adds work to the same backbone
    assert all(row[k] > 0 and math.isfinite(row[k]) for k in ("forward_ratio", "train_step_ratio"))
    ratio = bench.forward_ratio(model, x, repeats=2)
    assert ratio > 0 and math.isfinite(ratio)
    with pytest.raises(ValueError, match="repeats"):
        bench.forward_ratio(model, x, repeats=0)


def test_prediction_cost_runs_processor_model_and_post_processing(monkeypatch):
    from hf_vitseg import ViTSegImageProcessor

    model = tiny_model(num_labels=3).eval()
    processor = ViTSegImageProcessor.for_model(model, check_labels=False)
    calls = []
    original = processor.post_process_semantic_segmentation

    def recording(outputs, **kwargs):
        maps = original(outputs, **kwargs)
        calls.append((kwargs, maps[0].shape))
        return maps

    monkeypatch.setattr(processor, "post_process_semantic_segmentation", recording)
    cost = bench.prediction_cost(model, processor, bench.random_image((30, 44)), repeats=2)
    assert set(cost) == {"processor_s", "model_s", "post_process_s", "processor_ratio", "post_process_ratio"}
    assert all(v > 0 for v in cost.values())
    assert cost["post_process_ratio"] == pytest.approx(cost["post_process_s"] / cost["model_s"])
    kwargs, shape = calls[-1]
    assert shape == (30, 44) and "input_boxes" in kwargs  # back onto the image, through the padding geometry
    assert len(calls) == 3  # warm-up + 2


def test_model_from_spec_builds_the_backbone_alone_or_a_head():
    from conftest import tiny_backbone_config

    spec = {"config": tiny_backbone_config("dinov2").to_dict(), "num_labels": 5}
    model = bench.model_from_spec(json.dumps({**spec, "head": "conv"}))
    assert model.config.head == "conv" and model.config.num_labels == 5
    assert model.config.backbone_config.hidden_size == tiny_backbone_config("dinov2").hidden_size
    assert isinstance(bench.model_from_spec(json.dumps({**spec, "head": None})), bench.BackboneOnly)


@pytest.mark.slow
def test_peak_training_memory_in_a_subprocess():
    from conftest import tiny_backbone_config

    spec = json.dumps({"config": tiny_backbone_config("dinov2").to_dict(), "num_labels": 3, "head": "linear"})
    assert bench.peak_training_memory_mb("hf_vitseg.bench:model_from_spec", spec, (1, 3, 32, 32)) >= 0


def test_cli_bench_table_and_json(tiny_backbone_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--backbone", str(tiny_backbone_dir), "--heads", "linear", "mlp", "--image-size", "32",
                 "48", "--batch-size", "2", "--repeats", "1", "--num-labels", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "input 32x48, batch 2, 4 classes" in printed and "post/fwd" in printed
    rows = json.loads(out.read_text())
    assert [row["head"] for row in rows] == ["linear", "mlp"]
    for row in rows:
        assert row["forward_ratio"] > 0 and row["train_step_ratio"] > 0 and row["post_process_ratio"] > 0
        assert f"{row['head']:<12}{row['head_params_m']:>9}" in printed
    assert rows[1]["head_params_m"] > rows[0]["head_params_m"]  # mlp has hidden layers


def test_cli_bench_reads_a_saved_models_backbone(tmp_path, capsys):
    model = tiny_model(num_labels=2)
    model.save_pretrained(tmp_path / "model")
    assert main(["bench", "--backbone", str(tmp_path / "model"), "--heads", "linear", "--image-size", "16",
                 "--repeats", "1", "--no-prediction"]) == 0
    assert "(dinov2)" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "message"), [
    (["--heads", "linear", "nope"], "--heads nope: not a registered head"),
    (["--heads", "eomt"], "--heads eomt: mask transformers"),
    (["--image-size", "30"], "--image-size 30 30: height and width must be multiples of 8"),
    (["--image-size", "32", "32", "32"], "--image-size takes one or two numbers"),
    (["--device", "gpu0"], "--device gpu0: not a device name"),
    (["--json", "."], "--json .: is a folder"),
])
def test_cli_bench_errors_name_the_flag(tiny_backbone_dir, capsys, flags, message):
    status = main(["bench", "--backbone", str(tiny_backbone_dir), "--heads", "linear", "--repeats", "1", *flags])
    err = capsys.readouterr().err
    assert status == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_bench_missing_backbone_and_bad_numbers(tmp_path, capsys):
    assert main(["bench", "--backbone", str(tmp_path / "missing")]) == 1
    assert "--backbone" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--repeats", "0"])
    assert exit_info.value.code == 2 and "--repeats" in capsys.readouterr().err


def test_postprocess_benchmark_runs_and_keeps_the_maps(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import postprocess

    rows = postprocess.main(["--classes", "6", "--size", "56", "--repeats", "1", "--present", "3"])
    assert [(r["logits"], r["geometry"]) for r in rows] == [
        ("scene", "target_sizes"), ("scene", "input_boxes"), ("untrained", "target_sizes"),
        ("untrained", "input_boxes")]
    assert all(r["same_maps"] and r["before_ratio"] > 0 and r["after_ratio"] > 0 for r in rows)
