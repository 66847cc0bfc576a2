"""A tiny DINO (ResNet-18, d=64, 2+2 layers, 300 queries) on the embedded synthetic dataset:
for CPU tests and the demo. Same code paths as DINO-5scale (5 levels, two-stage, denoising)."""
from __future__ import annotations

from configs.data import DataConfig
from configs.model import ModelConfig
from configs.schema import Config
from configs.train import EvalConfig, OptimConfig


def config() -> Config:
    return Config(
        name="dino_tiny",
        model=ModelConfig(backbone="resnet18", backbone_weights=None, hidden_dim=64, nheads=4, enc_layers=2,
                          dec_layers=2, dim_feedforward=128, num_queries=300, dn_number=10,
                          num_classes=7, dn_labelbook_size=7),  # 7 synthetic classes, labels 0..6
        # sizes for the 256 x 256 synthetic scenes (the COCO defaults would upscale them to ~700 px)
        data=DataConfig(dataset="synthetic", label_mapping="contiguous", train_scales=[224, 256, 288, 320],
                        train_max_size=512, crop_resize_scales=[192, 224, 256], crop_min_size=128,
                        crop_max_size=224, eval_size=256, eval_max_size=512),
        optim=OptimConfig(batch_size=2),
        eval=EvalConfig(max_dets=300, num_select=300),
    )
