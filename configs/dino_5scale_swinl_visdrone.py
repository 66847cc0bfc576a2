"""DINO-5scale Swin-L on VisDrone-DET: the R50 VisDrone config (10 classes, 1500 detections, the
small-object data policy) with the Swin-L backbone of configs/dino_5scale_swinl_coco.py."""
from __future__ import annotations

from configs.dino_5scale_r50_visdrone import config as r50_config
from configs.dino_5scale_swinl_coco import use_swin_l
from configs.schema import Config


def config() -> Config:
    cfg = use_swin_l(r50_config())
    cfg.name = "dino_5scale_swinl_visdrone"
    return cfg
