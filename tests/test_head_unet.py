"""The `unet` head: the image stem, skip grouping for strides 14 and 16, the neck on ViTs only. Shapes, training
and save/load on every backbone family: the common suite in test_modeling.py."""

from __future__ import annotations

import pytest
import torch
from conftest import NON_SQUARE, tiny_model

import hf_vitseg.modeling.head_unet  # noqa: F401  registers "unet" until heads.py imports it
from hf_vitseg.modeling.head_base import BackboneFeatures
from hf_vitseg.modeling.head_unet import UNetHead

SMALL = {"decoder_channels": [32, 32, 16, 16], "stem_channels": [8, 16]}


@pytest.mark.parametrize("family", ["dinov2", "sam", "swin"])
def test_vit_and_sam_taps_go_through_the_pyramid_neck_and_swin_stages_do_not(family):
    assert (tiny_model("unet", family, head_kwargs=SMALL).neck is None) == (family == "swin")


def features_at(stride, grid, channels=8, image=None):
    """A neck-like pyramid at strides stride/4 .. 2*stride over a (h, w) token grid."""
    h, w = grid
    sizes = [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), ((h + 1) // 2, (w + 1) // 2)]
    return BackboneFeatures(
        feature_maps=[torch.randn(1, channels, *s) for s in sizes],
        strides=[stride / 4, stride / 2, stride, 2 * stride],
        pixel_values=image,
    )


@pytest.mark.parametrize("patch", [14, 16])
def test_stages_and_output_size_for_patch_14_and_16(patch):
    # DINOv2 at 518x518: a 37x37 grid, pyramid 148/74/37/19 at strides 3.5/7/14/28; the stem gives 259 and 130
    head = UNetHead([8] * 4, [patch / 4, patch / 2, patch, 2 * patch], num_labels=2, **SMALL).eval()
    # skips grouped by rounded log2 stride: p, p/2, p/4 with the stem's stride-4 map, the stem's stride-2 map
    assert head.stage_skips == [[("level", 2)], [("level", 1)], [("level", 0), ("stem", 1)], [("stem", 0)]]
    size = 37 * patch
    with torch.no_grad():
        logits = head(features_at(patch, (37, 37), image=torch.randn(1, 3, size, size)))
    assert logits.shape == (1, 2, -(-size // 2), -(-size // 2))


def test_non_square_odd_grid_and_stride_8_grouping():
    # patch 8: pyramid at 2, 4, 8, 16 meets the stem at 2 and 4, three stages
    head = UNetHead([8] * 4, [2, 4, 8, 16], num_labels=2, **SMALL).eval()
    assert head.stage_skips == [[("level", 2)], [("level", 1), ("stem", 1)], [("level", 0), ("stem", 0)]]
    with torch.no_grad():
        logits = head(features_at(8, (5, 7), image=torch.randn(1, 3, 40, 56)))
    assert logits.shape == (1, 2, 20, 28)


def test_without_stem_the_output_is_at_the_finest_level():
    head = UNetHead([8] * 4, [4, 8, 16, 32], num_labels=2, decoder_channels=[16, 16, 16], stem_channels=()).eval()
    with torch.no_grad():
        assert head(features_at(16, (3, 5))).shape == (1, 2, 12, 20)


def test_too_few_decoder_widths_is_a_clear_error():
    with pytest.raises(ValueError, match="4 decoder stages"):
        UNetHead([8] * 4, [4, 8, 16, 32], num_labels=2, decoder_channels=[16, 16])


def test_fewer_swin_stages_use_the_finest_widths():
    model = tiny_model("unet", "swin", backbone_out_indices=[3, 4],
                       head_kwargs={**SMALL, "decoder_channels": [64, 32, 16, 8]})
    # skips: stage 3 (stride 16), stem 4, stem 2 -> widths 32, 16, 8
    assert [stage[1][0].out_channels for stage in model.head.stages] == [32, 16, 8]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, *NON_SQUARE)).logits.shape == (1, 3, 32, 48)
