"""Two-hot soft targets (paper Eq. 8; docs/ugs.md)."""
from __future__ import annotations

import torch
from torch import Tensor

from ugs.grid import check_grid


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype UGS arithmetic runs in: the promoted input dtype, but at least float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def two_hot_neighbours(y: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
    """The two non-zero entries of `two_hot(y, grid)` without the (..., n+1) tensor: (k, w), both
    y.shape, with q_k = 1 - w and q_{k+1} = w (k int64 in [0, n-1]; w in the dtype of two_hot)."""
    check_grid(grid)
    dtype = compute_dtype(y, grid)
    g = grid.to(device=y.device, dtype=dtype)
    n = g.numel() - 1
    y = y.detach().to(dtype).clamp(min=g[0], max=g[-1])
    # Lower neighbour index k with g_k <= y < g_{k+1}; y == g_n falls back into the last interval.
    k = (torch.searchsorted(g, y.reshape(-1), right=True) - 1).clamp_(0, n - 1).reshape(y.shape)
    lo, hi = g[k], g[k + 1]
    return k, (y - lo) / (hi - lo)


def two_hot(y: Tensor, grid: Tensor) -> Tensor:
    """Spread each target value over its two neighbouring grid points.

    y: any shape, regression targets (for DINO: logit(t) - logit(r) per coordinate).
    grid: (n+1,) strictly increasing. Returns q of shape y.shape + (n+1,) with q >= 0,
    sum_j q_j = 1 and sum_j q_j g_j = y for y in [g_0, g_n]. Values outside the range are
    clamped to the nearest end point (so the target puts all its mass on g_0 or g_n); NaN stays
    NaN. Dtype: promoted with the grid's, at least float32. Not differentiable in y (targets).
    """
    k, w_hi = two_hot_neighbours(y, grid)
    q = torch.zeros(*y.shape, grid.numel(), dtype=w_hi.dtype, device=y.device)
    q.scatter_(-1, k.unsqueeze(-1), (1.0 - w_hi).unsqueeze(-1))
    q.scatter_(-1, (k + 1).unsqueeze(-1), w_hi.unsqueeze(-1))
    return q
