"""`segformer`: the SegFormer all-MLP decoder.

Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers", NeurIPS 2021,
section 3.2: a linear projection of every pyramid level to one width (`channels`), upsampling to the finest
(1/4) level, concatenation, a 1x1 fuse conv + BN + ReLU, dropout and the classifier. The concatenation runs
coarsest level first, as in the paper's code and transformers' `SegformerDecodeHead`, so the fuse conv's weights
are laid out as theirs (`hf_vitseg.convert` imports them).

Input contract: a pyramid of maps `(B, C_i, h_i, w_i)`, finest first, usually four at strides 4, 8, 16, 32 (p/4,
p/2, p, 2p after the pyramid neck on a ViT; Swin's own stages). Output: `(B, num_labels, h_0, w_0)`, the finest
level's resolution (stride p/4 on a ViT, 4 on Swin).

Cheaper, same function: the projection and the fuse conv are both pointwise linear maps, and bilinear upsampling
(weights summing to one) commutes with them, so `fuse(concat_i(up(proj_i(x_i))))` equals
`sum_i up(fuse_i(proj_i(x_i)))`, with `fuse_i` the fuse conv's slice for level i. `forward` composes
`fuse_i @ proj_i` into one 1x1 conv per level, applies it at the level's own resolution and upsamples only the
`channels`-wide result: no `num_levels * channels`-wide map at 1/4 resolution, about a third of the FLOPs of
the literal decoder. The parameters keep the paper's layout; outputs match transformers' to float rounding
(`tests/test_head_segformer.py` checks 1e-5). Default width 256 (the paper's B0; B1-B5 use 256 or 768).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .head_base import BackboneFeatures, BaseHead, ConvNormAct, register_head, resize


@register_head("segformer")
class SegFormerHead(BaseHead):
    """SegFormer's all-MLP decoder over a pyramid; see the module docstring.

    Args:
        in_channels, in_strides, num_labels, num_prefix_tokens: the incoming maps, as `BaseHead` (the model
            fills them in).
        channels: the common width every level is projected to, and the fuse conv's width (the paper's B0: 256).
        dropout: dropout before the classifier.
        in_index: which pyramid levels to read (default: all), finest first.
    """

    num_default_taps = 4
    wants_pyramid = True

    def __init__(self, in_channels: list[int], in_strides: list[float], num_labels: int, num_prefix_tokens: int = 0,
                 channels: int = 256, dropout: float = 0.1, in_index: int | list[int] | None = None):
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=channels,
                         dropout=dropout, in_index=in_index, input_transform="multiple_select")
        levels = self.selected_channels
        self.projections = nn.ModuleList([nn.Conv2d(c, channels, kernel_size=1) for c in levels])
        self.fuse = ConvNormAct(len(levels) * channels, channels, kernel_size=1)  # input: coarsest level first

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        maps = self.select_inputs(features.feature_maps)  # finest first
        size = maps[0].shape[-2:]
        fuse_slices = self.fuse[0].weight.flatten(1).split(self.channels, dim=1)[::-1]  # per level, finest first
        x = 0
        for proj, fuse_slice, level in zip(self.projections, fuse_slices, maps):
            weight = (fuse_slice @ proj.weight.flatten(1))[:, :, None, None]  # (channels, C_i, 1, 1)
            x = x + resize(F.conv2d(level, weight, fuse_slice @ proj.bias), size)
        x = self.fuse[2](self.fuse[1](x))  # BN, ReLU of the fuse block
        return self.classify(x)
