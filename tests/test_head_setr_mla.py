"""`setr_mla` (SETR multi-level feature aggregation): its widths, presets and top-down aggregation. Shapes,
training and save/load on every backbone family: the common suite in test_modeling.py."""

from __future__ import annotations

import pytest
import torch
from conftest import NON_SQUARE, tiny_model

import hf_vitseg.modeling.head_setr_mla  # noqa: F401  registers setr_mla
from hf_vitseg.modeling.features import BackboneFeatures
from hf_vitseg.modeling.head_setr_mla import SETRMLAHead

SMALL = {"mla_channels": 16, "stream_channels": 8}  # the paper's widths are tested below; these keep training fast


def batch(size=NON_SQUARE, num_labels=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, generator=g)
    blocks = torch.randint(0, num_labels, (2, 1, size[0] // 32, size[1] // 32), generator=g)
    return x, torch.nn.functional.interpolate(blocks.float(), size=size, mode="nearest")[:, 0].long()


def test_paper_widths_by_default_and_overrides():
    model = tiny_model("setr_mla")
    assert len(model.config.backbone_out_indices) == 4
    head = model.head
    assert head.projections[0][0].out_channels == 256 and head.streams[0][-1][0].out_channels == 128
    assert head.classifier.in_channels == 4 * 128
    light = tiny_model("setr_mla", head_kwargs={"preset": "light", "stream_channels": 24}).head
    assert light.projections[0][0].out_channels == 128 and light.classifier.in_channels == 4 * 24
    model = tiny_model("setr_mla", head_kwargs={"up_scale": 2, **SMALL}).eval()
    assert model(batch()[0]).logits.shape[-2:] == (16, 24)
    with pytest.raises(ValueError, match="unknown preset"):
        tiny_model("setr_mla", head_kwargs={"preset": "huge"})


def test_aggregation_is_top_down():
    """Stream i sums the projections of taps i..M-1: the deepest reaches every stream, the shallowest its own only."""
    torch.manual_seed(0)
    head = SETRMLAHead([8] * 4, [8] * 4, num_labels=2, mla_channels=8, stream_channels=4).eval()
    maps = [torch.randn(1, 8, 3, 5) for _ in range(4)]

    def streams(maps):  # the classifier's input, one 4-channel block per stream, shallow to deep
        captured = {}
        hook = head.classifier.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
        with torch.no_grad():
            head(BackboneFeatures(feature_maps=maps, strides=[8] * 4))
        hook.remove()
        return captured["x"].split(4, dim=1)

    reference = streams(maps)
    shallow_changed = streams([maps[0] + 1] + maps[1:])
    deep_changed = streams(maps[:3] + [maps[3] + 1])
    assert not torch.equal(shallow_changed[0], reference[0])
    assert all(torch.equal(a, b) for a, b in zip(shallow_changed[1:], reference[1:]))
    assert all(not torch.equal(a, b) for a, b in zip(deep_changed, reference))
