"""`setr_mla`: SETR's multi-level feature aggregation decoder.

Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with
Transformers" (SETR), CVPR 2021, section 3.3 "Multi-Level feature Aggregation".

M streams (four evenly spaced taps by default), one per tap. Each stream projects its map with a 1x1
conv-BN-ReLU to `mla_channels`; a top-down aggregation adds each stream to the sum of the deeper ones
(deepest first); a 3x3 conv-BN-ReLU follows the addition, then two 3x3 conv-BN-ReLU (to `stream_channels`)
and a bilinear x`up_scale` upsampling; the M streams are concatenated (`M * stream_channels` channels) and
classified. The layer order follows the SETR authors' code (mmsegmentation's `MLANeck` + `SETRMLAHead`), so
their weights map one to one; the paper's text halves the width at the third conv instead of the second.

Input contract: M maps `(B, C_i, h_i, w_i)`; equal strides on ViT/SAM (the paper's case), or a pyramid on
hierarchical backbones, where the top-down sum is resized to each finer map (as in an FPN). Output:
`(B, num_labels, up_scale * h, up_scale * w)` with `(h, w)` the coarsest selected grid: stride p/4 on a ViT
(the paper then upsamples x4 more to the image, which the loss and post-processing do here), 8 on Swin.
The paper's widths (`mla_channels=256`, `stream_channels=128`; 4.6M parameters on a 384-wide ViT) are the
default; `preset="light"` halves them. The README's "Speed of every head" table (`benchmarks/heads.py`) has
the measured costs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .head_base import BackboneFeatures, BaseHead, ConvNormAct, register_head, resize, resolve_preset

# (mla_channels, stream_channels); the paper's widths are the default.
SETR_MLA_PRESETS = {"default": (256, 128), "paper": (256, 128), "light": (128, 64)}


@register_head("setr_mla")
class SETRMLAHead(BaseHead):
    """SETR-MLA: per-tap streams with top-down aggregation, concatenated and classified; see the module docstring.

    Args:
        in_channels, in_strides, num_labels, num_prefix_tokens: the incoming maps, as `BaseHead` (the model
            fills them in).
        preset: `"default"` / `"paper"` (the paper's widths, 256 and 128) or `"light"` (half);
            `mla_channels` / `stream_channels` override it.
        mla_channels: width of each stream's projection and aggregation conv.
        stream_channels: width of each stream's last two convs.
        up_scale: the streams' upsampling factor from the coarsest selected grid (the paper's 4).
        dropout: dropout before the classifier.
        in_index: which taps to read (default: all); each is one stream.
    """

    num_default_taps = 4

    def __init__(self, in_channels: list[int], in_strides: list[float], num_labels: int, num_prefix_tokens: int = 0,
                 preset: str = "default", mla_channels: int | None = None, stream_channels: int | None = None,
                 up_scale: int = 4, dropout: float = 0.0, in_index: int | list[int] | None = None):
        preset_mla, preset_stream = resolve_preset("setr_mla", SETR_MLA_PRESETS, preset)
        if up_scale < 1:
            raise ValueError(f"setr_mla: up_scale must be >= 1, got {up_scale}.")
        mla_channels = mla_channels or preset_mla
        stream_channels = stream_channels or preset_stream
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=None, dropout=dropout,
                         in_index=in_index, input_transform="multiple_select")
        self.up_scale = up_scale
        self.projections = nn.ModuleList([ConvNormAct(c, mla_channels, kernel_size=1) for c in self.selected_channels])
        self.aggregations = nn.ModuleList([ConvNormAct(mla_channels, mla_channels) for _ in self.selected_channels])
        self.streams = nn.ModuleList([
            nn.Sequential(ConvNormAct(mla_channels, stream_channels), ConvNormAct(stream_channels, stream_channels))
            for _ in self.selected_channels
        ])
        self.build_classifier(stream_channels * len(self.selected_channels))

    def output_stride(self, in_strides: Sequence[float]) -> float:
        return max(self.select_strides(in_strides)) / self.up_scale

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        maps = self.select_inputs(features.feature_maps)  # M x (B, C_i, h_i, w_i), shallow to deep
        projected = [proj(x) for proj, x in zip(self.projections, maps)]  # M x (B, mla, h_i, w_i)
        aggregated, running = [None] * len(projected), None
        for i in reversed(range(len(projected))):  # top-down: each stream adds the sum of the deeper ones
            running = projected[i] if running is None else projected[i] + resize(running, projected[i].shape[-2:])
            aggregated[i] = running
        coarsest = min((x.shape[-2:] for x in maps), key=lambda hw: hw[0] * hw[1])
        size = (coarsest[0] * self.up_scale, coarsest[1] * self.up_scale)
        outs = [resize(stream(agg(x)), size) for agg, stream, x in zip(self.aggregations, self.streams, aggregated)]
        return self.classify(torch.cat(outs, dim=1))  # (B, num_labels, up_scale*h, up_scale*w)
