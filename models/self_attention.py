"""Multi-head self-attention among the decoder's queries (docs/dino.md, "Decoder").

Same parameters, initialisation and results as `nn.MultiheadAttention(d, heads, batch_first=True)`
called as `(query, key=query, value)` -- keys `in_proj_weight` (3d, d), `in_proj_bias` (3d,),
`out_proj.{weight,bias}`, so official checkpoints load unchanged -- written out because the decoder
is launch-bound on a GPU (900 queries: small kernels, host time per operator about equal to device
time) and the general module dispatches about twice the operators: sequence-first transposes,
three separate input projections and its mask conversion on every call. Here the query and key
projections are one matrix product (their input is the same) and the attention is one
`scaled_dot_product_attention` call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SelfAttention(nn.Module):
    """query_key (B, T, d) (content + position), value (B, T, d), attn_mask (T, T) bool, True where
    attention is blocked (nn.MultiheadAttention's convention) or None -> (B, T, d)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"SelfAttention: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's init, in its order (same random stream from the same seed)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query_key: Tensor, value: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, t, d = value.shape
        heads = self.n_heads
        qk = F.linear(query_key, self.in_proj_weight[:2 * d], self.in_proj_bias[:2 * d])
        q, k = qk.view(b, t, 2, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, T, d_h)
        v = F.linear(value, self.in_proj_weight[2 * d:], self.in_proj_bias[2 * d:])
        v = v.view(b, t, heads, d // heads).transpose(1, 2)
        allowed = None if attn_mask is None else ~attn_mask  # SDPA's boolean masks mark what may attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))
