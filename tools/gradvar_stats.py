"""Statistics of tools/gradvar.py: per-series mean / variance / CV / detrended oscillation, the
comparator/UGS ratios of one window, and 95% bootstrap intervals over seeds (geometric means of
per-seed ratios; iterations resampled in moving blocks, paired between the two runs)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from tools.target_stats import BUCKETS


DETREND_WINDOW = 9  # iterations in the centred moving average of the detrended oscillation


def detrended_oscillation(v: Tensor, window: int = DETREND_WINDOW) -> float:
    """Std of log(g_t) minus its centred moving average (symmetric, shrunk at the ends): the
    iteration-to-iteration relative fluctuation with the slow trend removed. Scale-free, like the
    CV, but not inflated by the steady growth of the gradient while the zero-initialised last
    layers of the box heads grow. NaN with fewer than 3 positive values."""
    v = v[v > 0]
    if v.numel() < 3:
        return float("nan")
    logs = v.log()
    half = window // 2
    n = len(logs)
    # symmetric windows, shrunk near the ends, so a linear trend in log g is removed exactly
    trend = torch.stack([logs[i - h:i + h + 1].mean() for i in range(n) for h in [min(half, i, n - 1 - i)]])
    return float((logs - trend).std(unbiased=True))


def series_stats(values: list[float]) -> dict:
    """mean, variance (ddof 1), std, coefficient of variation and detrended oscillation over the
    finite values (in iteration order)."""
    v = torch.tensor([x for x in values if math.isfinite(x)], dtype=torch.float64)
    if v.numel() < 2:
        return {"n": int(v.numel()), "mean": float("nan"), "variance": float("nan"), "std": float("nan"),
                "cv": float("nan"), "detrended_osc": float("nan")}
    mean, var = float(v.mean()), float(v.var(unbiased=True))
    return {"n": int(v.numel()), "mean": mean, "variance": var, "std": math.sqrt(var),
            "cv": math.sqrt(var) / mean if mean > 0 else float("nan"), "detrended_osc": detrended_oscillation(v)}


def safe_ratio(a: float, b: float) -> float:
    return a / b if (math.isfinite(a) and math.isfinite(b) and b > 0) else float("nan")


def window_ratios(stats: dict) -> dict[str, float]:
    """Comparator/UGS ratios per bucket; variance ratio = mean ratio^2 x CV ratio^2 exactly."""
    ratios = {}
    for b in BUCKETS:
        base, ug = stats["baseline"][b], stats["ugs"][b]
        ratios[f"{b}_variance_ratio"] = safe_ratio(base["variance"], ug["variance"])
        ratios[f"{b}_cv_ratio"] = safe_ratio(base["cv"], ug["cv"])
        ratios[f"{b}_mean_ratio"] = safe_ratio(base["mean"], ug["mean"])
        ratios[f"{b}_detrended_osc_ratio"] = safe_ratio(base["detrended_osc"], ug["detrended_osc"])
    return ratios


def geometric_mean(values: list[float]) -> float:
    vals = [v for v in values if math.isfinite(v) and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals and len(vals) == len(values) else float("nan")


def _paired_stat(a, b, kind: str) -> float:
    """comparator/UGS ratio of `kind` ("variance" or "cv") over the iterations where both are finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    return safe_ratio(_moment(a[both], kind), _moment(b[both], kind))


def _moment(v, kind: str) -> float:
    """series_stats' variance or CV (numpy: the bootstrap calls this thousands of times)."""
    if v.size < 2:
        return float("nan")
    mean, var = float(v.mean()), float(v.var(ddof=1))
    if kind == "variance":
        return var
    if kind == "cv":
        return math.sqrt(var) / mean if mean > 0 else float("nan")
    raise ValueError(f"kind must be 'variance' or 'cv', got {kind!r}")


def block_bootstrap_ratio(per_seed: list[tuple[list[float], list[float]]], kind: str, block: int = 10,
                          reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Geometric mean over seeds of the per-seed comparator/UGS ratio of `kind`, and its 95%
    percentile interval: seeds resampled with replacement, each seed's iterations resampled in
    moving blocks of `block` (the same blocks for both runs). NaN interval with < 2 seeds."""
    point = geometric_mean([_paired_stat(a, b, kind) for a, b in per_seed])
    if len(per_seed) < 2 or not math.isfinite(point):
        return point, float("nan"), float("nan")
    series = [(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)) for a, b in per_seed]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(reps):
        ratios = []
        for s in rng.integers(0, len(series), len(series)):
            a, b = series[s]
            n = len(a)
            size = min(block, n)
            starts = rng.integers(0, n - size + 1, -(-n // size))
            idx = (starts[:, None] + np.arange(size)).reshape(-1)[:n]
            ratios.append(_paired_stat(a[idx], b[idx], kind))
        g = geometric_mean(ratios)
        if math.isfinite(g):
            draws.append(g)
    if len(draws) < reps // 2:
        return point, float("nan"), float("nan")
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(low), float(high)


def seed_bootstrap(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Geometric mean of per-seed ratios and its 95% percentile interval over resampled seeds."""
    point = geometric_mean(values)
    if len(values) < 2 or not math.isfinite(point):
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = [geometric_mean([values[i] for i in rng.integers(0, len(values), len(values))]) for _ in range(reps)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(low), float(high)
