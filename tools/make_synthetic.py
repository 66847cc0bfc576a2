"""Write the embedded synthetic small-object dataset to disk, with its statistics.

    python tools/make_synthetic.py data/synthetic --images 200 --seed 0

OUT_DIR gets images/*.png (or .jpg), annotations.json (COCO; ignored regions as crowd annotations
one per category), statistics.json, size_histogram.png (box sizes with the COCO small/medium/large
buckets, and objects per image) and sample_boxes.png (one scene with its boxes drawn).
Train with it as a COCO dataset: data.dataset=coco data.train_images=OUT_DIR/images ...
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.synthetic import CATEGORIES, MEDIUM_AREA, SMALL_AREA  # noqa: E402
from datasets.synthetic import generate_synthetic, size_bucket_counts  # noqa: E402
from util.cli import add_debug_option, entry_point  # noqa: E402


def statistics(coco: dict, generator_stats: dict) -> dict:
    """Objects per image, size buckets, per-category counts, crowd regions."""
    per_image = {img["id"]: 0 for img in coco["images"]}
    per_cat = {c["name"]: 0 for c in coco["categories"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    crowd = 0
    for ann in coco["annotations"]:
        if ann["iscrowd"]:
            crowd += 1
            continue
        per_image[ann["image_id"]] += 1
        per_cat[names[ann["category_id"]]] += 1
    counts = np.array(list(per_image.values()))
    return {"images": len(coco["images"]), "objects": int(counts.sum()),
            "objects_per_image": {"min": int(counts.min()), "mean": round(float(counts.mean()), 2),
                                  "median": float(np.median(counts)), "max": int(counts.max())},
            "size_buckets": size_bucket_counts(coco), "objects_per_category": per_cat,
            "ignored_regions": crowd // max(len(coco["categories"]), 1),
            "generator": dict(sorted(generator_stats.items()))}


def plot_statistics(coco: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = np.array([np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in coco["annotations"] if not a["iscrowd"]])
    per_image = np.bincount([a["image_id"] for a in coco["annotations"] if not a["iscrowd"]],
                            minlength=len(coco["images"]) + 1)[1:]
    buckets = size_bucket_counts(coco)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.logspace(np.log10(2), np.log10(max(sides.max(), 200)), 40)
    ax1.hist(sides, bins=bins, color="tab:blue")
    ax1.set_xscale("log")
    for edge in (np.sqrt(SMALL_AREA), np.sqrt(MEDIUM_AREA)):
        ax1.axvline(edge, color="k", ls="--", lw=1)
    ax1.set_xlabel("sqrt(box area) [px]  (COCO buckets at 32 and 96)")
    ax1.set_ylabel("objects")
    ax1.set_title(f"box sizes: small {buckets['small']}, medium {buckets['medium']}, "
                  f"large {buckets['large']}")
    ax2.hist(per_image, bins=20, color="tab:orange")
    ax2.set_xlabel("objects per image")
    ax2.set_ylabel("images")
    ax2.set_title(f"{len(per_image)} images, mean {per_image.mean():.1f} objects")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sample(image: np.ndarray, coco: dict, image_id: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape[:2]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.3))
    for ax, draw in zip(axes, (False, True), strict=True):
        ax.imshow(image)
        ax.set_axis_off()
        if not draw:
            ax.set_title("synthetic scene")
            continue
        for ann in coco["annotations"]:
            if ann["image_id"] != image_id:
                continue
            x, y, bw, bh = ann["bbox"]
            colour = "red" if ann["iscrowd"] else "yellow"
            ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), bw, bh, fill=False, ec=colour, lw=0.7))
        ax.set_title("boxes (yellow) and ignored regions (red)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png")
    plt.close(fig)
    from PIL import Image

    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=256).save(path, optimize=True)  # ~5x smaller


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--min-objects", type=int, default=10)
    parser.add_argument("--max-objects", type=int, default=200)
    parser.add_argument("--max-ignored-regions", type=int, default=2)
    parser.add_argument("--small-side", type=float, nargs=3, default=(4.0, 10.0, 31.0),
                        metavar=("MIN", "MEDIAN", "MAX"), help="small objects' side in pixels")
    parser.add_argument("--clutter", type=int, default=0,
                        help="up to this many unannotated distractors per image (data.synthetic_clutter)")
    parser.add_argument("--format", choices=("png", "jpg"), default="png")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    from PIL import Image
    from tqdm import tqdm

    coco, images, gen_stats = generate_synthetic(args.images, tuple(args.size), args.min_objects,
                                                 args.max_objects, args.seed, file_ext=args.format,
                                                 max_ignored_regions=args.max_ignored_regions,
                                                 small_side=tuple(args.small_side), clutter=args.clutter)
    image_dir = args.out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for info in tqdm(coco["images"], desc="writing images", unit="img", disable=not sys.stderr.isatty()):
        array = images[info["id"]].permute(1, 2, 0).numpy()
        options = {"quality": 92} if args.format == "jpg" else {}
        Image.fromarray(array).save(image_dir / info["file_name"], **options)
    for name, payload in (("annotations.json", coco), ("statistics.json", statistics(coco, gen_stats))):
        tmp = args.out_dir / (name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=None if name == "annotations.json" else 2))
        tmp.replace(args.out_dir / name)
    plot_statistics(coco, args.out_dir / "size_histogram.png")
    # the busiest of the first ten scenes: the kind of image the dataset is about
    counts = np.bincount([a["image_id"] for a in coco["annotations"] if not a["iscrowd"]],
                         minlength=len(coco["images"]) + 1)
    shown = int(np.argmax(counts[1:11])) + 1
    plot_sample(images[shown].permute(1, 2, 0).numpy(), coco, shown, args.out_dir / "sample_boxes.png")
    print(json.dumps(statistics(coco, gen_stats), indent=2))
    print(f"wrote {len(coco['images'])} images, annotations.json, statistics.json, size_histogram.png, "
          f"sample_boxes.png to {args.out_dir} ({len(CATEGORIES)} categories)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
