"""Checks a run makes at start-up, before any data is read or any step is trained.

Each mistake they catch would otherwise surface late (a missing validation file after an epoch
of training), as hundreds of lines (a checkpoint of another model), or not at all (a launcher
that starts fewer processes than asked). Each message names the field or file and the way out.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from configs import Config, ConfigError

SPLIT_PATHS = {"train": ("train_images", "train_annotations"), "val": ("val_images", "val_annotations")}


def check_data_paths(cfg: Config, splits: tuple[str, ...] = ("train", "val")) -> None:
    """The files a COCO-format dataset reads exist: image folders and annotation files.
    (A path given for the synthetic dataset, which reads none, is refused by Config.check.)"""
    data = cfg.data
    if data.dataset == "synthetic":
        return
    problems = []
    for split in splits:
        images_key, annotations_key = SPLIT_PATHS[split]
        for key, want_dir in ((images_key, True), (annotations_key, False)):
            value = getattr(data, key)
            kind = "image folder" if want_dir else "COCO annotation file (JSON)"
            if not value:
                problems.append(f"data.{key} is empty: data.dataset={data.dataset!r} needs the {split} "
                                f"{kind}; pass --opt data.{key}=PATH")
            elif not (Path(value).is_dir() if want_dir else Path(value).is_file()):
                found = "is a file" if Path(value).is_file() else ("is a folder" if Path(value).is_dir()
                                                                   else "does not exist")
                problems.append(f"data.{key}={value!r} {found}; expected the {split} {kind}: "
                                f"--opt data.{key}=PATH")
    if problems:
        raise ConfigError("\n  ".join(["data paths:", *problems]))


def check_state_dict_fits(model_state: Mapping[str, Any], checkpoint_state: Mapping[str, Any],
                          source: str, how: str) -> None:
    """Strict loading, checked before it happens: the same keys with the same shapes. The error
    sums up the differences (at most a few named) instead of one line per tensor."""
    from util.checkpoint import CheckpointError

    mismatched = [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in checkpoint_state.items()
                  if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)]
    missing = [k for k in model_state if k not in checkpoint_state]
    unexpected = [k for k in checkpoint_state if k not in model_state]
    if not (mismatched or missing or unexpected):
        return
    summary = (f"{source} does not fit the model built from the config ({len(mismatched)} tensor(s) of "
               f"another shape, {len(missing)} missing, {len(unexpected)} unexpected):")
    lines = [summary]
    lines += [f"  {k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched[:5]]
    lines += [f"  missing: {k}" for k in missing[:3]] + [f"  unexpected: {k}" for k in unexpected[:3]]
    lines.append(f"  The checkpoint was made with another model config. {how}")
    raise CheckpointError("\n".join(lines))


def has_backbone_weights(state_dict: Mapping[str, Any] | None) -> bool:
    """Whether a state dict (official key layout) carries the backbone's weights."""
    return bool(state_dict) and any(k.startswith("backbone.") for k in state_dict)


def launcher_process_warning(env: Mapping[str, str], num_processes: int) -> str | None:
    """A warning when the launcher asked for more processes than run.

    accelerate's simple launcher (used with --cpu) sets MASTER_ADDR only when more than one
    process or machine was asked for, yet starts one process without a process group;
    torchrun and accelerate's multi-GPU launcher set WORLD_SIZE.
    """
    world = env.get("WORLD_SIZE")
    if world is not None and world.isdigit() and int(world) != num_processes:
        return (f"the launcher started WORLD_SIZE={world} processes but this run has {num_processes}: "
                "each process may be training alone")
    if (world is None and num_processes == 1 and "MASTER_ADDR" in env
            and "ACCELERATE_USE_CPU" in env):
        return ("accelerate launch asked for more than one process, but accelerate started ONE (its "
                "--cpu launcher does so without MPI): this run uses 1 process. For several CPU "
                "processes use: torchrun --nproc_per_node N main.py ...")
    return None


def finished_run_message(checkpoint: Mapping[str, Any], cfg: Config, path: Path) -> str | None:
    """A message when the checkpoint to resume has already trained what the config asks for."""
    epoch, step = int(checkpoint.get("epoch", 0)), int(checkpoint.get("step", 0))
    train_state = checkpoint.get("train_state") or {}
    mid_epoch = int(train_state.get("batches_in_epoch", 0) or 0) if isinstance(train_state, Mapping) else 0
    epochs_done = epoch >= cfg.optim.epochs and not mid_epoch
    steps_done = bool(cfg.runtime.max_steps) and step >= cfg.runtime.max_steps
    if not (epochs_done or steps_done):
        return None
    if epochs_done:
        why, longer = (f"epoch {epoch} of optim.epochs={cfg.optim.epochs}",
                       f"--opt optim.epochs=N with N > {cfg.optim.epochs}")
    else:
        why, longer = (f"step {step} of runtime.max_steps={cfg.runtime.max_steps}",
                       f"--opt runtime.max_steps=N with N > {step} (0: no limit)")
    return (f"--resume {path}: this run is already finished ({why}); nothing to train. To train "
            f"longer: {longer}; to evaluate it: --eval --resume {path}")
