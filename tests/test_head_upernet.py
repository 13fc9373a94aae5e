"""`upernet`: proven against transformers' `UperNetHead`, the converter, batch-1 training, matmul pooling. Shapes,
training and save/load on every backbone family: the common suite in test_modeling.py."""

import pytest
import torch
from conftest import tiny_model
from transformers import (
    ConvNextConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

import hf_vitseg.modeling.head_upernet  # noqa: F401  registers "upernet" until heads.py imports it
from hf_vitseg.convert import convert_upernet_decode_head, load_peer_head_weights
from hf_vitseg.modeling.head_base import BackboneFeatures
from hf_vitseg.modeling.head_upernet import UperNetHead

LEVEL_CHANNELS = [8, 16, 24, 32]
# Sizes that are not powers of two of each other, as DINOv2's 37x37 grid gives (148, 74, 37, 18).
LEVEL_SIZES = [(38, 58), (19, 29), (10, 15), (5, 7)]


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights and BatchNorm statistics, so that a mis-mapped layer cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)


def tiny_peer(channels=LEVEL_CHANNELS, hidden_size=16, num_labels=5, pool_scales=(1, 2, 3, 6)):
    backbone = ConvNextConfig(hidden_sizes=list(channels), depths=[1] * 4,
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=hidden_size, num_labels=num_labels,
                           pool_scales=list(pool_scales), use_auxiliary_head=False)
    peer = UperNetForSemanticSegmentation(config).eval()
    randomize(peer.decode_head)
    return peer


def test_matches_transformers_upernet_head():
    peer = tiny_peer()
    ours = UperNetHead(LEVEL_CHANNELS, [4, 8, 16, 32], num_labels=5, channels=16).eval()
    ours.load_state_dict(convert_upernet_decode_head(peer.state_dict()))
    torch.manual_seed(0)
    maps = [torch.randn(2, c, *hw) for c, hw in zip(LEVEL_CHANNELS, LEVEL_SIZES)]
    with torch.no_grad():
        expected = peer.decode_head(maps)
        logits = ours(BackboneFeatures(feature_maps=maps, strides=[4, 8, 16, 32]))
    # Same resolution as transformers' head: the finest level's. (Both models upsample to the image elsewhere.)
    assert logits.shape == expected.shape == (2, 5, *LEVEL_SIZES[0])
    assert expected.abs().max() > 1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_converter_accepts_head_or_model_state_dict():
    peer = tiny_peer()
    assert convert_upernet_decode_head(peer.state_dict()).keys() == convert_upernet_decode_head(
        peer.decode_head.state_dict()).keys()
    with pytest.raises(ValueError, match="Unexpected UperNet decode-head key"):
        convert_upernet_decode_head({"psp_modules.0.1.conv_weight": torch.zeros(1)})


def test_load_peer_head_weights_into_vitseg_model():
    model = tiny_model("upernet", num_labels=5, head_kwargs={"channels": 16}).eval()
    peer = tiny_peer(channels=[32] * 4)
    load_peer_head_weights(model, peer)
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = model.neck(model.backbone(pixel_values, False, False))
        expected = peer.decode_head(features.feature_maps)
        logits = model(pixel_values).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_load_peer_head_weights_errors():
    model = tiny_model("upernet", num_labels=5, head_kwargs={"channels": 16})
    mismatch = r"(?s)does not fit.*classifier\.weight: peer \(5, 24, 1, 1\) vs this head \(5, 16, 1, 1\)"
    with pytest.raises(ValueError, match=mismatch):
        load_peer_head_weights(model, tiny_peer(channels=[32] * 4, hidden_size=24))
    with pytest.raises(ValueError, match="Pool scales differ"):
        load_peer_head_weights(model, tiny_peer(channels=[32] * 4, pool_scales=(1, 2, 4, 8)))
    linear = tiny_model("linear", num_labels=5)
    with pytest.raises(ValueError, match="goes into a 'upernet' head"):
        load_peer_head_weights(linear, tiny_peer(channels=[32] * 4))


def test_trains_with_batch_of_one():
    """Deliberate difference: transformers' head raises here (BatchNorm over one value in the scale-1 branch)."""
    torch.manual_seed(0)
    maps = [torch.randn(1, c, *hw) for c, hw in zip(LEVEL_CHANNELS, LEVEL_SIZES)]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        tiny_peer().decode_head.train()(maps)
    ours = UperNetHead(LEVEL_CHANNELS, [4, 8, 16, 32], num_labels=5, channels=16).train()
    ours(BackboneFeatures(feature_maps=maps, strides=[4, 8, 16, 32])).sum().backward()
    assert ours.ppm[0][1][0].weight.grad.abs().sum() > 0


def test_four_taps_by_default():
    assert len(tiny_model("upernet", head_kwargs={"channels": 16}).config.backbone_out_indices) == 4


@pytest.mark.parametrize("size", [(5, 7), (6, 6), (37, 37), (13, 29), (2, 11)])
@pytest.mark.parametrize("scale", [1, 2, 3, 6])
def test_matmul_pooling_equals_adaptive_avg_pool(size, scale):
    # Overlapping bins (13 rows into 6), bins larger than the input (2 rows into 3 or 6), exact divisions.
    from hf_vitseg.modeling.head_upernet import AdaptiveAvgPool2dAsMatmul

    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(AdaptiveAvgPool2dAsMatmul(scale)(x), torch.nn.functional.adaptive_avg_pool2d(x, scale),
                               rtol=1e-6, atol=1e-6)
