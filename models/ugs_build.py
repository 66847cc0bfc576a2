"""The UGS parts of a build: the only model code that reads `cfg.ugs` (besides tools).

`ugs_parts(cfg, criterion, postprocessor)` returns the network class (UGSDINO, or OffsetDINO for the
Smooth-L1 offsets baseline) with its constructor arguments (grids and switches) and turns DINO's
criterion and post-processor into the ones of that variant; `models.build.build_model` calls it when
`cfg.ugs.enabled`.
"""
from __future__ import annotations

from typing import Any

import torch

import ugs
from models.criterion import SetCriterion
from models.dino import DINO
from models.offset_baseline import OffsetDINO, OffsetSmoothL1Loss
from models.postprocess import PostProcess
from models.ugs_dino import UGSDINO
from models.ugs_losses import UGSBoxLoss, UGSCriterion, ugs_weight_dict
from models.ugs_matcher import UGSBinsMatcher
from models.ugs_postprocess import UGSPostProcess


def ugs_grids(u) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001 - configs.ugs.UGSConfig
    """(decoder grid, encoder-proposal grid), float32, from ugs.grid.*."""
    g = u.grid
    grid = ugs.make_grid(g.range, g.alpha, g.intervals, g.kind, dtype=torch.float32)
    interm = ugs.make_grid(u.grid_range(interm=True), g.alpha, g.intervals, g.kind, dtype=torch.float32)
    return grid, interm


def ugs_parts(cfg, criterion: SetCriterion, postprocessor: PostProcess  # noqa: ANN001 - configs.Config
              ) -> tuple[type[DINO], dict[str, Any], SetCriterion, PostProcess]:
    """(the network class, its keyword arguments beyond DINO's, the criterion, the post-processor):
    UGSDINO with the UGS criterion and post-processor, or for the Smooth-L1 offsets baseline
    (`ugs.loss.box_loss=smooth_l1`) OffsetDINO with DINO's post-processor."""
    u = cfg.ugs
    u.check()
    if not u.enabled:
        raise ValueError("ugs_parts: cfg.ugs.enabled is false")
    if u.loss.box_loss == "smooth_l1":  # the paper's baseline: DINO's 4-output head, offsets loss
        return offset_baseline_parts(cfg, criterion, postprocessor)
    grid, interm_grid = ugs_grids(u)
    if u.ur.levels is not None and max(u.ur.levels) >= cfg.model.num_feature_levels:
        raise ValueError(f"ugs.ur.levels {u.ur.levels}: model.num_feature_levels is "
                         f"{cfg.model.num_feature_levels}")
    model_kwargs = {"grid": grid, "interm_grid": interm_grid, "zero_last_layer": u.init.zero_last_layer,
                    "collect_ur_context": u.ur.weight > 0}
    weights = ugs_weight_dict(criterion.weight_dict, u.loss.box_loss, u.loss.ce_weight, u.loss.um_weight,
                              u.ur.weight, aux_layers=u.loss.aux_layers, interm=u.loss.interm, dn=u.loss.dn)
    box_losses = tuple(criterion.box_losses) + (UGSBoxLoss(grid, interm_grid),)
    matcher = bins_matcher(cfg, grid, interm_grid) if u.match.box_cost == "bins" else criterion.matcher
    ugs_criterion = UGSCriterion(criterion.num_classes, matcher, weights, criterion.focal_alpha,
                                 criterion.losses, box_losses, criterion.focal_gamma, ur_weight=u.ur.weight,
                                 ur_rho=u.ur.rho, ur_levels=u.ur.levels, ur_eps=u.ur.eps,
                                 ur_per_level=u.ur.per_level)
    post = UGSPostProcess(grid, postprocessor.num_select, postprocessor.nms_iou_threshold,
                          postprocessor.extra_keys)
    return UGSDINO, model_kwargs, ugs_criterion, post


def bins_matcher(cfg, grid: torch.Tensor, interm_grid: torch.Tensor) -> UGSBinsMatcher:  # noqa: ANN001
    """`ugs.match.box_cost=bins`: the CE cost on the sets with the CE loss, weighted like the loss
    unless `ugs.match.ce_cost` is set (DINO's L1 cost mirrors its loss coefficient: 5 and 5)."""
    m, u = cfg.model, cfg.ugs
    ce_cost = u.match.ce_cost
    if ce_cost is None:
        if m.bbox_loss_coef == 0:
            raise ValueError("ugs.match.ce_cost: no default with model.bbox_loss_coef=0 (it mirrors "
                              "ce_weight * set_cost_bbox / bbox_loss_coef); set ugs.match.ce_cost")
        ce_cost = u.loss.ce_weight * m.set_cost_bbox / m.bbox_loss_coef
    return UGSBinsMatcher(grid, interm_grid, ce_cost, aux_layers=u.loss.aux_layers, interm=u.loss.interm,
                          cost_class=m.set_cost_class, cost_bbox=m.set_cost_bbox, cost_giou=m.set_cost_giou,
                          focal_alpha=m.focal_alpha, threads=m.matcher_threads)


def offset_baseline_parts(cfg, criterion: SetCriterion, postprocessor: PostProcess  # noqa: ANN001
                          ) -> tuple[type[OffsetDINO], dict[str, Any], SetCriterion, PostProcess]:
    """DINO trained with Smooth-L1 on the logit-space offsets in place of L1 (ugs.loss.box_loss)."""
    u = cfg.ugs
    weights = ugs_weight_dict(criterion.weight_dict, "smooth_l1", u.loss.ce_weight, 0.0, 0.0,
                              aux_layers=u.loss.aux_layers, interm=u.loss.interm, dn=u.loss.dn,
                              smooth_l1_weight=u.loss.smooth_l1_weight)
    box_losses = tuple(criterion.box_losses) + (OffsetSmoothL1Loss(u.loss.smooth_l1_beta),)
    offset_criterion = SetCriterion(criterion.num_classes, criterion.matcher, weights, criterion.focal_alpha,
                                    criterion.losses, box_losses, criterion.focal_gamma)
    return OffsetDINO, {}, offset_criterion, postprocessor
