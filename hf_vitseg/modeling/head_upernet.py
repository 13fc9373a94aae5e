"""`upernet`: UPerNet, pyramid pooling on the coarsest level, an FPN over the pyramid, fusion at the finest level.

Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018 (the scene-parsing branch, as
mmsegmentation's `UPerHead` and transformers' `UperNetHead` build it):

1. a pyramid pooling module (Zhao et al., PSPNet, CVPR 2017) on the coarsest level: average pooling to
   `pool_scales` grids (1, 2, 3, 6), a 1x1 conv-BN-ReLU each, upsampling back, concatenation with the level,
   a 3x3 conv-BN-ReLU (`ppm_bottleneck`);
2. an FPN: 1x1 lateral conv-BN-ReLU on every other level, a top-down path adding each upsampled coarser level,
   a 3x3 conv-BN-ReLU on every level but the top one;
3. every FPN level upsampled to the finest and concatenated, a 3x3 conv-BN-ReLU (`fuse`), dropout, classifier.

Input contract: a pyramid of maps `(B, C_i, h_i, w_i)`, finest first, usually four at strides 4, 8, 16, 32 (p/4,
p/2, p, 2p after the pyramid neck on a ViT; Swin's own stages). Output: `(B, num_labels, h_0, w_0)`, the finest
level's resolution (stride p/4 on a ViT, 4 on Swin).

Widths: `channels` (every conv's output width) defaults to 256 (`preset="default"`). transformers'
`UperNetConfig.hidden_size` and mmsegmentation use 512: `preset="paper"` (or `channels=512`) builds exactly those
layer shapes (`hf_vitseg.convert` imports transformers' weights), at four times the multiply-adds of the fusion
conv, which dominates at stride p/4 (the README's "Speed of every head" table has the measured costs).
`channels` overrides the preset.
transformers' UperNet has no dropout before the classifier, mmsegmentation's has 0.1 (the default here).

The pyramid pooling is `AdaptiveAvgPool2dAsMatmul`, adaptive average pooling written as products with
averaging matrices built at run time, so the head exports to ONNX with dynamic height and width.

One deliberate difference: with a batch of one image, the pool-scale-1 branch's BatchNorm sees a single value per
channel in training, where `nn.BatchNorm2d` (and so transformers' UperNet) raises; here that branch normalises
with its running statistics instead, so batch-size-1 fine-tuning works. Everything else matches transformers'
`UperNetHead` layer for layer (`tests/test_head_upernet.py` checks it to 1e-5).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .head_base import BackboneFeatures, BaseHead, ConvNormAct, register_head, resize, resolve_preset


def _pooling_matrix(length, scale: int, like: torch.Tensor) -> torch.Tensor:
    """`(scale, length)` averaging weights of `adaptive_avg_pool1d`: bin `i` covers
    `[floor(i * length / scale), ceil((i + 1) * length / scale))`."""
    bins = torch.arange(scale, device=like.device)
    start = (bins * length) // scale
    end = ((bins + 1) * length + scale - 1) // scale
    positions = torch.arange(length, device=like.device)
    mask = (positions[None, :] >= start[:, None]) & (positions[None, :] < end[:, None])
    weights = mask.to(like.dtype)
    return weights / weights.sum(dim=1, keepdim=True)


class AdaptiveAvgPool2dAsMatmul(nn.Module):
    """`nn.AdaptiveAvgPool2d(scale)` computed as two products with averaging matrices.

    The same numbers as `F.adaptive_avg_pool2d` (to float rounding), but built from the input's size at run time,
    so the ONNX graph stays valid at every height and width; ONNX has no adaptive pooling, and torch.onnx's
    `AveragePool` replacement fixes its kernel to the example's size."""

    def __init__(self, output_size: int):
        super().__init__()
        self.output_size = int(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _pooling_matrix(x.shape[-2], self.output_size, x)  # (s, H)
        cols = _pooling_matrix(x.shape[-1], self.output_size, x)  # (s, W)
        return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))  # (B, C, s, s)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class PooledBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that falls back to its running statistics when a training batch has one value per channel
    (a 1x1 pooled map of a single image), instead of raising."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


# Width of every conv: "paper" is the UPerNet / mmsegmentation / transformers width (512).
UPERNET_PRESETS = {"default": 256, "paper": 512}


@register_head("upernet")
class UperNetHead(BaseHead):
    """UPerNet: pyramid pooling on the coarsest level, an FPN, fusion at the finest; see the module docstring.

    Args:
        in_channels, in_strides, num_labels, num_prefix_tokens: the incoming maps, as `BaseHead` (the model
            fills them in).
        preset: `"default"` (256 channels) or `"paper"` (512, transformers' and mmsegmentation's width);
            `channels` overrides it.
        channels: the output width of every conv.
        pool_scales: the grids of the pyramid pooling module.
        dropout: dropout before the classifier (mmsegmentation's 0.1; transformers has none).
        in_index: which pyramid levels to read (default: all), finest first.
    """

    num_default_taps = 4
    wants_pyramid = True

    def __init__(self, in_channels: list[int], in_strides: list[float], num_labels: int, num_prefix_tokens: int = 0,
                 preset: str = "default", channels: int | None = None, pool_scales: tuple[int, ...] = (1, 2, 3, 6),
                 dropout: float = 0.1, in_index: int | list[int] | None = None):
        channels = int(channels or resolve_preset("upernet", UPERNET_PRESETS, preset))
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=channels,
                         dropout=dropout, in_index=in_index, input_transform="multiple_select")
        levels = self.selected_channels
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList([
            nn.Sequential(
                AdaptiveAvgPool2dAsMatmul(scale),
                nn.Sequential(nn.Conv2d(levels[-1], channels, 1, bias=False), PooledBatchNorm2d(channels),
                              nn.ReLU(inplace=True)),
            )
            for scale in self.pool_scales
        ])
        self.ppm_bottleneck = ConvNormAct(levels[-1] + len(self.pool_scales) * channels, channels)
        self.lateral_convs = nn.ModuleList([ConvNormAct(c, channels, kernel_size=1) for c in levels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvNormAct(channels, channels) for _ in levels[:-1]])
        self.fuse = ConvNormAct(len(levels) * channels, channels)

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        maps = self.select_inputs(features.feature_maps)  # finest first
        top = maps[-1]
        pooled = [resize(branch(top), top.shape[-2:]) for branch in self.ppm]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps[:-1])]  # (B, channels, h_i, w_i)
        laterals.append(self.ppm_bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        x = self.fuse(torch.cat([resize(x, size) for x in outs], dim=1))  # (B, channels, h_0, w_0)
        return self.classify(x)
