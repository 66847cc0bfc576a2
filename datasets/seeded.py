"""Per-sample random streams for training augmentation.

Random transforms draw from torch's global generator, so which draw a sample gets depends on how
many samples were loaded before it in that process: on the number of workers, on loaders that
fetch a batch ahead (accelerate does), and on where a resumed run restarted. Seeding each sample
from (seed, epoch, index) removes all three: a run resumed in the middle of an epoch sees the same
augmented images as an uninterrupted one, with or without workers.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

_MIX = 1_000_003


class SeededSamples(Dataset):
    """`dataset[i]` computed under torch seed f(seed, epoch, i); the global stream is left as it was."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.augmentation_epoch = 0

    def use_epoch(self, epoch: int) -> None:
        """Call before each epoch's iterator is created (workers get a copy of this object then).
        Not named `set_epoch`: accelerate's loaders call a dataset's `set_epoch` with their own
        count of iterations, which restarts at 0 in a resumed process."""
        self.augmentation_epoch = int(epoch)

    def sample_seed(self, index: int) -> int:
        return ((self.seed * _MIX + self.augmentation_epoch) * _MIX + int(index)) % (2**63 - 1)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.sample_seed(index))
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # categories, drop statistics, coco_gt ...
        if name == "dataset":  # not set yet (unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
