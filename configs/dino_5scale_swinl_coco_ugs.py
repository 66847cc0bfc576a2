"""UGS-DINO-5scale Swin-L on COCO: the Swin-L COCO config with UGS on at the paper's best values
(configs/ugs.py defaults, docs/ugs.md). Ablation rows: `--opt ugs.ablation=<row>`."""
from __future__ import annotations

from configs.dino_5scale_swinl_coco import config as base_config
from configs.schema import Config
from configs.ugs import apply_ablation_row


def config() -> Config:
    cfg = base_config()
    cfg.name = "dino_5scale_swinl_coco_ugs"
    apply_ablation_row(cfg.ugs, "full")  # enabled, CE on the IN grid, UM and UR
    return cfg
