"""Input projections: backbone stages -> d channels, plus extra stride-2 levels (section 2).

`input_proj.{i}` is Sequential(conv, GroupNorm(32, d)) with no activation. Levels beyond the
backbone's stages come from a 3x3 stride-2 conv; the first extra one reads the *raw* last
backbone feature (not its projection), later ones read the previous extra level.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from models.backbone import downsample_mask
from models.position_encoding import PositionEmbeddingSine


class InputProjection(nn.ModuleList):
    """ModuleList of `num_levels` Sequential(conv, GroupNorm) (keys `input_proj.{i}.{0,1}.*`)."""

    def __init__(self, in_channels: Sequence[int], hidden_dim: int, num_levels: int) -> None:
        if num_levels < len(in_channels):
            raise ValueError(f"num_feature_levels ({num_levels}) < number of backbone stages "
                             f"({len(in_channels)})")
        layers = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                  for c in in_channels]
        c = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            layers.append(nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=3, stride=2, padding=1),
                                        nn.GroupNorm(32, hidden_dim)))
            c = hidden_dim
        super().__init__(layers)
        self.num_backbone_levels = len(in_channels)
        for proj in self:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

    def forward(self, features: list[Tensor], masks: list[Tensor], pos: list[Tensor], image_mask: Tensor,
                position_encoding: PositionEmbeddingSine) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Backbone outputs (lists over stages) -> srcs (B, d, h_l, w_l), masks, pos over all levels.

        Extra levels get a mask interpolated from the full-resolution `image_mask` (B, H, W) and
        their own sine encoding.
        """
        srcs = [proj(f) for proj, f in zip(self, features)]
        masks, pos = list(masks), list(pos)
        x = features[-1]
        for proj in list(self)[self.num_backbone_levels:]:
            x = proj(x)
            mask = downsample_mask(image_mask, x.shape[-2:])
            srcs.append(x)
            masks.append(mask)
            pos.append(position_encoding(mask, x.dtype).to(x.dtype))
        return srcs, masks, pos
