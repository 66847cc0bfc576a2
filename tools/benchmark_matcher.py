"""Time one Hungarian matching call of a training step: cost matrices of every output set, the one
device-to-host copy, and the per-image assignments.

    python tools/benchmark_matcher.py                          # 2 and 4 images, 300 targets each
    python tools/benchmark_matcher.py --images 4 --targets 500 --device cuda --bins

Dense drone images carry hundreds of objects, and the matcher runs on the host between the
forward and the backward, so its time adds to every step. Defaults are DINO-5scale's: 900 queries,
7 output sets (6 decoder layers + the encoder proposals).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ugs  # noqa: E402
from models.matcher import HungarianMatcher  # noqa: E402
from models.ugs_matcher import UGSBinsMatcher  # noqa: E402
from util.cli import add_debug_option, entry_point  # noqa: E402


def make_batch(images: int, queries: int, targets: int, sets: int, classes: int, bins: int | None,
               device: str, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Random predictions for `sets` output sets and `targets` small boxes per image."""
    gen = torch.Generator().manual_seed(seed)
    output_sets = []
    for _ in range(sets):
        out = {"pred_logits": torch.randn(images, queries, classes, generator=gen),
               "pred_boxes": torch.rand(images, queries, 4, generator=gen) * 0.5 + 0.1}
        if bins is not None:
            out["pred_box_logits"] = torch.randn(images, queries, 4, bins + 1, generator=gen)
            out["ref_boxes_logit"] = torch.randn(images, queries, 4, generator=gen) - 2.0
        output_sets.append({k: v.to(device) for k, v in out.items()})
    labels = [torch.randint(0, classes, (targets,), generator=gen).to(device) for _ in range(images)]
    boxes = [(torch.rand(targets, 4, generator=gen) * 0.1 + torch.tensor([0.2, 0.2, 0.01, 0.01])).to(device)
             for _ in range(images)]
    return output_sets, [{"labels": lab, "boxes": box} for lab, box in zip(labels, boxes)]


def time_matcher(matcher: HungarianMatcher, output_sets: list[dict], targets: list[dict], names: list[str],
                 repeats: int, device: str) -> list[float]:
    """Milliseconds per forward_sets call (after one warm-up call)."""
    matcher.forward_sets(output_sets, targets, set_names=names)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        matcher.forward_sets(output_sets, targets, set_names=names)  # returns host indices: synchronous
        times.append(1000 * (time.perf_counter() - start))
    return times


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[2, 4], help="images per batch (per GPU)")
    parser.add_argument("--targets", type=int, default=300, help="targets per image")
    parser.add_argument("--queries", type=int, default=900)
    parser.add_argument("--sets", type=int, default=7, help="output sets matched per step")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--bins", action="store_true", help="UGS's bins cost (ugs.match.box_cost=bins, n = 16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads and assignment threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON line per configuration")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    if args.targets < 0 or args.queries < 1 or args.sets < 1 or args.repeats < 1 or min(args.images) < 1:
        parser.error("--images, --queries, --sets and --repeats must be >= 1 and --targets >= 0")
    torch.set_num_threads(args.threads)
    # the decoder's auxiliary layers, its final layer, the encoder proposals
    names = [""] if args.sets == 1 else [f"_{i}" for i in range(args.sets - 2)] + ["", "_interm"]
    if args.bins:
        grid = ugs.make_grid(4.0, 1.0, 16, device=args.device)
        matcher = UGSBinsMatcher(grid, ugs.make_grid(5.0, 1.0, 16, device=args.device), ce_cost=1.0,
                                 threads=args.threads)
    else:
        matcher = HungarianMatcher(threads=args.threads)
    for images in args.images:
        output_sets, targets = make_batch(images, args.queries, args.targets, args.sets, args.classes,
                                          16 if args.bins else None, args.device)
        times = time_matcher(matcher, output_sets, targets, names, args.repeats, args.device)
        row = {"images": images, "targets": args.targets, "queries": args.queries, "sets": args.sets,
               "cost": "bins" if args.bins else "l1", "device": args.device, "threads": args.threads,
               "median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
               "max_ms": round(max(times), 2)}
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{images} images x {args.targets} targets, {args.queries} queries, {args.sets} sets, "
                  f"{row['cost']} cost, {args.device}, {args.threads} thread(s): median {row['median_ms']:.1f} ms "
                  f"(min {row['min_ms']:.1f}, max {row['max_ms']:.1f}) over {args.repeats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
