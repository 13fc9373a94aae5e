"""One source of truth per fact (issue 10 item 2): `model.size_divisor` for what H and W must be multiples of,
`ViTSegImageProcessor.for_model` for the processor, one PEFT unwrap, one logit resize. Swin is the test case:
its patch size (4) is not its divisor (32), which five separate derivations used to get wrong."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NON_SQUARE, tiny_model
from transformers import ViTImageProcessor

import hf_vitseg
from hf_vitseg import ViTSegImageProcessor
from hf_vitseg.hub import load_model
from hf_vitseg.hub.loading import load_image_processor
from hf_vitseg.inference import forward_logits, predict_logits, sliding_window_inference
from hf_vitseg.training.loading import resolve_processor
from hf_vitseg.unwrap import is_peft_model, unwrap_model

PACKAGE = Path(hf_vitseg.__file__).parent


@pytest.fixture(scope="module")
def swin_model():
    model = tiny_model("linear", "swin").eval()
    assert model.size_divisor == 32 and model.config.backbone_config.patch_size == 4
    return model


def test_swin_tta_at_three_scales(swin_model):
    # Scale 0.75 of 64 x 96 is 48 x 72: it must be padded to 64 x 96 (multiples of 32), not to multiples of 4
    # ("must be multiples of 32 ... got 48x72" before).
    x = torch.randn(1, 3, *NON_SQUARE, generator=torch.Generator().manual_seed(0))
    log_probs = predict_logits(swin_model, x, scales=(0.75, 1.0, 1.5))
    assert log_probs.shape == (1, 3, *NON_SQUARE) and torch.isfinite(log_probs).all()
    torch.testing.assert_close(predict_logits(swin_model, x), forward_logits(swin_model, x).log_softmax(dim=1))


def test_swin_sliding_windows(swin_model):
    x = torch.randn(1, 3, 80, 112, generator=torch.Generator().manual_seed(1))  # not a multiple of 32: padded
    logits = sliding_window_inference(swin_model, x, crop_size=64, stride=32)
    assert logits.shape == (1, 3, 80, 112) and torch.isfinite(logits).all()
    one_window = sliding_window_inference(swin_model, x[..., :64, :96], crop_size=(64, 96), stride=(64, 96))
    torch.testing.assert_close(one_window, forward_logits(swin_model, x[..., :64, :96]))
    with pytest.raises(ValueError, match=r"must be a multiple of the model's size divisor 32"):
        sliding_window_inference(swin_model, x, crop_size=48, stride=24)  # a multiple of the patch size 4 only


def test_a_saved_swin_folder_without_processor_config_gets_a_processor_that_pads_to_32(swin_model, tmp_path):
    swin_model.save_pretrained(tmp_path / "swin")
    assert not (tmp_path / "swin" / "preprocessor_config.json").exists()
    model = load_model(tmp_path / "swin")
    with pytest.warns(UserWarning, match="has no preprocessor_config.json"):
        processor = load_image_processor(tmp_path / "swin", model)
    assert processor.patch_size == 32 and processor.ignore_index == model.config.ignore_index
    inputs = processor(np.zeros((50, 70, 3), np.uint8))
    assert tuple(inputs["pixel_values"].shape[-2:]) == (64, 96)
    assert model(**inputs).logits.shape[0] == 1


def test_export_example_input_uses_the_model_divisor(swin_model):
    from hf_vitseg.export import _example_input

    assert tuple(_example_input(swin_model, None, batch_size=1).shape) == (1, 3, 4 * 32, 6 * 32)
    with pytest.raises(ValueError, match=r"multiples of model.size_divisor \(32\)"):
        _example_input(swin_model, (48, 64), batch_size=1)


# -- ViTSegImageProcessor.for_model -------------------------------------------------------------------------------


def test_for_model_builds_from_the_model_and_the_backbones_own_statistics(tmp_path):
    model = tiny_model("linear", "dinov2", ignore_index=200)
    built = ViTSegImageProcessor.for_model(model)
    assert (built.patch_size, built.ignore_index) == (8, 200)
    assert list(built.image_mean) == pytest.approx([0.485, 0.456, 0.406])  # ImageNet without a backbone folder

    ViTImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(tmp_path / "backbone")
    model.config.backbone_name_or_path = str(tmp_path / "backbone")
    built = ViTSegImageProcessor.for_model(model)
    assert list(built.image_mean) == pytest.approx([0.5, 0.4, 0.3])
    assert list(built.image_std) == pytest.approx([0.2, 0.25, 0.3])


def test_for_model_loads_the_saved_processor_and_checks_it(tmp_path):
    model = tiny_model("linear", "dinov2")
    ViTSegImageProcessor(patch_size=16, do_resize=True, size={"shortest_edge": 48}).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a saved processor: no "built for the model" warning
        loaded = ViTSegImageProcessor.for_model(model, folder=tmp_path)
    assert (loaded.patch_size, loaded.do_resize, loaded.size["shortest_edge"]) == (16, True, 48)

    ViTSegImageProcessor(patch_size=12).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"pads to multiples of 12, but the model needs multiples of 8"):
        ViTSegImageProcessor.for_model(model, folder=tmp_path)
    ViTSegImageProcessor(patch_size=8, ignore_index=0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"ignore_index=0, but the model ignores 255"):
        ViTSegImageProcessor.for_model(model, folder=tmp_path)
    # inference has no segmentation maps, so another ignore_index does not matter there
    assert ViTSegImageProcessor.for_model(model, folder=tmp_path, check_labels=False).ignore_index == 0
    assert load_image_processor(tmp_path, model).ignore_index == 0
    ViTImageProcessor().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a ViTImageProcessor .*, not a ViTSegImageProcessor"):
        ViTSegImageProcessor.for_model(model, folder=tmp_path)


def test_resolve_processor_delegates_to_for_model_and_checks_a_given_one(tmp_path):
    model = tiny_model("linear", "swin")
    assert resolve_processor(None, model).patch_size == 32
    with pytest.raises(ValueError, match="the model needs multiples of 32"):
        resolve_processor(ViTSegImageProcessor(patch_size=4), model)
    assert resolve_processor(ViTSegImageProcessor(patch_size=64), model).patch_size == 64


def test_for_model_through_a_peft_model():
    pytest.importorskip("peft", reason="the LoRA recipe's optional dependency")
    from hf_vitseg.training.lora import apply_lora

    model = tiny_model("linear", "swin")
    wrapped = apply_lora(model, r=2)
    assert is_peft_model(wrapped) and not is_peft_model(model)
    assert unwrap_model(wrapped) is model and unwrap_model(model) is model
    processor = ViTSegImageProcessor.for_model(wrapped)
    assert processor.patch_size == 32
    assert resolve_processor(None, wrapped).patch_size == 32


# -- one home per fact: no second derivation creeps back ---------------------------------------------------------


def _sources(*parts: str) -> dict[str, str]:
    files = [PACKAGE / part for part in parts if part.endswith(".py")]
    files += [path for part in parts if not part.endswith(".py") for path in sorted((PACKAGE / part).rglob("*.py"))]
    return {str(path.relative_to(PACKAGE)): path.read_text(encoding="utf-8") for path in files}


def test_no_second_home_for_the_divisor_the_unwrap_or_the_logit_resize():
    outside_modeling = _sources("export.py", "inference", "training", "hub", "cli")
    for name, text in outside_modeling.items():
        # The divisor: only model.size_divisor (the backbone's patch size is not it for hierarchical backbones).
        assert not re.search(r"backbone_config\W*(\.|,\s*\")patch_size", text), name
        # The logit resize: head_base.resize.
        assert "F.interpolate(" not in text and "functional.interpolate(" not in text, name
    for name, text in _sources("export.py", "inference", "training", "hub", "cli", "data", "demo").items():
        # The unwrap: hf_vitseg.unwrap.unwrap_model.
        assert ".get_base_model()" not in text, name
        # The processor's per-sample steps are public methods; nothing imports its private helpers.
        for imported in re.findall(r"image_processing_vitseg import (\([^)]*\)|[^\n]*)", text):
            names = [item.split(" as ")[0].strip(" ()\n") for item in imported.split(",")]
            assert not [n for n in names if n.startswith("_")], (name, names)
