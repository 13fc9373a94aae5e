"""SETR decoders: `setr_pup` (progressive upsampling).

Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with
Transformers" (SETR), CVPR 2021, section 3.3.

`setr_pup`: four stages of (3x3 conv-BN-ReLU, bilinear x2), x16 in all, then the classifier.
Input contract: one single-stride map `(B, C, h, w)` (the last tap). Output: `(B, num_labels, 16h, 16w)`
(stride p/16: about the input resolution for p = 16).
The paper uses 256 channels at every stage (`preset="paper"`); that costs several times the backbone at
518x518, so the default halves the width at each stage (256, 128, 64, 32), see `benchmarks/heads.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from .head_base import BackboneFeatures, BaseHead, ConvNormAct, register_head


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
