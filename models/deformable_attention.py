"""Multi-scale deformable attention as an nn.Module (docs/dino.md, "Encoder").

The sampling itself is `ops.ms_deform_attn`; this module owns the four projections under the
official names (`sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`) and turns
reference points plus predicted offsets into sampling locations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ops


class MSDeformAttn(nn.Module):
    """Each query attends to `n_points` sampled locations per head and level.

    Attention weights are a softmax over levels x points jointly. Reference points are either
    (x, y) centres (encoder: offsets are in pixels of each level) or (cx, cy, w, h) boxes
    (decoder: offsets are scaled by box size * 0.5 / n_points). All in [0, 1] of the padded map.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 5, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: zero offsets weight, bias = a ring of directions growing with point index."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def project_value(self, value_input: Tensor, padding_mask: Tensor | None) -> Tensor:
        """value_proj(value_input) with padded positions zeroed, (N, S, d): what the sampling reads."""
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        return value

    def forward(self, query: Tensor, reference_points: Tensor, value_input: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None, value: Tensor | None = None) -> Tensor:
        """query (N, Lq, d); reference_points (N, Lq, L, 2|4); value_input (N, S, d);
        spatial_shapes (L, 2) long rows (h, w); level_start_index (L,); padding_mask (N, S) True on
        padding. `value` (N, S, d), if given, is `project_value(value_input, padding_mask)` computed
        by the caller (value_input is then not read). Returns (N, Lq, d)."""
        n, lq, _ = query.shape
        if value is None:
            value = self.project_value(value_input, padding_mask)
        value = value.reshape(n, value.shape[1], self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        locations = sampling_locations(reference_points, offsets, spatial_shapes, self.n_points)
        out = ops.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)


def sampling_locations(reference_points: Tensor, offsets: Tensor, spatial_shapes: Tensor,
                       n_points: int) -> Tensor:
    """(N, Lq, L, 2|4) references + (N, Lq, M, L, P, 2) offsets -> (N, Lq, M, L, P, 2) locations (x, y).

    Computed with autocast off in at least float32: in bf16 a location's rounding (~4e-3) is a
    sizeable fraction of a pixel on large maps.
    """
    dtype = torch.promote_types(torch.promote_types(reference_points.dtype, offsets.dtype), torch.float32)
    with torch.autocast(device_type=offsets.device.type, enabled=False):
        ref = reference_points.to(dtype)
        off = offsets.to(dtype)
        if ref.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (w, h)
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(dtype)
            return ref[:, :, None, :, None, :] + off / normalizer[None, None, None, :, None, :]
        if ref.shape[-1] == 4:
            return ref[:, :, None, :, None, :2] + off / n_points * ref[:, :, None, :, None, 2:] * 0.5
    raise ValueError(f"reference_points: last dim must be 2 or 4, got shape {tuple(reference_points.shape)}")
