"""The UGS parts of a build: the only model code that reads `cfg.ugs` (besides tools).

`ugs_parts(cfg, criterion, postprocessor)` returns UGS-DINO's constructor arguments (its grids and
switches) and turns DINO's criterion and post-processor into the UGS ones; `models.build.build_model`
calls it when `cfg.ugs.enabled` and builds the network with the UGSDINO class.
"""
from __future__ import annotations

from typing import Any

import torch

import ugs
from models.criterion import SetCriterion
from models.postprocess import PostProcess
from models.ugs_losses import UGSBoxLoss, UGSCriterion, ugs_weight_dict
from models.ugs_postprocess import UGSPostProcess


def ugs_grids(u) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001 - configs.ugs.UGSConfig
    """(decoder grid, encoder-proposal grid), float32, from ugs.grid.*."""
    g = u.grid
    grid = ugs.make_grid(g.range, g.alpha, g.intervals, g.kind, dtype=torch.float32)
    interm = ugs.make_grid(u.grid_range(interm=True), g.alpha, g.intervals, g.kind, dtype=torch.float32)
    return grid, interm


def ugs_parts(cfg, criterion: SetCriterion, postprocessor: PostProcess  # noqa: ANN001 - configs.Config
              ) -> tuple[dict[str, Any], UGSCriterion, UGSPostProcess]:
    """(UGSDINO's keyword arguments beyond DINO's, the UGS criterion, the UGS post-processor)."""
    u = cfg.ugs
    u.check()
    if not u.enabled:
        raise ValueError("ugs_parts: cfg.ugs.enabled is false")
    grid, interm_grid = ugs_grids(u)
    if u.ur.levels is not None and max(u.ur.levels) >= cfg.model.num_feature_levels:
        raise ValueError(f"ugs.ur.levels {u.ur.levels}: model.num_feature_levels is "
                         f"{cfg.model.num_feature_levels}")
    model_kwargs = {"grid": grid, "interm_grid": interm_grid, "zero_last_layer": u.init.zero_last_layer,
                    "collect_ur_context": u.ur.weight > 0}
    weights = ugs_weight_dict(criterion.weight_dict, u.loss.box_loss, u.loss.ce_weight, u.loss.um_weight,
                              u.ur.weight, aux_layers=u.loss.aux_layers, interm=u.loss.interm, dn=u.loss.dn)
    box_losses = tuple(criterion.box_losses) + (UGSBoxLoss(grid, interm_grid),)
    ugs_criterion = UGSCriterion(criterion.num_classes, criterion.matcher, weights, criterion.focal_alpha,
                                 criterion.losses, box_losses, criterion.focal_gamma, ur_weight=u.ur.weight,
                                 ur_rho=u.ur.rho, ur_levels=u.ur.levels, ur_eps=u.ur.eps)
    post = UGSPostProcess(grid, postprocessor.num_select, postprocessor.nms_iou_threshold,
                          postprocessor.extra_keys)
    return model_kwargs, ugs_criterion, post
