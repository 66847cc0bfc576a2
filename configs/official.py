"""Official DINO argument sets (config.json dicts, or the argparse.Namespace under a checkpoint's
"args") -> our `Config`.

Every official key falls in one of three groups:
* mapped: copied into a field of ours (renamed where needed);
* required: an architecture/behaviour switch we implement for one value only. Any other value is
  an error naming the option, so an unsupported checkpoint never loads into the wrong model;
* ignored: paths, devices, logging and switches that are inert for the values checked above.
Keys in none of the groups are reported with a warning (never silently dropped).
"""
from __future__ import annotations

import argparse
import warnings
from typing import Any

from configs.overrides import ConfigError, validate
from configs.schema import Config

# official key -> (section, field)
_MAPPED: dict[str, tuple[str, str]] = {
    "backbone": ("model", "backbone"),
    "use_checkpoint": ("model", "backbone_use_checkpoint"),  # official: Swin block checkpointing
    "return_interm_indices": ("model", "return_interm_indices"),
    "pe_temperatureH": ("model", "pe_temperature_h"),
    "pe_temperatureW": ("model", "pe_temperature_w"),
    "hidden_dim": ("model", "hidden_dim"),
    "nheads": ("model", "nheads"),
    "enc_layers": ("model", "enc_layers"),
    "dec_layers": ("model", "dec_layers"),
    "dim_feedforward": ("model", "dim_feedforward"),
    "dropout": ("model", "dropout"),
    "num_queries": ("model", "num_queries"),
    "num_feature_levels": ("model", "num_feature_levels"),
    "enc_n_points": ("model", "enc_n_points"),
    "dec_n_points": ("model", "dec_n_points"),
    "num_classes": ("model", "num_classes"),
    "dn_number": ("model", "dn_number"),
    "dn_box_noise_scale": ("model", "dn_box_noise_scale"),
    "dn_label_noise_ratio": ("model", "dn_label_noise_ratio"),
    "dn_labelbook_size": ("model", "dn_labelbook_size"),
    "set_cost_class": ("model", "set_cost_class"),
    "set_cost_bbox": ("model", "set_cost_bbox"),
    "set_cost_giou": ("model", "set_cost_giou"),
    "focal_alpha": ("model", "focal_alpha"),
    "cls_loss_coef": ("model", "cls_loss_coef"),
    "bbox_loss_coef": ("model", "bbox_loss_coef"),
    "giou_loss_coef": ("model", "giou_loss_coef"),
    "interm_loss_coef": ("model", "interm_loss_coef"),
    "no_interm_box_loss": ("model", "no_interm_box_loss"),
    "lr": ("optim", "lr"),
    "lr_backbone": ("optim", "lr_backbone"),
    "lr_backbone_names": ("optim", "lr_backbone_names"),
    "lr_linear_proj_names": ("optim", "lr_linear_proj_names"),
    "lr_linear_proj_mult": ("optim", "lr_linear_proj_mult"),
    "param_dict_type": ("optim", "param_dict_type"),
    "weight_decay": ("optim", "weight_decay"),
    "epochs": ("optim", "epochs"),
    "lr_drop": ("optim", "lr_drop"),
    "clip_max_norm": ("optim", "clip_max_norm"),
    "batch_size": ("optim", "batch_size"),
    "use_ema": ("optim", "use_ema"),
    "ema_decay": ("optim", "ema_decay"),
    "num_select": ("eval", "num_select"),
    "seed": ("runtime", "seed"),
    "data_aug_scales": ("data", "train_scales"),
    "data_aug_max_size": ("data", "train_max_size"),
    "data_aug_scales2_resize": ("data", "crop_resize_scales"),
}

# official key -> the only value we implement (None as a value means "must be None/absent")
_REQUIRED: dict[str, Any] = {
    "modelname": "dino",
    "two_stage_type": "standard",
    "decoder_sa_type": "sa",
    "decoder_module_seq": ["sa", "ca", "ffn"],
    "use_deformable_box_attn": False,
    "num_patterns": 0,
    "masks": False,
    "frozen_weights": None,
    "dilation": False,
    "position_embedding": "sine",
    "batch_norm_type": "FrozenBatchNorm2d",
    "backbone_freeze_keywords": None,
    "pre_norm": False,
    "query_dim": 4,
    "unic_layers": 0,
    "transformer_activation": "relu",
    "embed_init_tgt": True,
    "dec_pred_bbox_embed_share": True,
    "dec_pred_class_embed_share": True,
    "two_stage_bbox_embed_share": False,
    "two_stage_class_embed_share": False,
    "two_stage_learn_wh": False,
    "two_stage_default_hw": 0.05,
    "two_stage_keep_all_tokens": False,
    "two_stage_pat_embed": 0,
    "two_stage_add_query_num": 0,
    "dec_layer_number": None,
    "decoder_layer_noise": False,
    "add_channel_attention": False,
    "add_pos_value": False,
    "random_refpoints_xy": False,
    "fix_refpoints_hw": -1,
    "pdetr3_bbox_embed_diff_each_layer": False,
    "pdetr3_refHW": -1,
    "dabdetr_yolo_like_anchor_update": False,
    "dabdetr_deformable_encoder": False,
    "dabdetr_deformable_decoder": False,
    "use_detached_boxes_dec_out": False,
    "aux_loss": True,
    "matcher_type": "HungarianMatcher",
    "onecyclelr": False,
    "ddetr_lr_param": False,
    "data_aug_scale_overlap": None,
}

# Inert given the required values above, or unrelated to the model (paths, devices, logging).
_IGNORED = {
    "device", "output_dir", "coco_path", "coco_panoptic_path", "remove_difficult", "fix_size", "amp",
    "num_workers", "resume", "pretrain_model_path", "finetune_ignore", "start_epoch", "eval", "test",
    "find_unused_params", "save_log", "save_results", "debug", "note", "config_file", "options",
    "world_size", "dist_url", "rank", "local_rank", "gpu", "dist_backend", "distributed", "amp",
    "save_checkpoint_interval", "backbone_dir",  # ImageNet weights: an official checkpoint replaces them
    "box_attn_type", "dln_xy_noise", "dln_hw_noise",  # only used by disabled options
    "mask_loss_coef", "dice_loss_coef", "enc_loss_coef",  # masks off; enc loss = interm loss in DINO
    "match_unstable_error", "ema_epoch", "dataset_file", "num_select_used_for_fixture",
    "use_dn", "multi_step_lr", "lr_drop_list", "data_aug_scales2_crop", "nms_iou_threshold",  # handled below
}


def _as_dict(args: Any) -> dict[str, Any]:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, dict):
        return dict(args)
    raise TypeError(f"from_official_args: expected a dict or argparse.Namespace, got {type(args).__name__}")


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, list):
        return isinstance(value, (list, tuple)) and list(value) == expected
    numeric = (int, float)
    if isinstance(expected, numeric) and not isinstance(expected, bool):
        return isinstance(value, numeric) and not isinstance(value, bool) and abs(value - expected) < 1e-12
    if isinstance(expected, bool) or expected is None:
        return value is expected
    return value == expected


def from_official_args(args: Any, name: str = "official") -> Config:
    """Build our Config from an official DINO argument set; errors list every unsupported option.

    The backbone is built without ImageNet weights (`model.backbone_weights = None`): official
    argument sets come with official checkpoints, which overwrite them.
    """
    official = _as_dict(args)
    unsupported = [f"{k}={official[k]!r} (supported: {v!r})" for k, v in _REQUIRED.items()
                   if k in official and not _same(official[k], v)]
    if official.get("param_dict_type", "default") not in ("default", "ddetr_in_mmdet"):
        unsupported.append(f"param_dict_type={official['param_dict_type']!r} "
                           "(supported: 'default', 'ddetr_in_mmdet')")
    if unsupported:
        raise ConfigError("official DINO options not supported by this implementation: "
                          + "; ".join(unsupported))

    cfg = Config(name=name)
    cfg.model.backbone_weights = None
    for key, (section, fld) in _MAPPED.items():
        if key in official:
            value = official[key]
            setattr(getattr(cfg, section), fld, list(value) if isinstance(value, tuple) else value)
    if official.get("use_dn", True) is False:
        cfg.model.dn_number = 0
    if official.get("multi_step_lr", False):
        cfg.optim.lr_drop_list = list(official.get("lr_drop_list", []))
    if official.get("nms_iou_threshold") is not None:  # None/absent: the official default -1 (off)
        cfg.eval.nms_iou_threshold = float(official["nms_iou_threshold"])
    if "data_aug_scales2_crop" in official:
        cfg.data.crop_min_size, cfg.data.crop_max_size = (int(v) for v in official["data_aug_scales2_crop"])
    if official.get("dataset_file") == "coco":
        cfg.data.dataset = "coco"
        cfg.data.label_mapping = "category_id"

    unknown = sorted(set(official) - set(_MAPPED) - set(_REQUIRED) - _IGNORED)
    if unknown:
        warnings.warn(f"from_official_args: {len(unknown)} official option(s) not recognised and ignored: "
                      f"{unknown}", stacklevel=2)
    # re-type through the schema so a wrong type in the official set is reported by key
    from configs.overrides import json_copy

    try:
        cfg = json_copy(cfg)
    except ConfigError as exc:
        raise ConfigError(f"official argument set: {exc}") from None
    validate(cfg)
    return cfg
