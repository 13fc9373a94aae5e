"""`mlp`: SETR-naive, a per-token MLP.

Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with
Transformers" (SETR), CVPR 2021, section 3.3 "Naive upsampling": a 1x1 conv + BN + ReLU, then a 1x1
classifier, applied to every patch token independently.

Input contract: the last selected single-stride map `(B, C, h, w)`. Output: `(B, num_labels, h, w)`.
"""

from __future__ import annotations

import torch

from .head_base import BackboneFeatures, BaseHead, ConvNormAct, register_head


@register_head("mlp")
class MLPHead(BaseHead):
    """SETR-naive: 1x1 conv-BN-ReLU blocks and a 1x1 classifier per token; see the module docstring.

    Args:
        in_channels, in_strides, num_labels, num_prefix_tokens: the incoming maps, as `BaseHead` (the model
            fills them in).
        channels: width of the hidden 1x1 layers.
        num_layers: number of 1x1 conv-BN-ReLU blocks before the classifier.
        dropout: dropout before the classifier.
        in_index, input_transform: the taps read, as `BaseHead`; by default the last tap alone (several are
            concatenated: `select_single_map`).
    """

    num_default_taps = 1

    def __init__(self, in_channels: list[int], in_strides: list[float], num_labels: int, num_prefix_tokens: int = 0,
                 channels: int = 256, num_layers: int = 1, dropout: float = 0.1,
                 in_index: int | list[int] | None = None, input_transform: str | None = None):
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=channels,
                         dropout=dropout, in_index=in_index, input_transform=input_transform)
        if num_layers < 1:
            raise ValueError(f"mlp head: num_layers must be >= 1, got {num_layers}.")
        width = self.selected_width
        self.mlp = torch.nn.Sequential(
            *[ConvNormAct(width if i == 0 else channels, channels, kernel_size=1) for i in range(num_layers)]
        )

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        x = self.select_single_map(features.feature_maps)
        return self.classify(self.mlp(x))
