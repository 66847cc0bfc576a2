"""Run logs: a JSON-lines record per training step, the metrics history, TensorBoard if present.

Files in the run directory (all appended to, so a resumed run continues the same curves):
- `log.jsonl`: one object per optimizer step: `step`, `epoch`, `lr` (per group), `loss` (the
  weighted total) and every named loss term (unweighted, as the criterion returned it);
  skipped non-finite steps appear with `"skipped": true` and the image ids.
- `metrics_history.jsonl`: one object per evaluation (`epoch`, `step`, AP...).
- `metrics.json`: the latest evaluation (overwritten atomically).
Numbers that are undefined (NaN, e.g. APl without large objects) or infinite are written as
`null` in every file, as `tools/evaluate.py --json` does.
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


def json_safe(v: Any) -> Any:
    """`v` with tensors / numpy scalars as Python numbers and NaN / inf as None: strict JSON has no
    NaN, and `null` is what every JSON reader (and tools/evaluate.py --json) understands as missing."""
    if hasattr(v, "tolist") and not isinstance(v, (list, tuple, dict)):  # tensors, numpy values
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Strict JSON (NaN / inf written as null) via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tensorboard_installed() -> bool:
    """Whether the tensorboard package can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class RunLogger:
    """Appends step records and evaluation metrics; mirrors scalars to TensorBoard.

    `tensorboard`: None mirrors when the package is installed (silently off otherwise), True
    asks for it (a warning if it cannot start), False never mirrors.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool | None = None,
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
        if tensorboard is None:
            tensorboard = tensorboard_installed()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
            except Exception as exc:  # noqa: BLE001 - any failure only turns the mirror off
                log.warning("runtime.tensorboard=true but TensorBoard cannot start (%s: %s); install "
                            "it (pip install tensorboard) or set runtime.tensorboard=null (on when "
                            "installed)", type(exc).__name__, exc)
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
        record = {k: json_safe(v) for k, v in record.items()}
        with self.step_path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def log_metrics(self, metrics: dict[str, Any], epoch: int, step: int) -> None:
        if not self.enabled:
            return
        record = {"epoch": epoch, "step": step, **{k: json_safe(v) for k, v in metrics.items()}}
        with self.history_path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        write_json_atomic(self.dir / "metrics.json", record)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"eval/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
