"""Deformable encoder (docs/dino.md, "Encoder"): post-norm layers, no final norm.

Tokens are all levels' pixels flattened row-major and concatenated (level 0 first). Each layer
is `norm1(src + MSDeformAttn(src + pos))` then `norm2(src + FFN(src))`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.deformable_attention import MSDeformAttn


class EncoderLayer(nn.Module):
    """Keys: `self_attn.*` (MSDeformAttn), `norm1`, `linear1`, `linear2`, `norm2`."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor) -> Tensor:
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index,
                              padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Pixel-centre references (B, S, L, 2) as (x, y), for every token and every level.

    Centres are normalised by each level's *valid* size (1.0 = edge of the image), then
    re-expressed in every level's padded coordinates by multiplying with valid_ratios (B, L, 2) (w, h).
    """
    refs = []
    dtype, device = valid_ratios.dtype, valid_ratios.device
    for lvl, (h, w) in enumerate(spatial_shapes):
        ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device),
                                      torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device),
                                      indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(refs, 1)
    return reference_points[:, :, None] * valid_ratios[:, None]


class Encoder(nn.Module):
    """Stack of `EncoderLayer`s (keys `layers.{i}.*`); optional activation checkpointing per layer."""

    def __init__(self, layers: list[EncoderLayer], use_checkpoint: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.use_checkpoint = use_checkpoint

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: Tensor,
                spatial_shapes_list: list[tuple[int, int]], level_start_index: Tensor, valid_ratios: Tensor,
                padding_mask: Tensor) -> Tensor:
        """src, pos (B, S, d) (pos includes the level embedding); padding_mask (B, S) True on
        padding; valid_ratios (B, L, 2) (w, h). Returns memory (B, S, d)."""
        reference_points = encoder_reference_points(spatial_shapes_list, valid_ratios)
        for layer in self.layers:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                src = checkpoint(layer, src, pos, reference_points, spatial_shapes, level_start_index,
                                 padding_mask, use_reentrant=False)
            else:
                src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class FlatLevels(NamedTuple):
    """All feature levels flattened into one token sequence (S = sum h_l * w_l, level 0 first).

    src, pos (B, S, d) (pos includes the level embedding); padding_mask (B, S) True on padding;
    spatial_shapes (L, 2) long rows (h, w) and the same as Python ints in spatial_shapes_list;
    level_start_index (L,) long; valid_ratios (B, L, 2) ordered (w, h).
    """

    src: Tensor
    pos: Tensor
    padding_mask: Tensor
    spatial_shapes: Tensor
    spatial_shapes_list: list[tuple[int, int]]
    level_start_index: Tensor
    valid_ratios: Tensor


def valid_ratio(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """mask (B, h, w) True on padding -> (B, 2) valid fraction (w, h), counted on the first row / column."""
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.to(dtype) / w, valid_h.to(dtype) / h], -1)


def flatten_levels(srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor],
                   level_embed: Tensor) -> FlatLevels:
    """Per-level maps (B, d, h, w), masks (B, h, w), pos (B, d, h, w) -> FlatLevels (row-major tokens)."""
    shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]
    src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + level_embed[lvl].view(1, 1, -1)
                          for lvl, p in enumerate(pos)], 1)
    mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
    device = src_flat.device
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    dtype = torch.promote_types(src_flat.dtype, torch.float32)
    valid_ratios = torch.stack([valid_ratio(m, dtype) for m in masks], 1)
    return FlatLevels(src_flat, pos_flat, mask_flat, spatial_shapes, shapes, level_start_index, valid_ratios)
