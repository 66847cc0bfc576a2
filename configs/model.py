"""Model section of the config (DINO-5scale). Owned by the DINO model code; see models/build.py."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    num_classes: int = 91
    hidden_dim: int = 256
    num_queries: int = 900
    num_feature_levels: int = 5
    # TODO(model): the full DINO-5scale schema is filled in by the model issue.
