"""Optimisation, evaluation and runtime sections of the config."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimConfig:
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    epochs: int = 12
    lr_drop: int = 11
    clip_max_norm: float = 0.1
    batch_size: int = 2


@dataclass
class EvalConfig:
    max_dets: int = 100
    num_select: int = 300


@dataclass
class RuntimeConfig:
    output_dir: str = "outputs/run"
    seed: int = 42
