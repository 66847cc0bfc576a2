"""Training data pipeline throughput per DataLoader worker: decode + augment + collate.

    python tools/benchmark_data.py                      # short: 640x480 and 2000x1500, policy detr
    python tools/benchmark_data.py --policies detr small_object --images 32 --batches 16

Writes synthetic JPEG scenes of each size to a temporary folder (COCO JSON beside them), then
times the training DataLoader in the main process (num_workers=0 = one worker's throughput).
A run needs about (GPUs x images/s each GPU consumes) / (images/s per worker) workers in total;
the tool prints that estimate for --gpus and --gpu-images-per-s.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.coco import CocoDetection  # noqa: E402
from datasets.collate import collate_detection  # noqa: E402
from datasets.synthetic import CATEGORIES, render_image  # noqa: E402
from datasets.transforms import build_transforms  # noqa: E402
from util.cli import add_debug_option, entry_point  # noqa: E402


def write_jpeg_split(folder: Path, hw: tuple[int, int], n: int, seed: int = 0) -> Path:
    """n synthetic scenes of size hw as JPEG (quality 90) + annotations.json; returns the JSON."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": CATEGORIES}
    for i in range(n):
        img, objects, _, _ = render_image(seed, i, hw, min_objects=50, max_objects=200)
        name = f"{i:04d}.jpg"
        Image.fromarray(img).save(folder / name, quality=90)
        coco["images"].append({"id": i + 1, "file_name": name, "height": hw[0], "width": hw[1]})
        for obj in objects:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "iscrowd": 0,
                                        "category_id": obj["category_id"], "bbox": obj["bbox"],
                                        "area": obj["bbox"][2] * obj["bbox"][3]})
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def time_pipeline(ann: Path, images: Path, policy: str, batch_size: int, batches: int, warmup: int) -> dict:
    dataset = CocoDetection(ann, images, transforms=build_transforms(policy, train=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0,
                                         collate_fn=collate_detection,
                                         generator=torch.Generator().manual_seed(0))
    seen, times = 0, []
    it = iter(_cycle(loader))
    for _ in range(warmup):
        next(it)
    for _ in range(batches):
        start = time.perf_counter()
        images_batch, _, _ = next(it)
        times.append(time.perf_counter() - start)
        seen += images_batch.shape[0]
    total = sum(times)
    return {"images_per_s": seen / total, "ms_per_image": 1000 * total / seen,
            "p90_ms_per_batch": 1000 * float(np.percentile(times, 90))}


def _cycle(loader):  # noqa: ANN001, ANN202
    while True:
        yield from loader


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["480x640", "1500x2000"], help="HxW of the JPEGs")
    parser.add_argument("--policies", nargs="+", default=["detr"], choices=["detr", "small_object", "none"])
    parser.add_argument("--images", type=int, default=8, help="distinct JPEGs per size")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (a DataLoader worker uses 1; keep 1 for per-worker numbers)")
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--gpu-images-per-s", type=float, default=10.0,
                        help="images/s one GPU trains on (an assumption for the estimate: measure yours)")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            h, w = (int(v) for v in size.lower().split("x"))
            folder = Path(tmp) / size
            ann = write_jpeg_split(folder, (h, w), args.images)
            for policy in args.policies:
                r = time_pipeline(ann, folder, policy, args.batch_size, args.batches, args.warmup)
                rows.append((size, policy, r))
                print(f"{size:>10}  {policy:<12}  {r['images_per_s']:7.2f} img/s per worker  "
                      f"{r['ms_per_image']:7.1f} ms/img  p90 {r['p90_ms_per_batch']:7.1f} ms/batch",
                      flush=True)
    need = args.gpus * args.gpu_images_per_s
    print(f"\nfor {args.gpus} GPUs at {args.gpu_images_per_s:g} img/s each ({need:g} img/s in total):")
    for size, policy, r in rows:
        workers = math.ceil(need / r["images_per_s"])
        print(f"  {size:>10} {policy:<12} -> {workers} workers in total "
              f"(data.num_workers={math.ceil(workers / args.gpus)} per GPU process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
