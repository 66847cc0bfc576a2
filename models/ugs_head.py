"""UGS distribution box heads for DINO (docs/ugs.md, "The method").

A distribution box head is DINO's MLP(d, d, 4, 3) with a last layer of 4(n+1) outputs: per box
coordinate, n+1 bin logits over a grid (ugs.make_grid), decoded to the logit-space delta by the
expectation. Its forward returns that delta, so it is a drop-in for DINO's box head everywhere a
box head is called (decoder refinement inside the decoder, encoder proposals). Where the
criterion needs the bin logits (the output sets), UGS-DINO calls `bin_logits` and decodes them
itself (models/ugs_dino.py), so the head runs once per prediction.

Parameter names stay the official ones (`layers.{0,1,2}.*`): an official checkpoint loads into
every tensor except the last layer, whose shape differs; `zero_last_layer` makes that layer start
at zero weight and bias, i.e. uniform bins whose expectation over a symmetric grid is 0, the same
starting point as DINO's zero-initialised regression layer.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import ugs
from models.heads import MLP


class DistributionBoxHead(MLP):
    """MLP(d, d, 4(n+1), 3) -> per-coordinate bin logits over `grid` (n+1,), decoded by expectation.

    forward(hidden (..., d)) -> delta (..., 4), at least float32, to add to inverse_sigmoid(reference).
    """

    def __init__(self, hidden_dim: int, grid: Tensor, zero_last_layer: bool = True) -> None:
        if grid.dim() != 1 or grid.numel() < 2:
            raise ValueError(f"DistributionBoxHead: grid must be (n+1,) with n >= 1, got {tuple(grid.shape)}")
        super().__init__(hidden_dim, hidden_dim, 4 * grid.numel(), 3)
        # Not in the state dict: the grid is derived from the config (ugs.grid.*), like anchors.
        self.register_buffer("grid", grid.detach().clone().float(), persistent=False)
        if zero_last_layer:
            nn.init.zeros_(self.layers[-1].weight)
            nn.init.zeros_(self.layers[-1].bias)

    @property
    def num_bins(self) -> int:
        return self.grid.numel()

    def set_grid(self, grid: Tensor) -> None:
        """Use another grid with the same number of bins (e.g. the encoder-proposal range)."""
        if grid.shape != self.grid.shape:
            raise ValueError(f"DistributionBoxHead.set_grid: expected a grid of shape "
                             f"{tuple(self.grid.shape)}, got {tuple(grid.shape)}")
        self.grid = grid.detach().clone().to(device=self.grid.device, dtype=torch.float32)

    def bin_logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., d) -> (..., 4, n+1) raw logits (cx, cy, w, h order)."""
        out = super().forward(hidden)
        return out.unflatten(-1, (4, self.num_bins))

    def forward(self, hidden: Tensor) -> Tensor:
        return ugs.expectation(self.bin_logits(hidden), self.grid)


def distribution_outputs(head: DistributionBoxHead, hidden: Tensor,
                         ref_boxes_logit: Tensor) -> dict[str, Tensor]:
    """The per-query UGS fields of one output set (docs/conventions.md, Model).

    hidden (B, T, d), ref_boxes_logit (B, T, 4) the detached logit-space reference the head's
    delta was added to -> pred_box_logits (B, T, 4, n+1) and ref_boxes_logit (the two-hot target
    is y = inverse_sigmoid(target) - ref_boxes_logit).
    """
    return {"pred_box_logits": head.bin_logits(hidden), "ref_boxes_logit": ref_boxes_logit.detach()}


@torch.no_grad()
def detection_uncertainty(box_logits: Tensor, boxes_cxcywh: Tensor, grid: Tensor, sizes_hw: Tensor
                          ) -> tuple[Tensor, Tensor]:
    """Per-detection uncertainty for post-processing and result files.

    box_logits (..., 4, n+1), boxes_cxcywh (..., 4) the decoded boxes (normalised), sizes_hw
    broadcastable to (..., 2) as (h, w) pixels -> (std_xyxy_px (..., 4), entropy (...) mean over
    the 4 coordinates, nats). See ugs.box_std_pixels for the delta-method approximation.
    """
    std_logit, entropy = ugs.uncertainty(box_logits, grid)
    return ugs.box_std_pixels(boxes_cxcywh, std_logit, sizes_hw), entropy.mean(-1)
