"""Bin grids for distribution box regression (paper Eq. 9; docs/ugs.md).

A grid is a strictly increasing 1-D tensor g_0 < ... < g_n (n = `intervals`) that the per-coordinate
bin logits are spread over. The interval non-uniform ("in") grid is dense near 0, where late-training
and small-object regression targets live.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

GRID_KINDS = ("in", "uniform")

# Below this alpha the exponential form is replaced by its series (the exact formula is 0/0 at 0).
_SMALL_ALPHA = 1e-8


def _exp_profile(x: Tensor, alpha: float) -> Tensor:
    """expm1(alpha x) / expm1(alpha) for x in [0, 1]: 0 at 0, 1 at 1, -> x as alpha -> 0.

    Written as exp(alpha (x - 1)) * expm1(-alpha x) / expm1(-alpha) so that large alpha cannot
    overflow; small alpha uses the series x (1 + alpha (x - 1) / 2), accurate to O(alpha^2).
    """
    if alpha < _SMALL_ALPHA:
        return x * (1.0 + 0.5 * alpha * (x - 1.0))
    return torch.exp(alpha * (x - 1.0)) * torch.expm1(-alpha * x) / math.expm1(-alpha)


def make_grid(range: float, alpha: float, intervals: int, kind: str = "in", *,  # noqa: A002
              dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
    """Return the `intervals + 1` grid points of one coordinate's bins.

    kind "in":      g_i = R sign(u_i) expm1(alpha |u_i|) / expm1(alpha), u_i = (2i - n) / n,
                    over [-R, R], odd-symmetric (DINO's signed logit-space deltas);
    kind "uniform": g_i = R u_i (the alpha -> 0 limit of "in"; alpha is ignored).
    Computed in float64, then cast to `dtype` (default: torch's default dtype).
    """
    if kind not in GRID_KINDS:
        raise ValueError(f"make_grid: unknown kind {kind!r}; valid kinds: {list(GRID_KINDS)}")
    if not (isinstance(range, (int, float)) and math.isfinite(range) and range > 0):
        raise ValueError(f"make_grid: range must be a finite number > 0, got {range!r}")
    if isinstance(intervals, bool) or not isinstance(intervals, int) or intervals < 1:
        raise ValueError(f"make_grid: intervals must be an integer >= 1, got {intervals!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"make_grid: alpha must be a finite number >= 0, got {alpha!r}")
    n = intervals
    i = torch.arange(n + 1, dtype=torch.float64)
    u = (2.0 * i - n) / n  # exact odd symmetry: u_{n-i} == -u_i bit for bit
    if kind == "uniform":
        grid = range * u
    else:
        grid = range * torch.sign(u) * _exp_profile(u.abs(), float(alpha))
    grid = grid.to(dtype=dtype or torch.get_default_dtype(), device=device)
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"make_grid: kind={kind!r}, range={range}, alpha={alpha}, intervals={n} "
                         f"gives grid points that are not strictly increasing in {grid.dtype} "
                         "(alpha too large for this precision); lower alpha or intervals")
    return grid


def check_grid(grid: Tensor, name: str = "grid") -> None:
    """Raise unless `grid` is a 1-D tensor of at least 2 points (cheap checks only, no sync)."""
    if not isinstance(grid, Tensor) or grid.dim() != 1 or grid.numel() < 2:
        shape = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
        raise ValueError(f"{name}: expected a 1-D tensor of intervals+1 >= 2 points, got {shape}")
    if not grid.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {grid.dtype}")


def check_bin_logits(logits: Tensor, grid: Tensor, caller: str) -> None:
    """Raise unless `grid` is valid and `logits` (..., n+1) has one logit per grid point."""
    check_grid(grid)
    if logits.shape[-1] != grid.numel():
        raise ValueError(f"{caller}: logits' last dim {logits.shape[-1]} != grid size "
                         f"{grid.numel()} (intervals + 1)")
