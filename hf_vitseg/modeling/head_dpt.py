"""`dpt`: the Dense Prediction Transformer decoder (reassembly, fusion, segmentation head).

Ranftl, Bochkovskiy and Koltun, "Vision Transformers for Dense Prediction", ICCV 2021, section 3 and
figure 1; the segmentation model of their code (isl-org/DPT, `DPTSegmentationModel`) and transformers'
`DPTNeck` + `DPTSemanticSegmentationHead`, whose weights load into this head (`hf_vitseg.convert`).

1. Reassemble, per tap: the readout of the CLS token (`"ignore"`; `"add"` it to every patch token;
   `"project"`: concatenate it to every patch token, Linear(2C -> C) + GELU), a 1x1 projection to
   `reassemble_channels[i]`, and resampling of the stride-p map by `reassemble_factors[i]` (x4 and x2 by
   transposed convs, identity, a 3x3 stride-2 conv for 0.5): strides p/4, p/2, p, 2p.
2. A 3x3 conv brings every level to `fusion_channels`.
3. Fusion, from the coarsest level down: the running map plus a residual conv unit of the level's map,
   another residual conv unit, a 1x1 projection and a bilinear upsampling (align_corners=True) to the next
   finer level's exact size (x2 after the finest level).
4. Segmentation head: 3x3 conv-BN-ReLU, dropout, 1x1 classifier.

Input contract: single-stride maps `(B, C_i, h, w)` of 4 taps (or 1 tap, used for every level) with their
prefix tokens (the CLS token is the first); SAM's taps (no prefix tokens) work with `readout="ignore"`.
Hierarchical backbones (Swin) already have strides 4..32: their maps are only projected, not resampled.
Output: twice the finest level, `(B, num_labels, 8h, 8w)` on single-stride backbones: stride p/8 (2 for
p=16, 1.75 for DINOv2's p=14); stride 2 on Swin. The paper's head and transformers' upsample x2 more at the end; that
is left to the loss and post-processing here.

Deliberate differences from transformers, outputs otherwise equal (tests/test_head_dpt.py):
- the fused map is upsampled to the next level's exact size (as MiDaS v3.1 does); transformers upsamples
  x2 and resizes the level's map to it instead, which misaligns the levels on odd token grids (DINOv2 at
  518x518 has a 37x37 grid);
- the fusion's 1x1 projection runs before the upsampling, not after: both are linear and bilinear weights
  sum to one, so the result is the same at a quarter of the cost;
- the coarsest fusion block has no unused first residual unit.

Widths: `preset="paper"` is DPT-Base's (reassemble 96, 192, 384, 768 = C/8 .. C of ViT-B's C = 768; fusion
256). The default halves every width, the same proportions for a ViT-S-sized backbone (C = 384). The
README's "Speed of every head" table (`benchmarks/heads.py`) has the measured costs of both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .head_base import (
    BackboneFeatures,
    BaseHead,
    ConvNormAct,
    register_head,
    resolve_preset,
)

DPT_PRESETS = {
    "default": {"reassemble_channels": (48, 96, 192, 384), "fusion_channels": 128},
    "paper": {"reassemble_channels": (96, 192, 384, 768), "fusion_channels": 256},
}
READOUTS = ("ignore", "add", "project")


class ReassembleLayer(nn.Module):
    """1x1 projection, then resampling by `factor` (>1: transposed conv, 1: none, <1: strided 3x3 conv)."""

    def __init__(self, in_channels: int, out_channels: int, factor: float):
        super().__init__()
        self.projection = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        if factor > 1:
            self.resample = nn.ConvTranspose2d(out_channels, out_channels, kernel_size=int(factor), stride=int(factor))
        elif factor == 1:
            self.resample = nn.Identity()
        else:
            self.resample = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=round(1 / factor), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(self.projection(x))


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: x + conv(relu(norm?(conv(relu(x))))), with BN after each conv if asked."""

    def __init__(self, channels: int, batch_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=not batch_norm)
        self.norm1 = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=not batch_norm)
        self.norm2 = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm1(self.conv1(F.relu(x)))
        out = self.norm2(self.conv2(F.relu(out)))
        return x + out


class FusionBlock(nn.Module):
    """running map (+ residual unit of the level's map) -> residual unit -> 1x1 projection -> upsample."""

    def __init__(self, channels: int, batch_norm: bool, has_skip: bool):
        super().__init__()
        self.skip_unit = ResidualConvUnit(channels, batch_norm) if has_skip else None
        self.residual_unit = ResidualConvUnit(channels, batch_norm)
        self.projection = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size) -> torch.Tensor:
        if skip is not None:
            x = x + self.skip_unit(skip)
        x = self.projection(self.residual_unit(x))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


@register_head("dpt")
class DPTHead(BaseHead):
    """DPT reassembly + fusion + segmentation head, see the module docstring.

    Args:
        in_channels, in_strides, num_labels, num_prefix_tokens: the incoming maps, as `BaseHead` (the model
            fills them in).
        preset: `"default"` or `"paper"` (DPT-Base widths); `reassemble_channels` / `fusion_channels`
            override it.
        reassemble_channels: width of each level after the 1x1 projection, finest first.
        fusion_channels: width of the fusion stage and of the head.
        readout: what the CLS token does, `"ignore"`, `"add"` or `"project"`; default: `"project"` (the
            paper's choice) when the backbone has a CLS token, else `"ignore"`.
        reassemble_factors: resampling factor of each level for single-stride backbones (strides p/4 .. 2p).
        fusion_batch_norm: BatchNorm in the residual conv units, as in DPT's segmentation model
            (transformers' `use_batch_norm_in_fusion_residual`).
        dropout: dropout before the classifier.
        in_index: which taps to read (default: all); each is one level (or one tap for every level).
    """

    num_default_taps = 4
    uses_prefix_tokens = True
    prefix_tokens_optional = True

    def __init__(self, in_channels: list[int], in_strides: list[float], num_labels: int, num_prefix_tokens: int = 0,
                 preset: str = "default", reassemble_channels: list[int] | None = None,
                 fusion_channels: int | None = None, readout: str | None = None,
                 reassemble_factors: Sequence[float] = (4, 2, 1, 0.5), fusion_batch_norm: bool = True,
                 dropout: float = 0.1, in_index: int | list[int] | None = None):
        widths = resolve_preset("dpt", DPT_PRESETS, preset)
        reassemble_channels = list(reassemble_channels or widths["reassemble_channels"])
        fusion_channels = fusion_channels or widths["fusion_channels"]
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=fusion_channels,
                         dropout=dropout, in_index=in_index, input_transform="multiple_select")
        self.readout = self.resolve_readout(readout, num_prefix_tokens)
        num_levels = len(reassemble_channels)
        taps = len(self.selected_channels)
        if taps not in (1, num_levels):
            raise ValueError(
                f"dpt: {taps} backbone taps for {num_levels} levels (reassemble_channels={reassemble_channels}); "
                f"tap {num_levels} layers (backbone_out_indices) or 1, or give one reassemble width per tap."
            )
        tap_channels = self.selected_channels * (num_levels // taps)
        # Hierarchical maps already sit at strides 4..32: project them, do not resample.
        single_stride = len(set(self.selected_strides)) == 1
        if single_stride and len(reassemble_factors) != num_levels:
            raise ValueError(
                f"dpt: reassemble_factors {list(reassemble_factors)} needs one factor per level ({num_levels})."
            )
        factors = list(reassemble_factors) if single_stride else [1] * num_levels
        self.reassemble_factors = factors

        if self.readout == "project":
            self.readout_projects = nn.ModuleList(
                [nn.Sequential(nn.Linear(2 * c, c), nn.GELU()) for c in tap_channels]
            )
        self.reassemble = nn.ModuleList(
            [ReassembleLayer(c, r, f) for c, r, f in zip(tap_channels, reassemble_channels, factors)]
        )
        self.convs = nn.ModuleList(
            [nn.Conv2d(r, fusion_channels, kernel_size=3, padding=1, bias=False) for r in reassemble_channels]
        )
        # fusion[0] takes the coarsest level, fusion[-1] the finest (transformers' order)
        self.fusion = nn.ModuleList(
            [FusionBlock(fusion_channels, fusion_batch_norm, has_skip=i > 0) for i in range(num_levels)]
        )
        self.head_conv = ConvNormAct(fusion_channels, fusion_channels)

    @classmethod
    def resolve_readout(cls, readout: str | None, num_prefix_tokens: int) -> str:
        if readout is None:
            return "project" if num_prefix_tokens > 0 else "ignore"
        if readout not in READOUTS:
            raise ValueError(f"dpt: readout must be one of {READOUTS} (or None for automatic), got {readout!r}.")
        if readout != "ignore" and num_prefix_tokens == 0:
            raise ValueError(
                f"dpt: readout={readout!r} needs a CLS token, which this backbone (SAM or hierarchical) does not "
                "have; use readout='ignore' (or leave it unset)."
            )
        return readout

    def output_stride(self, in_strides: Sequence[float]) -> float:
        """Half the finest level's stride: the finest fusion block upsamples x2."""
        return self.select_strides(in_strides)[0] / self.reassemble_factors[0] / 2

    @classmethod
    def check_backbone(cls, is_hierarchical: bool, num_prefix_tokens: int, head_kwargs: dict | None = None) -> None:
        cls.resolve_readout((head_kwargs or {}).get("readout"), num_prefix_tokens)

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        maps = self.select_inputs(features.feature_maps)
        num_levels = len(self.reassemble)
        maps = maps * (num_levels // len(maps))
        if self.readout != "ignore":
            indices = [self.in_index] if isinstance(self.in_index, int) else self.in_index
            cls_tokens = [features.prefix_tokens[i][:, 0] for i in indices]  # (B, C) each
            cls_tokens = cls_tokens * (num_levels // len(cls_tokens))
            maps = [self.apply_readout(x, cls, i) for i, (x, cls) in enumerate(zip(maps, cls_tokens))]
        levels = [conv(reassemble(x)) for conv, reassemble, x in zip(self.convs, self.reassemble, maps)]

        x = None
        for block, level in zip(self.fusion, reversed(range(num_levels))):
            skip = levels[level]
            size = levels[level - 1].shape[-2:] if level > 0 else [2 * s for s in skip.shape[-2:]]
            x = block(skip, None, size) if x is None else block(x, skip, size)
        return self.classify(self.head_conv(x))  # (B, num_labels, 2 h_0, 2 w_0)

    def apply_readout(self, x: torch.Tensor, cls: torch.Tensor, level: int) -> torch.Tensor:
        """(B, C, h, w) patch map and (B, C) CLS token -> (B, C, h, w)."""
        if self.readout == "add":
            return x + cls[:, :, None, None]
        x = x.permute(0, 2, 3, 1)  # (B, h, w, C)
        x = torch.cat([x, cls[:, None, None, :].expand_as(x)], dim=-1)
        return self.readout_projects[level](x).permute(0, 3, 1, 2)
