"""Data section of the config: dataset location, augmentation policy, loader settings."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    # TODO(data): filled in by the data issue.
