"""`build_model(cfg) -> (model, criterion, postprocessor)`: the only code that reads `cfg.model`;
`build_optimizer(model, cfg.optim)` and `build_scheduler(optimizer, cfg.optim)`: the only code
that reads `cfg.optim`'s optimiser fields (util/optim.py takes plain arguments).

`build_model` picks the classes up front: DINO, SetCriterion and PostProcess, or with `cfg.ugs.enabled`
UGSDINO and the UGS criterion and post-processor, or the Smooth-L1 offsets baseline (the classes and
their arguments: models/ugs_build.py).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.backbone import build_backbone
from models.criterion import SetCriterion, expand_weight_dict
from models.decoder import Decoder, DecoderLayer
from models.dino import DINO
from models.encoder import Encoder, EncoderLayer
from models.input_projection import InputProjection
from models.matcher import HungarianMatcher
from models.postprocess import PostProcess
from models.ugs_build import ugs_parts
from util.optim import adamw, param_groups, step_schedule


def build_dino(m, model_cls: type[DINO] = DINO, **variant_kwargs: Any) -> DINO:  # noqa: ANN001 - ModelConfig
    """The network alone (no criterion), from a ModelConfig.

    `model_cls` builds a DINO variant with the same modules, `variant_kwargs` being its extra
    constructor arguments (UGS-DINO: UGSDINO and its grids, from models/ugs_build.py).
    """
    backbone = build_backbone(m.backbone, m.return_interm_indices, m.hidden_dim, m.pe_temperature_h,
                              m.pe_temperature_w, m.backbone_weights, frozen_stages=m.backbone_frozen_stages,
                              use_checkpoint=m.backbone_use_checkpoint, drop_path_rate=m.backbone_drop_path_rate)
    input_proj = InputProjection(backbone.num_channels, m.hidden_dim, m.num_feature_levels)
    layer_args = (m.hidden_dim, m.dim_feedforward, m.dropout, m.num_feature_levels, m.nheads)
    encoder = Encoder([EncoderLayer(*layer_args, m.enc_n_points) for _ in range(m.enc_layers)],
                      use_checkpoint=m.use_checkpoint)
    decoder = Decoder([DecoderLayer(*layer_args, m.dec_n_points) for _ in range(m.dec_layers)], m.hidden_dim)
    if m.compile_decoder_layers:
        decoder.compile_layers()
    return model_cls(backbone, input_proj, encoder, decoder, hidden_dim=m.hidden_dim,
                     num_classes=m.num_classes, num_queries=m.num_queries,
                     num_feature_levels=m.num_feature_levels, dn_number=m.dn_number,
                     dn_label_noise_ratio=m.dn_label_noise_ratio, dn_box_noise_scale=m.dn_box_noise_scale,
                     dn_labelbook_size=m.dn_labelbook_size, **variant_kwargs)


def build_model(cfg):  # noqa: ANN001, ANN201 - configs.Config -> (DINO, SetCriterion, PostProcess)
    """Model, criterion (official weight_dict) and post-processor (top eval.num_select detections,
    then NMS at eval.nms_iou_threshold when > 0); with `cfg.ugs.enabled`, their UGS versions."""
    m = cfg.model
    m.check()
    matcher = HungarianMatcher(cost_class=m.set_cost_class, cost_bbox=m.set_cost_bbox,
                               cost_giou=m.set_cost_giou, focal_alpha=m.focal_alpha, threads=m.matcher_threads)
    weight_dict = expand_weight_dict({"loss_ce": m.cls_loss_coef, "loss_bbox": m.bbox_loss_coef,
                                      "loss_giou": m.giou_loss_coef}, num_decoder_layers=m.dec_layers,
                                     aux_loss=True, denoising=m.dn_number > 0, interm=True,
                                     interm_coef=m.interm_loss_coef, no_interm_box_loss=m.no_interm_box_loss)
    criterion = SetCriterion(m.num_classes, matcher, weight_dict, focal_alpha=m.focal_alpha)
    postprocessor = PostProcess(num_select=cfg.eval.num_select, nms_iou_threshold=cfg.eval.nms_iou_threshold)
    if not cfg.ugs.enabled:
        return build_dino(m, DINO), criterion, postprocessor
    model_cls, variant_kwargs, criterion, postprocessor = ugs_parts(cfg, criterion, postprocessor)
    return build_dino(m, model_cls, **variant_kwargs), criterion, postprocessor


def build_optimizer(model: nn.Module, optim) -> torch.optim.AdamW:  # noqa: ANN001 - configs.train.OptimConfig
    """AdamW with the official parameter groups (util/optim.py) from `optim.*`."""
    groups = param_groups(model, optim.lr, optim.lr_backbone, optim.lr_backbone_names,
                          param_dict_type=optim.param_dict_type, linear_proj_names=optim.lr_linear_proj_names,
                          linear_proj_mult=optim.lr_linear_proj_mult,
                          box_head_last_mult=optim.lr_box_head_last_mult,
                          box_head_last_pattern=optim.lr_box_head_last_pattern)
    return adamw(groups, optim.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer,
                    optim) -> torch.optim.lr_scheduler.LRScheduler:  # noqa: ANN001 - OptimConfig
    """The per-epoch step schedule of `optim.lr_drop` / `lr_drop_list` / `lr_gamma`."""
    return step_schedule(optimizer, optim.lr_drop, optim.lr_gamma, optim.lr_drop_list)
