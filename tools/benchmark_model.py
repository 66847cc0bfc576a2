"""Speed and memory of DINO-5scale R50 (benchmark, not a test).

GPU (when one is present): training step time and peak memory at batch 2 x 1333x800 for
{fp32, bf16 autocast} x {activation checkpointing off, on}, and inference images/s (fp32, bf16).
CPU (always): eval forward time of one 512x512 image.

    python tools/benchmark_model.py [--iters 5] [--warmup 2] [--cpu-only] [--out results.json]

Random weights and inputs (timings do not depend on them; the targets have 20 boxes per image so
matching and denoising do real work). Keep it short: the default settings run in well under
150 s on one H100/H200. The last line printed is a JSON object with every number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import ops  # noqa: E402
from configs import load_config  # noqa: E402
from models import build_model  # noqa: E402


def make_batch(batch: int, h: int, w: int, boxes_per_image: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, h, w, generator=g).to(device)
    masks = torch.zeros(batch, h, w, dtype=torch.bool, device=device)
    targets = []
    for _ in range(batch):
        centers = torch.rand(boxes_per_image, 2, generator=g) * 0.8 + 0.1
        sizes = torch.rand(boxes_per_image, 2, generator=g) * 0.15 + 0.01
        targets.append({"labels": torch.randint(1, 91, (boxes_per_image,), generator=g).to(device),
                        "boxes": torch.cat([centers, sizes], 1).to(device)})
    return images, masks, targets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_time(model, criterion, optimizer, batch, device, bf16: bool, iters: int, warmup: int) -> dict:
    images, masks, targets = batch
    model.train()

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = model(images, masks, targets)
        losses = criterion(outputs, targets)
        total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per setting")
    parser.add_argument("--cpu-iters", type=int, default=2)
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU benchmarks")
    parser.add_argument("--out", type=Path, help="also write the results JSON here (atomically)")
    args = parser.parse_args(argv)
    results: dict = {"torch": torch.__version__}
    if torch.cuda.is_available() and not args.cpu_only:
        results["cuda"] = gpu_benchmarks(args)
    else:
        print("no GPU benchmarks (no CUDA device or --cpu-only)", flush=True)
    results["cpu"] = cpu_forward(args.cpu_iters)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, args.out)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
