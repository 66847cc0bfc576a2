"""Variants x seeds at an equal step budget, as one command: `python tools/sweep.py SPEC.toml`.

The spec (TOML, configs/sweeps/*.toml) names a base config, overrides shared by every run, the
budget in optimizer steps, the seeds, the baseline variant and the variants (each a list of
`--opt` overrides). A `[stages.NAME]` table trains once (one seed) a checkpoint that variants with
`start_from = "NAME"` load through `main.py --pretrained`, the import path users use for official
checkpoints (its report, e.g. UGS's fresh bin layers, is in the run's stdout.log). A variant's own
`baseline = "NAME"` takes its paired deltas against that variant instead of the spec's baseline
(UGS at head multiplier 10 against L1 at 10).

Each (variant, seed) is a `main.py` process, `processes` at a time with `threads` torch threads each
(processes x threads <= CPU cores; with `--gpus 0,1` runs are spread over those GPUs, several per
GPU). Every run starts with `--resume auto`: rerunning the command after a kill skips finished runs
(a `sweep_run.json` marks them) and continues interrupted ones from their last checkpoint
(`checkpoint_every` steps apart). At the end (and with `--aggregate-only`) the runs' metrics are
aggregated into OUT/results.md, OUT/results.json and OUT/plots/*.png (tools/sweep_stats.py).

A spec error (unknown key, an override the config does not have, a missing baseline, a bad
value) stops the command before anything runs, naming the spec's line. `--opt KEY=VALUE ...` adds
overrides to every run after the spec's shared ones (what differs between machines, such as
where the data lies; tools/gpu_sweep.sh points the runs at scenes it wrote once).

    python tools/sweep.py configs/sweeps/scratch.toml             # run or continue, then aggregate
    python tools/sweep.py configs/sweeps/scratch.toml --dry-run   # validate, print the commands
    python tools/sweep.py configs/sweeps/scratch.toml --aggregate-only
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import sweep_stats  # noqa: E402
from util.logging import write_json_atomic  # noqa: E402

DONE_FILE = "sweep_run.json"
TOP_KEYS = {"name", "base", "overrides", "steps", "seeds", "baseline", "processes", "threads",
            "checkpoint_every", "out", "start_from", "stages", "variants", "description"}
VARIANT_KEYS = {"overrides", "start_from", "description", "baseline"}
STAGE_KEYS = {"overrides", "steps", "seed", "description"}


class SpecError(ValueError):
    """A sweep spec that cannot run; the message names the file and line."""


@dataclass
class Run:
    """One main.py process: a variant at a seed, or a stage."""

    name: str  # "variant/seed3" or "stage:pretrain"
    out_dir: Path
    overrides: list[str]
    steps: int
    pretrained: Path | None = None
    needs: str | None = None  # the stage this run starts from
    variant: str | None = None
    seed: int = 0


@dataclass
class Spec:
    path: Path
    name: str
    base: str
    overrides: list[str]
    steps: int
    seeds: list[int]
    baseline: str
    processes: int
    threads: int
    checkpoint_every: int
    out: Path
    variants: dict[str, dict] = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- spec
def _line_of(text: str, table: str | None, key: str | None = None, needle: str | None = None) -> int:
    """1-based line of `key =` (or of the quoted `needle`) inside `[table]` (None: top level); 0 if
    not found. tomllib keeps no positions, so the raw text is scanned."""
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.split("#", 1)[0].strip() if needle is None else line.strip()
        header = re.match(r"^\[\s*([^\[\]]+?)\s*\]$", stripped)
        if header:
            current = header.group(1).replace('"', "").replace(" ", "")
            if current == table:
                if key is None and needle is None:
                    return number
            continue
        if current != table:
            continue
        if needle is not None and (f'"{needle}"' in line or f"'{needle}'" in line):
            return number
        if key is not None and re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", line):
            return number
    return 0


def _err(spec_path: Path, line: int, message: str) -> SpecError:
    where = f"{spec_path}:{line}" if line else str(spec_path)
    return SpecError(f"{where}: {message}")


def _check_keys(path: Path, text: str, table: dict, allowed: set[str], where: str | None) -> None:
    for key in table:
        if key not in allowed:
            raise _err(path, _line_of(text, where, key), f"unknown key '{key}' in "
                       f"{'[' + where + ']' if where else 'the top level'}; valid keys: {sorted(allowed)}")


def _typed(path: Path, text: str, value: object, kind: type, key: str, where: str | None) -> object:
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        raise _err(path, _line_of(text, where, key), f"'{key}' must be "
                   f"{'a list of strings' if kind is list else kind.__name__}, got {value!r}")
    return value


def load_spec(path: str | Path, cores: int | None = None, extra_overrides: list[str] | tuple = ()) -> Spec:
    """Parse and validate a spec; every variant's and stage's config is loaded (so an override the
    config does not have fails here, with the line it is on). `extra_overrides` (the command
    line's `--opt`) follow the spec's shared overrides in every run and are validated with them."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such sweep spec")
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    _check_keys(path, text, raw, TOP_KEYS, None)
    for key in ("base", "steps", "seeds", "baseline", "variants"):
        if key not in raw:
            raise _err(path, 0, f"missing required key '{key}'")
    base = _typed(path, text, raw["base"], str, "base", None)
    steps = _typed(path, text, raw["steps"], int, "steps", None)
    seeds = raw["seeds"]
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise _err(path, _line_of(text, None, "seeds"), f"'seeds' must be a non-empty list of distinct integers, got {seeds!r}")
    processes = _typed(path, text, raw.get("processes", 1), int, "processes", None)
    threads = _typed(path, text, raw.get("threads", 1), int, "threads", None)
    for key, value in (("steps", steps), ("processes", processes), ("threads", threads)):
        if value < 1:
            raise _err(path, _line_of(text, None, key), f"'{key}' must be >= 1, got {value}")
    cores = cores or os.cpu_count() or 1
    if processes * threads > cores:
        raise _err(path, _line_of(text, None, "processes"), f"processes x threads = {processes} x {threads} "
                   f"exceeds the {cores} CPU cores; lower one (or pass --processes)")
    spec = Spec(path=path, name=str(raw.get("name", path.stem)), base=base,
                overrides=list(_typed(path, text, raw.get("overrides", []), list, "overrides", None))
                + list(extra_overrides),
                steps=steps, seeds=list(seeds), baseline=_typed(path, text, raw["baseline"], str, "baseline", None),
                processes=processes, threads=threads,
                checkpoint_every=_typed(path, text, raw.get("checkpoint_every", max(1, steps // 10)), int,
                                        "checkpoint_every", None),
                out=ROOT / str(raw.get("out", f"outputs/sweeps/{path.stem}")))
    default_start = raw.get("start_from")
    stages = raw.get("stages", {})
    if not isinstance(stages, dict):
        raise _err(path, _line_of(text, None, "stages"), "'stages' must be tables [stages.NAME]")
    for name, table in stages.items():
        where = f"stages.{name}"
        _check_keys(path, text, table, STAGE_KEYS, where)
        if "steps" not in table:
            raise _err(path, _line_of(text, where), f"[{where}] needs 'steps'")
        _typed(path, text, table["steps"], int, "steps", where)
        _typed(path, text, table.get("overrides", []), list, "overrides", where)
        spec.stages[name] = {"overrides": list(table.get("overrides", [])), "steps": table["steps"],
                             "seed": int(table.get("seed", spec.seeds[0]))}
    variants = raw["variants"]
    if not isinstance(variants, dict) or not variants:
        raise _err(path, _line_of(text, None, "variants"), "'variants' must hold at least one [variants.NAME]")
    for name, table in variants.items():
        where = f"variants.{name}"
        if not isinstance(table, dict):
            raise _err(path, _line_of(text, None, name), f"variant '{name}' must be a table [{where}]")
        _check_keys(path, text, table, VARIANT_KEYS, where)
        start = table.get("start_from", default_start)
        if start is not None and start not in spec.stages:
            raise _err(path, _line_of(text, where, "start_from") or _line_of(text, None, "start_from"),
                       f"variant '{name}' starts from stage '{start}', which is not defined "
                       f"(stages: {sorted(spec.stages)})")
        spec.variants[name] = {"overrides": list(_typed(path, text, table.get("overrides", []), list,
                                                        "overrides", where)), "start_from": start,
                               "baseline": _typed(path, text, table.get("baseline", spec.baseline), str,
                                                  "baseline", where)}
        if "/" in name or not re.fullmatch(r"[\w.-]+", name):
            raise _err(path, _line_of(text, where), f"variant name '{name}' must be letters, digits, _ . -")
    if spec.baseline not in spec.variants:
        raise _err(path, _line_of(text, None, "baseline"), f"baseline '{spec.baseline}' is not one of the "
                   f"variants {sorted(spec.variants)}")
    for name, entry in spec.variants.items():  # a variant's own baseline: compare like with like
        ref = entry["baseline"]
        if name == spec.baseline and ref != name:
            raise _err(path, _line_of(text, f"variants.{name}", "baseline"), f"variant '{name}' is the spec's "
                       f"baseline and cannot have one ('{ref}')")
        if name != spec.baseline and (ref not in spec.variants or ref == name):
            raise _err(path, _line_of(text, f"variants.{name}", "baseline"), f"variant '{name}': baseline "
                       f"'{ref}' must be another variant of this spec {sorted(set(spec.variants) - {name})}")
    _validate_configs(spec, text)
    return spec


def _validate_configs(spec: Spec, text: str) -> None:
    """Load every variant's and stage's config; on an error, name the first override that fails."""
    from configs import ConfigError, load_config

    for kind, table, entries in (("stage", "stages", spec.stages), ("variant", "variants", spec.variants)):
        for name, entry in entries.items():
            items = spec.overrides + entry["overrides"] + _runtime_overrides(spec, Path("."), spec.seeds[0],
                                                                              entry.get("steps", spec.steps))
            try:
                load_config(spec.base, items)
            except ConfigError as exc:
                for i in range(len(items)):  # the first prefix that fails names the culprit
                    try:
                        load_config(spec.base, items[: i + 1])
                    except ConfigError:
                        bad = items[i]
                        where = None if i < len(spec.overrides) else f"{table}.{name}"
                        line = _line_of(text, where, needle=bad)
                        raise _err(spec.path, line, f"{kind} '{name}': override '{bad}': {exc}") from None
                raise _err(spec.path, _line_of(text, f"{table}.{name}"), f"{kind} '{name}': {exc}") from None


def _runtime_overrides(spec: Spec, out_dir: Path, seed: int, steps: int) -> list[str]:
    """What the sweep sets itself in every run (after the spec's overrides, so they win)."""
    return [f"runtime.seed={seed}", f"runtime.max_steps={steps}", f"runtime.output_dir={out_dir}",
            f"runtime.num_threads={spec.threads}", "runtime.max_train_minutes=0",
            f"runtime.checkpoint_every_steps={spec.checkpoint_every}"]


def select(spec: Spec, variants: str | None, seeds: str | None) -> None:
    """Keep a subset of the variants (plus the baselines they are compared with) and of the seeds,
    in place."""
    if variants:
        wanted = [v.strip() for v in variants.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in spec.variants]
        if unknown:
            raise SpecError(f"--variants: {unknown} not in the spec's variants {sorted(spec.variants)}")
        keep, todo = set(), list(wanted) + [spec.baseline]
        while todo:  # each kept variant's baseline too, and its baseline's, ...
            name = todo.pop()
            if name not in keep:
                keep.add(name)
                todo.append(spec.variants[name]["baseline"])
        spec.variants = {k: v for k, v in spec.variants.items() if k in keep}
        used = {v["start_from"] for v in spec.variants.values()}
        spec.stages = {k: v for k, v in spec.stages.items() if k in used}
    if seeds:
        try:
            wanted_seeds = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise SpecError(f"--seeds: expected comma-separated integers, got {seeds!r}") from None
        unknown_seeds = [s for s in wanted_seeds if s not in spec.seeds]
        if unknown_seeds:
            raise SpecError(f"--seeds: {unknown_seeds} not in the spec's seeds {spec.seeds}")
        spec.seeds = wanted_seeds


def plan_runs(spec: Spec) -> list[Run]:
    """Stages first, then every (variant, seed) in seed-major order (so an early stop leaves every
    variant with the same seeds done)."""
    runs = []
    for name, st in spec.stages.items():
        out = spec.out / "stages" / name
        runs.append(Run(f"stage:{name}", out, spec.overrides + st["overrides"] +
                        _runtime_overrides(spec, out, st["seed"], st["steps"]), st["steps"], seed=st["seed"]))
    for seed in spec.seeds:
        for name, v in spec.variants.items():
            out = spec.out / "runs" / name / f"seed{seed}"
            start = v["start_from"]
            runs.append(Run(f"{name}/seed{seed}", out, spec.overrides + v["overrides"] +
                            _runtime_overrides(spec, out, seed, spec.steps), spec.steps,
                            pretrained=(spec.out / "stages" / start / "checkpoint_last.pth") if start else None,
                            needs=f"stage:{start}" if start else None, variant=name, seed=seed))
    return runs


# ------------------------------------------------------------------------------------- running
def command(spec: Spec, run: Run) -> list[str]:
    cmd = [sys.executable, str(ROOT / "main.py"), "--config", spec.base, "--opt", *run.overrides,
           "--resume", "auto"]
    if run.pretrained is not None:
        cmd += ["--pretrained", str(run.pretrained)]
    return cmd


def is_done(run: Run) -> bool:
    return (run.out_dir / DONE_FILE).is_file()


def last_step(out_dir: Path) -> int:
    """The last logged optimizer step of a run (0 if none)."""
    log = out_dir / "log.jsonl"
    if not log.is_file():
        return 0
    with log.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4096))
        tail = f.read().decode(errors="replace").strip().splitlines()
    for line in reversed(tail):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


@dataclass
class Active:
    run: Run
    proc: subprocess.Popen
    started: float
    step_before: int
    log: object
    gpu: str | None = None


def _start(spec: Spec, run: Run, gpu: str | None) -> Active:
    run.out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads),
               PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log = (run.out_dir / "stdout.log").open("a")
    step = last_step(run.out_dir)
    log.write(f"\n=== sweep attempt at {time.strftime('%Y-%m-%d %H:%M:%S')} from step {step}: "
              f"{' '.join(command(spec, run))}\n")
    log.flush()
    proc = subprocess.Popen(command(spec, run), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Active(run, proc, time.time(), step, log, gpu)


def _finish(active: Active) -> bool:
    """Record an attempt; mark the run done if it exited 0 having reached its budget."""
    run, rc = active.run, active.proc.returncode
    active.log.close()
    wall = time.time() - active.started
    step = last_step(run.out_dir)
    attempts_path = run.out_dir / "sweep_attempts.jsonl"
    with attempts_path.open("a") as f:
        f.write(json.dumps({"returncode": rc, "wall_s": round(wall, 2), "step_before": active.step_before,
                            "step_after": step}) + "\n")
    if rc == 0 and (run.out_dir / "checkpoint_last.pth").is_file():
        attempts = [json.loads(x) for x in attempts_path.read_text().splitlines() if x.strip()]
        write_json_atomic(run.out_dir / DONE_FILE, {"run": run.name, "steps": step, "attempts": attempts,
                                              "command": command_str(run)})
        return True
    return False


def command_str(run: Run) -> str:
    return " ".join(["main.py"] + run.overrides)


def execute(spec: Spec, runs: list[Run], processes: int, gpus: list[str] | None = None,
            poll_s: float = 1.0, progress_s: float = 10.0) -> list[str]:
    """Run what is not done, `processes` at a time; returns the names of failed runs."""
    pending = [r for r in runs if not is_done(r)]
    skipped = len(runs) - len(pending)
    if skipped:
        print(f"[sweep] {skipped} of {len(runs)} runs already finished: skipped", flush=True)
    failed: list[str] = []
    active: list[Active] = []
    gpu_load = {g: 0 for g in gpus or []}
    last_print = 0.0

    def stop_all(signum, _frame):  # noqa: ANN001
        for a in active:
            a.proc.terminate()
        for a in active:
            try:
                a.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                a.proc.kill()
        print(f"\n[sweep] stopped by signal {signum}; rerun the same command to continue", flush=True)
        sys.exit(130)

    old = {s: signal.signal(s, stop_all) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending or active:
            for a in list(active):
                if a.proc.poll() is None:
                    continue
                active.remove(a)
                if a.gpu is not None:
                    gpu_load[a.gpu] -= 1
                ok = _finish(a)
                print(f"[sweep] {a.run.name}: {'done' if ok else f'FAILED (exit {a.proc.returncode})'} "
                      f"in {time.time() - a.started:.0f} s"
                      + ("" if ok else f"; see {a.run.out_dir / 'stdout.log'}"), flush=True)
                if not ok:
                    failed.append(a.run.name)
            failed_stages = {n for n in failed if n.startswith("stage:")}
            for r in [r for r in pending if r.needs in failed_stages]:
                pending.remove(r)
                failed.append(r.name)
                print(f"[sweep] {r.name}: not started, its stage {r.needs} failed", flush=True)
            while len(active) < processes:
                ready = [r for r in pending if r.needs is None or any(
                    x.name == r.needs and is_done(x) for x in runs)]
                if not ready:
                    break
                run = ready[0]
                pending.remove(run)
                gpu = min(gpu_load, key=gpu_load.get) if gpus else None
                a = _start(spec, run, gpu)
                if gpu is not None:
                    gpu_load[gpu] += 1
                active.append(a)
                again = (f" again (step {a.step_before} logged; it resumes from its last checkpoint)"
                         if a.step_before else "")
                print(f"[sweep] {run.name}: started{again}" + (f" on GPU {gpu}" if gpu is not None else ""),
                      flush=True)
            if not active and pending:  # waiting on a stage that is neither running nor done
                for r in pending:
                    failed.append(r.name)
                break
            now = time.time()
            if active and now - last_print >= progress_s:
                last_print = now
                done = sum(is_done(r) for r in runs)
                states = ", ".join(f"{a.run.name} {last_step(a.run.out_dir)}/{a.run.steps}" for a in active)
                print(f"[sweep] {done}/{len(runs)} done; running: {states}", flush=True)
            time.sleep(poll_s)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return failed


# ------------------------------------------------------------------------------------- results
def collect(spec: Spec) -> dict[tuple[str, int], dict]:
    """Finished runs' final metrics, curves and timing."""
    out = {}
    for run in plan_runs(spec):
        if run.variant is None or not is_done(run):
            continue
        history = run.out_dir / "metrics_history.jsonl"
        curve = [json.loads(x) for x in history.read_text().splitlines() if x.strip()] if history.is_file() else []
        if not curve:
            continue
        done = json.loads((run.out_dir / DONE_FILE).read_text())
        attempts = done.get("attempts", [])
        clean = [a for a in attempts if a.get("returncode") == 0 or a.get("step_after", 0) > a.get("step_before", 0)]
        wall = sum(a["wall_s"] for a in attempts)
        trained = sum(a["step_after"] - a["step_before"] for a in clean)
        out[(run.variant, run.seed)] = {"final": curve[-1], "curve": curve, "wall_s": wall,
                                        "steps_per_s": trained / wall if wall > 0 else float("nan"),
                                        "steps": done.get("steps"), "attempts": len(attempts)}
    return out


def aggregate(spec: Spec, argv_text: str) -> Path:
    runs = collect(spec)
    doc = sweep_stats.summarize(runs, list(spec.variants), spec.seeds, spec.baseline,
                                {k: v["baseline"] for k, v in spec.variants.items()})
    doc.update({"spec": str(spec.path.relative_to(ROOT) if spec.path.is_relative_to(ROOT) else spec.path),
                "base": spec.base, "steps": spec.steps, "overrides": spec.overrides,
                "variant_overrides": {k: v["overrides"] for k, v in spec.variants.items()},
                "stages": spec.stages, "commit": _commit()})
    spec.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(spec.out / "results.json", doc)
    curves: dict[str, dict[int, list[dict]]] = {}
    for (variant, seed), r in runs.items():
        curves.setdefault(variant, {})[seed] = r["curve"]
    plots = []
    if curves:
        plots.append(sweep_stats.plot_curves(curves, spec.out / "plots" / "ap_vs_step.png", "AP"))
        plots.append(sweep_stats.plot_curves(curves, spec.out / "plots" / "aps_vs_step.png", "APs"))
        if len(spec.variants) > 1:
            plots.append(sweep_stats.plot_deltas(doc, spec.out / "plots" / "deltas.png"))
    missing = [f"{v}/seed{s}" for v in spec.variants for s in spec.seeds if (v, s) not in runs]
    notes = [f"Spec `{doc['spec']}`: base `{spec.base}`, {spec.steps} steps per run, seeds {spec.seeds}, "
             f"commit {doc['commit']}.", ""]
    if missing:
        notes.append(f"Not finished (excluded): {', '.join(missing)}.")
    notes += [f"![{p.stem}](plots/{p.name})" for p in plots]
    text = sweep_stats.results_markdown(doc, f"Sweep `{spec.name}`", argv_text, notes)
    (spec.out / "results.md").write_text(text)
    return spec.out / "results.md"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="sweep spec (TOML), e.g. configs/sweeps/scratch.toml")
    p.add_argument("--dry-run", action="store_true", help="validate and print the commands; run nothing")
    p.add_argument("--aggregate-only", action="store_true", help="only write results from finished runs")
    p.add_argument("--processes", type=int, default=None, help="runs at a time (default: the spec's)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids to spread runs over (e.g. 0,1)")
    p.add_argument("--out", default=None, help="output folder (default: the spec's `out`)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of the spec's variants (the baseline is always kept)")
    p.add_argument("--seeds", default=None, help="comma-separated subset of the spec's seeds")
    p.add_argument("--opt", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides added to every run after the spec's shared ones (e.g. where the "
                        "data lies on this machine); validated like the spec's")
    args = p.parse_args(argv)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    # with GPUs the processes share devices, not cores: the core check is for CPU runs
    cores = 1 << 30 if (gpus or args.processes) else None  # --processes is checked below
    try:
        spec = load_spec(args.spec, cores=cores, extra_overrides=args.opt)
    except SpecError as exc:
        print(f"sweep spec error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        spec.out = Path(args.out).resolve()
    try:
        select(spec, args.variants, args.seeds)
    except SpecError as exc:
        print(f"sweep error: {exc}", file=sys.stderr)
        return 2
    processes = args.processes or spec.processes
    if not gpus and processes * spec.threads > (os.cpu_count() or 1):
        print(f"sweep error: --processes {processes} x threads {spec.threads} exceeds {os.cpu_count()} cores",
              file=sys.stderr)
        return 2
    runs = plan_runs(spec)
    argv_text = "python tools/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.dry_run:
        for r in runs:
            print(("[done] " if is_done(r) else "") + " ".join(command(spec, r)))
        return 0
    failed: list[str] = []
    if not args.aggregate_only:
        print(f"[sweep] {spec.name}: {len(runs)} runs ({len(spec.variants)} variants x {len(spec.seeds)} seeds"
              f" + {len(spec.stages)} stages), {processes} at a time -> {spec.out}", flush=True)
        failed = execute(spec, runs, processes, gpus)
    report = aggregate(spec, argv_text)
    print(f"[sweep] results: {report} (+ results.json, plots/)", flush=True)
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed or did not start: {', '.join(failed)}; rerun to retry",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
