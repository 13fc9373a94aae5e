"""`BackboneFeatures`: what the backbone adapter hands to a neck or head, and what `model.decode` takes.

Its own small module because every stage after the backbone reads it (adapter, neck, heads, the model's
`decode`, the feature cache) and a user's head module imports it; it imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BackboneFeatures:
    """What the backbone adapter hands to a neck or head.

    Attributes:
        feature_maps: one `(B, C_i, h_i, w_i)` map per tapped layer (or per pyramid level after a neck).
        strides: the stride of each map with respect to `pixel_values` (not always whole: DINOv2's patch 14
            gives pyramid levels at 3.5, 7, 14, 28).
        prefix_tokens: for ViT families, one `(B, P, C_i)` tensor per tap holding the prefix tokens
            (CLS first, then distillation or register tokens); `None` where the backbone has none
            (SAM, hierarchical backbones).
        pixel_values: the input image `(B, 3, H, W)`, for heads with an image stem (U-Net); heads that read it
            declare `uses_pixel_values = True`.
        hidden_states / attentions: what the backbone recorded when asked to (model outputs).
    """

    feature_maps: list[torch.Tensor]
    strides: list[float]
    prefix_tokens: list[torch.Tensor] | None = None
    pixel_values: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    @property
    def grid_hw(self) -> tuple[int, int]:
        """The (h, w) grid of the first feature map."""
        return tuple(self.feature_maps[0].shape[-2:])
