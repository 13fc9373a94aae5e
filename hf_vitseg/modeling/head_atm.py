"""`atm`: SegViT's Attention-to-Mask (ATM) decoder.

Zhang et al., "SegViT: Semantic Segmentation with Plain Vision Transformers", NeurIPS 2022, section 3
(written from the paper alone). `num_labels` learnable class queries pass through one ATM layer per tapped
map, shallow to deep. Each layer: self-attention among the queries; cross-attention from the queries to that
tap's tokens (each tap linearly projected to `d_model` and layer-normed); an MLP. The cross-attention's
similarity logits `Q K^T / sqrt(d_head)`, averaged over heads, are the layer's mask logits
`(B, num_labels, h, w)` (their sigmoid: the per-query masks); a class head shared by the layers predicts
`num_labels + 1` scores per updated query (the last: "no object").

Two choices for training with plain pixel cross-entropy (the paper trains with a set-prediction loss):
- `class_prior`, a learnable `(Q, num_labels + 1)` bias on the class scores, starts with query q predicting
  class q (probability ~0.88): the paper's class tokens stand one per class. Without it every query starts
  predicting every class alike, the masks get little class-specific gradient and the loss falls far more
  slowly.
- the class queries start at unit variance (like `nn.Embedding`), not 0.02: small queries are swamped by
  what the layers add to them and end up identical, with identical masks.

Per-pixel output: the paper's inference `seg = einsum(softmax(cls)[..., :-1], sigmoid(mask))` over the
queries of the last layer, a probability-like map in `[0, 1]`. `forward` returns `log(seg)`: its softmax
over classes is `seg` renormalised per pixel, so the argmax is the paper's and the model's cross-entropy
applies as is. It is computed in float32 with the per-pixel max of `log sigmoid(mask)` factored out, which
neither underflows nor goes flat where every mask is small (as `log(seg.clamp_min(eps))` would).
`forward_layers` returns every layer's `(class_logits, mask_logits)`, for deep supervision with a loss of
one's own; the model does not need it.

Input contract: several maps `(B, C_i, h_i, w_i)` (default: three evenly spaced taps, e.g. layers 4, 8, 12 of
12), any strides. Output: `(B, num_labels, h, w)` on the grid of the last (deepest) selected map: stride p on
ViT/SAM, the deepest selected stage's stride on Swin (32 by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init

from .attention_layers import TransformerLayer
from .head_base import BackboneFeatures, BaseHead, register_head


@register_head("atm")
class ATMHead(BaseHead):
    """SegViT's ATM decoder; see the module docstring.

    Args:
        in_channels, in_strides, num_labels, num_prefix_tokens: the incoming maps, as `BaseHead` (the model
            fills them in).
        d_model: width of the queries and projected tokens.
        num_heads: attention heads; must divide `d_model`.
        mlp_ratio: hidden width of each layer's MLP, as a multiple of `d_model`.
        dropout: dropout inside the ATM layers.
        in_index: which taps to read (default: all), shallow to deep; one ATM layer each.
    """

    num_default_taps = 3

    def __init__(self, in_channels: list[int], in_strides: list[float], num_labels: int, num_prefix_tokens: int = 0,
                 d_model: int = 256, num_heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 in_index: int | list[int] | None = None):
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=None, dropout=0.0,
                         in_index=in_index, input_transform="multiple_select")
        self.input_projections = nn.ModuleList([
            nn.Sequential(nn.Linear(c, d_model), nn.LayerNorm(d_model)) for c in self.selected_channels
        ])
        self.class_queries = nn.Parameter(torch.zeros(1, num_labels, d_model))
        self.layers = nn.ModuleList([
            TransformerLayer(d_model, num_heads, mlp_ratio, dropout, cross_attention=True)
            for _ in self.selected_channels
        ])
        self.class_norm = nn.LayerNorm(d_model)
        self.class_head = nn.Linear(d_model, num_labels + 1)
        self.class_prior = nn.Parameter(torch.zeros(num_labels, num_labels + 1))
        self.reset_extra_parameters(0.02)

    def reset_extra_parameters(self, std: float) -> None:
        """Queries at unit variance whatever `std` (see the module docstring), the class prior's diagonal."""
        init.normal_(self.class_queries, std=1.0)
        # log(K) + 2 on the diagonal: p(class q | query q) = e^2 / (e^2 + 1) ~ 0.88 whatever K
        diagonal = torch.eye(self.num_labels, self.num_labels + 1) * (math.log(self.num_labels) + 2.0)
        init.copy_(self.class_prior, diagonal)

    def output_stride(self, in_strides: Sequence[float]) -> float:
        """The last (deepest) selected map's stride: the last ATM layer's masks are on its grid."""
        return self.select_strides(in_strides)[-1]

    def forward_layers(self, features: BackboneFeatures) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per ATM layer, shallow to deep: class logits `(B, Q, num_labels + 1)` and mask logits `(B, Q, h_i, w_i)`
        (sigmoid them for the masks), with `Q = num_labels` queries."""
        maps = self.select_inputs(features.feature_maps)
        # a copy, not an expand: under no_grad an expanded view of a parameter still says requires_grad, which
        # breaks torch's module tracker (FlopCounterMode) at the first layer's hooks
        queries = self.class_queries.repeat(maps[0].shape[0], 1, 1)  # (B, Q, d)
        outputs = []
        for projection, layer, x in zip(self.input_projections, self.layers, maps):
            tokens = projection(x.flatten(2).transpose(1, 2))  # (B, h*w, d), rows first
            queries, similarity = layer(queries, tokens)  # similarity (B, heads, Q, h*w)
            mask_logits = similarity.mean(dim=1)
            class_logits = self.class_head(self.class_norm(queries)) + self.class_prior
            outputs.append((class_logits, mask_logits.unflatten(-1, x.shape[-2:])))
        return outputs

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        return self.segmentation_logits(*self.forward_layers(features)[-1])

    @staticmethod
    def segmentation_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """`log(einsum(softmax(class_logits)[..., :-1], sigmoid(mask_logits)))`.

        (B, Q, K+1), (B, Q, h, w) -> (B, K, h, w). In float32, with the per-pixel max of `log sigmoid(mask_logits)`
        factored out of the sum over queries."""
        class_probs = class_logits.float().softmax(dim=-1)[..., :-1]  # (B, Q, K), "no object" dropped
        log_masks = F.logsigmoid(mask_logits.float())  # (B, Q, h, w)
        shift = log_masks.amax(dim=1, keepdim=True)  # (B, 1, h, w)
        seg = torch.einsum("bqk,bqhw->bkhw", class_probs, (log_masks - shift).exp())  # (B, K, h, w)
        return (shift + seg.clamp_min(torch.finfo(seg.dtype).tiny).log()).to(class_logits.dtype)
