"""Decoding bin logits to a value (paper Eq. 10; docs/ugs.md)."""
from __future__ import annotations

import torch
from torch import Tensor

from ugs.grid import check_bin_logits
from ugs.targets import compute_dtype


def expectation(logits: Tensor, grid: Tensor) -> Tensor:
    """d = sum_i softmax(z)_i g_i: the decoded value of each distribution.

    logits (..., n+1), grid (n+1,) -> (...). The softmax runs in at least float32 (half-precision
    logits are upcast) and the result keeps that dtype. Differentiable in the logits; this is what
    box decoding, matching and GIoU use. Zero logits over a symmetric grid decode to 0.
    """
    check_bin_logits(logits, grid, "expectation")
    dtype = compute_dtype(logits, grid)
    p = torch.softmax(logits.to(dtype), dim=-1)
    return (p * grid.to(device=logits.device, dtype=dtype)).sum(dim=-1)
