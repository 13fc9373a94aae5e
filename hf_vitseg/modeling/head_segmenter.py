"""`segmenter`: the Segmenter mask transformer.

Strudel et al., "Segmenter: Transformer for Semantic Segmentation", ICCV 2021, section 3.2 "Mask Transformer":
the patch tokens of the last tap are projected to `d_model`; `num_labels` learnable class embeddings are
appended; `num_layers` pre-norm transformer layers (GELU MLP) process [patch tokens; class embeddings]
jointly; after a final LayerNorm both groups get a linear projection, are L2-normalised, and the masks are
their scalar products, `(B, h*w, num_labels)`, followed by a LayerNorm over the classes (`mask_norm`). The
computation matches the authors' code and mmsegmentation's `SegmenterMaskTransformerHead` (whose fused qkv
projection splits into `q_proj`, `k_proj`, `v_proj` here).

The pre-norm `TransformerLayer` (in `attention_layers.py`) also serves `atm`, with cross-attention.

Input contract: one map `(B, C, h, w)` (the last tap by default: on ViT/SAM the patch tokens at stride p, on
Swin the last stage). Output: `(B, num_labels, h, w)`, stride p (the selected map's stride).
`d_model` defaults to the input width and `num_heads` to `d_model // 64` (at least 1), as in the paper.

One deliberate difference, for two classes only: a LayerNorm over two values maps every pixel to
`±(1, -1)` (the sign of the difference of its two scores) times its weight, so its gradient vanishes almost
everywhere; a binary Segmenter so built never leaves its initial prediction (`benchmarks/README.md` has the
measurement on the nuclei benchmark). With `num_labels <= 2` (`mask_norm=None`, the default), the cosine
scores are instead multiplied by a learned temperature (initially 10, as a log-parametrised scalar
`logit_scale`) plus a per-class bias. `mask_norm=True` / `False` forces either form.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init

from .attention_layers import TransformerLayer
from .head_base import BackboneFeatures, BaseHead, register_head


@register_head("segmenter")
class SegmenterHead(BaseHead):
    """Segmenter's mask transformer; see the module docstring.

    Args:
        in_channels, in_strides, num_labels, num_prefix_tokens: the incoming maps, as `BaseHead` (the model
            fills them in).
        d_model: width of the mask transformer (default: the input width).
        num_layers: transformer layers over [patch tokens; class embeddings] (the paper uses 2).
        num_heads: attention heads (default: `d_model // 64`, at least 1); must divide `d_model`.
        mlp_ratio: hidden width of each layer's MLP, as a multiple of `d_model`.
        dropout: dropout inside the transformer layers (attention and MLP).
        mask_norm: LayerNorm over the classes' scores (the paper's); `None` = only when `num_labels > 2`,
            else a learned temperature and bias (see the module docstring).
        in_index: which tap to read (default: the last).
        input_transform: `None` (one map, the default) or `"resize_concat"` (several taps concatenated).
    """

    num_default_taps = 1

    def __init__(self, in_channels: list[int], in_strides: list[float], num_labels: int, num_prefix_tokens: int = 0,
                 d_model: int | None = None, num_layers: int = 2, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, mask_norm: bool | None = None,
                 in_index: int | list[int] | None = None, input_transform: str | None = None):
        if input_transform == "multiple_select":
            raise ValueError("segmenter reads one map: input_transform must be None or 'resize_concat'.")
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=None, dropout=0.0,
                         in_index=in_index, input_transform=input_transform)
        width = self.selected_channels
        d_model = d_model or width
        num_heads = num_heads or max(1, d_model // 64)
        if num_layers < 1:
            raise ValueError(f"segmenter: num_layers must be >= 1, got {num_layers}.")
        self.input_projection = nn.Linear(width, d_model)
        self.class_embeddings = nn.Parameter(torch.zeros(1, num_labels, d_model))
        self.layers = nn.ModuleList([TransformerLayer(d_model, num_heads, mlp_ratio, dropout)
                                     for _ in range(num_layers)])
        self.decoder_norm = nn.LayerNorm(d_model)
        self.patch_projection = nn.Linear(d_model, d_model, bias=False)
        self.class_projection = nn.Linear(d_model, d_model, bias=False)
        if mask_norm is None:
            mask_norm = num_labels > 2
        self.mask_norm = nn.LayerNorm(num_labels) if mask_norm else None
        if not mask_norm:  # scores in [-1, 1] -> logits: exp(logit_scale) * score + bias
            self.logit_scale = nn.Parameter(torch.zeros(()))
            self.mask_bias = nn.Parameter(torch.zeros(num_labels))
        self.reset_extra_parameters(0.02)

    def reset_extra_parameters(self, std: float) -> None:
        init.trunc_normal_(self.class_embeddings, std=std)
        if self.mask_norm is None:
            init.constant_(self.logit_scale, math.log(10.0))
            init.zeros_(self.mask_bias)

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        x = self.select_inputs(features.feature_maps)  # (B, C, h, w)
        batch, _, h, w = x.shape
        tokens = self.input_projection(x.flatten(2).transpose(1, 2))  # (B, h*w, d), rows first
        tokens = torch.cat([tokens, self.class_embeddings.expand(batch, -1, -1)], dim=1)  # (B, h*w + K, d)
        for layer in self.layers:
            tokens = layer(tokens)[0]
        tokens = self.decoder_norm(tokens)
        patches = F.normalize(self.patch_projection(tokens[:, : h * w]), dim=-1)  # (B, h*w, d)
        classes = F.normalize(self.class_projection(tokens[:, h * w :]), dim=-1)  # (B, K, d)
        scores = patches @ classes.transpose(1, 2)  # (B, h*w, K), cosine similarities
        if self.mask_norm is not None:
            masks = self.mask_norm(scores)
        else:
            masks = scores * self.logit_scale.exp() + self.mask_bias
        return masks.transpose(1, 2).reshape(batch, self.num_labels, h, w)
