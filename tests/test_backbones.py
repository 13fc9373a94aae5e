"""The backbone-family table, config hygiene and transformers' model conventions (issue 10 items 5-7)."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from conftest import FAMILIES, NON_SQUARE, builtin_heads, tiny_backbone_config, tiny_model
from torch import nn
from transformers import (
    AutoModel,
    BertConfig,
    CLIPConfig,
    CLIPModel,
    ConvNextConfig,
    Dinov2Config,
    SamConfig,
    SamVisionConfig,
    SiglipConfig,
    SiglipModel,
)

from hf_vitseg import ViTSegConfig, ViTSegForSemanticSegmentation
from hf_vitseg.modeling import backbone_adapter
from hf_vitseg.modeling.backbones import FAMILIES as RECORDS
from hf_vitseg.modeling.backbones import family_for


def images(size=NON_SQUARE, b=2):
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(0))


# -- the family table ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_every_record_names_parts_the_built_model_has(family):
    """Layers, norms and attention projections named by the record exist, with the counts the config says."""
    model = tiny_model("linear", family)
    adapter, config = model.backbone, model.config.backbone_config
    record = family_for(config)
    assert adapter.family is record and model.config.backbone_family is record
    assert len(adapter.layers) == record.num_levels(config)
    assert (adapter.final_norm is not None) == (record.final_norm is not None)
    if record.pre_norm:
        assert isinstance(getattr(adapter.model, record.pre_norm), nn.LayerNorm)
    for path in record.drop_modules:
        assert path.rsplit(".", 1)[-1] not in dict(adapter.model.named_modules()), path
    projections = adapter.attention_projection_names()
    # every layer (block) has each projection once: LoRA adapts all of them
    hierarchical = record.kind == "hierarchical"
    num_blocks = sum(len(stage.blocks) for stage in adapter.layers) if hierarchical else len(adapter.layers)
    assert len(projections) == num_blocks * len(record.attention_projections), projections
    assert {n.rsplit(".", 1)[-1] for n in projections} == set(record.attention_projections)
    assert record.source_name and record.citation and record.paper_url.startswith("https://")
    assert record.license in (None, "apache-2.0", "mit")


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_ids_follow_the_record(family):
    """Layer-wise LR decay ids: embeddings 0, block i of L -> i, final norm L + 1 (Swin: blocks across stages)."""
    adapter = tiny_model("linear", family).backbone
    ids, num_layers = adapter.layer_ids()
    blocks = [b for stage in adapter.layers for b in stage.blocks] if adapter.kind == "hierarchical" else adapter.layers
    assert num_layers == len(blocks)
    for i, block in enumerate(blocks, start=1):
        assert {ids[id(p)] for p in block.parameters()} == {i}
    if adapter.final_norm is not None:
        assert {ids[id(p)] for p in adapter.final_norm.parameters()} <= {num_layers + 1}
    embedding = adapter.get_input_embeddings()
    assert all(id(p) not in ids for p in embedding.parameters())  # optim gives them id 0


def test_generic_hierarchical_backbones_and_unknown_types():
    convnext = family_for(ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 8, 8]))
    assert convnext.kind == "hierarchical" and convnext.license is None and convnext.layer_scheme is None
    model = tiny_model(backbone_config=ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 16, 16]))
    with pytest.raises(ValueError, match="layer_decay=None"):
        model.backbone.layer_ids()
    with pytest.raises(ValueError, match="model_type 'bert' is not supported. Supported: vit, deit"):
        family_for(BertConfig())


def test_multi_tower_configs_reduce_to_their_vision_tower():
    for full, vision_type in [
        (CLIPConfig(vision_config=tiny_backbone_config("clip").to_dict()), "clip_vision_model"),
        (SiglipConfig(vision_config=tiny_backbone_config("siglip").to_dict()), "siglip_vision_model"),
        (SamConfig(vision_config=tiny_backbone_config("sam").to_dict()), "sam_vision_model"),
    ]:
        assert family_for(full).name == vision_type
        assert ViTSegConfig(backbone_config=full).backbone_config.model_type == vision_type


def test_model_types_are_unique_across_records():
    types = [t for r in RECORDS for t in r.model_types + r.composite_model_types]
    assert len(types) == len(set(types))


@pytest.mark.parametrize("family,model_cls,config_cls", [("clip", CLIPModel, CLIPConfig),
                                                         ("siglip", SiglipModel, SiglipConfig)])
def test_from_pretrained_backbone_of_a_full_two_tower_checkpoint_is_bit_exact(family, model_cls, config_cls, tmp_path):
    torch.manual_seed(3)
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "vocab_size": 99}
    source = model_cls(config_cls(text_config=text, vision_config=tiny_backbone_config(family).to_dict()))
    source.save_pretrained(tmp_path / "full")
    model = ViTSegForSemanticSegmentation.from_pretrained_backbone(tmp_path / "full", head="conv", num_labels=2)
    assert model.config.backbone_config.model_type == f"{family}_vision_model"
    reference = source.vision_model.state_dict()
    target = model.backbone.model.state_dict()
    assert len(target) > 10 and not any("text" in k for k in model.state_dict())
    for key, value in target.items():
        assert torch.equal(value, reference[key]), key
    # and the taps are the vision tower's own hidden states
    with torch.no_grad():
        hidden = source.vision_model(images(), interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
        feature_map = model.backbone(images()).feature_maps[-1]
    prefix = model.config.num_prefix_tokens
    tokens = model.backbone.final_norm(hidden[-1])[:, prefix:]
    torch.testing.assert_close(feature_map, tokens.reshape(2, 8, 12, -1).permute(0, 3, 1, 2), rtol=0, atol=0)


# -- config hygiene -----------------------------------------------------------------------------------------------

def test_config_copies_the_backbone_config_it_is_given():
    swin = tiny_backbone_config("swin")
    before = swin.to_dict()
    first = ViTSegConfig(backbone_config=swin, head="upernet", num_labels=3)
    second = ViTSegConfig(backbone_config=swin, head="linear", backbone_out_indices=[2], num_labels=3)
    assert swin.to_dict() == before, "the caller's config is not changed"
    assert first.backbone_config.out_indices == [1, 2, 3, 4] and second.backbone_config.out_indices == [2]
    for config in (first, second):  # the first one stays buildable
        with torch.no_grad():
            logits = ViTSegForSemanticSegmentation(config).eval()(images()).logits
        assert logits.shape[:2] == (2, 3)


def test_validate_checks_fields_changed_after_construction(tmp_path):
    config = ViTSegConfig(backbone_config=tiny_backbone_config("dinov2"), num_labels=3)
    config.backbone_out_indices = [9]
    with pytest.raises(ValueError, match="out of range: this backbone has 4 layers"):
        config.validate()
    with pytest.raises(ValueError, match="out of range"):
        config.save_pretrained(tmp_path)  # transformers calls validate() before writing
    config.backbone_out_indices = [4]
    config.class_weights = [1.0, 2.0]
    with pytest.raises(ValueError, match="class_weights has 2 entries for 3 labels"):
        config.validate()


SHALLOW = {
    "dinov2": Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                           mlp_ratio=2),
    "sam": SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, image_size=64,
                           patch_size=8, window_size=4, global_attn_indexes=[1], output_channels=16),
}


@pytest.mark.parametrize("head", builtin_heads())
@pytest.mark.parametrize("shallow", sorted(SHALLOW))
def test_every_head_builds_with_default_taps_on_a_two_layer_backbone(head, shallow):
    model = tiny_model(head, backbone_config=SHALLOW[shallow]).eval()
    num_default = type(model.head).num_default_taps
    assert model.config.backbone_out_indices == ([2] if num_default > 2 else [1, 2][-num_default:])
    with torch.no_grad():
        assert model(images()).logits.shape[:2] == (2, 3)


@pytest.mark.parametrize("backbone", ["dinov2", "shallow"])
@pytest.mark.parametrize("head,taps", [("unet", [1, 2]), ("unet", [2, 1]), ("segformer", []), ("linear", [1.5]),
                                       ("upernet", [0, 1, 2])])
def test_every_error_example_is_a_valid_value(backbone, head, taps):
    backbone_config = SHALLOW["dinov2"] if backbone == "shallow" else tiny_backbone_config("dinov2")
    with pytest.raises(ValueError, match=r"e\.g\. \[") as error:
        ViTSegConfig(backbone_config=backbone_config, head=head, backbone_out_indices=taps, num_labels=3)
    example = eval(re.search(r"e\.g\. (\[[^\]]*\])", str(error.value)).group(1))
    ViTSegConfig(backbone_config=backbone_config, head=head, backbone_out_indices=example, num_labels=3)


# -- transformers conventions -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_under_sdpa_warns_once_and_records_with_eager(family, caplog, monkeypatch):
    monkeypatch.setattr(backbone_adapter._EagerAttention, "_warned", False)
    model = tiny_model("linear", family).eval()
    hf = model.backbone.model
    assert hf.config._attn_implementation == "sdpa"
    x = images((64, 64))
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        out = model(x, output_attentions=True)
        again = model(x, output_attentions=True)
        plain = model(x)
    assert sum("runs with eager attention" in r.getMessage() for r in caplog.records) == 1
    assert hf.config._attn_implementation == "sdpa", "restored after the call"
    assert len(out.attentions) == len(again.attentions) > 0
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-5)
    # the probabilities are the ones the HF model itself returns with eager attention
    if family == "sam":  # SAM picks its attention class at construction, and the adapter's copy has no neck
        hf = AutoModel.from_config(model.config.backbone_config, attn_implementation="eager")
        hf.load_state_dict(model.backbone.model.state_dict(), strict=False)
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        kwargs = {"interpolate_pos_encoding": True} if model.backbone.family.interpolates_with_kwarg else {}
        reference = hf(x, output_attentions=True, **kwargs).attentions
    assert len(reference) == len(out.attentions)
    for ours, theirs in zip(out.attentions, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["dinov2", "clip", "sam", "swin"])
def test_output_hidden_states_as_indices_returns_only_those(family):
    model = tiny_model("linear", family, backbone_out_indices=[2]).eval()
    x = images()
    with torch.no_grad():
        everything = model.backbone(x, output_hidden_states=[0, 1, 2, 3, 4]).hidden_states
        chosen = model(x, output_hidden_states=[0, -1]).hidden_states
        as_tuple = model(x, output_hidden_states=[-1], return_dict=False)
    assert len(everything) == 5, "runs past the deepest tap when a deeper hidden state is asked for"
    assert len(chosen) == 2
    torch.testing.assert_close(chosen[0], everything[0], rtol=0, atol=0)
    torch.testing.assert_close(chosen[1], everything[4], rtol=0, atol=0)
    assert len(as_tuple) == 2 and torch.equal(as_tuple[1][0], everything[4])
    with torch.no_grad():
        assert len(model(x, output_hidden_states=True).hidden_states) == (5 if family == "swin" else 3)
    with pytest.raises(ValueError, match=r"selects hidden state 7.*e\.g\. \[4\]"):
        model(x, output_hidden_states=[7])


@pytest.mark.parametrize("family", FAMILIES)
def test_get_input_embeddings_is_the_patch_embedding(family):
    model = tiny_model("linear", family)
    embeddings = model.get_input_embeddings()
    assert any(embeddings is m for m in model.backbone.model.modules())
    convs = [m for m in embeddings.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].in_channels == 3 and convs[0].stride == convs[0].kernel_size
    assert convs[0].stride[0] == model.config.backbone_config.patch_size

