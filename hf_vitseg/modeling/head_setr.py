"""SETR decoders: `setr_pup` (progressive upsampling) and `setr_mla` (multi-level feature aggregation).

Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with
Transformers" (SETR), CVPR 2021, section 3.3.

`setr_pup`: four stages of (3x3 conv-BN-ReLU, bilinear x2), x16 in all, then the classifier.
Input contract: one single-stride map `(B, C, h, w)` (the last tap). Output: `(B, num_labels, 16h, 16w)`
(stride p/16: about the input resolution for p = 16).
The paper uses 256 channels at every stage (`preset="paper"`); that costs several times the backbone at
518x518, so the default halves the width at each stage (256, 128, 64, 32), see `benchmarks/heads.py`.

`setr_mla`: M streams (four evenly spaced taps by default), one per tap. Each stream projects its map with a
1x1 conv-BN-ReLU to `mla_channels`; a top-down aggregation adds each stream to the sum of the deeper ones
(deepest first); a 3x3 conv-BN-ReLU follows the addition, then two 3x3 conv-BN-ReLU (to `stream_channels`)
and a bilinear x`up_scale` upsampling; the M streams are concatenated (`M * stream_channels` channels) and
classified. The layer order follows the SETR authors' code (mmsegmentation's `MLANeck` + `SETRMLAHead`), so
their weights map one to one; the paper's text halves the width at the third conv instead of the second.
Input contract: M maps `(B, C_i, h_i, w_i)`; equal strides on ViT/SAM (the paper's case), or a pyramid on
hierarchical backbones, where the top-down sum is resized to each finer map (as in an FPN). Output:
`(B, num_labels, up_scale * h, up_scale * w)` with `(h, w)` the coarsest selected grid: stride p/4 on a ViT
(the paper then upsamples x4 more to the image, which the loss and post-processing do here), 8 on Swin.
The paper's widths (`mla_channels=256`, `stream_channels=128`; 4.6M parameters on a 384-wide ViT) are the
default: with them the whole model costs about 1.3x the FLOPs and forward time of a DINOv2-S/14 backbone alone at
518x518 (150 classes, CPU); `preset="light"` halves them.
"""

from __future__ import annotations

import torch
from torch import nn

from .head_base import BackboneFeatures, BaseHead, ConvNormAct, register_head, resize


SETR_PUP_PRESETS = {"default": (256, 128, 64, 32), "paper": (256, 256, 256, 256)}


@register_head("setr_pup")
class SETRPUPHead(BaseHead):
    num_default_taps = 1

    def __init__(self, in_channels, in_strides, num_labels, num_prefix_tokens=0, preset: str = "default",
                 stage_channels: list[int] | None = None, dropout: float = 0.0, in_index=None, input_transform=None):
        if stage_channels is None:
            if preset not in SETR_PUP_PRESETS:
                raise ValueError(f"setr_pup: unknown preset {preset!r}; choose from {sorted(SETR_PUP_PRESETS)}.")
            stage_channels = SETR_PUP_PRESETS[preset]
        stage_channels = list(stage_channels)
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=stage_channels[-1],
                         dropout=dropout, in_index=in_index, input_transform=input_transform)
        width = self.selected_channels if isinstance(self.selected_channels, int) else sum(self.selected_channels)
        widths = [width] + stage_channels
        self.stages = nn.ModuleList([ConvNormAct(widths[i], widths[i + 1]) for i in range(len(stage_channels))])

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        x = self.select_inputs(features.feature_maps)
        if isinstance(x, list):
            x = torch.cat(x, dim=1)
        for stage in self.stages:
            x = nn.functional.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.classify(x)


SETR_MLA_PRESETS = {"paper": (256, 128), "light": (128, 64)}


@register_head("setr_mla")
class SETRMLAHead(BaseHead):
    """SETR-MLA; see the module docstring. `mla_channels` / `stream_channels` override the preset's widths."""

    num_default_taps = 4

    def __init__(self, in_channels, in_strides, num_labels, num_prefix_tokens=0, preset: str = "paper",
                 mla_channels: int | None = None, stream_channels: int | None = None, up_scale: int = 4,
                 dropout: float = 0.0, in_index=None, input_transform="multiple_select"):
        if preset not in SETR_MLA_PRESETS:
            raise ValueError(f"setr_mla: unknown preset {preset!r}; choose from {sorted(SETR_MLA_PRESETS)}.")
        if input_transform != "multiple_select":
            raise ValueError("setr_mla aggregates several maps: input_transform must be 'multiple_select'.")
        if up_scale < 1:
            raise ValueError(f"setr_mla: up_scale must be >= 1, got {up_scale}.")
        preset_mla, preset_stream = SETR_MLA_PRESETS[preset]
        mla_channels = mla_channels or preset_mla
        stream_channels = stream_channels or preset_stream
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=None, dropout=dropout,
                         in_index=in_index, input_transform=input_transform)
        self.up_scale = up_scale
        self.projections = nn.ModuleList([ConvNormAct(c, mla_channels, kernel_size=1) for c in self.selected_channels])
        self.aggregations = nn.ModuleList([ConvNormAct(mla_channels, mla_channels) for _ in self.selected_channels])
        self.streams = nn.ModuleList([
            nn.Sequential(ConvNormAct(mla_channels, stream_channels), ConvNormAct(stream_channels, stream_channels))
            for _ in self.selected_channels
        ])
        self.build_classifier(stream_channels * len(self.selected_channels))

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
