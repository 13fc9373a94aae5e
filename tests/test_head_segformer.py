"""`segformer`: proven against transformers' `SegformerDecodeHead`, the converter, composed weights. Shapes,
training and save/load on every backbone family: the common suite in test_modeling.py."""

import pytest
import torch
from conftest import tiny_model
from transformers import (
    SegformerConfig,
    SegformerForSemanticSegmentation,
)

import hf_vitseg.modeling.head_segformer  # noqa: F401  registers "segformer" until heads.py imports it
from hf_vitseg.convert import convert_segformer_decode_head, load_peer_head_weights
from hf_vitseg.modeling.head_base import BackboneFeatures
from hf_vitseg.modeling.head_segformer import SegFormerHead

LEVEL_CHANNELS = [8, 16, 24, 32]
# Sizes that are not powers of two of each other, as DINOv2's 37x37 grid gives (148, 74, 37, 18).
LEVEL_SIZES = [(38, 58), (19, 29), (10, 15), (5, 7)]


def tiny_peer(channels=LEVEL_CHANNELS, decoder_hidden_size=16, num_labels=5):
    config = SegformerConfig(hidden_sizes=list(channels), decoder_hidden_size=decoder_hidden_size,
                             num_labels=num_labels, depths=[1] * 4, num_attention_heads=[1] * 4)
    peer = SegformerForSemanticSegmentation(config).eval()
    # Non-trivial weights and BatchNorm statistics, so that a mis-mapped layer cannot hide.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in peer.decode_head.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return peer


def test_matches_transformers_segformer_decode_head():
    """Ours composes projection and fuse conv per level before upsampling (see the module docstring): the same
    function, summed in another order, so equal to float rounding."""
    peer = tiny_peer()
    ours = SegFormerHead(LEVEL_CHANNELS, [4, 8, 16, 32], num_labels=5, channels=16).eval()
    ours.load_state_dict(convert_segformer_decode_head(peer.state_dict()))
    torch.manual_seed(0)
    maps = [torch.randn(2, c, *hw) for c, hw in zip(LEVEL_CHANNELS, LEVEL_SIZES)]
    with torch.no_grad():
        expected = peer.decode_head(maps)
        logits = ours(BackboneFeatures(feature_maps=maps, strides=[4, 8, 16, 32]))
    assert logits.shape == expected.shape == (2, 5, *LEVEL_SIZES[0])  # both at the finest level (1/4)
    assert expected.abs().max() > 1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_converter():
    peer = tiny_peer()
    converted = convert_segformer_decode_head(peer.decode_head.state_dict())
    assert converted.keys() == convert_segformer_decode_head(peer.state_dict()).keys()
    assert converted["projections.0.weight"].shape == (16, 8, 1, 1)
    with pytest.raises(ValueError, match="Unexpected Segformer decode-head key"):
        convert_segformer_decode_head({"linear_c1.proj.weight": torch.zeros(1)})


def test_load_peer_head_weights_into_vitseg_model():
    model = tiny_model("segformer", num_labels=5, head_kwargs={"channels": 16}).eval()
    load_peer_head_weights(model, peer := tiny_peer(channels=[32] * 4))
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = peer.decode_head(model.neck(model.backbone(pixel_values, False, False)).feature_maps)
        logits = model(pixel_values).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    mismatch = r"(?s)does not fit.*projections\.0\.weight: peer \(16, 16, 1, 1\) vs this head \(16, 32, 1, 1\)"
    with pytest.raises(ValueError, match=mismatch):
        load_peer_head_weights(model, tiny_peer(channels=[16] * 4))


def test_four_taps_by_default_and_the_projections_learn_through_the_composed_weights():
    model = tiny_model("segformer", head_kwargs={"channels": 16}).train()
    assert len(model.config.backbone_out_indices) == 4
    model(torch.randn(2, 3, 64, 96), labels=torch.randint(0, 3, (2, 64, 96))).loss.backward()
    assert model.head.projections[0].weight.grad.abs().sum() > 0
