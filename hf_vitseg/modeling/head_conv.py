"""`conv`: a few 3x3 conv blocks on the token map, then a learned x2 upsampling stage.

An FCN-style head (Long et al., "Fully Convolutional Networks for Semantic Segmentation", CVPR 2015;
mmsegmentation's `FCNHead`) adapted to ViT token maps: `num_convs` 3x3 conv-BN-ReLU blocks at the token
grid mix neighbouring patches, then `num_upsample` stages of (bilinear x2, 3x3 conv-BN-ReLU) recover
some resolution before the classifier.

Input contract: one selected map `(B, C, h, w)` (several are upsampled and concatenated).
Output: `(B, num_labels, h * 2**num_upsample, w * 2**num_upsample)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .head_base import BackboneFeatures, BaseHead, ConvNormAct, register_head


@register_head("conv")
class ConvHead(BaseHead):
    """3x3 conv blocks at the token grid, then learned x2 upsampling stages; see the module docstring.

    Args:
        in_channels, in_strides, num_labels, num_prefix_tokens: the incoming maps, as `BaseHead` (the model
            fills them in).
        channels: width of every conv block.
        num_convs: 3x3 conv-BN-ReLU blocks at the token grid (at least 1).
        num_upsample: stages of (bilinear x2, 3x3 conv-BN-ReLU); the output stride is the input's
            `/ 2**num_upsample`.
        dropout: dropout before the classifier.
        in_index: which taps to read (default: all).
        input_transform: how to combine several taps; the default `"resize_concat"` concatenates them.
    """

    num_default_taps = 1

    def __init__(self, in_channels: list[int], in_strides: list[float], num_labels: int, num_prefix_tokens: int = 0,
                 channels: int = 256, num_convs: int = 2, num_upsample: int = 1, dropout: float = 0.1,
                 in_index: int | list[int] | None = None, input_transform: str | None = "resize_concat"):
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=channels,
                         dropout=dropout, in_index=in_index, input_transform=input_transform)
        if num_convs < 1 or num_upsample < 0:
            raise ValueError(f"conv head: need num_convs >= 1 and num_upsample >= 0, got {num_convs}, {num_upsample}.")
        width = self.selected_width
        self.convs = nn.Sequential(*[ConvNormAct(width if i == 0 else channels, channels) for i in range(num_convs)])
        self.upsample = nn.ModuleList([ConvNormAct(channels, channels) for _ in range(num_upsample)])

    def output_stride(self, in_strides: Sequence[float]) -> float:
        return self.select_strides(in_strides)[0] / 2 ** len(self.upsample)

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        x = self.select_single_map(features.feature_maps)
        x = self.convs(x)
        for stage in self.upsample:
            x = stage(nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.classify(x)
