"""DINO-5scale ResNet-50 on COCO 2017, 12 epochs: the official configuration
(config/DINO/DINO_5scale.py with the training scripts' dn_box_noise_scale=1.0)."""
from __future__ import annotations

from configs.data import DataConfig
from configs.model import ModelConfig
from configs.schema import Config
from configs.train import EvalConfig, OptimConfig


def config() -> Config:
    return Config(
        name="dino_5scale_r50_coco",
        model=ModelConfig(),  # defaults = official DINO-5scale R50, 91 COCO category ids
        data=DataConfig(dataset="coco", label_mapping="category_id"),
        optim=OptimConfig(),
        eval=EvalConfig(max_dets=100, num_select=300),
    )
