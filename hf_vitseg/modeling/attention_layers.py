"""The transformer layers of the mask-transformer heads: `segmenter` (self-attention) and `atm` (with cross-attention).

`TransformerLayer` is a pre-norm layer (self-attention, optional cross-attention to a context, GELU MLP);
`MultiHeadAttention` names its projections `q_proj`, `k_proj`, `v_proj`, `o_proj` (transformers 5's names, which
LoRA targets) and runs through `F.scaled_dot_product_attention` unless the attention logits are asked for.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MultiHeadAttention(nn.Module):
    """Multi-head attention of `x` to `context` with `q_proj`, `k_proj`, `v_proj`, `o_proj` projections.

    Runs through `F.scaled_dot_product_attention`, or explicitly when the logits are asked for (`atm` turns
    them into masks)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, n, d) -> (B, heads, n, d_head)

    def forward(self, x: torch.Tensor, context: torch.Tensor, return_logits: bool = False):
        """x (B, n, d), context (B, m, d) -> (B, n, d), and the logits (B, heads, n, m) or None."""
        q = self._split_heads(self.q_proj(x))
        k, v = self._split_heads(self.k_proj(context)), self._split_heads(self.v_proj(context))
        logits = None
        if return_logits:
            logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
            out = F.dropout(logits.softmax(dim=-1), self.dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).flatten(2)), logits


class TransformerLayer(nn.Module):
    """A pre-norm transformer layer: self-attention, optional cross-attention to a `context`, GELU MLP.

    `forward(x, context=None) -> (x, cross-attention logits or None)`."""

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 cross_attention: bool = False):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.cross_attn_norm = nn.LayerNorm(d_model) if cross_attention else None
        self.cross_attn = MultiHeadAttention(d_model, num_heads, dropout) if cross_attention else None
        self.mlp_norm = nn.LayerNorm(d_model)
        hidden = int(mlp_ratio * d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):
        h = self.self_attn_norm(x)
        x = x + self.dropout(self.self_attn(h, h)[0])
        logits = None
        if self.cross_attn is not None:
            update, logits = self.cross_attn(self.cross_attn_norm(x), context, return_logits=True)
            x = x + self.dropout(update)
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x, logits
