"""Checkpoint retention (runtime.keep_checkpoints): per-epoch copies beyond N are deleted oldest
first; checkpoint_last.pth and checkpoint_best.pth always stay."""
from __future__ import annotations

from pathlib import Path

import pytest

from configs import ConfigError, Config, apply_overrides
from util.checkpoint import prune_epoch_checkpoints


def _touch(directory: Path, names: list[str]) -> None:
    for name in names:
        (directory / name).write_bytes(b"x")


def test_prune_keeps_newest_epochs_and_never_last_or_best(tmp_path):
    epochs = [f"checkpoint_epoch{e:04d}.pth" for e in (1, 2, 3, 10, 11)]
    _touch(tmp_path, ["checkpoint_last.pth", "checkpoint_best.pth", "model.safetensors",
                      "checkpoint_epoch_notes.pth", *epochs])
    deleted = prune_epoch_checkpoints(tmp_path, 2)
    assert [p.name for p in deleted] == epochs[:3]          # oldest first, by epoch number
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoint_last.pth", "checkpoint_best.pth", "model.safetensors", "checkpoint_epoch_notes.pth",
         "checkpoint_epoch0010.pth", "checkpoint_epoch0011.pth"])
    assert prune_epoch_checkpoints(tmp_path, 2) == []
    assert [p.name for p in prune_epoch_checkpoints(tmp_path, 0)] == epochs[3:]
    assert (tmp_path / "checkpoint_last.pth").is_file() and (tmp_path / "checkpoint_best.pth").is_file()


def test_keep_all_and_config_default(tmp_path):
    _touch(tmp_path, [f"checkpoint_epoch{e:04d}.pth" for e in range(5)])
    assert prune_epoch_checkpoints(tmp_path, -1) == [] and len(list(tmp_path.iterdir())) == 5
    assert Config().runtime.keep_checkpoints == 2
    with pytest.raises(ConfigError, match="runtime.keep_checkpoints"):
        apply_overrides(Config(), ["runtime.keep_checkpoints=-2"])
