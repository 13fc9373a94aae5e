"""The `dpt` head: readout handling, odd grids, presets, and equality with transformers' DPT neck + head. Shapes,
training and save/load on every backbone family: the common suite in test_modeling.py."""

from __future__ import annotations

import pytest
import torch
from conftest import NON_SQUARE, tiny_model
from torch.nn import functional as F
from transformers import DPTConfig, DPTForSemanticSegmentation

import hf_vitseg.modeling.head_dpt  # noqa: F401  registers "dpt" until heads.py imports it
from hf_vitseg.convert import convert_dpt_neck_and_head, dpt_head_kwargs, load_peer_head_weights
from hf_vitseg.modeling.head_base import BackboneFeatures
from hf_vitseg.modeling.head_dpt import DPTHead

SMALL = {"reassemble_channels": [8, 8, 16, 16], "fusion_channels": 16}


def batch(size=NON_SQUARE, b=2):
    """Random images with labels constant on 16x16 blocks: learnable in a few steps by a narrow head, unlike
    per-pixel noise at full resolution."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 3, (b, size[0] // 16, size[1] // 16), generator=g)
    return torch.randn(b, 3, *size, generator=g), blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)


def test_default_readout_follows_the_backbone():
    heads = {family: tiny_model("dpt", family, head_kwargs=SMALL).head for family in ("dinov2", "deit", "sam", "swin")}
    assert heads["dinov2"].readout == "project"
    assert heads["deit"].readout == "project"  # the CLS token, not the distillation token
    assert heads["sam"].readout == "ignore"
    assert heads["swin"].readout == "ignore"
    # Swin maps are already at strides 4..32: projected, never resampled
    assert all(isinstance(layer.resample, torch.nn.Identity) for layer in heads["swin"].reassemble)


@pytest.mark.parametrize("family", ["sam", "swin"])
@pytest.mark.parametrize("readout", ["add", "project"])
def test_cls_readout_without_a_cls_token_is_a_clear_error(family, readout):
    with pytest.raises(ValueError, match="needs a CLS token"):
        tiny_model("dpt", family, head_kwargs={**SMALL, "readout": readout})
    with pytest.raises(ValueError, match="needs a CLS token"):
        DPTHead.check_backbone(family == "swin", 0, {"readout": readout})


@pytest.mark.parametrize("readout", ["ignore", "add"])
def test_other_readouts_and_a_single_tap(readout):
    model = tiny_model("dpt", "dinov2_with_registers", head_kwargs={**SMALL, "readout": readout}).eval()
    single = tiny_model("dpt", "vit", backbone_out_indices=[4], head_kwargs={**SMALL, "readout": readout}).eval()
    x, _ = batch()
    assert model(x).logits.shape == single(x).logits.shape == (2, 3, *NON_SQUARE)


def test_odd_token_grids_keep_the_levels_aligned():
    # 7x9 grid: the stride-2p level is 4x5; upsampling to each finer level's exact size gives 8 * grid
    model = tiny_model("dpt", "dinov2", head_kwargs=SMALL).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 56, 72)).logits.shape == (1, 3, 56, 72)


def test_paper_preset_widths():
    head = DPTHead([768] * 4, [16] * 4, num_labels=150, num_prefix_tokens=1, preset="paper")
    assert [layer.projection.out_channels for layer in head.reassemble] == [96, 192, 384, 768]
    assert head.head_conv[0].out_channels == 256


def test_trains_with_the_auxiliary_head():
    # DPTForSemanticSegmentation's use_auxiliary_head breaks with labels; ours trains with it
    model = tiny_model("dpt", auxiliary_loss_weight=0.4, head_kwargs=SMALL).train()
    x, y = batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(8):
        loss = model(x, labels=y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02, losses
    assert all(p.grad is not None for p in model.auxiliary_head.parameters())


# -- equality with transformers ---------------------------------------------------------------------------------

def tiny_dpt(readout, batch_norm, factors=(4, 2, 1, 0.5)):
    torch.manual_seed(0)
    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], readout_type=readout, neck_hidden_sizes=[8, 16, 24, 32],
        reassemble_factors=list(factors), fusion_hidden_size=16, num_labels=3,
        use_batch_norm_in_fusion_residual=batch_norm,
    )
    dpt = DPTForSemanticSegmentation(config).eval()
    # PyTorch's default init (activations of order 1, unlike std 0.02) and random BN affines and statistics,
    # so that every path counts and an absolute tolerance of 1e-5 means something
    with torch.no_grad():
        for module in [*dpt.neck.modules(), *dpt.head.modules()]:
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
                module.reset_parameters()
                if module.bias is not None:
                    module.bias.uniform_(-0.5, 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return dpt


@pytest.mark.parametrize("readout", ["ignore", "add", "project"])
@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("grid", [(6, 8), (4, 4)])
def test_equal_to_transformers_dpt_neck_and_head(readout, batch_norm, grid):
    dpt = tiny_dpt(readout, batch_norm)
    head = DPTHead([32] * 4, [8] * 4, num_labels=3, num_prefix_tokens=1, **dpt_head_kwargs(dpt.config)).eval()
    load_peer_head_weights(head, dpt)

    h, w = grid
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randn(2, 1 + h * w, 32, generator=g) for _ in range(4)]  # CLS + patch tokens per tap
    features = BackboneFeatures(
        feature_maps=[t[:, 1:].transpose(1, 2).reshape(2, 32, h, w) for t in tokens],
        strides=[8] * 4,
        prefix_tokens=[t[:, :1] for t in tokens],
    )
    with torch.no_grad():
        ours = head(features)
        fused = dpt.neck(tokens, patch_height=h, patch_width=w)
        theirs_before_upsampling = dpt.head.head[:-1](fused[-1])
        theirs = dpt.head(fused)
    # Deliberate difference: transformers' head upsamples x2 (bilinear, align_corners=True) at the end, ours
    # leaves that to the loss. Compare before it, and after applying the same upsampling to ours.
    assert ours.shape == theirs_before_upsampling.shape == (2, 3, 8 * h, 8 * w)
    assert theirs.abs().max() > 0.1, "a comparison of vanishing outputs would prove nothing"
    assert (ours - theirs_before_upsampling).abs().max() < 1e-5
    upsampled = F.interpolate(ours, scale_factor=2, mode="bilinear", align_corners=True)
    assert (upsampled - theirs).abs().max() < 1e-5


def test_converter_keys_and_what_it_drops():
    dpt = tiny_dpt("project", True)
    converted = convert_dpt_neck_and_head(dpt.state_dict())
    assert not any(k.startswith(("dpt.", "auxiliary")) for k in converted)
    assert not any(k.startswith("fusion.0.skip_unit") for k in converted)  # unused by transformers too
    head = DPTHead([32] * 4, [8] * 4, num_labels=3, num_prefix_tokens=1, **dpt_head_kwargs(dpt.config))
    assert set(converted) == set(head.state_dict())


def test_loading_into_a_mismatched_head_is_an_error():
    dpt = tiny_dpt("project", True)
    head = DPTHead([32] * 4, [8] * 4, num_labels=3, num_prefix_tokens=1,
                   **{**dpt_head_kwargs(dpt.config), "readout": "add"})
    with pytest.raises(ValueError, match="Readout differs"):
        load_peer_head_weights(head, dpt)
    narrow = DPTHead([32] * 4, [8] * 4, num_labels=3, num_prefix_tokens=1,
                     **{**dpt_head_kwargs(dpt.config), "fusion_channels": 8})
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_peer_head_weights(narrow, dpt)


def test_odd_grids_are_where_transformers_misaligns_and_we_do_not():
    # Deliberate difference: on a 5x7 grid the stride-2p level is 3x4; transformers upsamples the fused map x2
    # (6x8) and stretches the 5x7 level onto it, ending at 48x64 for a 40x56 input. Ours stays at 8 x grid.
    dpt = tiny_dpt("project", True)
    head = DPTHead([32] * 4, [8] * 4, num_labels=3, num_prefix_tokens=1, **dpt_head_kwargs(dpt.config)).eval()
    tokens = [torch.randn(1, 1 + 5 * 7, 32) for _ in range(4)]
    features = BackboneFeatures([t[:, 1:].transpose(1, 2).reshape(1, 32, 5, 7) for t in tokens], [8] * 4,
                                [t[:, :1] for t in tokens])
    with torch.no_grad():
        assert head(features).shape[-2:] == (40, 56)
        assert dpt.head.head[:-1](dpt.neck(tokens, patch_height=5, patch_width=7)[-1]).shape[-2:] == (48, 64)


def test_peer_weights_load_into_a_vitseg_model():
    dpt = tiny_dpt("project", True)
    model = tiny_model("dpt", "vit", backbone_out_indices=[1, 2, 3, 4], backbone_apply_layernorm=False,
                       head_kwargs=dpt_head_kwargs(dpt.config))
    load_peer_head_weights(model, dpt)
    assert torch.equal(model.head.classifier.weight, dpt.head.head[4].weight)
