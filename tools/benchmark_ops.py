"""Benchmark multi-scale deformable attention implementations at DINO-5scale shapes.

    python tools/benchmark_ops.py                       # CUDA: encoder + decoder, float32 + bfloat16
    python tools/benchmark_ops.py --device cpu          # CPU decoder shape: ours (CPU path) vs plain PyTorch
    python tools/benchmark_ops.py --device cpu --shapes encoder,decoder --levels 14x14,7x7,4x4,2x2 \
        --batch 4 --heads 4 --queries 150                # the CPU demo's shapes
    python tools/benchmark_ops.py --msda-original DIR --deformops-wheel WHEEL --markdown OUT.md

Every implementation is timed --repeats times (each a median over --iters calls), round-robin so
that clock and thermal drift touch all alike; the table gives the median with the spread (min-max)
and each time's ratio to ours from the same round (> 1: ours is faster).

Implementations (absent ones are skipped with a note):
  ours               ops.ms_deform_attn (CUDA kernels of ops/csrc, or the CPU path with --device cpu)
  ours-sparse        CPU only: ours with the backward's sparse method forced (ops/cpu.py picks the
                     dense one for small maps on its own)
  ours-dense         CPU only: ours with the dense method forced in both directions, whatever the
                     size (where the limits DENSE_MAX_SPATIAL / DENSE_MAX_ELEMENTS should lie)
  pytorch            ops.ms_deform_attn_reference (plain PyTorch, grid_sample per level)
  original           the Deformable-DETR CUDA op (--msda-original DIR or $MSDA_ORIGINAL_DIR; float32 only)
  deformops-triton   deformops (--deformops-wheel WHEEL or $DEFORMOPS_WHEEL, or already importable)
  deformops-cuda     deformops' CUDA backend (built just in time, DEFORMOPS_COMPILE=1)

Shapes: encoder self-attention, batch 2, 1333x800 input -> levels 200x334, 100x167, 50x84, 25x42, 13x21
(89,023 tokens = queries), M=8 heads, D=32, L=5, P=4; decoder cross-attention: 900 + 200 (denoising)
queries on the same value maps. Locations are realistic: encoder queries sample around their own pixel
(offsets ~ N(0, 2 px) per level), decoder queries around random reference points (N(0, 0.03)).

Forward bandwidth model (the floor any kernel must pay): read value once + read locations and weights +
write the output, bytes / time, against the device's peak (H100 SXM 3.35 TB/s, H200 4.8 TB/s).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import ops  # noqa: E402
from util.cli import add_debug_option, entry_point  # noqa: E402

ENCODER_LEVELS = [(200, 334), (100, 167), (50, 84), (25, 42), (13, 21)]
CPU_LEVELS = [(50, 84), (25, 42), (13, 21), (7, 11)]  # 1333x800 at strides 16..128: CPU-sized maps
PEAK_BW = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}

Impl = Callable[..., torch.Tensor]


# ---- inputs ---------------------------------------------------------------------------------------
def level_tensors(levels, device):
    spatial = torch.tensor(levels, dtype=torch.long, device=device)
    areas = spatial[:, 0] * spatial[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial, starts


def make_inputs(kind: str, levels, batch: int, heads: int, channels: int, points: int, dtype, device,
                queries: int | None = None, seed: int = 0):
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    spatial, starts = level_tensors(levels, device)
    total = sum(h * w for h, w in levels)
    nl = len(levels)
    size = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32)  # (L, 2) as (W, H)
    if kind == "encoder":
        # every token is a query at its own pixel centre; reference points in normalised (x, y)
        refs = []
        for h, w in levels:
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            refs.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
        ref = torch.cat(refs)  # (S, 2)
        lq = total
        offsets = torch.randn(batch, lq, heads, nl, points, 2, generator=gen) * 2.0 / size.view(1, 1, 1, nl, 1, 2)
    else:
        lq = queries or 1100
        ref = torch.rand(lq, 2, generator=gen)
        offsets = torch.randn(batch, lq, heads, nl, points, 2, generator=gen) * 0.03
    loc = ref.view(1, lq, 1, 1, 1, 2) + offsets
    attn = torch.rand(batch, lq, heads, nl, points, generator=gen)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    value = torch.randn(batch, total, heads, channels, generator=gen)
    grad = torch.randn(batch, lq, heads * channels, generator=gen)
    return (value.to(device, dtype), spatial, starts, loc.to(device, dtype), attn.to(device, dtype),
            grad.to(device, dtype))


# ---- implementations ------------------------------------------------------------------------------
def ours(device: str) -> Impl:
    """Our op: the CUDA kernels of ops/csrc, or the fused CPU path with --device cpu."""
    backend = "cuda" if device == "cuda" else "cpu"

    def run(value, spatial, starts, loc, attn):
        ops.set_backend(backend)
        return ops.ms_deform_attn(value, spatial, starts, loc, attn)
    return run


def ours_sparse(value, spatial, starts, loc, attn):
    """The CPU path with the backward's sparse method forced."""
    return _SparseBackward.apply(value, spatial, starts, loc, attn)


class _SparseBackward(torch.autograd.Function):
    """ops' CPU forward with the sparse backward (ops.ms_deform_attn's backward picks the method itself)."""

    @staticmethod
    def forward(ctx, value, spatial, starts, loc, attn):  # noqa: ANN001, ANN205
        ctx.save_for_backward(value, spatial, starts, loc, attn)
        from ops.cpu import ms_deform_attn_cpu
        return ms_deform_attn_cpu(value, spatial, starts, loc, attn)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        from ops.cpu import ms_deform_attn_cpu_backward
        value, spatial, starts, loc, attn = ctx.saved_tensors
        gv, gl, ga = ms_deform_attn_cpu_backward(value, spatial, starts, loc, attn, grad, method="sparse")
        return gv, None, None, gl, ga


def ours_dense(value, spatial, starts, loc, attn):
    """The CPU path with the dense method forced: a dense forward that keeps its sampling matrix
    for a dense backward, as ops.ms_deform_attn does in training below the limits."""
    return _DenseBoth.apply(value, spatial, starts, loc, attn)


class _DenseBoth(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial, starts, loc, attn):  # noqa: ANN001, ANN205
        from ops.cpu import ms_deform_attn_cpu
        ctx.save_for_backward(value, spatial, starts, loc, attn)
        keep = any(t.requires_grad for t in (value, loc, attn))  # a backward follows (not the fwd-only timing)
        return ms_deform_attn_cpu(value, spatial, starts, loc, attn, keep_for_backward=keep, method="dense")

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        from ops.cpu import ms_deform_attn_cpu_backward
        value, spatial, starts, loc, attn = ctx.saved_tensors
        gv, gl, ga = ms_deform_attn_cpu_backward(value, spatial, starts, loc, attn, grad, method="dense")
        return gv, None, None, gl, ga


def plain_pytorch(value, spatial, starts, loc, attn):
    return ops.ms_deform_attn_reference(value, spatial, starts, loc, attn)


def original_op(folder: str) -> Impl:
    sys.path.insert(0, str(Path(folder).resolve()))
    import MultiScaleDeformableAttention as msda_original  # noqa: N813

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, spatial, starts, loc, attn):
            ctx.save_for_backward(value, spatial, starts, loc, attn)
            return msda_original.ms_deform_attn_forward(value, spatial, starts, loc, attn, 64)

        @staticmethod
        def backward(ctx, grad):
            value, spatial, starts, loc, attn = ctx.saved_tensors
            gv, gl, ga = msda_original.ms_deform_attn_backward(value, spatial, starts, loc, attn,
                                                                grad.contiguous(), 64)
            return gv, None, None, gl, ga

    def run(value, spatial, starts, loc, attn):
        if value.dtype not in (torch.float32, torch.float64):
            raise NotImplementedError("float32/float64 only")
        return Function.apply(value, spatial, starts, loc, attn)
    return run


def deformops_impls(wheel: str | None) -> tuple[dict[str, Impl], str]:
    os.environ.setdefault("DEFORMOPS_COMPILE", "1")
    site = ROOT / ".site"
    try:
        import deformops  # noqa: F401
    except ImportError:
        if not wheel:
            return {}, "deformops: not importable and no --deformops-wheel / $DEFORMOPS_WHEEL"
        if not Path(wheel).is_file():
            return {}, f"deformops: wheel {wheel} not found"
        if not (site / "deformops").is_dir():
            done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                   "--target", str(site), wheel], capture_output=True, text=True)
            if done.returncode != 0:
                return {}, f"deformops: pip install of {wheel} failed: {done.stderr.strip()[-200:]}"
        sys.path.insert(0, str(site))
    try:
        from deformops.registry import Backend, msda
    except Exception as exc:  # noqa: BLE001 - report any import failure as a skip note
        return {}, f"deformops: import failed ({type(exc).__name__}: {exc})"

    def make(backend) -> Impl:
        def run(value, spatial, starts, loc, attn):
            return msda(value, spatial, starts, loc, attn.flatten(-2), backend=backend)
        return run
    return {"deformops-triton": make(Backend.TRITON), "deformops-cuda": make(Backend.CUDA)}, ""


# ---- timing ---------------------------------------------------------------------------------------
class Timer:
    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn: Callable[[], object], iters: int, warmup: int) -> float:
        """Median milliseconds of fn over iters runs after warmup runs (fewer when one run is slow)."""
        start = time.perf_counter()
        fn()
        self.sync()
        first = (time.perf_counter() - start) * 1e3
        if first > 200:
            iters, warmup = max(2, min(iters, 3)), 0
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BW.items():
        if key in name:
            return bw
    return None


def forward_bytes(value, loc, attn, out) -> int:
    return sum(t.numel() * t.element_size() for t in (value, loc, attn, out))


def bench_one(impl: Impl, inputs, timer: Timer, iters: int, warmup: int, device: str):
    value, spatial, starts, loc, attn, grad = inputs
    with torch.no_grad():
        out = impl(value, spatial, starts, loc, attn)
        fwd = timer(lambda: impl(value, spatial, starts, loc, attn), iters, warmup)
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]

    def step():
        for t in leaves:
            t.grad = None
        impl(leaves[0], spatial, starts, leaves[1], leaves[2]).backward(grad)
    peak = None
    if device == "cuda":
        step()
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    both = timer(step, iters, warmup)
    return out.detach(), fwd, both, peak


# ---- table ---------------------------------------------------------------------------------------
HEADER = ("| shape | dtype | implementation | fwd ms (min-max) | fwd+bwd ms (min-max) | fwd / ours | "
          "fwd+bwd / ours | fwd+bwd peak MiB | fwd GB/s | fwd / floor | max abs diff vs ours | note |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def spread(values: list[float], digits: int) -> str:
    """median (min-max) of a non-empty list, "-" for an empty one."""
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def round_ratios(times: list[float], ours_times: list[float]) -> list[float]:
    """Each round's time over ours from the same round (> 1: ours is faster)."""
    return [t / o for t, o in zip(times, ours_times) if o > 0]


def table_row(r: dict) -> str:
    return (f"| {r['shape']} | {r['dtype']} | {r['impl']} | {spread(r['fwd'], 3)} | {spread(r['both'], 3)} | "
            f"{spread(r['fwd_ratio'], 2)} | {spread(r['both_ratio'], 2)} | {fmt(r['peak_mib'], 0)} | "
            f"{fmt(r['gbps'], 1)} | {fmt(r['floor_ratio'], 2)} | {fmt(r['diff'], 2, sci=True)} | {r['note']} |")


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


# ---- main -----------------------------------------------------------------------------------------
@entry_point
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--shapes", default=None, help="encoder,decoder (CUDA default) / decoder (CPU default)")
    p.add_argument("--impls", default="ours,ours-sparse,pytorch,original,deformops-triton,deformops-cuda")
    p.add_argument("--levels", default=None,
                   help="HxW,HxW,... value maps (default: DINO-5scale at 1333x800 on CUDA, CPU_LEVELS on CPU)")
    p.add_argument("--batch", type=int, default=None, help="default 2 on CUDA, 1 on CPU")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--queries", type=int, default=None, help="decoder queries (default 1100 on CUDA, 900 on CPU)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="rounds over all implementations (spread of each ratio)")
    p.add_argument("--msda-original", default=os.environ.get("MSDA_ORIGINAL_DIR"))
    p.add_argument("--deformops-wheel", default=os.environ.get("DEFORMOPS_WHEEL"))
    p.add_argument("--write-docs", action="store_true", help="append the table to --docs-path")
    p.add_argument("--docs-path", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--markdown", default=None, help="rewrite this file with the table after every shape and dtype")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    add_debug_option(p)
    args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *(argv or sys.argv[1:])])

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    shapes = (args.shapes or ("encoder,decoder" if device == "cuda" else "decoder")).split(",")
    wanted = args.impls.split(",")
    notes: list[str] = []
    impls: dict[str, Impl] = {}
    if "ours" in wanted:
        impls["ours"] = ours(device)
    if device == "cpu" and "ours-sparse" in wanted:
        impls["ours-sparse"] = ours_sparse
    if device == "cpu" and "ours-dense" in wanted:
        impls["ours-dense"] = ours_dense
    if "pytorch" in wanted:
        impls["pytorch"] = plain_pytorch
    if device == "cuda" and "original" in wanted:
        if args.msda_original:
            try:
                impls["original"] = original_op(args.msda_original)
            except Exception as exc:  # noqa: BLE001
                notes.append(f"original: import from {args.msda_original} failed ({type(exc).__name__}: {exc})")
        else:
            notes.append("original: skipped (no --msda-original / $MSDA_ORIGINAL_DIR)")
    if device == "cuda" and any(w.startswith("deformops") for w in wanted):
        found, note = deformops_impls(args.deformops_wheel)
        impls.update({k: v for k, v in found.items() if k in wanted})
        if note:
            notes.append(note)

    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak_bw = peak_bandwidth(name)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
        peak_bw = None
    timer = Timer(device)
    rows: list[dict] = []
    commit = git_commit()

    def section() -> str:
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines = [f"### {when}: {name}, torch {torch.__version__}, commit {commit}", "",
                 f"Command: `{command}`", "",
                 f"Times: median over {args.iters} calls, {args.repeats} rounds; median (min-max) over the rounds; "
                 "ratios per round against ours (> 1: ours is faster)."]
        if peak_bw:
            lines.append(f"Peak memory bandwidth assumed: {peak_bw / 1e12:.2f} TB/s.")
        if device == "cpu" and hasattr(os, "getloadavg"):
            lines.append(f"Load average while measuring (1 min): {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
                         "cores; other processes' load makes CPU timings noisy.")
        lines += ["", HEADER] + [table_row(r) for r in rows]
        floors = {(r["shape"], r["dtype"]): r for r in rows if r.get("floor_us")}
        if floors:
            lines += ["", "Forward memory floor (value read once + locations + weights + output written):"]
            for (s_name, dt), r in floors.items():
                lines.append(f"- {s_name} {dt}: {r['bytes'] / 1e6:.1f} MB -> {r['floor_us']:.1f} us at peak")
        lines += [f"- note: {n}" for n in notes]
        return "\n".join(lines) + "\n"

    for s_name in shapes:
        levels = ENCODER_LEVELS if device == "cuda" else CPU_LEVELS
        if args.levels:
            levels = [tuple(int(v) for v in hw.split("x")) for hw in args.levels.split(",")]
        batch = args.batch or (2 if device == "cuda" else 1)
        queries = None if s_name == "encoder" else (args.queries or (1100 if device == "cuda" else 900))
        for dtype in dtypes:
            inputs = make_inputs(s_name, levels, batch, args.heads, 32, 4, dtype, device, queries=queries)
            print(f"== {s_name}: value {tuple(inputs[0].shape)}, locations {tuple(inputs[3].shape)}, {dtype}",
                  flush=True)
            found = {k: dict(shape=s_name, dtype=str(dtype).replace("torch.", ""), impl=k, fwd=[], both=[],
                             fwd_ratio=[], both_ratio=[], peak_mib=None, gbps=None, floor_ratio=None, diff=None,
                             note="", bytes=None, floor_us=None, out=None) for k in impls}
            for round_index in range(args.repeats):
                for impl_name, impl in impls.items():
                    row = found[impl_name]
                    if row["note"].startswith("failed"):
                        continue
                    try:
                        out, fwd, both, peak = bench_one(impl, inputs, timer, args.iters, args.warmup, device)
                        row["fwd"].append(fwd)
                        row["both"].append(both)
                        if row["out"] is None:
                            row.update(out=out.float(), peak_mib=peak)
                    except Exception as exc:  # noqa: BLE001 - one failing implementation must not stop the rest
                        text = str(exc).splitlines()[0][:120] if str(exc) else ""
                        row["note"] = f"failed: {type(exc).__name__}: {text}"
                    finally:
                        if device == "cuda":
                            torch.cuda.empty_cache()
                    print(f"   round {round_index + 1}/{args.repeats} {impl_name:17s} "
                          f"fwd {fmt(row['fwd'][-1] if row['fwd'] else None, 3)} ms  "
                          f"fwd+bwd {fmt(row['both'][-1] if row['both'] else None, 3)} ms  {row['note']}", flush=True)
            reference = found.get("ours") or next(iter(found.values()), None)
            ref_out = reference["out"] if reference is not None else None
            for impl_name, row in found.items():
                out = row.pop("out")
                if out is not None and row["fwd"]:
                    nbytes = forward_bytes(inputs[0], inputs[3], inputs[4], out)
                    fwd = statistics.median(row["fwd"])
                    if device == "cuda":
                        row["gbps"] = nbytes / (fwd * 1e-3) / 1e9
                    if peak_bw:
                        row.update(bytes=nbytes, floor_us=nbytes / peak_bw * 1e6,
                                   floor_ratio=fwd * 1e-3 / (nbytes / peak_bw))
                if row is reference:
                    row["note"] = row["note"] or (f"backend={ops.backend()}" if impl_name == "ours"
                                                  else "(diff reference)")
                    continue
                if out is not None and ref_out is not None:
                    row["diff"] = float((out - ref_out).abs().max())
                row["fwd_ratio"] = round_ratios(row["fwd"], reference["fwd"])
                row["both_ratio"] = round_ratios(row["both"], reference["both"])
            rows.extend(found.values())
            if args.markdown:
                Path(args.markdown).write_text(section())
            del inputs
    text = section()
    print()
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=name, torch=torch.__version__, command=command,
                                                   commit=commit, rows=rows, notes=notes), indent=1))
    if args.write_docs:
        path = Path(args.docs_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write("\n" + text)
        print(f"appended to {path}")
    return 0


def fmt(x, digits: int, sci: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}e}" if sci else f"{x:.{digits}f}"


if __name__ == "__main__":
    raise SystemExit(main())
