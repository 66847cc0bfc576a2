"""Run logs: a JSON-lines record per training step, the metrics history, TensorBoard if present.

Files in the run directory (all appended to, so a resumed run continues the same curves):
- `log.jsonl`: one object per optimizer step: `step`, `epoch`, `lr` (per group), `loss` (the
  weighted total) and every named loss term (unweighted, as the criterion returned it);
  skipped non-finite steps appear with `"skipped": true` and the image ids.
- `metrics_history.jsonl`: one object per evaluation (`epoch`, `step`, AP...).
- `metrics.json`: the latest evaluation (overwritten atomically).
Only the main process writes; the other processes get no-op loggers.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def setup_console_logging(is_main: bool) -> None:
    """INFO on the main process, WARNING elsewhere, one concise format on stdout. Replaces only
    the handler it added before (other handlers, e.g. pytest's, stay)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_detection_console", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    handler._detection_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)


def _json_value(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Appends step records and evaluation metrics; mirrors scalars to TensorBoard if installed."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 truncate_after_step: int | None = None) -> None:
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.step_path = self.dir / "log.jsonl"
        self.history_path = self.dir / "metrics_history.jsonl"
        self._tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None:
            # A resumed run drops records written after the checkpoint it resumes from (steps a
            # crash interrupted), so the log continues exactly where the checkpoint stopped; a
            # fresh run (-1) drops them all instead of appending to an earlier run's curves.
            self._truncate(self.step_path, "step", truncate_after_step)
            self._truncate(self.history_path, "step", truncate_after_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
            except Exception:  # tensorboard is optional  # noqa: BLE001
                log.info("TensorBoard logging off: the tensorboard package is not installed")
                self._tb = None

    @staticmethod
    def _truncate(path: Path, key: str, last: int) -> None:
        records = read_jsonl(path)
        kept = [r for r in records if int(r.get(key, 0)) <= last]
        if len(kept) != len(records):
            log.info("%s: dropping %d record(s) from %s", "fresh run" if last < 0 else f"resume at step {last}",
                     len(records) - len(kept), path.name)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)

    def log_step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _json_value(v) for k, v in record.items()}
        with self.step_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def log_metrics(self, metrics: dict[str, Any], epoch: int, step: int) -> None:
        if not self.enabled:
            return
        record = {"epoch": epoch, "step": step, **{k: _json_value(v) for k, v in metrics.items()}}
        with self.history_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        write_json_atomic(self.dir / "metrics.json", record)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"eval/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
