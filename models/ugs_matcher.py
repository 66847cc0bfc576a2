"""Hungarian matching with UGS's own box cost (`ugs.match.box_cost=bins`; docs/ugs.md).

DINO's matcher costs a (query, target) pair with L1 on the boxes the bin distributions decode to
by expectation. That cost ignores the distributions' shape: a query whose bins put their mass on
two far-apart values can decode to the target exactly and be matched, although its CE loss is
high. `UGSBinsMatcher` replaces the L1 term by the loss's own quantity, the two-hot CE of the
query's per-coordinate distributions against the target,

    C[q, t] = ce_cost * mean_c CE(z_qc, y_qtc) + cost_class * focal_cost + cost_giou * (-GIoU),

    y_qtc = inverse_sigmoid(t_c) - ref_boxes_logit_qc,

with GIoU still on the expectation boxes. Each set uses the grid of its loss: the encoder
proposals (`_interm`) the interm grid, the decoder layers the main one. Sets whose CE loss is
switched off (`ugs.loss.aux_layers` / `ugs.loss.interm` false) keep DINO's L1 cost, as they keep
DINO's L1 loss: matching and loss measure a set's boxes the same way.
"""
from __future__ import annotations

import torch
from torch import Tensor

import ugs
from models.matcher import HungarianMatcher
from models.ugs_losses import AUX_SET, ugs_loss_on
from util.box_ops import inverse_sigmoid
from util.precision import at_least_float32


class UGSBinsMatcher(HungarianMatcher):
    """HungarianMatcher whose box term is the bins' CE where the set's CE loss is on.

    Args:
        grid, interm_grid: (n+1,) the decoder and encoder-proposal grids (UGSBoxLoss's).
        ce_cost: weight of the CE term (mirrors the loss: ce_weight * cost_bbox / bbox_loss_coef).
        aux_layers, interm: whether the CE loss is on for the auxiliary decoder layers and the
            encoder proposals (the final layer always has it); elsewhere L1 with `cost_bbox`.
        cost_class, cost_bbox, cost_giou, focal_alpha, focal_gamma, threads: HungarianMatcher's.

    Output sets costed with bins need `pred_box_logits` (B, Q, 4, n+1) and `ref_boxes_logit`
    (B, Q, 4) (UGSDINO's outputs). Still one device->host copy per call (HungarianMatcher).
    """

    costs_by_set = True

    def __init__(self, grid: Tensor, interm_grid: Tensor, ce_cost: float, aux_layers: bool = True,
                 interm: bool = True, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, threads: int = 0) -> None:
        super().__init__(cost_class, cost_bbox, cost_giou, focal_alpha, focal_gamma, threads)
        if not ce_cost >= 0:
            raise ValueError(f"UGSBinsMatcher: ce_cost must be >= 0, got {ce_cost!r}")
        self.register_buffer("grid", grid.detach().clone(), persistent=False)
        self.register_buffer("interm_grid", interm_grid.detach().clone(), persistent=False)
        self.ce_cost = float(ce_cost)
        self.aux_layers, self.interm = bool(aux_layers), bool(interm)

    def cost_kind(self, set_name: str) -> str:
        """The set's cost: bins (main or interm grid) where its CE loss is on, else "expectation"
        (DINO's L1). Denoising sets have fixed pairs and are never matched."""
        if set_name not in ("", "_interm") and not AUX_SET.match(set_name):
            raise ValueError(f"UGSBinsMatcher: unknown output set {set_name!r} (expected '', '_<layer>' or "
                             "'_interm')")
        if not ugs_loss_on(set_name, self.aux_layers, self.interm, dn=False):
            return "expectation"
        return "bins_interm" if set_name == "_interm" else "bins"

    def group_cost(self, kind: str | None, output_sets: list[dict], prob_logits: Tensor, pred_boxes: Tensor,
                   tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        if kind == "expectation":
            return self.cost_matrix(prob_logits, pred_boxes, tgt_labels, tgt_boxes)
        for key in ("pred_box_logits", "ref_boxes_logit"):
            if any(key not in o for o in output_sets):
                raise KeyError(f"UGSBinsMatcher: an output set has no '{key}' (ugs.match.box_cost=bins needs "
                               "UGSDINO's outputs)")
        bin_logits = torch.cat([o["pred_box_logits"] for o in output_sets])  # (G*B, Q, 4, n+1)
        ref_logit = at_least_float32(torch.cat([o["ref_boxes_logit"] for o in output_sets]))  # (G*B, Q, 4)
        queries = prob_logits.shape[:-1]
        if bin_logits.shape[:-1].numel() != 4 * queries.numel() or ref_logit.shape[:-1].numel() != queries.numel() \
                or ref_logit.shape[-1] != 4 or bin_logits.shape[-2] != 4:
            raise ValueError(f"UGSBinsMatcher: expected pred_box_logits (B, Q, 4, n+1) and ref_boxes_logit "
                             f"(B, Q, 4) for {queries.numel()} queries in all, got "
                             f"{tuple(bin_logits.shape)} and {tuple(ref_logit.shape)}")
        bin_logits = bin_logits.reshape(*queries, 4, bin_logits.shape[-1])
        ref_logit = ref_logit.reshape(*queries, 4)
        grid = self.interm_grid if kind == "bins_interm" else self.grid
        # the loss's target (UGSBoxLoss) for every pair of an image: (..., Q, M, 4)
        y = inverse_sigmoid(tgt_boxes.to(ref_logit.dtype))[..., None, :, :] - ref_logit[..., :, None, :]
        ce = ugs.pairwise_ce_loss(bin_logits.flatten(0, -3), y.flatten(0, -3), grid).view(y.shape[:-1])
        return self.cost_matrix(prob_logits, pred_boxes, tgt_labels, tgt_boxes, box_cost=self.ce_cost * ce)
