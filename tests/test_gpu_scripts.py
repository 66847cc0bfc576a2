"""The GPU scripts (tools/gpu_check.sh, tools/gpu_sweep.sh) in their CPU dry-run modes.

GPU time is scarce: a script that breaks while nobody has a GPU is found out only on the next GPU
run, and then costs that run. These tests run the scripts' plumbing (options, step table, budget,
the benchmark steps at tiny sizes) on every CI run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash scripts")


def _run(script: str, out: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(ROOT / "tools" / script), str(out)], env=full_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _steps(out: Path) -> dict[str, str]:
    """steps.md -> {step name: status}."""
    rows = [line.split("|") for line in (out / "steps.md").read_text().splitlines()[2:]]
    return {cells[1].strip(): cells[2].strip() for cells in rows if len(cells) > 3}


def test_gpu_check_usage_error_without_output_dir():
    result = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_gpu_check_dry_run_runs_the_benchmark_steps(tmp_path):
    # pytest (this suite), bench_model and train (main.py) have their own tests; the rest runs here
    result = _run("gpu_check.sh", tmp_path, GPU_CHECK_DRY_RUN="1", GPU_CHECK_SKIP="pytest bench_model train")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = _steps(tmp_path)
    assert steps["bench_ops"] == "ok", (tmp_path / "bench_ops.log").read_text()[-3000:]
    assert steps["bench_matcher"] == "ok", (tmp_path / "bench_matcher.log").read_text()[-3000:]
    assert steps["pytest"].startswith("skipped") and steps["train"].startswith("skipped")
    assert steps["bench_official"] == "skipped (no OFFICIAL_DINO)"
    assert "| ours |" in (tmp_path / "bench_ops.md").read_text()
    matcher_log = (tmp_path / "bench_matcher.log").read_text()
    assert "l1 cost" in matcher_log and "bins cost" in matcher_log
    env_md = (tmp_path / "env.md").read_text()
    assert "- commit:" in env_md and "torch" in env_md


def test_gpu_check_stops_starting_steps_when_the_budget_is_spent(tmp_path):
    result = _run("gpu_check.sh", tmp_path, GPU_CHECK_DRY_RUN="1", GPU_CHECK_BUDGET="15")
    assert result.returncode == 0
    steps = _steps(tmp_path)
    ran = [name for name, status in steps.items() if not status.startswith("skipped")]
    assert ran == [], steps
    assert steps["bench_ops"].startswith("skipped (budget of 15 s used)")


def test_gpu_sweep_dry_run_validates_both_sweeps_and_trains_nothing(tmp_path):
    result = _run("gpu_sweep.sh", tmp_path, GPU_SWEEP_DRY_RUN="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = _steps(tmp_path)
    assert steps["scratch"] == "dry run: ok" and steps["finetune"] == "dry run: ok", steps
    assert sum(name.startswith("gradvar_seed") for name in steps) == 5
    assert not (tmp_path / "gpu_scratch" / "runs").exists()
