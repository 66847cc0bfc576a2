"""Speed and memory of DINO-5scale R50, and the cost of UGS over DINO (benchmark, not a test).

GPU (when one is present):
- training step time and peak memory at batch 2 x 1333x800 for {fp32, bf16 autocast} x
  {activation checkpointing off, on}, and inference images/s (fp32, bf16);
- DINO vs UGS-DINO training steps (the project's target: at most +10% time and +8% peak memory with
  UR on): DINO-5scale R50, fp32, 2 images of 800x1088 with 60 small boxes each; DINO
  (`ugs.ablation=l1`), UGS with UR off (`ce_in_um`) and UR on (`full`) built from the same seed;
  step times are the median of `--ugs-iters` steps run in alternating order (variant order rotates
  every step), peak memory is measured with one variant resident at a time.
CPU (always): eval forward time of one 512x512 image (R50), and the same DINO vs UGS comparison on
the tiny config (`dino_tiny`: ResNet-18, d=64, 2+2 layers) at 2 x 128x128 with 10 boxes per image
(step time only; CPU peak memory is not measured).

    python tools/benchmark_model.py [--iters 5] [--warmup 2] [--cpu-only] [--skip-ugs] [--profile]
        [--out results.json]

Random weights and inputs (timings do not depend on them; the targets have boxes so matching and
denoising do real work). Keep it short: the default settings run in well under 150 s on one
H100/H200. Markdown tables of the results are printed; the last line printed is a JSON object
with every number.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import ops  # noqa: E402
from configs import load_config  # noqa: E402
from models import build_model  # noqa: E402
from util.cli import add_debug_option, entry_point  # noqa: E402
from util.engine import weighted_loss  # noqa: E402
from util.logging import json_safe  # noqa: E402
from util.precision import tf32_mode  # noqa: E402
from util.profiling import is_host_op, on_device, profiled_call, range_ms, runtime_calls, self_ms  # noqa: E402


def make_batch(batch: int, h: int, w: int, boxes_per_image: int, device: torch.device, num_classes: int = 91,
               max_box: float = 0.15):
    """Random images (B, 3, h, w), no padding, and targets with box sides in [0.01, 0.01 + max_box]."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, h, w, generator=g).to(device)
    masks = torch.zeros(batch, h, w, dtype=torch.bool, device=device)
    targets = []
    for _ in range(batch):
        centers = torch.rand(boxes_per_image, 2, generator=g) * 0.8 + 0.1
        sizes = torch.rand(boxes_per_image, 2, generator=g) * max_box + 0.01
        targets.append({"labels": torch.randint(1 if num_classes > 1 else 0, num_classes, (boxes_per_image,),
                                                generator=g).to(device),
                        "boxes": torch.cat([centers, sizes], 1).to(device)})
    return images, masks, targets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, criterion, optimizer, batch, device: torch.device, bf16: bool = False):  # noqa: ANN001, ANN201
    """A closure running one full training step (forward, criterion, backward, clip, AdamW)."""
    images, masks, targets = batch

    def step() -> None:
        model.train()
        criterion.train()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):  # as util/engine.py
            outputs = model(images, masks, targets)
            losses = criterion(outputs, targets)
        total = weighted_loss(losses, criterion.weight_dict)  # as util/engine.py
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    return step


def train_step_time(model, criterion, optimizer, batch, device, bf16: bool, iters: int, warmup: int) -> dict:
    step = make_step(model, criterion, optimizer, batch, device, bf16)
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    result = {"step_ms": (time.perf_counter() - start) / iters * 1000}
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return result


@torch.no_grad()
def inference_rate(model, images, masks, device, bf16: bool, iters: int, warmup: int) -> float:
    model.eval()
    for _ in range(warmup):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            model(images, masks)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            model(images, masks)
    sync(device)
    return images.shape[0] * iters / (time.perf_counter() - start)


def gpu_benchmarks(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    cfg = load_config("dino_5scale_r50_coco", ["model.backbone_weights=none"])
    model, criterion, _ = build_model(cfg)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    batch = make_batch(2, 800, 1333, 20, device)
    results: dict = {"gpu": torch.cuda.get_device_name(device), "train": {}, "inference_images_per_s": {}}
    for bf16 in (False, True):
        for ckpt in (False, True):
            model.transformer.encoder.use_checkpoint = ckpt
            name = f"{'bf16' if bf16 else 'fp32'}{'+ckpt' if ckpt else ''}"
            torch.cuda.empty_cache()
            results["train"][name] = train_step_time(model, criterion, optimizer, batch, device, bf16,
                                                     args.iters, args.warmup)
            print(f"train {name:10s} {results['train'][name]}", flush=True)
    model.transformer.encoder.use_checkpoint = False
    images, masks, _ = batch
    for bf16 in (False, True):
        name = "bf16" if bf16 else "fp32"
        results["inference_images_per_s"][name] = inference_rate(model, images, masks, device, bf16,
                                                                 args.iters * 2, args.warmup)
        print(f"inference {name}: {results['inference_images_per_s'][name]:.2f} images/s", flush=True)
    fp32, ckpt = results["train"]["fp32"], results["train"]["fp32+ckpt"]
    results["ckpt_peak_mem_reduction_fp32"] = 1 - ckpt["peak_mem_gib"] / fp32["peak_mem_gib"]
    results["msda_backend"] = ops.backend()
    return results


# DINO vs UGS-DINO: (key, label, override). All three are built from one config and one seed.
# An override may hold several space-separated `key=value` items.
UGS_VARIANTS = (("dino", "DINO (L1 baseline)", "ugs.ablation=l1"),
                ("ugs_ur_off", "UGS, UR off (ce_in_um)", "ugs.ablation=ce_in_um"),
                ("ugs_ur_on", "UGS, UR on (full)", "ugs.ablation=full"))


def _build_variant(config: str, overrides: list[str], override: str, device: torch.device, seed: int = 0):  # noqa: ANN202
    items = override.split()
    cfg = load_config(config, list(overrides) + items)
    if "ugs.ablation=full" in items and cfg.ugs.ur.weight == 0:
        raise ValueError(f"{config}: ugs.ur.weight is 0, so the 'UR on' variant would not run UR")
    torch.manual_seed(seed)
    model, criterion, _ = build_model(cfg)
    model.to(device)
    criterion.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    return model, criterion, optimizer, cfg.model.num_classes


def _variant_step(config: str, overrides: list[str], override: str, device: torch.device, batch_size: int,
                  h: int, w: int, boxes: int, max_box: float, warmup: int, bf16: bool = False):  # noqa: ANN202
    """A training-step closure of one variant on its own random batch, after `warmup` steps."""
    model, criterion, optimizer, num_classes = _build_variant(config, overrides, override, device)
    step = make_step(model, criterion, optimizer, make_batch(batch_size, h, w, boxes, device, num_classes, max_box),
                     device, bf16)
    for _ in range(warmup):
        step()
    return step


def ugs_comparison(config: str, overrides: list[str], device: torch.device, batch_size: int, h: int, w: int,
                   boxes: int, iters: int, warmup: int, max_box: float = 0.03,
                   variants: tuple = UGS_VARIANTS, bf16: bool = False) -> dict:
    """Training-step time (median and fastest of alternating steps; on CPU also the process CPU
    time) and, on CUDA, peak memory of each variant.

    Returns {"setup": {...}, key: {"label", "step_ms", "step_ms_min", "step_ms_all", ["step_cpu_ms"],
    ["peak_mem_gib"]}, and "<key>_time_ratio" / "_min_time_ratio" / "_cpu_time_ratio" / "_mem_ratio"
    relative to the first variant (DINO)}.
    """
    result: dict = {"setup": {"config": config, "overrides": list(overrides), "batch": batch_size, "h": h, "w": w,
                              "boxes_per_image": boxes, "iters": iters, "warmup": warmup,
                              "device": str(device), "msda_backend": ops.backend(), "bf16_autocast": bf16,
                              "threads": torch.get_num_threads()}}
    if device.type == "cuda":  # peak memory: one variant resident at a time
        torch.cuda.empty_cache()
        for key, _label, override in variants:
            step = _variant_step(config, overrides, override, device, batch_size, h, w, boxes, max_box,
                                 max(1, warmup), bf16)
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            sync(device)
            result[key] = {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}
            del step
            torch.cuda.empty_cache()
    steps = {key: _variant_step(config, overrides, override, device, batch_size, h, w, boxes, max_box, warmup, bf16)
             for key, _label, override in variants}
    times: dict[str, list[float]] = {key: [] for key in steps}
    cpu_times: dict[str, list[float]] = {key: [] for key in steps}
    keys = list(steps)
    for i in range(iters):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:  # rotate the order every step
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[key]()
            sync(device)
            times[key].append((time.perf_counter() - start) * 1000)
            cpu_times[key].append((time.process_time() - start_cpu) * 1000)
    result["setup"]["msda_backend"] = ops.backend()  # known once a step has run
    base = variants[0][0]
    for key, label, _override in variants:
        entry = result.setdefault(key, {})
        entry.update({"label": label, "step_ms": statistics.median(times[key]), "step_ms_min": min(times[key]),
                      "step_ms_all": times[key]})
        if device.type == "cpu":  # process CPU time: robust to other processes sharing the cores
            entry["step_cpu_ms"] = statistics.median(cpu_times[key])
    for key, _label, _override in variants[1:]:
        result[f"{key}_time_ratio"] = result[key]["step_ms"] / result[base]["step_ms"]
        # the fastest step is the least disturbed by other processes on a shared machine
        result[f"{key}_min_time_ratio"] = result[key]["step_ms_min"] / result[base]["step_ms_min"]
        if device.type == "cpu":
            result[f"{key}_cpu_time_ratio"] = result[key]["step_cpu_ms"] / result[base]["step_cpu_ms"]
        if "peak_mem_gib" in result[key]:
            result[f"{key}_mem_ratio"] = result[key]["peak_mem_gib"] / result[base]["peak_mem_gib"]
    return result


class Comparison(NamedTuple):
    """One DINO vs UGS comparison setting: result-key suffix, bf16 autocast, extra config
    overrides, the variants compared, table title, runtime.tf32 value (None: PyTorch's)."""

    key: str
    bf16: bool
    overrides: list[str]
    variants: tuple
    title: str
    tf32: bool | None = None


def comparison_settings(args: argparse.Namespace, cpu: bool = False) -> list[Comparison]:
    """The comparisons asked for on the command line (bf16 and TF32 on the GPU only)."""
    settings = [Comparison("", False, [], UGS_VARIANTS, "fp32")]
    if args.compile_decoder:
        settings.append(Comparison("_compiled", False, ["model.compile_decoder_layers=true"], UGS_VARIANTS,
                                   "fp32, decoder layers compiled"))
    if args.ugs_bf16 and not cpu:
        settings.append(Comparison("_bf16", True, [], UGS_VARIANTS, "bf16 autocast"))
    if args.tf32 and not cpu:
        settings.append(Comparison("_tf32", False, [], UGS_VARIANTS,
                                   "fp32 with TF32 matrix products (runtime.tf32=true)", True))
    return settings


def gpu_comparison(setting: Comparison, args: argparse.Namespace, device: torch.device, results: dict,
                   tables: list[str]) -> None:
    """One DINO vs UGS comparison on the GPU (DINO-5scale R50, 2 x 800x1088, 60 boxes per image);
    its table is printed at once. A failure is printed and recorded, not raised: the other
    settings still run."""
    try:
        with tf32_mode(setting.tf32):
            result = ugs_comparison("dino_5scale_r50_coco", ["model.backbone_weights=none"] + setting.overrides,
                                    device, 2, 800, 1088, 60, args.ugs_iters, args.ugs_warmup, bf16=setting.bf16,
                                    variants=setting.variants)
    except Exception as exc:  # noqa: BLE001 - reported, recorded in the JSON, and the run goes on
        print(f"DINO vs UGS-DINO ({setting.title}) failed: {type(exc).__name__}: {exc}", flush=True)
        results[f"ugs_cuda{setting.key}"] = {"error": f"{type(exc).__name__}: {exc}"}
        torch.cuda.empty_cache()
        return
    result["setup"]["gpu"] = torch.cuda.get_device_name(device)
    results[f"ugs_cuda{setting.key}"] = result
    tables.append(ugs_table(result, f"DINO vs UGS-DINO training step ({result['setup']['gpu']}, {setting.title})"))
    print(tables[-1], flush=True)


def profile_variants(config: str, overrides: list[str], device: torch.device, batch_size: int, h: int, w: int,
                     boxes: int, max_box: float = 0.03, variants: tuple = UGS_VARIANTS, top: int = 20,
                     warmup: int = 2) -> tuple[dict, str]:
    """One profiled training step per variant (torch.profiler), after `warmup` steps.

    Returns ({key: {"wall_ms", "device_busy_ms", "ops"}}, text): on CUDA, device_busy_ms is the sum
    of kernel time, so busy/wall well below 1 means the step waits on the host (kernel launches,
    host syncs) rather than on the GPU; text holds the `top` ops by self device time (by self CPU
    time on CPU) per variant.
    """
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    result: dict = {}
    texts = []
    for key, label, override in variants:
        step = _variant_step(config, overrides, override, device, batch_size, h, w, boxes, max_box, warmup)
        prof, wall_ms = profiled_call(step, device)
        events = prof.key_averages()
        # kernels and copies only: an op's self device time repeats its kernels' (counted twice)
        busy_ms = sum(e.self_device_time_total for e in events if on_device(e)) / 1000
        result[key] = {"label": label, "wall_ms": wall_ms, "device_busy_ms": busy_ms, "ops": len(events),
                       # host ops only: each kernel's time sits in the self time of the op that
                       # launched it, so these sum to the step's total once; profiler ranges apart
                       "op_ms": {e.key: self_ms(e, device) for e in events if is_host_op(e)},
                       "op_calls": {e.key: e.count for e in events if is_host_op(e)},
                       "ranges_ms": {e.key: range_ms(e, device) for e in events
                                     if getattr(e, "is_user_annotation", False)}}
        result[key]["runtime_calls"] = runtime_calls(events)
        ratio = f", device busy {busy_ms:.1f} ms = {busy_ms / wall_ms:.2f} of wall" if device.type == "cuda" else ""
        runtime = ", ".join(f"{n} x{c}" for n, c in result[key]["runtime_calls"].items())
        texts.append(f"### {label}: profiled step {wall_ms:.1f} ms wall (profiler on){ratio}\n"
                     + (f"CUDA runtime calls (host waits and launches): {runtime}\n" if runtime else "")
                     + events.table(sort_by=sort_key, row_limit=top))
        del step, prof
        if device.type == "cuda":
            torch.cuda.empty_cache()
    keys = [key for key, _label, _override in variants]
    for before, after in zip(keys, keys[1:]):
        texts.append(profile_difference(result, before, after, top))
    return result, "\n\n".join(texts)


def profile_difference(result: dict, before: str, after: str, top: int = 20) -> str:
    """The ops whose self time (device time on CUDA) grew most from variant `before` to `after`:
    where an addition such as UR spends its time, op by op."""
    a, b = result[before], result[after]
    names = set(a["op_ms"]) | set(b["op_ms"])
    rows = sorted(((b["op_ms"].get(n, 0.0) - a["op_ms"].get(n, 0.0), n) for n in names), reverse=True)
    total = sum(d for d, _ in rows)
    lines = [f"### {b['label']} minus {a['label']}: self time {total:+.2f} ms in all "
             f"(wall {b['wall_ms'] - a['wall_ms']:+.1f} ms)", "",
             "| op | self ms | calls | share of the difference |", "|---|---|---|---|"]
    for delta, name in rows[:top]:
        calls = b["op_calls"].get(name, 0) - a["op_calls"].get(name, 0)
        share = delta / total if total > 0 else float("nan")
        lines.append(f"| {name[:90]} | {delta:+.3f} | {calls:+d} | {share:.1%} |")
    ranges = {**a.get("ranges_ms", {}), **b.get("ranges_ms", {})}
    if ranges:
        lines += ["", "Profiler ranges (length; they overlap the ops above): " + ", ".join(
            f"{n} {b.get('ranges_ms', {}).get(n, 0.0):.2f} ms (was {a.get('ranges_ms', {}).get(n, 0.0):.2f})"
            for n in sorted(ranges))]
    return "\n".join(lines)


def ugs_table(result: dict, title: str) -> str:
    """Markdown table of a `ugs_comparison` result."""
    s = result["setup"]
    lines = [f"{title}: {s['config']} {' '.join(s['overrides'])}, {s['batch']} x {s['h']}x{s['w']}, "
             f"{s['boxes_per_image']} boxes/image, median of {s['iters']} alternating steps after {s['warmup']} "
             f"warm-up, {s['device']}, MSDA backend {s['msda_backend']}",
             "", "| variant | step time (wall, median) | vs DINO | fastest step | vs DINO | process CPU time | vs DINO "
             "| peak memory | vs DINO |", "|---|---|---|---|---|---|---|---|---|"]
    base = UGS_VARIANTS[0][0]
    for key, label, _ in UGS_VARIANTS:
        if key not in result:
            continue
        r = result[key]
        t_ratio = "1.000" if key == base else f"{result[f'{key}_time_ratio']:.3f}"
        b_ratio = "1.000" if key == base else f"{result[f'{key}_min_time_ratio']:.3f}"
        cpu = f"{r['step_cpu_ms']:.1f} ms" if "step_cpu_ms" in r else "-"
        c_ratio = ("x1.000" if key == base else f"x{result[f'{key}_cpu_time_ratio']:.3f}") if "step_cpu_ms" in r else "-"
        mem = f"{r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else "n/a (CPU)"
        m_ratio = ("x1.000" if key == base else f"x{result[f'{key}_mem_ratio']:.3f}") if "peak_mem_gib" in r else "-"
        lines.append(f"| {label} | {r['step_ms']:.1f} ms | x{t_ratio} | {r['step_ms_min']:.1f} ms | x{b_ratio} | {cpu} "
                     f"| {c_ratio} | {mem} | {m_ratio} |")
    verdict = target_verdict(result)
    return "\n".join(lines + ([f"\n{verdict}"] if verdict else []))


# The project's target for UGS with UR on against DINO (step time, peak memory), measured on the GPU.
TARGET_TIME_RATIO, TARGET_MEMORY_RATIO = 1.10, 1.08


def target_verdict(result: dict) -> str:
    """One line: UR on against the target (median and fastest step time, peak memory)."""
    if "ugs_ur_on_time_ratio" not in result:
        return ""
    t, fast = result["ugs_ur_on_time_ratio"], result["ugs_ur_on_min_time_ratio"]
    parts = [f"time x{t:.3f} median / x{fast:.3f} fastest "
             f"({'within' if max(t, fast) <= TARGET_TIME_RATIO else 'above'} x{TARGET_TIME_RATIO:.2f})"]
    if "ugs_ur_on_mem_ratio" in result:
        m = result["ugs_ur_on_mem_ratio"]
        parts.append(f"peak memory x{m:.3f} ({'within' if m <= TARGET_MEMORY_RATIO else 'above'} "
                     f"x{TARGET_MEMORY_RATIO:.2f})")
    where = "GPU" if result["setup"]["device"].startswith("cuda") else "CPU, not the target's device"
    return f"UR on vs DINO ({where}): " + "; ".join(parts)


def dino_tables(cuda: dict) -> str:
    """Markdown tables of the DINO-only GPU benchmarks."""
    lines = [f"DINO-5scale R50 training step, 2 x 800x1333, 20 boxes/image, {cuda['gpu']}, "
             f"MSDA backend {cuda['msda_backend']}", "",
             "| setting | step time | peak memory |", "|---|---|---|"]
    for name, r in cuda["train"].items():
        lines.append(f"| {name} | {r['step_ms']:.1f} ms | {r.get('peak_mem_gib', float('nan')):.2f} GiB |")
    lines += ["", "| inference | images/s |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in cuda["inference_images_per_s"].items()]
    return "\n".join(lines)


@torch.no_grad()
def cpu_forward(iters: int) -> dict:
    device = torch.device("cpu")
    cfg = load_config("dino_5scale_r50_coco", ["model.backbone_weights=none"])
    model, _, _ = build_model(cfg)
    model.eval()
    images, masks, _ = make_batch(1, 512, 512, 1, device)
    model(images, masks)  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        model(images, masks)
    ms = (time.perf_counter() - start) / iters * 1000
    print(f"cpu forward 512x512: {ms:.0f} ms ({torch.get_num_threads()} threads)", flush=True)
    return {"forward_512_ms": ms, "threads": torch.get_num_threads(), "msda_backend": ops.backend()}


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per setting")
    parser.add_argument("--cpu-iters", type=int, default=2)
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU benchmarks")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU benchmarks (on a GPU machine)")
    parser.add_argument("--skip-dino", action="store_true", help="skip the DINO-only benchmarks (GPU and CPU)")
    parser.add_argument("--skip-ugs", action="store_true", help="skip the DINO vs UGS-DINO comparison")
    parser.add_argument("--ugs-iters", type=int, default=8, help="GPU: timed steps per UGS variant")
    parser.add_argument("--ugs-warmup", type=int, default=3, help="GPU: untimed steps per UGS variant")
    parser.add_argument("--cpu-ugs-iters", type=int, default=5, help="CPU: timed steps per UGS variant")
    parser.add_argument("--cpu-ugs-warmup", type=int, default=1, help="CPU: untimed steps per UGS variant")
    parser.add_argument("--cpu-ugs-size", type=int, default=128, help="CPU: square input side (dino_tiny)")
    parser.add_argument("--ugs-bf16", action="store_true",
                        help="GPU: also run the DINO vs UGS-DINO comparison under bfloat16 autocast")
    parser.add_argument("--compile-decoder", action="store_true",
                        help="also run the DINO vs UGS-DINO comparison (fp32; DINO, UR off, UR on) with "
                             "model.compile_decoder_layers=true (the first steps compile)")
    parser.add_argument("--tf32", action="store_true",
                        help="GPU: also run the comparison (DINO, UR off, UR on) with TF32 matrix products and "
                             "convolutions (runtime.tf32=true)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step of each DINO/UGS variant (torch.profiler) and print the "
                             "top ops and, on a GPU, how busy the device is during the step")
    parser.add_argument("--out", type=Path, help="also write the results JSON here (atomically)")
    parser.add_argument("--markdown", type=Path, help="also write the tables here (markdown)")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    results: dict = {"torch": torch.__version__}
    tables: list[str] = []
    if torch.cuda.is_available() and not args.cpu_only:
        device = torch.device("cuda")
        if not args.skip_dino:
            results["cuda"] = gpu_benchmarks(args)
            tables.append(dino_tables(results["cuda"]))
        if not args.skip_ugs:
            settings = comparison_settings(args)
            # the compiled comparison last: its first steps compile (the slowest and least certain part)
            for setting in [st for st in settings if st.key != "_compiled"]:
                gpu_comparison(setting, args, device, results, tables)
            if args.profile:
                results["ugs_cuda_profile"], text = profile_variants(
                    "dino_5scale_r50_coco", ["model.backbone_weights=none"], device, 2, 800, 1088, 60,
                    variants=UGS_VARIANTS[:3])
                print(text, flush=True)
                tables.append(text)
            for setting in [st for st in settings if st.key == "_compiled"]:
                gpu_comparison(setting, args, device, results, tables)
    else:
        print("no GPU benchmarks (no CUDA device or --cpu-only)", flush=True)
    if not args.skip_dino and not args.gpu_only:
        results["cpu"] = cpu_forward(args.cpu_iters)
    if not args.skip_ugs and not args.gpu_only:
        n = args.cpu_ugs_size
        for setting in comparison_settings(args, cpu=True):
            ugs_cpu = ugs_comparison("dino_tiny", setting.overrides, torch.device("cpu"), 2, n, n, 10,
                                     args.cpu_ugs_iters, args.cpu_ugs_warmup, max_box=0.1, variants=setting.variants)
            results[f"ugs_cpu{setting.key}"] = ugs_cpu
            tables.append(ugs_table(ugs_cpu, f"DINO vs UGS-DINO training step (CPU, tiny config, {setting.title})"))
            print(tables[-1], flush=True)
        if args.profile:
            results["ugs_cpu_profile"], text = profile_variants("dino_tiny", [], torch.device("cpu"), 2, n, n, 10,
                                                                max_box=0.1, warmup=1)
            print(text, flush=True)
    print("\n\n".join(tables), flush=True)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n\n".join(tables) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, args.out)
    print(json.dumps(json_safe(results), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
