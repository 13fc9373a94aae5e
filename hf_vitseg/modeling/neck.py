"""`PyramidNeck`: single-stride ViT taps -> a four-level pyramid at strides p/4, p/2, p, 2p.

The simple feature pyramid of ViTDet (Li et al., "Exploring Plain Vision Transformer Backbones for Object
Detection", ECCV 2022) as mmsegmentation builds it for BEiT/ViT-Adapter (`Feature2Pyramid`) and
`MultiLevelNeck`: level 0 is upsampled x4 by two stride-2 transposed convs (BN + GELU between), level 1 x2
by one transposed conv, level 2 is kept, level 3 is max-pooled x2. For a stride-16 ViT that gives strides
4, 8, 16, 32; for DINOv2's stride 14: 3.5, 7, 14, 28.

With four taps, tap i feeds level i; with one tap, every level is built from it; other counts are an error.
An optional 1x1 projection brings every level to `out_channels`.
Hierarchical backbones already have a pyramid and get no neck.
"""

from __future__ import annotations

from torch import nn

from .features import BackboneFeatures


class PyramidNeck(nn.Module):
    scales = (4, 2, 1, 0.5)

    def __init__(self, in_channels: list[int], in_strides: list[int], out_channels: int | None = None):
        super().__init__()
        if len(in_channels) not in (1, 4):
            raise ValueError(
                f"The pyramid neck builds 4 levels from 1 or 4 backbone taps, got {len(in_channels)} "
                "(backbone_out_indices). Tap 4 layers (e.g. 4 evenly spaced) or 1."
            )
        channels = list(in_channels) * (4 // len(in_channels))
        c = channels[0]
        self.levels = nn.ModuleList([
            nn.Sequential(
                nn.ConvTranspose2d(c, c, kernel_size=2, stride=2), nn.BatchNorm2d(c), nn.GELU(),
                nn.ConvTranspose2d(c, c, kernel_size=2, stride=2),
            ),
            nn.ConvTranspose2d(channels[1], channels[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        ])
        self.projections = nn.ModuleList(
            [nn.Conv2d(ch, out_channels, kernel_size=1) if out_channels else nn.Identity() for ch in channels]
        )
        self.out_channels = [out_channels or ch for ch in channels]
        stride = in_strides[0]
        self.out_strides = [stride / s for s in self.scales]

    def forward(self, features: BackboneFeatures) -> BackboneFeatures:
        maps = features.feature_maps * (4 // len(features.feature_maps))
        pyramid = [proj(level(x)) for level, proj, x in zip(self.levels, self.projections, maps)]
        return BackboneFeatures(
            feature_maps=pyramid,
            strides=self.out_strides,
            prefix_tokens=features.prefix_tokens,
            pixel_values=features.pixel_values,
            hidden_states=features.hidden_states,
            attentions=features.attentions,
        )
