"""What a training checkpoint holds, and how a run writes and restores it (exact resume)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from configs import Config, to_dict
from util.checkpoint import CheckpointError, capture_rng_state, restore_rng_state
from accelerate.utils import set_seed
from util.engine import TrainState

log = logging.getLogger("main")

TRAINING_KEYS = ("model", "optimizer", "lr_scheduler", "train_state")


def training_checkpoint(accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                        ema: Any, state: TrainState, cfg: Config, rng_all: list) -> dict:
    """The official layout ({"model": state_dict}) plus what exact resume needs."""
    ckpt = {"model": accelerator.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
            "epoch": state.epoch, "step": state.step, "train_state": state.state_dict(),
            "rng": rng_all, "config": to_dict(cfg)}
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()
    if ema is not None:
        ckpt["ema"] = ema.state_dict()
    return ckpt


def check_training_checkpoint(ckpt: dict, path: Path) -> None:
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"--resume {path}: not a training checkpoint of this code (missing "
                              f"{missing}); to start from its weights use --pretrained {path}, to "
                              f"evaluate it --eval --resume {path}")


def restore_training(ckpt: dict, path: Path, accelerator: Any, model: torch.nn.Module,
                     optimizer: Any, scheduler: Any, ema: Any, state: TrainState) -> None:
    check_training_checkpoint(ckpt, path)
    accelerator.unwrap_model(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["lr_scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        if "ema" in ckpt:
            ema.load_state_dict(ckpt["ema"])
        else:
            log.warning("--resume %s has no EMA state; the EMA restarts from the current weights", path)
    state.load_state_dict(ckpt["train_state"])
    rng = ckpt.get("rng") or []
    if len(rng) == accelerator.num_processes:
        restore_rng_state(rng[accelerator.process_index])
    else:
        log.warning("--resume %s: saved by %d process(es), running %d; RNG streams are re-seeded, "
                    "so the run continues but not bit-exactly", path, len(rng), accelerator.num_processes)
        set_seed(1000 * state.epoch + int(ckpt["config"]["runtime"]["seed"]), device_specific=True)


def save_training(accelerator: Any, ckpt_fn: Callable[[list], dict], out_dir: Path, is_best: bool,
                  extra_names: list[str]) -> None:
    """Every process contributes its RNG state; the main process writes atomically."""
    from accelerate.utils import gather_object

    from util.checkpoint import save_checkpoint, save_training_checkpoint

    rng_all = gather_object([capture_rng_state()])
    if accelerator.is_main_process:
        ckpt = ckpt_fn(rng_all)
        save_training_checkpoint(out_dir, ckpt, is_best=is_best)
        for name in extra_names:
            save_checkpoint(ckpt, out_dir / name)
    accelerator.wait_for_everyone()
