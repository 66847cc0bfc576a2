"""Aggregation of a sweep (tools/sweep.py): per-variant mean +- std over seeds, paired per-seed
deltas against the baseline with a 95% paired-t confidence interval, the small-object verdict rule,
and the report files (results.md, results.json, AP-vs-step and delta PNGs).

Why paired: every variant runs the same seeds, and a seed fixes the data order, the denoising noise
and every shared initial weight, so the per-seed difference removes most of the seed-to-seed spread.
The interval is Student's t on the n per-seed differences (n - 1 degrees of freedom): mean +-
t_{0.975, n-1} * sd / sqrt(n). With one seed there is no interval (NaN).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

# reported per variant; AP_smallest is the AP of the smallest COCO size bucket the data has
METRICS = ("AP", "AP50", "APs", "AP_smallest", "AR")
DELTA_METRICS = ("AP", "AP50", "APs", "AP_smallest", "AR")
# The small-object verdict, fixed before any result: reproduced if the mean paired APs delta is
# >= +0.010 and positive in every seed (with `require_interval`: and its 95% interval excludes 0);
# not reproduced if the mean delta is <= 0; otherwise inconclusive.
VERDICT_MIN_DELTA = 0.010


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for fewer than 2 values). NaNs are kept
    (a metric missing in one run makes the variant's figure NaN, never silently smaller)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_t_interval(deltas: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the per-seed differences; paired t with n - 1 degrees of freedom."""
    from scipy import stats

    mean, sd = mean_std(deltas)
    n = len(deltas)
    if n < 2 or not math.isfinite(sd):
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def smallest_bucket_ap(metrics: dict[str, float]) -> tuple[float, str]:
    """AP of the smallest COCO size bucket with objects (APs, else APm, else APl; COCO reports -1
    or NaN for an empty bucket)."""
    for key in ("APs", "APm", "APl"):
        value = metrics.get(key)
        if value is not None and math.isfinite(value) and value >= 0:
            return float(value), key
    return math.nan, "none"


def ap_verdict(deltas: Sequence[float], require_interval: bool = False) -> str:
    """The fixed rule for the small-object claim on the per-seed APs deltas (UGS - baseline)."""
    if not deltas or any(not math.isfinite(d) for d in deltas):
        return "not measured"
    mean, low, _high = paired_t_interval(deltas)
    if mean <= 0:
        return "not reproduced"
    if mean >= VERDICT_MIN_DELTA and all(d > 0 for d in deltas) and (not require_interval or low > 0):
        return "reproduced"
    return "inconclusive"


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and value is not None else math.nan


def summarize(runs: dict[tuple[str, int], dict], variants: Sequence[str], seeds: Sequence[int],
              baseline: str, baselines: dict[str, str] | None = None) -> dict:
    """runs[(variant, seed)] = {"final": metrics dict, "curve": [...], "wall_s", "steps_per_s",
    "steps"} (missing = not finished) -> the results.json document. `baselines[v]` names the
    variant v's deltas are taken against (default: `baseline`), e.g. the baseline at the same
    optimiser setting."""
    out: dict[str, Any] = {"baseline": baseline, "seeds": list(seeds), "variants": {},
                           "interval": "paired t, 95%, n-1 degrees of freedom, over seeds"}
    for v in variants:
        done = [s for s in seeds if (v, s) in runs]
        entry: dict[str, Any] = {"seeds_done": done, "per_seed": {}}
        for s in done:
            r = runs[(v, s)]
            ap_small, bucket = smallest_bucket_ap(r["final"])
            entry["per_seed"][str(s)] = {**{k: _num(r["final"].get(k)) for k in METRICS if k != "AP_smallest"},
                                         "AP_smallest": ap_small, "smallest_bucket": bucket,
                                         "wall_s": _num(r.get("wall_s")), "steps_per_s": _num(r.get("steps_per_s")),
                                         "steps": r.get("steps")}
        for key in METRICS + ("wall_s", "steps_per_s"):
            m, sd = mean_std([entry["per_seed"][str(s)][key] for s in done])
            entry[key] = {"mean": m, "std": sd}
        out["variants"][v] = entry
    for v, entry in out["variants"].items():  # second pass: a variant's baseline may come after it
        ref = (baselines or {}).get(v, baseline)
        if v == baseline or v == ref:
            continue
        entry["baseline"] = ref
        entry["delta_vs_baseline"] = {}
        paired = [s for s in entry["seeds_done"] if (ref, s) in runs]
        for key in DELTA_METRICS:
            deltas = [entry["per_seed"][str(s)][key] - out["variants"][ref]["per_seed"][str(s)][key]
                      for s in paired] if ref in out["variants"] else []
            mean, low, high = paired_t_interval(deltas) if deltas else (math.nan,) * 3
            entry["delta_vs_baseline"][key] = {"per_seed": dict(zip(map(str, paired), deltas)),
                                               "mean": mean, "ci95": [low, high]}
        aps_deltas = list(entry["delta_vs_baseline"]["APs"]["per_seed"].values())
        entry["small_object_verdict"] = ap_verdict(aps_deltas)
    return out


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.{digits}f}"


def results_markdown(doc: dict, title: str, command: str, notes: Sequence[str] = ()) -> str:
    base = doc["baseline"]
    lines = [f"# {title}", "", f"Command: `{command}`", ""] + list(notes) + [
        "", f"Per variant: mean +- std over seeds {doc['seeds']} (seeds finished in brackets). "
        "AP_smallest: AP of the smallest COCO size bucket the validation data has. "
        "Wall time and steps/s per run include start-up and evaluations; an attempt killed together "
        "with the sweep is not counted.", "",
        "| variant | seeds | AP | AP50 | APs | AP_smallest | AR | wall s | steps/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v, e in doc["variants"].items():
        cells = [f"{_fmt(e[k]['mean'])} +- {_fmt(e[k]['std'])}" for k in METRICS]
        lines.append(f"| {v}{' (baseline)' if v == base else ''} | {len(e['seeds_done'])} | " + " | ".join(cells)
                     + f" | {_fmt(e['wall_s']['mean'], 0)} | {_fmt(e['steps_per_s']['mean'], 2)} |")
    lines += ["", f"Paired per-seed deltas vs each variant's baseline (`{base}` unless the spec names "
              f"another; mean [95% interval, {doc['interval']}]); small-object verdict by the fixed rule "
              "(APs delta >= +0.010 and > 0 in every seed: reproduced; mean <= 0: not reproduced; "
              "otherwise inconclusive):", "",
              "| variant | vs | dAP | dAP50 | dAPs | dAP_smallest | dAR | APs deltas per seed | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v, e in doc["variants"].items():
        if "delta_vs_baseline" not in e:
            continue
        d = e["delta_vs_baseline"]
        cells = [f"{_fmt(d[k]['mean'])} [{_fmt(d[k]['ci95'][0])}, {_fmt(d[k]['ci95'][1])}]" for k in DELTA_METRICS]
        per_seed = ", ".join(f"{_fmt(x)}" for x in d["APs"]["per_seed"].values())
        lines.append(f"| {v} | {e['baseline']} | " + " | ".join(cells)
                     + f" | {per_seed} | {e['small_object_verdict']} |")
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, dict[int, list[dict]]], path: Path, metric: str = "AP") -> Path:
    """AP vs step per variant: mean over seeds, band = min..max over seeds (at the shared steps)."""
    from util.plots import plt, save_figure  # matplotlib on the Agg backend, loaded only to plot

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, per_seed in curves.items():
        by_step: dict[int, list[float]] = {}
        for curve in per_seed.values():
            for rec in curve:
                if isinstance(rec.get(metric), (int, float)):
                    by_step.setdefault(int(rec["step"]), []).append(float(rec[metric]))
        steps = sorted(s for s, v in by_step.items() if len(v) == len(per_seed))
        if not steps:
            continue
        mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
        line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{variant} (n={len(per_seed)})")
        ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs step (line: mean over seeds; band: min..max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_deltas(doc: dict, path: Path, metrics: Sequence[str] = ("AP", "APs", "AP_smallest")) -> Path:
    """Bar chart of the mean paired deltas vs the baseline with their 95% intervals."""
    from util.plots import plt, save_figure  # matplotlib on the Agg backend, loaded only to plot

    names = [v for v, e in doc["variants"].items() if "delta_vs_baseline" in e]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) + 2), 4.5))
    width = 0.8 / len(metrics)
    for j, key in enumerate(metrics):
        means = [doc["variants"][v]["delta_vs_baseline"][key]["mean"] for v in names]
        ci = [doc["variants"][v]["delta_vs_baseline"][key]["ci95"] for v in names]
        err = [[m - lo if math.isfinite(lo) else 0 for m, (lo, _) in zip(means, ci)],
               [hi - m if math.isfinite(hi) else 0 for m, (_, hi) in zip(means, ci)]]
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [m if math.isfinite(m) else 0 for m in means], width, yerr=err, capsize=3, label=f"d{key}")
    ax.axhline(0, color="black", lw=0.8)
    refs = {v: doc["variants"][v]["baseline"] for v in names}
    labels = [v if refs[v] == doc["baseline"] else f"{v}\n(vs {refs[v]})" for v in names]
    ax.set_xticks(range(len(names)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"delta vs the variant's baseline ({doc['baseline']} unless named)")
    ax.set_title("paired per-seed deltas (mean, 95% paired-t interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
