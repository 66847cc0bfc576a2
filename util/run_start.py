"""What a run starts from: its config (and where that came from) and the checkpoints it loads.

The config is --config NAME with the --opt overrides; without --config, a run that resumes or
evaluates a checkpoint uses the config stored in it (or config.json beside a safetensors file),
with the overrides on top; otherwise the default config. A checkpoint whose weights replace the
freshly built model's also replaces the backbone's ImageNet weights, so those are not downloaded.
"""
from __future__ import annotations

import argparse
import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from configs import Config, ConfigError, apply_overrides, load_config, stored_config
from util.checkpoint import CheckpointError, find_resume_checkpoint, load_checkpoint, load_weights_file
from util.preflight import check_state_dict_fits, has_backbone_weights
from util.training_checkpoint import check_training_checkpoint
from util.weight_downloads import check_backbone_weights_name

log = logging.getLogger("main")

DEFAULT_CONFIG = "demo_synthetic"


def config_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.opt or [])
    if args.output_dir is not None:
        overrides.append(f"runtime.output_dir={args.output_dir}")
    if args.max_dets is not None:
        overrides.append(f"eval.max_dets={args.max_dets}")
    return overrides


def resolve_config(args: argparse.Namespace) -> Config:
    """The config of --config (default demo_synthetic) with the command line's overrides."""
    return load_config(args.config or DEFAULT_CONFIG, config_overrides(args))


@dataclass
class Start:
    """What a run starts from: its config (and where that came from) and what it loads."""

    cfg: Config
    config_source: str
    resume_path: Path | None = None
    checkpoint: dict | None = None      # the --resume checkpoint ({"model": ...} for a safetensors file)
    pretrained: dict | None = None      # the --pretrained state dict


def load_model_checkpoint(path: str | Path) -> dict:
    """A checkpoint as a dict: a .pth file as saved, a .safetensors file as {"model": weights}."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return {"model": load_weights_file(path)}
    return load_checkpoint(path)


def checkpoint_config(path: str | Path, ckpt: dict, config: str | None, overrides: list[str],
                      option: str = "--checkpoint") -> tuple[Config, str]:
    """--config when given, else the config stored with the checkpoint; overrides on top."""
    if config is not None:
        return load_config(config, overrides), f"--config {config}"
    stored = stored_config(path, ckpt)
    if stored is None:
        raise ConfigError(f"{option} {path} stores no config and has no config.json beside it (an "
                          "official checkpoint without its arguments?): pass --config NAME, the config "
                          "it was trained with")
    return apply_overrides(stored[0], overrides), stored[1]


def load_resume_checkpoint(path: Path, eval_only: bool) -> dict:
    if path.suffix == ".safetensors" and not eval_only:
        raise CheckpointError(f"--resume {path}: a safetensors file holds weights only, no training "
                              f"state; evaluate it with --eval --resume {path}, or train from its "
                              f"weights with --pretrained {path}")
    return load_model_checkpoint(path)


def config_from_checkpoint(args: argparse.Namespace, path: Path, ckpt: dict) -> tuple[Config, str]:
    return checkpoint_config(path, ckpt, None, config_overrides(args), option="--resume")


def resolve_start(args: argparse.Namespace, cfg: Config | None = None) -> Start:
    """Config and checkpoints of a run. A caller's `cfg` wins; then --config; then the config
    stored with the checkpoint being resumed or evaluated; then the default config."""
    path, ckpt = None, None
    if args.resume not in (None, "auto"):
        path = Path(args.resume)
        ckpt = load_resume_checkpoint(path, args.eval)
    if cfg is not None:
        source = "given by the caller"
    elif args.config is None and ckpt is not None:
        cfg, source = config_from_checkpoint(args, path, ckpt)
    else:
        cfg = resolve_config(args)
        source = f"--config {args.config}" if args.config else f"the default config {DEFAULT_CONFIG}"
    if args.resume == "auto":
        path = find_resume_checkpoint(cfg.runtime.output_dir)
        if path is not None:
            ckpt = load_checkpoint(path)
            if args.config is None and source.startswith("the default"):
                cfg, source = config_from_checkpoint(args, path, ckpt)
    pretrained = load_weights_file(args.pretrained) if args.pretrained else None
    return Start(cfg, source, path, ckpt, pretrained)


def eval_weights(ckpt: dict, cfg: Config) -> tuple[dict, str]:
    """The weights `--eval` scores: the EMA ones when the run kept them (and eval_ema)."""
    from util.checkpoint import extract_state_dict

    if cfg.runtime.eval_ema and "ema" in ckpt:
        return ckpt["ema"]["model"], "EMA"
    return extract_state_dict(ckpt), "model"


def weights_loaded_after_build(args: argparse.Namespace, start: Start) -> tuple[dict | None, str]:
    """The state dict that will replace the freshly built model's weights, and its source."""
    if start.checkpoint is not None:
        weights = (eval_weights(start.checkpoint, start.cfg)[0] if args.eval
                   else start.checkpoint.get("model"))
        return weights, f"--resume {start.resume_path}"
    if start.pretrained is not None:
        return start.pretrained, f"--pretrained {args.pretrained}"
    return None, ""


def config_for_building(args: argparse.Namespace, start: Start) -> Config:
    """The config without the backbone download when a checkpoint's weights replace it anyway."""
    return without_replaced_download(start.cfg, *weights_loaded_after_build(args, start))


def without_replaced_download(cfg: Config, weights: dict | None, source: str) -> Config:
    """`cfg`, or a copy with model.backbone_weights=None when `weights` (loaded right after the
    model is built) hold the backbone's: downloading ImageNet weights would be wasted."""
    if cfg.model.backbone_weights is None or not has_backbone_weights(weights):
        check_backbone_weights_name(cfg.model.backbone, cfg.model.backbone_weights)
        return cfg
    log.info("model.backbone_weights=%s not loaded: the weights of %s replace the backbone's",
             cfg.model.backbone_weights, source)
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone_weights = None
    return cfg


def check_checkpoint_fits(args: argparse.Namespace, start: Start, model: torch.nn.Module) -> None:
    """--resume / --eval load strictly: the same tensors, the same shapes (checked before work)."""
    if start.checkpoint is None:
        return
    if not args.eval:
        check_training_checkpoint(start.checkpoint, start.resume_path)
    weights, source = weights_loaded_after_build(args, start)
    how = ("Drop --config to use the config stored in the checkpoint, or pass the one it was trained "
           "with." if args.config else "Pass --config NAME with the config it was trained with.")
    how += (f" To start from its weights anyway: --pretrained {start.resume_path} (imports what fits, "
            "reports the rest; --skip-mismatched keeps the model's own tensors where shapes differ).")
    check_state_dict_fits(model.state_dict(), weights, source, how)
