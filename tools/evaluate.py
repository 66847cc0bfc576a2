"""Evaluate a COCO results file at N detections per image.

    python tools/evaluate.py GT.json RESULTS.json --max-dets 1500 [--json] [--backend faster]
    python tools/evaluate.py GT.json RESULTS.json --config dino_5scale_r50_visdrone   # its 1500
    python tools/evaluate.py --benchmark-synthetic 500 [--max-dets 1500]

Every summary row is computed at --max-dets (see docs/evaluation.md): by default the config's
eval.max_dets when --config is given (1500 for the VisDrone configs), else 100. The backend
defaults to faster-coco-eval when it is installed (same numbers as pycocotools, several times
faster on dense scenes); `--backend pycocotools` selects the reference. With --json the last line
printed is one JSON object with the metrics as fractions (AP, AP50, AP75, APs, APm, APl, AR, ...;
null where undefined). The benchmark mode times both backends on a synthetic dense case.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.coco_eval import (BACKEND_CHOICES, BACKENDS,  # noqa: E402
                                evaluate_detections, format_summary, metrics_to_json, resolve_backend)
from util.cli import add_debug_option, entry_point  # noqa: E402

DEFAULT_MAX_DETS = 100


def synthetic_case(num_images: int, gts_per_image: int, dets_per_image: int, num_categories: int = 1,
                   seed: int = 0, image_hw: tuple[int, int] = (1080, 1920),
                   size_range: tuple[float, float] = (6.0, 60.0)) -> tuple[dict, list[dict]]:
    """A dense drone-like case: small GT boxes (side in `size_range` px) and detections = jittered
    GTs + false positives.

    Scores are distinct (no ties) and unrelated to quality for the false positives, so truncating
    to fewer detections per image loses true positives and changes AP. Returns (gt dict, results).
    """
    rng = np.random.default_rng(seed)
    h, w = image_hw
    images, annotations, results = [], [], []
    categories = [{"id": c + 1, "name": f"class{c + 1}"} for c in range(num_categories)]
    ann_id = 1
    for img in range(1, num_images + 1):
        images.append({"id": img, "height": h, "width": w, "file_name": f"{img:06d}.jpg"})
        sizes = rng.uniform(*size_range, size=(gts_per_image, 2))
        xy = rng.uniform(0, 1, size=(gts_per_image, 2)) * (np.array([w, h]) - sizes)
        cats = rng.integers(1, num_categories + 1, size=gts_per_image)
        for (x, y), (bw, bh), c in zip(xy, sizes, cats):
            annotations.append({"id": ann_id, "image_id": img, "category_id": int(c), "iscrowd": 0,
                                "bbox": [float(x), float(y), float(bw), float(bh)],
                                "area": float(bw * bh)})
            ann_id += 1
        n_tp = min(gts_per_image, int(dets_per_image * 0.8))
        picks = rng.permutation(gts_per_image)[:n_tp]
        jitter = rng.normal(0, 0.08, size=(n_tp, 4)) * np.concatenate([sizes[picks], sizes[picks]], 1)
        boxes = np.concatenate([xy[picks], sizes[picks]], 1) + jitter
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
        n_fp = dets_per_image - n_tp
        fp_sizes = rng.uniform(*size_range, size=(n_fp, 2))
        fp_xy = rng.uniform(0, 1, size=(n_fp, 2)) * (np.array([w, h]) - fp_sizes)
        boxes = np.concatenate([boxes, np.concatenate([fp_xy, fp_sizes], 1)], 0)
        det_cats = np.concatenate([cats[picks], rng.integers(1, num_categories + 1, size=n_fp)])
        scores = rng.permutation(dets_per_image) / dets_per_image * 0.98 + 0.01 + 1e-7 * img
        for box, c, s in zip(boxes, det_cats, scores):
            results.append({"image_id": img, "category_id": int(c), "bbox": [float(v) for v in box],
                            "score": float(s)})
    return {"images": images, "annotations": annotations, "categories": categories}, results


def benchmark(num_images: int, max_dets: int, gts_per_image: int, num_categories: int,
              backends: list[str]) -> None:
    gt, results = synthetic_case(num_images, gts_per_image, max_dets, num_categories)
    print(f"synthetic case: {num_images} images x {max_dets} detections ({len(results)} in total), "
          f"{gts_per_image} GT boxes per image, {num_categories} categories")
    seen = {}
    for backend in backends:
        start = time.perf_counter()
        metrics = evaluate_detections(gt, results, max_dets, backend=backend)
        seconds = time.perf_counter() - start
        seen[backend] = metrics
        print(f"  {backend:<12} {seconds:8.2f} s   AP={metrics['AP']:.6f} AP50={metrics['AP50']:.6f} "
              f"AR={metrics['AR']:.6f}")
    if len(seen) == 2:
        a, b = seen.values()
        diff = max(abs(a[k] - b[k]) for k in ("AP", "AP50", "AP75", "APs", "AR"))
        print(f"  max |difference| between backends over AP, AP50, AP75, APs, AR: {diff:.3g}")


def apply_config_defaults(args: argparse.Namespace) -> None:
    """Fill --max-dets and --backend left unset: from --config's eval section when given, else
    100 and auto. Sets `args.max_dets_source` (how the cap was chosen, for the printed line)."""
    from configs import ConfigError, load_config

    if args.opt and not args.config:
        raise ConfigError("--opt overrides a config: pass --config NAME with it")
    eval_cfg = None
    if args.config:

        eval_cfg = load_config(args.config, args.opt).eval
    args.max_dets_source = ""
    if args.max_dets is None:
        args.max_dets = eval_cfg.max_dets if eval_cfg is not None else DEFAULT_MAX_DETS
        args.max_dets_source = f" from {args.config}" if eval_cfg is not None else " (default)"
    if args.backend is None:
        args.backend = eval_cfg.backend if eval_cfg is not None else "auto"
    args.backend = resolve_backend(args.backend)



@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gt", nargs="?", help="COCO ground-truth JSON")
    parser.add_argument("results", nargs="?", help="COCO results JSON (list of records)")
    parser.add_argument("--max-dets", type=int, default=None,
                        help="detections per image every summary row is computed at (default: "
                             f"eval.max_dets of --config, else {DEFAULT_MAX_DETS})")
    parser.add_argument("--config", default=None,
                        help="named config or .py/.json path whose eval section gives the defaults of "
                             "--max-dets and --backend (e.g. dino_5scale_r50_visdrone: 1500)")
    parser.add_argument("--opt", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted overrides of --config, e.g. eval.max_dets=300 (several after one "
                             "--opt, or --opt repeated)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                        help="auto (default, or eval.backend of --config): faster-coco-eval when "
                             "installed, else pycocotools; both give the same numbers")
    parser.add_argument("--per-class", action="store_true", help="also print per-category AP")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON on the last line")
    parser.add_argument("--benchmark-synthetic", type=int, metavar="NUM_IMAGES",
                        help="time both backends on a synthetic dense case with NUM_IMAGES images")
    parser.add_argument("--benchmark-gts", type=int, default=100, help="GT boxes per synthetic image")
    parser.add_argument("--benchmark-categories", type=int, default=10)
    parser.add_argument("--benchmark-backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    add_debug_option(parser)
    args = parser.parse_args(argv)
    apply_config_defaults(args)

    if args.benchmark_synthetic:
        benchmark(args.benchmark_synthetic, args.max_dets, args.benchmark_gts, args.benchmark_categories,
                  args.benchmark_backends)
        return 0
    if not args.gt or not args.results:
        parser.error("GT and RESULTS are required (or use --benchmark-synthetic)")
    metrics = evaluate_detections(args.gt, args.results, args.max_dets, backend=args.backend,
                                  per_class=args.per_class)  # CocoEvalError: message, exit 2 (@entry_point)
    dropped = f", {metrics['num_truncated']} dropped by the per-image cap" if metrics["num_truncated"] else ""
    print(f"{args.results}: {metrics['num_detections']} detections on {metrics['num_images']} images, "
          f"{metrics['num_images_without_detections']} of them without any "
          f"(maxDets={args.max_dets}{args.max_dets_source}, backend={metrics['backend']}{dropped})")
    print(format_summary(metrics))
    if args.json:
        print(metrics_to_json(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
