"""`runtime.profile_steps`: util/profiling.StepProfiler in the training loop (main.run with the tiny
fakes of tests/engine_fakes.py) and on its own."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.engine_fakes import fake_config, reset_accelerate, run_fake
from util.profiling import StepProfiler


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()


def test_training_run_profiles_the_requested_steps_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_fake(out, ["runtime.profile_skip=1", "runtime.profile_steps=2"])  # 4 steps per epoch, 2 epochs
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_before"] == 1
    assert summary["wall_ms"] > 0 and summary["launches"] > 10 and summary["data_wait_ms"] >= 0
    assert summary["categories_ms"] and sum(summary["categories_ms"].values()) > 0
    assert any("aten::" in name for name in summary["top_ms"])
    text = (out / "profile" / "summary.md").read_text()
    assert text.startswith("### 2 training steps after 1 warm ones:") and "waiting for the data loader" in text
    trace = json.loads((out / "profile" / "trace.json").read_text())
    assert len(trace["traceEvents"]) > 10


def test_profile_longer_than_the_epoch_ends_with_the_epoch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_fake(out, ["runtime.profile_skip=1", "runtime.profile_steps=50"])
    assert json.loads((out / "profile" / "summary.json").read_text())["steps"] == 3  # steps 2-4 of epoch 0


def test_no_profile_by_default_and_negative_counts_are_config_errors(tmp_path: Path) -> None:
    from configs import ConfigError

    out = tmp_path / "run"
    run_fake(out, ["runtime.max_steps=2"])
    assert not (out / "profile").exists()
    with pytest.raises(ConfigError, match="runtime.profile_steps"):
        fake_config(tmp_path / "bad", ["runtime.profile_steps=-1"]).check()


def test_step_profiler_counts_the_loader_wait_between_steps(tmp_path: Path) -> None:
    profiler = StepProfiler(tmp_path, skip=1, steps=2, device=torch.device("cpu"))
    x = torch.randn(32, 32)
    for step in range(5):
        if step in (2, 3):
            time.sleep(0.05)  # a slow loader before steps 2 and 3
        profiler.batch_ready()
        (x @ x).sum()
        profiler.step_done()
    summary = json.loads((tmp_path / "summary.json").read_text())
    # profiled: steps 1 and 2 (0-based); only the wait before step 2 lies inside the profile
    assert summary["steps"] == 2 and 40 <= summary["data_wait_ms"] < 500
    assert profiler.finish() is None  # once
    with pytest.raises(ValueError, match="steps >= 1"):
        StepProfiler(tmp_path, skip=0, steps=0, device=torch.device("cpu"))
