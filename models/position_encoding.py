"""Sine position encodings (docs/dino.md, "Position encodings").

Two encodings share one formula: values scaled to [0, 2*pi], divided by `T ** (2*floor(i/2)/n)`,
then sin on even and cos on odd channels (interleaved). Feature maps use temperature 20 and put
y before x; query boxes use temperature 10000 and the order (y, x, w, h).
Every tensor follows the input dtype (at least float32), so a float64 model stays float64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs get float32 encodings; float32/float64 keep their own dtype."""
    return torch.promote_types(dtype, torch.float32)


def sine_divisors(num_feats: int, temperature: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(num_feats,) the divisors `T ** (2*floor(i/2)/n)`: a caller that embeds many times per
    forward (the decoder, once per layer) computes them once."""
    dim_t = torch.arange(num_feats, dtype=_compute_dtype(dtype), device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def _sine(values: Tensor, num_feats: int, temperature: float, divisors: Tensor | None = None) -> Tensor:
    """values (...,) already scaled -> (..., num_feats) interleaved [sin f0, cos f0, sin f1, ...]."""
    if divisors is None:
        divisors = sine_divisors(num_feats, temperature, values.dtype, values.device)
    pos = values[..., None] / divisors
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Normalised sine encoding of a padded feature map; the official `PositionEmbeddingSineHW`.

    `num_pos_feats` channels per axis (d/2), output (B, 2*num_pos_feats, h, w) = concat(y, x).
    Positions are 1-based cumulative counts of valid pixels divided by the last row / column
    (+1e-6), times 2*pi: padded rows/columns keep the last valid count.
    """

    def __init__(self, num_pos_feats: int = 128, temperature_h: float = 20.0,
                 temperature_w: float = 20.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.scale = scale

    def forward(self, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """mask (B, h, w) bool, True on padding -> (B, 2*num_pos_feats, h, w) in `dtype` (>= fp32)."""
        dtype = _compute_dtype(dtype)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=dtype)
        x_embed = not_mask.cumsum(2, dtype=dtype)
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        pos_x = _sine(x_embed, self.num_pos_feats, self.temperature_w)  # (B, h, w, n)
        pos_y = _sine(y_embed, self.num_pos_feats, self.temperature_h)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def box_sine_embedding(boxes_cxcywh: Tensor, num_feats: int, temperature: float = 10000.0,
                       divisors: Tensor | None = None) -> Tensor:
    """Query position features of reference boxes: (..., 4) in [0, 1] -> (..., 4*num_feats).

    Order (y, x, w, h), i.e. (cy, cx, w, h); `num_feats` = hidden_dim / 2 (the official code
    hard-codes 128, which equals d/2 for d = 256). divisors: `sine_divisors(num_feats,
    temperature, ...)` if the caller has them.
    """
    boxes = boxes_cxcywh.to(_compute_dtype(boxes_cxcywh.dtype)) * (2 * math.pi)
    # all four coordinates in one pass (the decoder calls this once per layer; few operators
    # matter there, its kernels are launch-bound on a GPU): (..., 4) -> (..., 4, num_feats)
    yxwh = torch.cat((boxes[..., :2].flip(-1), boxes[..., 2:]), dim=-1)
    return _sine(yxwh, num_feats, temperature, divisors).flatten(-2)
