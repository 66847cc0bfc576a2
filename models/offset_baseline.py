"""The paper's baseline box loss on DINO: Smooth-L1 on the logit-space offsets
(`ugs.ablation=smooth_l1` / `smooth_l1_ninth`; ugs_method.md sections 2, 11).

DINO's box head predicts per coordinate a delta d added to the reference in inverse-sigmoid space,
b = sigmoid(d + logit(r)). UGS's two-hot CE trains the same d towards y = logit(t) - logit(r); the
baseline the paper compares with regresses that offset directly:

    loss_box_sl1 = sum over matched pairs of sum_c SmoothL1_beta(d_c - y_c) / num_boxes

with DINO's 4-output head (no bins). Summed over the 4 coordinates like the L1 it replaces (and
Faster R-CNN's box loss); normalised like every other box term. Its gradient in d is
clamp((d - y) / beta, -1, 1): the offset parametrisation itself, not the loss, carries the
1/size scaling of norm-based losses the paper starts from.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.dino import DINO
from models.heads import apply_box_delta
from models.matched_pairs import MatchedPairs, per_set_normalisers, per_set_sums
from models.query_selection import SelectedQueries
from util.box_ops import inverse_sigmoid

# |inverse_sigmoid| never exceeds this (eps 1e-3, util/box_ops.py)
MAX_REFERENCE_LOGIT = math.log((1 - 1e-3) / 1e-3)


class OffsetDINO(DINO):
    """DINO whose output sets also carry `pred_box_delta (B, T, 4)` (the head's raw offsets) and
    `ref_boxes_logit (B, T, 4)` (detached) for the offset loss. Same modules and parameters as
    DINO, so from one seed its initialisation is the L1 baseline's."""

    def box_outputs(self, layer: int, hidden: Tensor, reference_boxes: Tensor) -> dict[str, Tensor]:
        delta = self.bbox_embed[layer](hidden)
        boxes, ref_logit = apply_box_delta(delta, reference_boxes)
        return {"pred_boxes": boxes, "pred_box_delta": delta, "ref_boxes_logit": ref_logit.detach()}

    def interm_box_outputs(self, selected: SelectedQueries) -> dict[str, Tensor]:
        # the proposal head's delta on the gathered features (what interm_boxes was refined by);
        # the reference is the raw proposal, clamped as inverse_sigmoid clamps
        delta = self.transformer.enc_out_bbox_embed(selected.interm_hidden)
        ref = selected.proposals_unsig.clamp(-MAX_REFERENCE_LOGIT, MAX_REFERENCE_LOGIT)
        return {"pred_boxes": selected.interm_boxes, "pred_box_delta": delta, "ref_boxes_logit": ref.detach()}


class OffsetSmoothL1Loss(nn.Module):
    """Box-loss term `loss_box_sl1` (unweighted) for SetCriterion: Smooth-L1 (beta) of the matched
    queries' offsets against y = inverse_sigmoid(target) - ref_boxes_logit."""

    names = ("loss_box_sl1",)

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"OffsetSmoothL1Loss: beta must be > 0, got {beta}")
        self.beta = float(beta)

    def forward(self, matched: MatchedPairs) -> dict[str, Tensor]:
        return self.forward_sets([matched])[0]

    def forward_sets(self, sets: list[MatchedPairs]) -> list[dict[str, Tensor]]:
        """All output sets' pairs at once (the criterion's batched hook)."""
        delta = torch.cat([m.gather("pred_box_delta") for m in sets])  # (N, 4)
        ref_logit = torch.cat([m.gather("ref_boxes_logit") for m in sets])
        target = torch.cat([m.target_boxes_cxcywh for m in sets]).to(ref_logit.dtype)
        y = inverse_sigmoid(target) - ref_logit
        per_pair = F.smooth_l1_loss(delta.to(y.dtype), y, reduction="none", beta=self.beta).sum(-1)  # (N,)
        losses = per_set_sums(per_pair, sets) / per_set_normalisers(sets, per_pair)
        return [{"loss_box_sl1": value} for value in losses]
