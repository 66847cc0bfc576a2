"""Typed, composable configs.

`load_config("dino_5scale_r50_coco", overrides=["model.num_queries=300"])` returns a `Config`.
A name is a module in this package exposing `config() -> Config` (variants import their base
and change a few fields); a path is a `.py` file with such a function or a `.json` dump written
by `dump_config`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import pkgutil
from pathlib import Path

from configs.overrides import ConfigError, apply_overrides, dump_config, from_dict, to_dict
from configs.schema import Config

_NOT_CONFIGS = {"overrides", "schema", "model", "data", "ugs", "train", "official", "errors"}


def available_configs() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)])
                  if not m.ispkg and m.name not in _NOT_CONFIGS and not m.name.startswith("_"))


def _from_python_file(path: Path) -> Config:
    spec = importlib.util.spec_from_file_location(f"_user_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ConfigError(f"config file {path} must define a function config() -> Config")
    return module.config()


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """Resolve a named config or a file, then apply dotted `key=value` overrides."""
    path = Path(name_or_path)
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} holds a {type(data).__name__}, expected a JSON object")
        cfg = from_dict(Config, data)
    elif path.suffix == ".py":
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        cfg = _from_python_file(path)
    else:
        if name_or_path not in available_configs():
            raise ConfigError(f"unknown config '{name_or_path}'; available: {available_configs()} "
                              "(or pass a path to a .py or .json config)")
        cfg = importlib.import_module(f"configs.{name_or_path}").config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"config '{name_or_path}' did not produce a configs.Config")
    return apply_overrides(cfg, overrides)


def stored_config(checkpoint_path: str | Path, checkpoint: dict | None = None) -> tuple[Config, str] | None:
    """The config a checkpoint was made with, and where it came from; None when it has none.

    Looked up in this order: the checkpoint's "config" entry (our training checkpoints), its
    "args" (official DINO checkpoints), then config.json beside the file (a safetensors export,
    or tools/import_official.py's output folder).
    """
    path = Path(checkpoint_path)
    if checkpoint is not None and isinstance(checkpoint.get("config"), dict):
        try:
            return from_dict(Config, checkpoint["config"]), f"the config stored in {path}"
        except ConfigError as err:
            raise ConfigError(f"{path}: its stored config does not fit this code ({err}); "
                              "pass --config NAME to build the model from one of ours") from None
    if checkpoint is not None and "args" in checkpoint:
        return from_official_args(checkpoint["args"]), f"the official arguments stored in {path}"
    beside = path.parent / "config.json"
    if beside.is_file():
        return load_config(str(beside)), f"{beside} (beside {path.name})"
    return None


def from_official_args(args):  # noqa: ANN001 - dict or argparse.Namespace
    """Turn an official DINO argument set into our Config (see configs/official.py)."""
    from configs.official import from_official_args as convert

    return convert(args)


__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "dump_config",
           "from_dict", "to_dict", "available_configs", "from_official_args", "stored_config"]
