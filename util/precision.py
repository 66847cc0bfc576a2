"""TF32 switch for float32 training on Ampere and newer GPUs (`runtime.tf32`)."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

log = logging.getLogger(__name__)


def set_tf32(enabled: bool | None) -> tuple[bool, bool]:
    """None: leave PyTorch's settings; True/False: allow TF32 for float32 matrix products and cuDNN
    convolutions, or forbid it. Returns the resulting (matmul, cudnn) flags, also logged.

    PyTorch 1.7-1.11 allowed both by default (the official DINO environment, 1.9, trained that way
    on Ampere GPUs); since 1.12 only convolutions are. bf16 autocast is unaffected.
    """
    if enabled is not None:
        torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
        torch.backends.cudnn.allow_tf32 = bool(enabled)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    log.info("TF32: float32 matrix products %s, cuDNN convolutions %s%s", "on" if flags[0] else "off",
             "on" if flags[1] else "off", "" if enabled is not None else " (PyTorch defaults)")
    return flags


@contextmanager
def tf32_mode(enabled: bool | None) -> Iterator[None]:
    """`set_tf32(enabled)` inside the block, the previous flags restored after it (benchmarks that
    compare settings in one process)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_tf32(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x upcast to float32 if it is bf16/fp16, else x itself: losses and matching costs in half
    precision would be too coarse (and cdist has no bf16 kernel)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
