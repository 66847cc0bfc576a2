"""Reading torch.profiler results of training steps: where the device time goes, and whether the
step waits on the host. Used by the training loop (`runtime.profile_steps`, `StepProfiler`),
tools/benchmark_model.py (UGS over DINO) and tools/benchmark_official.py (the official DINO step
against ours).

Imports torch only: benchmark_official.py loads this file by path in the process that runs the
official code, whose packages `models` and `util` clash with ours.
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

# CUDA runtime calls that show where the host waits for the device (synchronisations; a blocking
# memcpy waits too) and how many kernels it launched; one cudaDeviceSynchronize is the profiler's.
RUNTIME_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cudaMemcpyAsync",
                 "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")

# Kernel (CUDA) or op (CPU) name -> the kind of work, first match wins. The two sides of a comparison
# name their kernels differently (the official op's im2col kernels, our msda:: kernels, cuBLAS's
# nvjet / sm90 GEMMs); grouping them says which kind of work one side spends more on.
KERNEL_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("deformable attention", r"msda|ms_deform|grid_sampler"),
    ("attention (SDPA)", r"flash|fmha|scaled_dot_product|efficient_attention|mem_eff"),
    # before matrix products: cuDNN's convolutions are implicit GEMMs ("sm90_xmma_fprop_implicit_gemm")
    ("convolutions", r"conv|cudnn|winograd|implicit|fprop|dgrad|wgrad"),
    ("matrix products", r"gemm|cutlass|cublas|xmma|nvjet|\bsm\d+_|aten::(addmm|mm|bmm|matmul|linear|baddbmm)\b"),
    # before normalisation: gradient clipping's norms are multi-tensor kernels too
    ("optimizer and clipping", r"adam|foreach|multi_tensor|clip_grad|_amp_"),
    ("normalisation", r"norm"),
    ("softmax, reductions, top-k, sort",
     r"softmax|reduce_kernel|reduction|topk|sort|scan|cumsum|aten::(sum|mean|max|min|amax|amin|argmax|argmin)\b"),
    ("copies and fills", r"memcpy|memset|copy|fill|catarray|\bcat\b|aten::cat\b|index|gather|scatter|nonzero"),
    ("elementwise", r"elementwise|vectorized|unrolled|aten::(add|mul|sub|div|sigmoid|relu|exp|log|where|clamp)"),
)


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, lowered):
            return category
    return "other"


def runtime_calls(events) -> dict[str, int]:  # noqa: ANN001
    """{runtime call: count} of one profiled step, for the calls in RUNTIME_CALLS that occurred."""
    counts = {e.key: e.count for e in events if e.key in RUNTIME_CALLS}
    return {name: counts[name] for name in RUNTIME_CALLS if name in counts}


def _is(event, device_type: torch.autograd.DeviceType) -> bool:  # noqa: ANN001
    """An op or kernel on that side, not a profiler range (torch.profiler's own "Self CUDA time
    total" leaves ranges out too)."""
    return (getattr(event, "device_type", None) == device_type
            and not getattr(event, "is_user_annotation", False))


def on_device(event) -> bool:  # noqa: ANN001
    return _is(event, torch.autograd.DeviceType.CUDA)  # kernels, memcpy, memset


def is_host_op(event) -> bool:  # noqa: ANN001
    return _is(event, torch.autograd.DeviceType.CPU)


def range_ms(event, device: torch.device) -> float:  # noqa: ANN001
    """A profiler range's length: on the device where it has a device span, else on the host."""
    if device.type == "cuda" and getattr(event, "device_time_total", 0.0) > 0:
        return event.device_time_total / 1000
    return event.cpu_time_total / 1000


def self_ms(event, device: torch.device) -> float:  # noqa: ANN001
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return getattr(event, attr, 0.0) / 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(prof: Any, device: torch.device, wall_ms: float, top: int = 15) -> dict:
    """The profiled stretch of `prof` (a finished torch.profiler.profile) that took `wall_ms`.

    On CUDA the "work items" are kernels, copies and fills, timed on the device; device_busy_ms is
    their sum, so busy / wall well below 1 means the steps wait on the host (launches, syncs, data).
    On a CPU they are the host ops by self time (no device: busy is 0). Returns wall_ms,
    device_busy_ms, launches (work items run), runtime_calls, categories_ms (KERNEL_CATEGORIES)
    and top_ms (the `top` largest work items by total time, with their call counts).
    """
    events = prof.key_averages()
    items = [e for e in events if (on_device(e) if device.type == "cuda" else is_host_op(e))]
    item_ms = {e.key: self_ms(e, device) for e in items}
    categories: dict[str, float] = {}
    for name, ms in item_ms.items():
        category = kernel_category(name)
        categories[category] = categories.get(category, 0.0) + ms
    largest = sorted(items, key=lambda e: item_ms[e.key], reverse=True)[:top]
    return {"wall_ms": wall_ms,
            "device_busy_ms": sum(item_ms.values()) if device.type == "cuda" else 0.0,
            "launches": sum(e.count for e in items),
            "runtime_calls": runtime_calls(events),
            "categories_ms": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "top_ms": {e.key: {"ms": item_ms[e.key], "calls": e.count} for e in largest}}


def _activities(device: torch.device) -> list:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def profiled_call(step: Callable[[], None], device: torch.device) -> tuple[Any, float]:
    """One call of `step` (warm it up first) under torch.profiler, the device synchronised on both
    sides: (the finished profiler, wall ms)."""
    from torch.profiler import profile

    _sync(device)
    with profile(activities=_activities(device)) as prof:
        start = time.perf_counter()
        step()
        _sync(device)
        wall_ms = (time.perf_counter() - start) * 1000
    return prof, wall_ms


def profile_step(step: Callable[[], None], device: torch.device, top: int = 15) -> dict:
    """`summarize` of one profiled call of `step` (warm it up first)."""
    prof, wall_ms = profiled_call(step, device)
    return summarize(prof, device, wall_ms, top)


class StepProfiler:
    """Profiles `steps` optimizer steps of a training run after `skip` warm ones, once.

    The training loop calls `batch_ready()` when a batch has arrived from the loader and
    `step_done()` after each optimizer step; `finish()` (also at the end of an epoch) writes
    OUT_DIR/summary.md and summary.json (the steps' wall time, device-busy share, host waits, the
    time spent waiting for the data loader, device time by kind of work) and OUT_DIR/trace.json
    (a Chrome trace: chrome://tracing or https://ui.perfetto.dev).
    """

    def __init__(self, out_dir: str | Path, skip: int, steps: int, device: torch.device,
                 logger: logging.Logger | None = None) -> None:
        if skip < 0 or steps < 1:
            raise ValueError(f"StepProfiler: skip must be >= 0 and steps >= 1, got {skip}, {steps}")
        self.out_dir, self.skip, self.steps, self.device = Path(out_dir), skip, steps, device
        self.log = logger or logging.getLogger(__name__)
        self.seen = 0  # optimizer steps before profiling started
        self.profiled = 0
        self.prof: Any = None
        self.start = 0.0
        self.last_step_end: float | None = None
        self.data_wait_s = 0.0
        self.done = False

    def batch_ready(self) -> None:
        if self.done:
            return
        now = time.perf_counter()
        if self.prof is None and self.seen >= self.skip:
            from torch.profiler import profile

            _sync(self.device)
            self.prof = profile(activities=_activities(self.device))
            self.prof.__enter__()
            self.start = time.perf_counter()
        elif self.prof is not None and self.last_step_end is not None:
            self.data_wait_s += now - self.last_step_end
        self.last_step_end = None

    def step_done(self) -> None:
        if self.done:
            return
        if self.prof is None:
            self.seen += 1
            return
        self.profiled += 1
        self.last_step_end = time.perf_counter()
        if self.profiled >= self.steps:
            self.finish()

    def finish(self) -> dict | None:
        """Stops profiling (if it started) and writes the files; later calls do nothing."""
        if self.done or self.prof is None:
            return None
        self.done = True
        _sync(self.device)
        wall_ms = (time.perf_counter() - self.start) * 1000
        self.prof.__exit__(None, None, None)
        summary = summarize(self.prof, self.device, wall_ms, top=25)
        summary.update(steps=self.profiled, skipped_before=self.skip, data_wait_ms=self.data_wait_s * 1000)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out_dir / "trace.json"))
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        per_step = wall_ms / max(self.profiled, 1)
        text = side_by_side({"profiled steps": summary},
                            f"{self.profiled} training steps after {self.skip} warm ones: {per_step:.1f} ms "
                            f"per step, {self.data_wait_s * 1000 / max(self.profiled, 1):.1f} ms of it "
                            "waiting for the data loader")
        (self.out_dir / "summary.md").write_text(text)
        self.log.info("profile of %d training steps: %s (%.1f ms per step, device busy %.0f%% of the wall "
                      "time; trace: %s)", self.profiled, self.out_dir / "summary.md", per_step,
                      100 * summary["device_busy_ms"] / max(wall_ms, 1e-9), self.out_dir / "trace.json")
        self.prof = None
        return summary


def side_by_side(profiles: dict[str, dict], title: str) -> str:
    """Markdown: the profiled steps of several sides (e.g. official, ours) next to each other: wall
    time, device-busy share, launches, host waits, then time per kind of work and the largest items."""
    names = list(profiles)
    unit = "device ms" if any(p["device_busy_ms"] > 0 for p in profiles.values()) else "host self ms"
    lines = [f"### {title}", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines.append("| wall ms, profiled (profiler overhead included) | "
                 + " | ".join(f"{profiles[n]['wall_ms']:.1f}" for n in names) + " |")
    lines.append("| device busy ms (share of wall) | " + " | ".join(
        f"{profiles[n]['device_busy_ms']:.1f} ({profiles[n]['device_busy_ms'] / profiles[n]['wall_ms']:.2f})"
        for n in names) + " |")
    lines.append("| kernels / ops run | " + " | ".join(str(profiles[n]["launches"]) for n in names) + " |")
    for call in ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize"):
        if any(call in profiles[n]["runtime_calls"] for n in names):
            lines.append(f"| {call} | " + " | ".join(str(profiles[n]["runtime_calls"].get(call, 0))
                                                      for n in names) + " |")
    categories = sorted({c for p in profiles.values() for c in p["categories_ms"]},
                        key=lambda c: -max(p["categories_ms"].get(c, 0.0) for p in profiles.values()))
    for category in categories:
        lines.append(f"| {category}, {unit} | " + " | ".join(
            f"{profiles[n]['categories_ms'].get(category, 0.0):.2f}" for n in names) + " |")
    for n in names:
        lines += ["", f"Largest items, {n} ({unit}, calls):", ""]
        lines += [f"- {ms['ms']:.2f} x{ms['calls']}: `{name[:110]}`" for name, ms in profiles[n]["top_ms"].items()]
    return "\n".join(lines) + "\n"
