"""Element-wise distribution losses: two-hot cross-entropy (L_CE) and entropy (L_UM).

Both reduce only the bin dimension: the output has shape logits.shape[:-1] (one value per box
coordinate) so the caller applies its own matching, masking and normalisation (for DINO: mean over
the 4 coordinates, sum over matched queries, divided by num_boxes). Computed from log_softmax in at
least float32, so half-precision logits give finite losses and gradients.
Logit gradients (tested): dL_CE/dz = p - q in [-1, 1]; dL_UM/dz = -p (log p + H).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ugs.grid import check_grid
from ugs.targets import compute_dtype, two_hot, two_hot_neighbours


def _log_probs(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.to(compute_dtype(logits)), dim=-1)


def ce_loss(logits: Tensor, y: Tensor, grid: Tensor) -> Tensor:
    """L_CE = -sum_i q_i log p_i with q = two_hot(y, grid). logits (..., n+1), y (...) -> (...)."""
    check_grid(grid)
    if logits.shape[-1] != grid.numel() or logits.shape[:-1] != y.shape:
        raise ValueError(f"ce_loss: logits {tuple(logits.shape)} must be y.shape + (n+1,) with "
                         f"y {tuple(y.shape)} and grid of {grid.numel()} points")
    log_p = _log_probs(logits)
    q = two_hot(y, grid).to(log_p.dtype)
    return -(q * log_p).sum(dim=-1)


def pairwise_ce_loss(logits: Tensor, y: Tensor, grid: Tensor) -> Tensor:
    """L_CE of every (row, target) pair, mean over the D distributions of a row: a matching cost.

    logits (N, D, n+1), y (N, M, D) -> (N, M): entry [i, j] is ce_loss(logits[i], y[i, j],
    grid).mean(). One distribution at a time, reading the two non-zero two-hot entries with a
    gather, so the peak memory is a few (N, M) tensors, never (N, M, D, n+1) targets.
    """
    check_grid(grid)
    if logits.dim() != 3 or y.dim() != 3 or logits.shape[-1] != grid.numel() or \
            y.shape[0] != logits.shape[0] or y.shape[2] != logits.shape[1]:
        raise ValueError(f"pairwise_ce_loss: expected logits (N, D, n+1) and y (N, M, D) with n+1 = "
                         f"{grid.numel()} grid points, got {tuple(logits.shape)} and {tuple(y.shape)}")
    log_p = _log_probs(logits)  # (N, D, n+1)
    total = None
    for d in range(logits.shape[1]):
        k, w_hi = two_hot_neighbours(y[..., d], grid)  # (N, M)
        w_hi = w_hi.to(log_p.dtype)
        lp = log_p[:, d]  # (N, n+1); gather along the bins: (N, M) index, no expanded copy
        ce = -((1.0 - w_hi) * lp.gather(1, k) + w_hi * lp.gather(1, k + 1))
        total = ce if total is None else total + ce
    return total / logits.shape[1]


def um_loss(logits: Tensor) -> Tensor:
    """L_UM = H(p) = -sum_i p_i log p_i (nats), per distribution. logits (..., n+1) -> (...)."""
    log_p = _log_probs(logits)
    # A -inf logit has p = 0 and contributes 0 (clamping avoids 0 * -inf = nan).
    log_p = log_p.clamp(min=torch.finfo(log_p.dtype).min)
    return -(log_p.exp() * log_p).sum(dim=-1)
