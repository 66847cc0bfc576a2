"""Plain-PyTorch multi-scale deformable attention: the oracle every other backend is tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ops.validate import compute_dtype


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: torch.Tensor,
                             level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor) -> torch.Tensor:
    """value (N, S, M, D); spatial_shapes (L, 2) rows (H, W); level_start_index (L,);
    sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1], pixel centres at (i + 0.5) / W;
    attention_weights (N, Lq, M, L, P). Returns (N, Lq, M * D) in value's dtype.

    Bilinear sampling with zeros outside the map (grid_sample, align_corners=False). Accumulates in
    float64 for float64 value and in float32 otherwise (the policy in ops/validate.py).
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    out_dtype = value.dtype
    dtype = compute_dtype(value.dtype)
    value = value.to(dtype)
    sampling_locations = sampling_locations.to(dtype)
    attention_weights = attention_weights.to(dtype)
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(shapes):
        start = starts[level]
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).reshape(n * m, lq, num_points, 2)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (N*M, D, Lq, P)
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (N*M, D, Lq, L*P)
    out = (stacked * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous().to(out_dtype)
