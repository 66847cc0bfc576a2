"""The top-level config: one typed section per part of the system."""
from __future__ import annotations

from dataclasses import dataclass, field

from configs.data import DataConfig
from configs.model import ModelConfig
from configs.train import EvalConfig, OptimConfig, RuntimeConfig
from configs.ugs import UGSConfig


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    ugs: UGSConfig = field(default_factory=UGSConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
