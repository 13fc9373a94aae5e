"""`unet`: a U-Net decoder over the feature pyramid plus a light convolutional stem on the image.

In the spirit of TransUNet (Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image
Segmentation", arXiv:2102.04306, 2021) and U-Net (Ronneberger, Fischer and Brox, "U-Net: Convolutional
Networks for Biomedical Image Segmentation", MICCAI 2015): start from the deepest level and climb in
stages; each stage upsamples (bilinear, to the skip's exact size), concatenates the skips of that
resolution and applies two 3x3 conv-BN-ReLU.

Skips come from two places:
- the pyramid levels but the deepest (`wants_pyramid=True`: on ViT/SAM the `PyramidNeck` turns 4 taps into
  strides p/4, p/2, p, 2p; Swin hands its own stages at 4, 8, 16, 32);
- a stem on `features.pixel_values`: per entry of `stem_channels`, a stride-2 3x3 conv-BN-ReLU and a 3x3
  conv-BN-ReLU, giving maps at strides 2 and 4 by default. A stride-14/16 ViT never sees detail finer
  than a patch; the stem gives it back (nuclei spanning about 1.5 patches, say).
Skips are grouped by their stride rounded to a power of two (DINOv2's level at stride 3.5 joins the stem's
stride-4 map); a stage works at the largest map of its group and resizes the others to it.

Input contract: a pyramid `(B, C_i, h_i, w_i)` at strides about 4, 8, 16, 32, and the image.
Output: `(B, num_labels, ceil(H/2), ceil(W/2))`, stride 2 with the default 2-level stem (stride 4 without
a stem: `stem_channels=()`). `decoder_channels` gives one width per stage, coarsest first; with fewer
stages (fewer taps) the last (finest) entries are used. The README's "Speed of every head" table
(`benchmarks/heads.py`) has the measured costs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .head_base import BackboneFeatures, BaseHead, ConvNormAct, register_head, resize


@register_head("unet")
class UNetHead(BaseHead):
    """A U-Net decoder over the pyramid, with skips from a convolutional stem on the image; see the module
    docstring.

    Args:
        in_channels, in_strides, num_labels, num_prefix_tokens: the incoming maps, as `BaseHead` (the model
            fills them in).
        decoder_channels: the width of each decoder stage, coarsest first; with fewer stages the last
            (finest) entries are used.
        stem_channels: the width of each stem block on the image (one stride-2 block per entry); `()` for no
            stem, which then reads no image.
        dropout: dropout before the classifier.
        in_index: which pyramid levels to read (default: all); each is one skip, the deepest the start.
        image_channels: channels of the image the stem reads; the model passes its `num_channels`.
    """

    num_default_taps = 4
    wants_pyramid = True
    uses_pixel_values = True  # the stem; False per instance without one

    def __init__(self, in_channels: list[int], in_strides: list[float], num_labels: int, num_prefix_tokens: int = 0,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32), stem_channels: Sequence[int] = (32, 64),
                 dropout: float = 0.1, in_index: int | list[int] | None = None, image_channels: int = 3):
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=None, dropout=dropout,
                         in_index=in_index, input_transform="multiple_select")
        channels, strides = self.selected_channels, self.selected_strides
        if len(channels) < 2 and not stem_channels:
            raise ValueError("unet: needs at least two pyramid levels or an image stem to have skips.")
        self.uses_pixel_values = bool(stem_channels)
        self.deepest = max(range(len(strides)), key=lambda i: strides[i])
        stem_in = [image_channels] + list(stem_channels)
        self.stem = nn.ModuleList([
            nn.Sequential(ConvNormAct(stem_in[i], c, stride=2), ConvNormAct(c, c)) for i, c in enumerate(stem_channels)
        ])

        # skips: ("level", i) for pyramid level i, ("stem", j) for stem output j (stride 2 ** (j + 1))
        skips = [(("level", i), strides[i], channels[i]) for i in range(len(strides)) if i != self.deepest]
        skips += [(("stem", j), 2 ** (j + 1), c) for j, c in enumerate(stem_channels)]
        groups: dict[int, list] = {}
        for key, stride, c in skips:
            groups.setdefault(round(math.log2(stride)), []).append((key, c))
        self.stage_skips = [[key for key, _ in groups[e]] for e in sorted(groups, reverse=True)]
        if len(decoder_channels) < len(self.stage_skips):
            raise ValueError(
                f"unet: {len(self.stage_skips)} decoder stages (skips at strides "
                f"{[2 ** e for e in sorted(groups, reverse=True)]}) need as many decoder_channels, got "
                f"{list(decoder_channels)}."
            )
        widths = list(decoder_channels)[-len(self.stage_skips):]
        previous = channels[self.deepest]
        self.stages = nn.ModuleList()
        for e, width in zip(sorted(groups, reverse=True), widths):
            skip_channels = sum(c for _, c in groups[e])
            self.stages.append(nn.Sequential(ConvNormAct(previous + skip_channels, width), ConvNormAct(width, width)))
            previous = width
        self.build_classifier(previous)

    def output_stride(self, in_strides: Sequence[float]) -> float:
        """The finest skip's stride: the last stage works at the largest map of the finest group."""
        strides = self.select_strides(in_strides)
        deepest = max(range(len(strides)), key=lambda i: strides[i])
        levels = [s for i, s in enumerate(strides) if i != deepest]
        return min(levels + [2 ** (j + 1) for j in range(len(self.stem))])

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        levels = self.select_inputs(features.feature_maps)
        sources = {("level", i): x for i, x in enumerate(levels)}
        if self.stem:
            if features.pixel_values is None:
                raise ValueError("unet: the image stem needs features.pixel_values.")
            x = features.pixel_values
            for j, block in enumerate(self.stem):
                x = block(x)  # (B, stem_channels[j], ceil(H / 2^(j+1)), ...)
                sources[("stem", j)] = x

        x = levels[self.deepest]
        for stage, keys in zip(self.stages, self.stage_skips):
            skips = [sources[k] for k in keys]
            size = max((s.shape[-2:] for s in skips), key=lambda hw: hw[0] * hw[1])
            x = stage(torch.cat([resize(x, size)] + [resize(s, size) for s in skips], dim=1))
        return self.classify(x)  # (B, num_labels, ceil(H/2), ceil(W/2)) with the default stem
