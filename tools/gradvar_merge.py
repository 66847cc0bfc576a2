"""Pool tools/gradvar.py runs made one seed per process (side by side on one GPU, say) into the
statistics that one call with all those seeds prints:

    python tools/gradvar_merge.py OUT_DIR RUN_DIR [RUN_DIR ...] [--json]

Each RUN_DIR holds a gradvar.json. The runs must agree on everything but the seed (config,
overrides, UGS variant, comparator, head multiplier, windows, iterations, noise batches, GIoU and
UM switches); the seeds must differ. The ratios and their 95% intervals are recomputed over the
pooled seeds by `tools.gradvar.aggregate` (the same block bootstrap, the same resampling seed), so
the result equals that of one call with every seed. Writes OUT_DIR/gradvar.json and prints the
table (and with --json, one JSON line with the headline keys, as tools/gradvar.py does).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.gradvar import COMPARATORS, aggregate, summary_text  # noqa: E402
from util.cli import add_debug_option, entry_point  # noqa: E402
from util.logging import json_safe, write_json_atomic  # noqa: E402

# what one seed's run must share with the others for the pooled statistics to mean anything
SAME = ("config", "overrides", "variant", "comparator", "head_mult", "iters", "windows", "noise_batches",
        "include_giou", "include_um")


def _restore(obj, key: str | None = None):  # noqa: ANN001, ANN202
    """Undo the JSON encoding of a run: null -> NaN, per_window keys -> int window starts."""
    if obj is None:
        return float("nan")
    if isinstance(obj, dict):
        return {(int(k) if key == "per_window" else k): _restore(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return obj


def load_runs(run_dirs: list[Path]) -> list[dict]:
    """Every per-seed result in the RUN_DIRs' gradvar.json files, checked to agree but for the seed."""
    results: list[dict] = []
    origin: dict[int, Path] = {}
    for run_dir in run_dirs:
        path = run_dir / "gradvar.json"
        if not path.is_file():
            raise SystemExit(f"gradvar_merge: {path} does not exist (did that tools/gradvar.py run finish?)")
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SystemExit(f"gradvar_merge: {path} is not valid JSON: {exc}") from None
        if not isinstance(doc.get("per_seed"), list) or not doc["per_seed"]:
            raise SystemExit(f"gradvar_merge: {path} has no 'per_seed' results (not a tools/gradvar.py output)")
        for result in doc["per_seed"]:
            result = _restore(result)
            seed = result["seed"]
            if seed in origin:
                raise SystemExit(f"gradvar_merge: seed {seed} is in both {origin[seed]} and {path}; "
                                 "pass each seed once")
            if results:
                differ = [k for k in SAME if result.get(k) != results[0].get(k)]
                if differ:
                    raise SystemExit(f"gradvar_merge: {path} differs from {origin[results[0]['seed']]} in "
                                     f"{differ}: {[result.get(k) for k in differ]} vs "
                                     f"{[results[0].get(k) for k in differ]}; only the seed may differ")
            origin[seed] = path
            results.append(result)
    return sorted(results, key=lambda r: r["seed"])


def merge(results: list[dict], block: int, reps: int) -> dict:
    """The summary tools/gradvar.py's main prints for these seeds."""
    first = results[0]
    return {"config": first["config"], "overrides": first["overrides"], "variant": first["variant"],
            "comparator": first["comparator"], "comparator_name": COMPARATORS[first["comparator"]],
            "head_mult": first["head_mult"], "seeds": [r["seed"] for r in results], "windows": first["windows"],
            "iters": first["iters"], "noise_batches": first["noise_batches"], "block": block,
            "interval": "95% block bootstrap: seeds with replacement, iterations in moving blocks",
            "differing_init_tensors": first["differing_init_tensors"], **aggregate(results, block, reps)}


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for the pooled gradvar.json")
    ap.add_argument("runs", type=Path, nargs="+", help="folders with one tools/gradvar.py output each")
    ap.add_argument("--block", type=int, default=10, help="block length (iterations) of the bootstrap")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--json", action="store_true", help="last line: a JSON object with the ratios and intervals")
    add_debug_option(ap)
    args = ap.parse_args(argv)
    if args.block < 1 or args.bootstrap < 1:
        ap.error("--block and --bootstrap must be >= 1")
    results = load_runs(args.runs)
    summary = merge(results, args.block, args.bootstrap)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "gradvar.json", {**summary, "per_seed": results}, indent=1)
    print(summary_text(summary))
    print(f"pooled {len(results)} seeds {summary['seeds']} from {len(args.runs)} runs; wrote "
          f"{args.out / 'gradvar.json'}", flush=True)
    if args.json:
        print(json.dumps(json_safe(summary), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
