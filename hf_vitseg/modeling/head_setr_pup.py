"""`setr_pup`: SETR's progressive upsampling decoder.

Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with
Transformers" (SETR), CVPR 2021, section 3.3 "Progressive UPsampling": four stages of (3x3 conv-BN-ReLU,
bilinear x2), x16 in all, then the classifier.

Input contract: one single-stride map `(B, C, h, w)` (the last tap). Output: `(B, num_labels, 16h, 16w)`
(stride p/16: about the input resolution for p = 16).
The paper uses 256 channels at every stage (`preset="paper"`); at DINOv2's native 518x518 that costs several
times the backbone, so the default halves the width at each stage (256, 128, 64, 32). The README's "Speed of
every head" table (`benchmarks/heads.py`) has the measured costs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .head_base import (
    BackboneFeatures,
    BaseHead,
    ConvNormAct,
    register_head,
    resolve_preset,
)

# Width of each stage's conv; "paper" is SETR-PUP's 256 everywhere.
SETR_PUP_PRESETS = {"default": (256, 128, 64, 32), "paper": (256, 256, 256, 256)}


@register_head("setr_pup")
class SETRPUPHead(BaseHead):
    """SETR-PUP: four (3x3 conv-BN-ReLU, bilinear x2) stages, then the classifier; see the module docstring.

    Args:
        in_channels, in_strides, num_labels, num_prefix_tokens: the incoming maps, as `BaseHead` (the model
            fills them in).
        preset: `"default"` (widths 256, 128, 64, 32) or `"paper"` (256 at every stage); `stage_channels`
            overrides it.
        stage_channels: the width of each stage; one x2 upsampling per entry.
        dropout: dropout before the classifier.
        in_index, input_transform: the taps read, as `BaseHead`; by default the last tap alone (several are
            concatenated: `select_single_map`).
    """

    num_default_taps = 1

    def __init__(self, in_channels: list[int], in_strides: list[float], num_labels: int, num_prefix_tokens: int = 0,
                 preset: str = "default", stage_channels: list[int] | None = None, dropout: float = 0.0,
                 in_index: int | list[int] | None = None, input_transform: str | None = None):
        if stage_channels is None:
            stage_channels = resolve_preset("setr_pup", SETR_PUP_PRESETS, preset)
        stage_channels = list(stage_channels)
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=stage_channels[-1],
                         dropout=dropout, in_index=in_index, input_transform=input_transform)
        width = self.selected_width
        widths = [width] + stage_channels
        self.stages = nn.ModuleList([ConvNormAct(widths[i], widths[i + 1]) for i in range(len(stage_channels))])

    def output_stride(self, in_strides: Sequence[float]) -> float:
        return self.select_strides(in_strides)[0] / 2 ** len(self.stages)

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        x = self.select_single_map(features.feature_maps)
        for stage in self.stages:
            x = nn.functional.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.classify(x)
