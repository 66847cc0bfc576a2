"""The few lines a finished run prints last: its final metrics and where its results lie, so a
reader of the console (the demo's, above all) need not search the run directory."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

# what `main.py` writes into a run directory (and its plots/ folder), in the order worth opening
RESULT_FILES = ("metrics.json", "log.jsonl", "checkpoint_last.pth")
PLOT_FILES = ("ap_history.png", "loss_curves.png", "detections_last.png")


def format_duration(seconds: float) -> str:
    """'4 min 05 s', '52 s'."""
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def run_summary(metrics: Mapping[str, Any] | None, out_dir: Path | str, steps: int, seconds: float) -> str:
    """A short text block: steps and time of this invocation, AP50 / AP / APs / AR of the last
    evaluation (when there was one), and the plots and result files that exist in `out_dir`."""
    out_dir = Path(out_dir)
    rate = f", {steps / seconds:.2f} steps/s" if steps and seconds > 0 else ""
    lines = [f"finished: {steps} training steps in {format_duration(seconds)}{rate} "
             "(evaluations included)"]
    if metrics:
        scores = ", ".join(f"{key} {_fmt(metrics.get(key))}" for key in ("AP50", "AP", "APs", "AR"))
        lines.append(f"final evaluation ({metrics.get('num_images', '?')} images, maxDets "
                     f"{metrics.get('max_dets', '?')}): {scores}")
    else:
        lines.append("no evaluation in this run")
    plots = [out_dir / "plots" / name for name in PLOT_FILES if (out_dir / "plots" / name).is_file()]
    if plots:
        lines.append("plots: " + ", ".join(str(p) for p in plots))
    results = [out_dir / name for name in RESULT_FILES if (out_dir / name).is_file()]
    if results:
        lines.append("results: " + ", ".join(str(p) for p in results))
    return "\n".join(lines)
