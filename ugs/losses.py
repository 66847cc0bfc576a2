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
from ugs.targets import compute_dtype, two_hot


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


def um_loss(logits: Tensor) -> Tensor:
    """L_UM = H(p) = -sum_i p_i log p_i (nats), per distribution. logits (..., n+1) -> (...)."""
    log_p = _log_probs(logits)
    # A -inf logit has p = 0 and contributes 0 (clamping avoids 0 * -inf = nan).
    log_p = log_p.clamp(min=torch.finfo(log_p.dtype).min)
    return -(log_p.exp() * log_p).sum(dim=-1)
