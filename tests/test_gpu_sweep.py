"""The GPU sweep (configs/sweeps/gpu_*.toml, tools/gpu_sweep.sh) without a GPU and without
training: the specs are the CPU specs' variants at more seeds, steps and pixels, every run they
plan loads its config, the script's dry run lists every run, the command line's `--opt` reaches
every run, and the scenes the script writes to disk are exactly the ones generated in memory."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from configs import load_config
from tools import sweep

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "configs" / "sweeps"
PAIRS = [("gpu_scratch", "scratch"), ("gpu_finetune", "finetune")]


@pytest.mark.parametrize("gpu_name, cpu_name", PAIRS)
def test_gpu_specs_scale_the_cpu_specs_and_every_run_loads(gpu_name, cpu_name):
    gpu = sweep.load_spec(SPECS / f"{gpu_name}.toml", cores=16)
    cpu = sweep.load_spec(SPECS / f"{cpu_name}.toml", cores=2)
    # every variant of the CPU spec, with the same overrides and baseline
    assert {k: v["overrides"] for k, v in gpu.variants.items()} == {k: v["overrides"] for k, v in cpu.variants.items()}
    assert len(gpu.variants) == 12 and gpu.baseline == cpu.baseline == "dino_l1"
    assert set(cpu.seeds) < set(gpu.seeds) and len(gpu.seeds) >= 5
    assert gpu.steps >= 1.5 * cpu.steps
    assert gpu.processes * gpu.threads <= 16  # one GPU machine's host cores
    runs = sweep.plan_runs(gpu)
    assert len(runs) == len(gpu.variants) * len(gpu.seeds) + len(gpu.stages)
    for run in runs:  # exactly the overrides main.py gets
        cmd = sweep.command(gpu, run)
        cfg = load_config(cmd[cmd.index("--config") + 1], cmd[cmd.index("--opt") + 1: cmd.index("--resume")])
        cfg.check_detections_per_image()
        h, w = cfg.data.synthetic_image_size
        assert h * w >= 4 * 128 * 128 and cfg.data.synthetic_small_side_px == (3.0, 7.0, 16.0)
        assert cfg.model.num_queries >= cfg.data.synthetic_max_objects  # every object can be matched
        assert cfg.eval.max_dets > cfg.data.synthetic_max_objects
        evaluated = set(range(cfg.eval.interval, cfg.optim.epochs + 1, cfg.eval.interval)) | {cfg.optim.epochs}
        assert len(evaluated) >= 3  # the AP-vs-step curves
        assert cfg.model.matcher_threads == 1 and cfg.runtime.num_threads == 1  # one host core per run
        steps_per_epoch = cfg.data.synthetic_train_images // cfg.optim.batch_size
        assert cfg.optim.epochs * steps_per_epoch == run.steps and cfg.optim.lr_drop == cfg.optim.epochs - 1
    if gpu.stages:
        assert all(v["start_from"] == "pretrain" for v in gpu.variants.values())
        assert gpu.stages["pretrain"]["seed"] not in gpu.seeds
    full = load_config(gpu.base, gpu.overrides + gpu.variants["ugs_full"]["overrides"])
    assert (full.ugs.loss.um_weight, full.ugs.ur.weight, full.optim.lr_box_head_last_mult) == (0.5, 0.5, 1.0)


def test_convergence_spec_follows_the_deciding_variants_well_past_the_equal_budget():
    conv = sweep.load_spec(SPECS / "gpu_convergence.toml", cores=16)
    scratch = sweep.load_spec(SPECS / "gpu_scratch.toml", cores=16)
    assert conv.steps >= 3 * scratch.steps and conv.baseline == "dino_l1" and len(conv.seeds) >= 3
    # both head multipliers on both sides, and the paper's Smooth-L1 baseline, as in the other specs
    assert set(conv.variants) == {"dino_l1", "dino_l1_head_x10", "ugs_full", "ugs_full_head_x10", "smooth_l1"}
    assert all(conv.variants[k]["overrides"] == scratch.variants[k]["overrides"] for k in conv.variants)
    for run in sweep.plan_runs(conv):
        cmd = sweep.command(conv, run)
        cfg = load_config(cmd[cmd.index("--config") + 1], cmd[cmd.index("--opt") + 1: cmd.index("--resume")])
        steps_per_epoch = cfg.data.synthetic_train_images // cfg.optim.batch_size
        assert cfg.optim.epochs * steps_per_epoch == run.steps
        assert len(range(cfg.eval.interval, cfg.optim.epochs + 1, cfg.eval.interval)) >= 8  # a curve to see flatten
        assert cfg.optim.lr_drop < cfg.optim.epochs  # the drop happens before the end


def test_command_line_overrides_reach_every_run_and_are_validated(tmp_path):
    extra = ["data.dataset=coco", "data.train_images=a", "data.train_annotations=b.json",
             "data.val_images=c", "data.val_annotations=d.json"]
    spec = sweep.load_spec(SPECS / "gpu_finetune.toml", cores=16, extra_overrides=extra)
    for run in sweep.plan_runs(spec):
        opts = run.overrides
        assert opts[len(spec.overrides) - len(extra): len(spec.overrides)] == extra  # after the spec's shared ones
    with pytest.raises(sweep.SpecError, match="data.no_such_key"):
        sweep.load_spec(SPECS / "gpu_scratch.toml", cores=16, extra_overrides=["data.no_such_key=1"])
    res = subprocess.run([os.sys.executable, "tools/sweep.py", str(SPECS / "gpu_scratch.toml"), "--gpus", "0",
                          "--variants", "ugs_full", "--seeds", "3", "--out", str(tmp_path / "o"), "--dry-run",
                          "--opt", "optim.clip_max_norm=0.2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stdout.splitlines() if "main.py" in x]
    assert len(lines) == 2 and all("optim.clip_max_norm=0.2" in x and "runtime.seed=3" in x for x in lines)
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_dry_run_of_the_script_lists_every_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_SWEEP_DRY_RUN="1", PYTHON=os.sys.executable, OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", str(ROOT / "tools" / "gpu_sweep.sh"), str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout
    for name in ("gpu_scratch", "gpu_finetune"):
        spec = sweep.load_spec(SPECS / f"{name}.toml", cores=16)
        for variant in spec.variants:
            for seed in spec.seeds:
                line = [x for x in text.splitlines()
                        if f"runtime.output_dir={out / name / 'runs' / variant / f'seed{seed}'} " in x]
                assert len(line) == 1, (name, variant, seed)
                assert f"runtime.seed={seed} " in line[0] and "data.dataset=coco" in line[0]
                assert f"data.train_annotations={out / 'data' / 'train' / 'annotations.json'}" in line[0]
                if spec.stages:
                    assert f"--pretrained {out / name / 'stages' / 'pretrain' / 'checkpoint_last.pth'}" in line[0]
        assert sum(f"runtime.output_dir={out / name / 'stages'}" in x for x in text.splitlines()) == len(spec.stages)
    for seed in range(5):
        assert re.search(rf"tools/gradvar.py .*--device cuda --seeds {seed} --windows 50,300,600 .*--noise-batches 100", text)
    merge = [x for x in text.splitlines() if "tools/gradvar_merge.py" in x]
    assert len(merge) == 1 and all(f"{out / 'gradvar' / f'seed{s}'}" in merge[0] for s in range(5))
    assert "tools/make_synthetic.py" in text and "--clutter 96" in text
    steps = (out / "steps.md").read_text()
    assert "| scratch | dry run: ok |" in steps and "| finetune | dry run: ok |" in steps
    assert not (out / "gpu_scratch").exists() and not (out / "data").exists()  # nothing trained or written


def test_scenes_written_to_disk_are_the_scenes_generated_in_memory(tmp_path):
    from datasets import build_dataset
    from tools import make_synthetic

    opts = ["data.synthetic_image_size=[64,80]", "data.synthetic_min_objects=20", "data.synthetic_max_objects=40",
            "data.synthetic_max_ignored_regions=2", "data.synthetic_clutter=12", "data.synthetic_train_images=3",
            "data.synthetic_small_side_px=[3,7,16]"]
    memory = load_config("dense_small_synthetic", opts).data
    assert make_synthetic.main([str(tmp_path / "train"), "--images", "3", "--seed", str(memory.synthetic_seed),
                                "--size", "64", "80", "--min-objects", "20", "--max-objects", "40",
                                "--max-ignored-regions", "2", "--clutter", "12", "--small-side", "3", "7", "16"]) == 0
    disk = load_config("dense_small_synthetic", opts + [
        "data.dataset=coco", f"data.train_images={tmp_path / 'train' / 'images'}",
        f"data.train_annotations={tmp_path / 'train' / 'annotations.json'}",
        f"data.val_images={tmp_path / 'train' / 'images'}",
        f"data.val_annotations={tmp_path / 'train' / 'annotations.json'}"]).data
    a, b = build_dataset(memory, "train"), build_dataset(disk, "train")
    assert len(a) == len(b) == 3
    crowd = 0
    for i in range(3):
        (img_a, t_a), (img_b, t_b) = a[i], b[i]
        assert torch.equal(img_a, img_b)
        assert t_a.keys() == t_b.keys()
        for key in t_a:
            if isinstance(t_a[key], torch.Tensor):
                assert torch.equal(t_a[key], t_b[key]), key
            else:
                assert t_a[key] == t_b[key], key
        crowd += len(t_a["ignore_boxes"])
    assert crowd > 0  # the ignored regions are part of what is compared


def _fake_gradvar_result(seed: int, windows: list[int], iters: int = 30) -> dict:
    """A per-seed result shaped like tools/gradvar.run's, from random series (NaN where a batch
    had no object of the size, as in the real runs)."""
    import numpy as np

    from tools.gradvar_stats import safe_ratio, series_stats, window_ratios
    from tools.target_stats import BUCKETS

    rng = np.random.default_rng(seed)
    per_window = {}
    for w in windows:
        series = {run: {b: [float(x) if rng.random() > 0.2 * k else float("nan")
                            for x in rng.lognormal(0.0, 0.3 + 0.2 * (run == "baseline"), iters)]
                        for k, b in enumerate(BUCKETS)} for run in ("baseline", "ugs")}
        stats = {run: {b: series_stats(series[run][b]) for b in BUCKETS} for run in series}
        noise = {run: {b: float(rng.uniform(0.5, 3.0)) for b in BUCKETS} for run in series}
        per_window[w] = {"stats": stats, "series": series, **window_ratios(stats), "noise": noise,
                         **{f"{b}_noise_ratio": safe_ratio(noise["baseline"][b], noise["ugs"][b]) for b in BUCKETS}}
    return {"config": "dense_small_synthetic", "overrides": ["model.num_queries=300"], "variant": "full",
            "comparator": "smooth_l1", "head_mult": 1.0, "iters": iters, "warmup": windows[-1], "windows": windows,
            "seed": seed, "noise_batches": 100, "include_giou": False, "include_um": False,
            "differing_init_tensors": ["bbox_embed.0.layers.2.weight"], "seconds": {"total": 1.0},
            "per_window": per_window}


def test_gradvar_runs_of_one_seed_each_pool_into_the_one_call_result(tmp_path):
    import json
    import math

    from tools import gradvar, gradvar_merge
    from util.logging import write_json_atomic

    windows = [50, 300]
    results = [_fake_gradvar_result(seed, windows) for seed in (0, 1, 2)]
    for r in results:  # what tools/gradvar.py writes for a one-seed call
        (tmp_path / f"seed{r['seed']}").mkdir()
        write_json_atomic(tmp_path / f"seed{r['seed']}" / "gradvar.json", {"per_seed": [r]}, indent=1)
    direct = gradvar.aggregate(results, block=5, reps=100)
    assert gradvar_merge.main([str(tmp_path / "pooled"), *(str(tmp_path / f"seed{s}") for s in (2, 0, 1)),
                               "--block", "5", "--bootstrap", "100"]) == 0
    pooled = json.loads((tmp_path / "pooled" / "gradvar.json").read_text())
    assert pooled["seeds"] == [0, 1, 2] and pooled["comparator"] == "smooth_l1"

    def same(a, b) -> bool:
        if isinstance(a, float) and math.isnan(a):
            return b is None
        if isinstance(a, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == pytest.approx(b, rel=1e-12)

    checked = 0
    for w in windows:
        for key, value in direct["per_window"][w].items():
            assert same(value, pooled["per_window"][str(w)][key]), (w, key)
            checked += 1
    assert checked > 20 and math.isfinite(direct["small_variance_ratio_ci95"][0])
    assert same(direct["small_variance_ratio"], pooled["small_variance_ratio"])

    # runs that differ in more than the seed, or repeat a seed, are refused
    other = _fake_gradvar_result(3, windows)
    other["comparator"] = "l1"
    (tmp_path / "seed3").mkdir()
    write_json_atomic(tmp_path / "seed3" / "gradvar.json", {"per_seed": [other]})
    with pytest.raises(SystemExit, match=r"differs .* in \['comparator'\]"):
        gradvar_merge.load_runs([tmp_path / "seed0", tmp_path / "seed3"])
    with pytest.raises(SystemExit, match="seed 0 is in both"):
        gradvar_merge.load_runs([tmp_path / "seed0", tmp_path / "seed0"])
