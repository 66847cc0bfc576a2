"""tools/sweep.py: spec validation (errors name the line), the statistics against scipy, the shipped
specs, and a tiny real sweep killed mid-way and rerun."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tools import sweep, sweep_stats

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
name = "t"
base = "dino_tiny"
overrides = ["optim.batch_size=2"]
steps = 3
seeds = [0, 1]
baseline = "dino"
processes = 1
threads = 1

[variants.dino]
overrides = ["ugs.ablation=l1"]

[variants.ugs]
overrides = ["ugs.ablation=full"]
"""


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def test_a_valid_spec_plans_every_variant_and_seed(tmp_path):
    spec = sweep.load_spec(_spec(tmp_path, f'out = "{tmp_path / "o"}"\n' + GOOD), cores=2)
    runs = sweep.plan_runs(spec)
    assert [r.name for r in runs] == ["dino/seed0", "ugs/seed0", "dino/seed1", "ugs/seed1"]
    cmd = sweep.command(spec, runs[1])
    assert cmd[cmd.index("--resume") + 1] == "auto"
    opts = cmd[cmd.index("--opt") + 1: cmd.index("--resume")]
    assert opts[:2] == ["optim.batch_size=2", "ugs.ablation=full"] and "runtime.seed=0" in opts
    assert "runtime.max_steps=3" in opts and f"runtime.output_dir={tmp_path / 'o' / 'runs' / 'ugs' / 'seed0'}" in opts


@pytest.mark.parametrize("edit, line, message", [
    (lambda t: t.replace('steps = 3', 'steps = 3\nstpes = 4'), 5, "unknown key 'stpes'"),
    (lambda t: t.replace('overrides = ["ugs.ablation=full"]', 'overrides = ["ugs.ablation=full"]\nseed = 2'),
     15, "unknown key 'seed' in [variants.ugs]"),
    (lambda t: t.replace('"ugs.ablation=full"', '"ugs.ablation=full", "ugs.loss.um_wieght=0.1"'), 14,
     "ugs.loss.um_wieght"),
    (lambda t: t.replace('"optim.batch_size=2"', '"optim.batch_size=0"'), 3, "optim.batch_size"),
    (lambda t: t.replace('baseline = "dino"', 'baseline = "l1"'), 6, "baseline 'l1' is not one of"),
    (lambda t: t.replace('processes = 1', 'processes = 3'), 7, "exceeds the 2 CPU cores"),
    (lambda t: t + '\n[variants.ft]\nstart_from = "pretrain"\n', 17, "stage 'pretrain', which is not defined"),
    (lambda t: t.replace('seeds = [0, 1]', 'seeds = [0, 0]'), 5, "distinct integers"),
    (lambda t: t + 'baseline = "dino_x10"\n', 15, "baseline 'dino_x10' must be another variant"),
    (lambda t: t.replace('["ugs.ablation=l1"]', '["ugs.ablation=l1"]\nbaseline = "ugs"'), 12,
     "is the spec's baseline and cannot have one"),
])
def test_a_bad_spec_fails_before_running_and_names_the_line(tmp_path, edit, line, message):
    path = _spec(tmp_path, edit(GOOD))
    with pytest.raises(sweep.SpecError) as err:
        sweep.load_spec(path, cores=2)
    assert f"{path}:{line}:" in str(err.value) and message in str(err.value)


def test_missing_keys_and_bad_toml_are_errors(tmp_path):
    with pytest.raises(sweep.SpecError, match="missing required key 'baseline'"):
        sweep.load_spec(_spec(tmp_path, GOOD.replace('baseline = "dino"\n', "")), cores=2)
    with pytest.raises(sweep.SpecError, match="not valid TOML"):
        sweep.load_spec(_spec(tmp_path, GOOD + "[variants.x\n"), cores=2)
    # the command line: exit 2 and the message on stderr, nothing run
    res = subprocess.run([sys.executable, "tools/sweep.py", str(_spec(tmp_path, GOOD.replace("dino_tiny", "nope")))],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown config 'nope'" in res.stderr
    assert not (ROOT / "outputs" / "sweeps" / "spec").exists()


@pytest.mark.parametrize("name", ["finetune", "scratch"])
def test_shipped_specs_parse_and_every_variant_loads(name):
    spec = sweep.load_spec(ROOT / "configs" / "sweeps" / f"{name}.toml", cores=2)
    assert len(spec.seeds) >= 3 and spec.processes * spec.threads <= 2
    names = set(spec.variants)
    assert {"dino_l1", "ugs_full", "ugs_full_head_x10", "ugs_ce_uniform", "ugs_ce_in", "ugs_ce_in_um",
            "smooth_l1", "smooth_l1_ninth", "ugs_full_no_giou"} <= names and spec.baseline == "dino_l1"
    from configs import load_config

    for v in spec.variants.values():
        cfg = load_config(spec.base, spec.overrides + v["overrides"])
        assert cfg.data.synthetic_small_side_px[0] == 3.0  # the dense small-object data
    full = load_config(spec.base, spec.overrides + spec.variants["ugs_full"]["overrides"])
    assert (full.ugs.loss.um_weight, full.ugs.ur.weight, full.ugs.ur.rho, full.ugs.grid.alpha) == (0.5, 0.5, 0.5, 1.0)
    assert full.optim.lr_box_head_last_mult == 1.0
    x10 = load_config(spec.base, spec.overrides + spec.variants["ugs_full_head_x10"]["overrides"])
    assert x10.optim.lr_box_head_last_mult == 10.0
    # UGS at 10x is compared with L1 at 10x, so a gain of the optimiser trick is never UGS's
    assert spec.variants["ugs_full_head_x10"]["baseline"] == "dino_l1_head_x10"
    assert spec.variants["ugs_full"]["baseline"] == "dino_l1"
    chained = copy.deepcopy(spec)  # a baseline's own baseline is kept too
    sweep.select(chained, "ugs_full_head_x10_bins_match", None)
    assert set(chained.variants) == {"dino_l1", "dino_l1_head_x10", "ugs_full_head_x10",
                                     "ugs_full_head_x10_bins_match"}
    sweep.select(spec, "ugs_full_head_x10", None)
    assert set(spec.variants) == {"dino_l1", "dino_l1_head_x10", "ugs_full_head_x10"}
    if name == "finetune":
        assert spec.stages and all(v["start_from"] == "pretrain" for v in spec.variants.values())
        stage = load_config(spec.base, spec.overrides + spec.stages["pretrain"]["overrides"])
        assert not stage.ugs.enabled  # the shared pretraining is DINO with L1
    else:
        assert not spec.stages


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs" / "sweeps").glob("*.toml")
                                         if not p.stem.startswith("gpu_")))
def test_every_cpu_spec_loads_every_variant_and_stage(name):
    from configs import load_config

    spec = sweep.load_spec(ROOT / "configs" / "sweeps" / f"{name}.toml", cores=2)
    assert len(spec.seeds) >= 3 and spec.processes * spec.threads <= 2 and spec.baseline in spec.variants
    for v in list(spec.variants.values()) + list(spec.stages.values()):
        load_config(spec.base, spec.overrides + v["overrides"])


def test_grid_search_spec_gives_both_arms_the_same_budget():
    """R and n for UGS against loss weights for L1: as many candidates each, every one at 10x and
    compared with its own arm's defaults; the search seeds are not the evaluation seeds."""
    from configs import load_config

    spec = sweep.load_spec(ROOT / "configs" / "sweeps" / "finetune_grid_search.toml", cores=2)
    arms: dict[str, list] = {"dino_l1_head_x10": [], "ugs_full_head_x10": []}
    for name, v in spec.variants.items():
        if name not in arms:
            arms[v["baseline"]].append(name)
    assert len(arms["dino_l1_head_x10"]) == len(arms["ugs_full_head_x10"]) == 4
    grids = set()
    for name in arms["ugs_full_head_x10"] + ["ugs_full_head_x10"]:
        cfg = load_config(spec.base, spec.overrides + spec.variants[name]["overrides"])
        assert cfg.ugs.enabled and cfg.optim.lr_box_head_last_mult == 10.0
        grids.add((cfg.ugs.grid.range, cfg.ugs.grid.intervals))
    assert grids == {(4.0, 16), (2.0, 16), (8.0, 16), (4.0, 8), (4.0, 32)}
    for name in arms["dino_l1_head_x10"]:
        cfg = load_config(spec.base, spec.overrides + spec.variants[name]["overrides"])
        assert not cfg.ugs.enabled and cfg.optim.lr_box_head_last_mult == 10.0
    assert {10, 11} <= set(spec.seeds) and {0, 1, 2} <= set(spec.seeds)


# ----------------------------------------------------------------------------- statistics

def test_paired_t_interval_and_summary_against_scipy():
    rng = np.random.default_rng(0)
    base = rng.normal(0.30, 0.02, 5)
    ugs = base + rng.normal(0.01, 0.005, 5)
    mean, low, high = sweep_stats.paired_t_interval(list(ugs - base))
    ci = stats.ttest_rel(ugs, base).confidence_interval(0.95)
    assert mean == pytest.approx(float(np.mean(ugs - base)), rel=1e-12)
    assert (low, high) == (pytest.approx(ci.low, rel=1e-10), pytest.approx(ci.high, rel=1e-10))
    m, sd = sweep_stats.mean_std(list(base))
    assert (m, sd) == (pytest.approx(base.mean(), rel=1e-12), pytest.approx(base.std(ddof=1), rel=1e-12))
    assert math.isnan(sweep_stats.paired_t_interval([0.1])[1])

    runs = {}
    for s in range(5):
        for v, arr in (("dino", base), ("ugs", ugs)):
            runs[(v, s)] = {"final": {"AP": arr[s], "AP50": 2 * arr[s], "APs": arr[s], "APm": 0.5, "AR": 0.4},
                            "wall_s": 10.0 + s, "steps_per_s": 2.0}
    doc = sweep_stats.summarize(runs, ["dino", "ugs"], list(range(5)), "dino")
    d = doc["variants"]["ugs"]["delta_vs_baseline"]
    assert d["APs"]["ci95"] == [pytest.approx(ci.low, rel=1e-10), pytest.approx(ci.high, rel=1e-10)]
    assert d["AP50"]["mean"] == pytest.approx(2 * float(np.mean(ugs - base)), rel=1e-10)
    assert doc["variants"]["dino"]["AP"]["std"] == pytest.approx(base.std(ddof=1), rel=1e-12)
    assert doc["variants"]["dino"]["wall_s"]["mean"] == pytest.approx(12.0)
    assert doc["variants"]["ugs"]["AP_smallest"]["mean"] == pytest.approx(ugs.mean())

    # a variant with its own baseline (listed after it): deltas against that one
    for s in range(5):
        runs[("ugs_x10", s)] = {"final": {"AP": ugs[s] + 0.02, "APs": ugs[s] + 0.02}, "wall_s": 1.0, "steps_per_s": 1.0}
        runs[("dino_x10", s)] = {"final": {"AP": base[s] + 0.05, "APs": base[s] + 0.05}, "wall_s": 1.0, "steps_per_s": 1.0}
    doc = sweep_stats.summarize(runs, ["dino", "ugs", "ugs_x10", "dino_x10"], list(range(5)), "dino",
                                {"ugs_x10": "dino_x10"})
    x10 = doc["variants"]["ugs_x10"]
    assert x10["baseline"] == "dino_x10" and doc["variants"]["dino_x10"]["baseline"] == "dino"
    assert x10["delta_vs_baseline"]["APs"]["mean"] == pytest.approx(float(np.mean(ugs - base)) - 0.03, rel=1e-10)
    assert x10["small_object_verdict"] == "not reproduced"
    text = sweep_stats.results_markdown(doc, "t", "cmd")
    assert "| ugs_x10 | dino_x10 | " in text and "| ugs | dino | " in text


def test_verdict_rule_and_smallest_bucket():
    assert sweep_stats.ap_verdict([0.02, 0.015, 0.011]) == "reproduced"
    assert sweep_stats.ap_verdict([0.03, 0.02, -0.001]) == "inconclusive"  # not positive in every seed
    assert sweep_stats.ap_verdict([0.005, 0.004, 0.006]) == "inconclusive"  # below +0.010
    assert sweep_stats.ap_verdict([0.01, -0.02, 0.0]) == "not reproduced"
    assert sweep_stats.ap_verdict([0.05, 0.011, 0.012], require_interval=True) == "inconclusive"  # CI spans 0
    assert sweep_stats.smallest_bucket_ap({"APs": -1.0, "APm": 0.3}) == (0.3, "APm")
    assert sweep_stats.smallest_bucket_ap({"APs": 0.2, "APm": 0.3}) == (0.2, "APs")


# ----------------------------------------------------------------------------- a real sweep, killed

TINY_RUN = """\
name = "tiny"
base = "dino_tiny"
overrides = ["data.synthetic_train_images=4", "data.synthetic_val_images=2",
  "data.synthetic_image_size=[64,64]", "data.synthetic_min_objects=1", "data.synthetic_max_objects=4",
  "data.train_policy=none", "data.eval_policy=none", "data.num_workers=0",
  "model.backbone=timm:resnet10t", "model.return_interm_indices=[2,3,4]", "model.num_feature_levels=4",
  "model.hidden_dim=32", "model.dim_feedforward=64", "model.enc_layers=1", "model.dec_layers=2",
  "model.num_queries=20", "model.dn_number=2", "eval.max_dets=20", "eval.num_select=20",
  "optim.batch_size=2", "optim.epochs=2", "eval.num_draw_images=0", "runtime.checkpoint_interval=0"]
steps = 3
seeds = [0, 1]
baseline = "dino"
processes = PROCS
threads = 1
checkpoint_every = 1
out = "OUT"

[variants.dino]
overrides = ["ugs.ablation=l1"]

[variants.ugs]
overrides = ["ugs.ablation=ce_in_um"]
"""


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "log.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_a_tiny_sweep_killed_and_rerun_finishes_without_redoing_finished_runs(tmp_path):
    procs = 2 if (os.cpu_count() or 1) >= 2 else 1
    out = tmp_path / "out"
    path = _spec(tmp_path, TINY_RUN.replace("PROCS", str(procs)).replace("OUT", str(out)))
    cmd = [sys.executable, "tools/sweep.py", str(path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    runs = [out / "runs" / v / f"seed{s}" for s in (0, 1) for v in ("dino", "ugs")]
    deadline = time.time() + 900
    try:
        while time.time() < deadline:  # kill once a run is done and another has a mid-run checkpoint
            done = [r for r in runs if (r / sweep.DONE_FILE).is_file()]
            partial = [r for r in runs if r not in done and (r / "checkpoint_last.pth").is_file()
                       and (r / "log.jsonl").is_file() and 1 <= max(_steps(r), default=0) < 3]
            if done and partial:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        else:
            pytest.fail("the sweep did not reach a finished run and a partial one in time")
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its main.py children, no clean-up
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finished = {r: (r / sweep.DONE_FILE).stat().st_mtime_ns for r in runs if (r / sweep.DONE_FILE).is_file()}
    interrupted = [r for r in runs if r not in finished and (r / "checkpoint_last.pth").is_file()]
    assert finished and interrupted

    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(finished)} of 4 runs already finished: skipped" in res.stdout
    for r, mtime in finished.items():  # not rerun: same marker, one attempt in its log
        assert (r / sweep.DONE_FILE).stat().st_mtime_ns == mtime
        assert (r / "stdout.log").read_text().count("=== sweep attempt") == 1
    for r in interrupted:  # resumed from its checkpoint, not restarted
        text = (r / "stdout.log").read_text()
        assert text.count("=== sweep attempt") == 2 and "resumed" in text
        assert "from step 0:" not in text.split("=== sweep attempt")[-1]
    for r in runs:
        assert (r / sweep.DONE_FILE).is_file() and _steps(r) == [1, 2, 3], r  # each step logged once
    doc = json.loads((out / "results.json").read_text())
    assert doc["variants"]["dino"]["seeds_done"] == [0, 1] == doc["variants"]["ugs"]["seeds_done"]
    assert set(doc["variants"]["ugs"]["delta_vs_baseline"]["APs"]["per_seed"]) == {"0", "1"}
    assert (out / "results.md").is_file() and (out / "plots" / "ap_vs_step.png").stat().st_size > 1000
    assert (out / "plots" / "deltas.png").is_file()
