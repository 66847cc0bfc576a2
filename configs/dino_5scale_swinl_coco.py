"""DINO-5scale Swin-L (swin_L_384_22k) on COCO 2017: the R50 COCO config with the official Swin-L
backbone -- the architecture of the released 5-scale Swin-L checkpoints (docs/swin.md).

Learning rates follow the official rule for every backbone: parameters under `backbone.0` at
optim.lr_backbone = 1e-5, the rest at optim.lr = 1e-4 (the R50 defaults, unchanged). Blocks are
checkpointed as in the official Swin-L training. ImageNet weights: set
`model.backbone_weights=PATH/swin_large_patch4_window12_384_22k.pth` to train from ImageNet; when
fine-tuning an official DINO checkpoint (`--pretrained`) they are not needed.
"""
from __future__ import annotations

from configs.dino_5scale_r50_coco import config as r50_config
from configs.schema import Config


def use_swin_l(cfg: Config) -> Config:
    """The backbone change shared by the Swin-L configs."""
    cfg.model.backbone = "swin_L_384_22k"
    cfg.model.backbone_weights = None
    cfg.model.backbone_use_checkpoint = True
    cfg.model.return_interm_indices = [0, 1, 2, 3]  # 5-scale: all four stages (192..1536 channels)
    return cfg


def config() -> Config:
    cfg = use_swin_l(r50_config())
    cfg.name = "dino_5scale_swinl_coco"
    return cfg
