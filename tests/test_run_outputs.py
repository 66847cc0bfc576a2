"""What a run leaves in its directory (main.run with the tiny fakes of tests/engine_fakes.py):
per-epoch checkpoints pruned to runtime.keep_checkpoints, the data report, strict JSON."""
from __future__ import annotations

import json

import pytest

from tests.engine_fakes import reset_accelerate, run_fake


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()


def test_run_keeps_only_the_newest_epoch_checkpoints_and_writes_the_data_report(tmp_path):
    out = tmp_path / "run"
    run_fake(out, ["optim.epochs=4", "runtime.checkpoint_interval=1", "runtime.keep_checkpoints=2"])
    names = sorted(p.name for p in out.glob("checkpoint*.pth"))
    assert names == ["checkpoint_best.pth", "checkpoint_epoch0003.pth", "checkpoint_epoch0004.pth",
                     "checkpoint_last.pth"]
    report = json.loads((out / "data_report.json").read_text())
    assert set(report) == {"train", "val"} and report["train"]["skipped"] == {}
    assert report["train"]["images"] == 8


def test_main_accepts_opt_repeated_and_several_after_one():
    from main import parse_args

    args = parse_args(["--opt", "a.b=1", "c.d=2", "--opt", "e.f=3"])
    assert args.opt == ["a.b=1", "c.d=2", "e.f=3"]


def test_json_files_write_null_for_missing_numbers(tmp_path):
    import torch

    from util.logging import RunLogger, write_json_atomic

    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log_step({"step": 1, "loss": torch.tensor(float("nan")), "lr": 1e-4})
    logger.log_metrics({"AP": 0.25, "APl": float("nan"), "AR": float("inf"),
                        "per_class": [{"AP": float("nan")}]}, epoch=0, step=1)
    logger.close()
    for name in ("metrics.json", "metrics_history.jsonl", "log.jsonl"):
        assert "nan" not in (tmp_path / name).read_text().lower(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["APl"] is None and metrics["AR"] is None and metrics["AP"] == 0.25
    assert metrics["per_class"] == [{"AP": None}]
    assert json.loads((tmp_path / "log.jsonl").read_text())["loss"] is None
    write_json_atomic(tmp_path / "r.json", [{"score": float("nan"), "bbox": [1.0, float("-inf")]}])
    assert json.loads((tmp_path / "r.json").read_text()) == [{"score": None, "bbox": [1.0, None]}]


def test_tensorboard_default_is_silent_when_not_installed(tmp_path, caplog, monkeypatch):
    import logging
    import sys

    import util.logging as run_logging
    from configs import Config

    assert Config().runtime.tensorboard is None        # auto: on only when installed
    monkeypatch.setattr(run_logging, "tensorboard_installed", lambda: False)
    with caplog.at_level(logging.DEBUG):
        logger = run_logging.RunLogger(tmp_path / "auto", tensorboard=None)
    assert logger._tb is None and not any("ensorBoard" in r.getMessage() for r in caplog.records)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        logger = run_logging.RunLogger(tmp_path / "asked", tensorboard=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert logger._tb is None and len(warnings) == 1 and "runtime.tensorboard=null" in warnings[0]
