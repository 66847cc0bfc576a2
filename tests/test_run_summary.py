"""The end-of-run summary and the progress bar's planned step count."""
from __future__ import annotations

import math
from pathlib import Path

from util.engine import TrainSettings, TrainState, planned_steps
from util.run_summary import format_duration, run_summary


def test_format_duration() -> None:
    assert format_duration(52.4) == "52 s"
    assert format_duration(245.0) == "4 min 05 s"
    assert format_duration(600) == "10 min 00 s"


def test_summary_names_metrics_and_only_the_files_that_exist(tmp_path: Path) -> None:
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "ap_history.png").write_bytes(b"png")
    (tmp_path / "metrics.json").write_text("{}")
    metrics = {"AP50": 0.5234, "AP": 0.3712, "APs": math.nan, "AR": 0.6, "num_images": 64, "max_dets": 100}
    text = run_summary(metrics, tmp_path, steps=1200, seconds=240.0)
    lines = text.splitlines()
    assert lines[0] == "finished: 1200 training steps in 4 min 00 s, 5.00 steps/s (evaluations included)"
    assert lines[1] == "final evaluation (64 images, maxDets 100): AP50 0.523, AP 0.371, APs n/a, AR 0.600"
    assert lines[2] == f"plots: {tmp_path / 'plots' / 'ap_history.png'}"  # loss_curves.png is absent
    assert lines[3] == f"results: {tmp_path / 'metrics.json'}"
    assert run_summary(None, tmp_path / "empty", steps=0, seconds=0.0).splitlines() == [
        "finished: 0 training steps in 0 s (evaluations included)", "no evaluation in this run"]


def test_planned_steps_prefers_the_runs_plan_then_max_steps_then_the_epochs_end() -> None:
    loader = list(range(10))  # 10 batches
    state = TrainState(step=30)
    assert planned_steps(TrainSettings(total_steps=100, max_steps=50), state, loader) == 100
    assert planned_steps(TrainSettings(max_steps=50), state, loader) == 50
    assert planned_steps(TrainSettings(), state, loader) == 40
    assert planned_steps(TrainSettings(), state, loader, accumulation_steps=2) == 35
    assert planned_steps(TrainSettings(), state, iter(loader)) == 0  # no length: no ETA
