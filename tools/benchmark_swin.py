"""Speed and memory of the Swin backbones (benchmark, not a test).

    python tools/benchmark_swin.py --cpu [--official-repo DINO_CHECKOUT]
        CPU forward of the tiny official-fixture Swin (tests/fixtures/swin_official_tiny: two images,
        251 x 301 padded batch), float64 and float32, one thread, median of --iters runs. With
        --official-repo (a checkout of IDEA-Research/DINO) the official SwinTransformer runs the same
        weights and inputs in the same process and its time and max abs difference are printed too.
    python tools/benchmark_swin.py --gpu [--iters 5 --warmup 2]
        DINO-5scale Swin-L (configs/dino_5scale_swinl_coco, random weights) training step at batch
        2 x 800x1333 (20 boxes per image): fp32 and bf16 autocast, Swin block checkpointing off and
        on; step time and peak memory.

The last line printed is a JSON object with every number.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models.swin import SwinTransformer  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "swin_official_tiny"


def median_ms(fn, iters: int, warmup: int) -> float:  # noqa: ANN001
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def official_swin_class(repo: Path):  # noqa: ANN201
    """SwinTransformer and NestedTensor of an official DINO checkout (its `util` package shadows ours,
    which this tool does not use)."""
    for name in [m for m in sys.modules if m == "util" or m.startswith("util.")]:
        del sys.modules[name]
    sys.path.insert(0, str(repo))
    spec = importlib.util.spec_from_file_location("official_swin", repo / "models/dino/swin_transformer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from util.misc import NestedTensor  # the official one, now first on sys.path

    return module.SwinTransformer, NestedTensor


def cpu_benchmark(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    config = json.loads((FIXTURE / "config.json").read_text())
    state = torch.load(FIXTURE / "state_dict.pt", weights_only=True)
    inputs = torch.load(FIXTURE / "inputs.pt", weights_only=True)
    kwargs = {k: config[k] for k in ("embed_dim", "depths", "num_heads", "window_size", "drop_path_rate")}
    ours = SwinTransformer(**kwargs, out_indices=config["out_indices"])
    ours.load_state_dict(state)
    official = nested = None
    if args.official_repo:
        official_cls, nested = official_swin_class(args.official_repo)
        official = official_cls(pretrain_img_size=config["pretrain_img_size"],
                                out_indices=tuple(config["out_indices"]), **kwargs)
        official.load_state_dict(state)
    results = {}
    for dtype in (torch.float64, torch.float32):
        images = inputs["tensors"].to(dtype)
        model = ours.to(dtype).eval()
        row = {"ours_ms": median_ms(lambda: model(images), args.iters, args.warmup)}  # noqa: B023
        if official is not None:
            ref_model = official.to(dtype)
            ref_model.eval()  # the official train() returns None
            batch = nested(images, inputs["mask"])
            row["official_ms"] = median_ms(lambda: ref_model(batch), args.iters, args.warmup)  # noqa: B023
            with torch.no_grad():
                ours_out, ref_out = model(images), ref_model(batch)
            row["max_abs_diff"] = max(float((o - ref_out[i].tensors).abs().max())
                                      for i, o in enumerate(ours_out))
        name = str(dtype).replace("torch.", "")
        results[name] = row
        print(f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
    return {"cpu_tiny_forward": results, "threads": 1, "iters": args.iters}


def gpu_benchmark(args: argparse.Namespace) -> dict:
    from configs import load_config
    from models import build_model
    from tools.benchmark_model import make_batch, train_step_time

    device = torch.device("cuda")
    model, criterion, _ = build_model(load_config("dino_5scale_swinl_coco"))
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4)
    batch = make_batch(2, 800, 1333, 20, device)
    results: dict = {"gpu": torch.cuda.get_device_name(device), "train": {}}
    for bf16 in (False, True):
        for ckpt in (False, True):
            for stage in model.backbone[0].layers:
                stage.use_checkpoint = ckpt
            name = f"{'bf16' if bf16 else 'fp32'}{'+ckpt' if ckpt else ''}"
            torch.cuda.empty_cache()
            results["train"][name] = train_step_time(model, criterion, optimizer, batch, device, bf16,
                                                     args.iters, args.warmup)
            print(f"train {name:10s} {results['train'][name]}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny fixture Swin forward on the CPU")
    parser.add_argument("--gpu", action="store_true", help="Swin-L DINO-5scale training step on a GPU")
    parser.add_argument("--official-repo", type=Path,
                        help="IDEA-Research/DINO checkout to time the official Swin")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if not (args.cpu or args.gpu):
        parser.error("give --cpu and/or --gpu")
    if args.official_repo and not (args.official_repo / "models/dino/swin_transformer.py").is_file():
        parser.error(f"--official-repo {args.official_repo}: models/dino/swin_transformer.py not found")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: no CUDA device visible")
    results = {}
    if args.gpu:  # first: the official checkout of --cpu replaces our `util` package in this process
        results.update(gpu_benchmark(args))
    if args.cpu:
        results.update(cpu_benchmark(args))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
