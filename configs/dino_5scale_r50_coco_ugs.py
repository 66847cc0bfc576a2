"""UGS-DINO-5scale ResNet-50 on COCO: the DINO config with UGS on at the paper's best values
(lambda_1 = lambda_2 = rho = 0.5, alpha = 1; configs/ugs.py defaults, docs/ugs.md). The ablation
rows are one override each: `--opt ugs.ablation=l1|ce_uniform|ce_in|ce_in_um|full`."""
from __future__ import annotations

from configs.dino_5scale_r50_coco import config as base_config
from configs.schema import Config
from configs.ugs import apply_ablation_row


def config() -> Config:
    cfg = base_config()
    cfg.name = "dino_5scale_r50_coco_ugs"
    apply_ablation_row(cfg.ugs, "full")  # enabled, CE on the IN grid, UM and UR
    return cfg
