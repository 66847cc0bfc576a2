"""Small process helpers: who is the main process, per-process seeds.

(RNG state capture/restore for exact resume lives with the checkpoint code: util/checkpoint.py.)

These work with or without an initialised process group (plain `python main.py`, `torchrun`,
`accelerate launch`), so library code can call them without knowing how it was started.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    if is_dist():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    if is_dist():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return get_rank() == 0


def seed_everything(seed: int, rank: int | None = None) -> int:
    """Seed python, numpy and torch with `seed + rank` (official DINO: each process differs, so
    random augmentations and denoising noise are not replicated across GPUs). Returns the seed."""
    rank = get_rank() if rank is None else rank
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    return s
