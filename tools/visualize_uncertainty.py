"""Draw detections with their per-coordinate uncertainty on an image (paper Fig. 5 style), as PNG.

Each box edge is drawn as a band of +-1 standard deviation (pixels) around the decoded edge, and
the box is coloured by its mean per-coordinate entropy (nats), with a colourbar. Input is a COCO
results JSON whose entries carry `uncertainty: {std_xyxy_px: [4], entropy}` (what evaluation
writes with ugs.enabled=true, docs/conventions.md).

    python tools/visualize_uncertainty.py --detections results.json --image img.jpg --image-id 42 \
        --out outputs/uncertainty.png
    python tools/visualize_uncertainty.py --config dino_5scale_r50_visdrone_ugs --checkpoint ckpt.pth \
        --image img.jpg --out outputs/uncertainty.png          # run a UGS-DINO checkpoint on an image
    python tools/visualize_uncertainty.py --demo --out outputs/uncertainty_demo.png  # synthetic
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from util.cli import add_debug_option, entry_point  # noqa: E402

COLORBAR_PX = 110  # extra width (pixels) right of the image for the colourbar


def check_detections(detections: Sequence[dict], source: str = "detections") -> None:
    """Raise CocoEvalError (a ValueError) naming the first malformed entry (COCO result + uncertainty)."""
    from datasets.coco_eval import CocoEvalError

    missing = [i for i, d in enumerate(detections) if "uncertainty" not in d]
    if missing:
        raise CocoEvalError(f"{source}: {len(missing)} of {len(detections)} detections have no 'uncertainty' "
                            f"(first: index {missing[0]}); write results with ugs.enabled=true")
    for i, d in enumerate(detections):
        unc = d["uncertainty"]
        ok = (len(d.get("bbox", ())) == 4 and isinstance(unc, dict) and len(unc.get("std_xyxy_px", ())) == 4
              and isinstance(unc.get("entropy"), (int, float)) and isinstance(d.get("score"), (int, float)))
        if not ok:
            raise CocoEvalError(f"{source}[{i}]: expected bbox [x, y, w, h], score, and uncertainty "
                                f"{{std_xyxy_px: [4], entropy}}, got {d}")
        vals = [*d["bbox"], *unc["std_xyxy_px"], unc["entropy"], d["score"]]
        if not all(math.isfinite(float(v)) for v in vals) or min(unc["std_xyxy_px"]) < 0:
            raise CocoEvalError(f"{source}[{i}]: non-finite value or negative std in {d}")


def draw_uncertainty(image: np.ndarray, detections: Sequence[dict], out_path: str | Path, *,
                     scale: float = 1.0, entropy_max: float | None = None, title: str | None = None,
                     cmap: str = "plasma", dpi: int = 100) -> Path:
    """Write a PNG of `image` (H, W, 3) uint8 or float in [0, 1] with the detections drawn.

    detections: COCO results (bbox [x, y, w, h] absolute pixels of this image) with
      uncertainty {std_xyxy_px: [sx0, sy0, sx1, sy1], entropy}.
    Output size: (round(H * scale), round(W * scale) + COLORBAR_PX) pixels (h, w).
    The colour scale is [0, entropy_max] (default: the largest entropy drawn); higher-entropy boxes
    are drawn last, on top. Written atomically (temporary file + rename).
    """
    check_detections(detections)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected (H, W, 3), got {image.shape}")
    h, w = image.shape[:2]
    out_h, img_w = round(h * scale), round(w * scale)
    out_w = img_w + COLORBAR_PX
    fig = plt.figure(figsize=(out_w / dpi, out_h / dpi), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, img_w / out_w, 1.0))
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    entropies = [float(d["uncertainty"]["entropy"]) for d in detections]
    vmax = entropy_max if entropy_max is not None else max(entropies, default=1.0)
    norm = Normalize(vmin=0.0, vmax=max(vmax, 1e-6))
    colormap = plt.get_cmap(cmap)
    lw = max(0.6, 1.2 * scale)
    for d in sorted(detections, key=lambda d: d["uncertainty"]["entropy"]):
        x, y, bw, bh = (float(v) for v in d["bbox"])
        x0, y0, x1, y1 = x, y, x + bw, y + bh
        sx0, sy0, sx1, sy1 = (float(v) for v in d["uncertainty"]["std_xyxy_px"])
        color = colormap(norm(float(d["uncertainty"]["entropy"])))
        bands = [((x0 - sx0, y0), 2 * sx0, bh), ((x1 - sx1, y0), 2 * sx1, bh),  # left, right edge
                 ((x0, y0 - sy0), bw, 2 * sy0), ((x0, y1 - sy1), bw, 2 * sy1)]  # top, bottom edge
        for xy, bw_, bh_ in bands:
            ax.add_patch(Rectangle(xy, bw_, bh_, facecolor=color, edgecolor="none", alpha=0.45))
        ax.add_patch(Rectangle((x0, y0), bw, bh, facecolor="none", edgecolor=color, linewidth=lw))
    cax = fig.add_axes(((img_w + 12) / out_w, 0.08, 16 / out_w, 0.84))
    cbar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=colormap), cax=cax)
    cbar.set_label("mean entropy per coordinate (nats)", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    if title:
        ax.text(4, 4, title, color="white", fontsize=8, va="top",
                bbox=dict(facecolor="black", alpha=0.6, edgecolor="none", pad=2))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A gray, textured (H, W, 3) uint8 background for drawing without a dataset image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 90 + 50 * np.sin(xx / 37.0) * np.cos(yy / 53.0) + rng.normal(0, 8, (h, w))
    return np.repeat(np.clip(base, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def synthetic_detections(h: int, w: int, count: int = 30, seed: int = 0) -> list[dict]:
    """Random small boxes whose std and entropy grow as they shrink (what UGS should show)."""
    rng = np.random.default_rng(seed)
    dets = []
    for _ in range(count):
        side = float(rng.uniform(6, 60))
        bw, bh = side * rng.uniform(0.7, 1.4), side * rng.uniform(0.7, 1.4)
        x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
        rel = 1.0 / math.sqrt(side)
        std = [float(s) for s in np.abs(rng.normal(6 * rel, 2 * rel, 4)) * side / 10]
        entropy = float(np.clip(2.5 * rel + rng.normal(0, 0.05), 0.0, math.log(17)))
        dets.append({"image_id": 0, "category_id": 1, "bbox": [x, y, bw, bh],
                     "score": float(rng.uniform(0.3, 1.0)),
                     "uncertainty": {"std_xyxy_px": std, "entropy": entropy}})
    return dets


def _load_image(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise SystemExit(f"error: --image {path} does not exist")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def detect(image: np.ndarray, config: str, overrides: list[str], checkpoint: Path) -> list[dict]:
    """Run a UGS-DINO checkpoint on one (H, W, 3) uint8 image -> COCO-style results with uncertainty.

    Eval preprocessing of the config (shorter side data.eval_size, longer side capped at
    data.eval_max_size, ImageNet normalisation); boxes in the original image's pixels;
    category_id is the model's label index.
    """
    import torch
    import torchvision.transforms.v2.functional as TF

    from configs import load_config
    from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, official_resize_hw
    from models.build import build_model
    from util.checkpoint import extract_state_dict, import_weights, load_checkpoint
    from util.run_start import without_replaced_download
    from util.weight_downloads import explain_download_failure

    cfg = load_config(config, overrides)
    if not cfg.ugs.enabled:
        raise SystemExit(f"config {config} has ugs.enabled=false: only UGS-DINO predicts uncertainty "
                         "(use a *_ugs config or --opt ugs.ablation=full)")
    weights = extract_state_dict(load_checkpoint(checkpoint))
    build_cfg = without_replaced_download(cfg, weights, f"--checkpoint {checkpoint}")  # offline: no download
    with explain_download_failure(build_cfg.model.backbone, build_cfg.model.backbone_weights):
        model, _, postprocessor = build_model(build_cfg)
    report = import_weights(model, weights)
    print(str(report).splitlines()[0])
    h, w = image.shape[:2]
    img = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W), a copy
    img = TF.resize(img, list(official_resize_hw((h, w), cfg.data.eval_size, cfg.data.eval_max_size)),
                    antialias=True)
    img = TF.normalize(img.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
    mask = torch.zeros(1, *img.shape[1:], dtype=torch.bool)
    model.eval()
    with torch.no_grad():
        det = postprocessor(model(img[None], mask), torch.tensor([[h, w]]))[0]
    out = []
    columns = [det[k].tolist() for k in ("boxes", "scores", "labels", "std_xyxy_px", "entropy")]
    for box, score, label, std, ent in zip(*columns):
        x0, y0, x1, y1 = box
        out.append({"image_id": 0, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(score), "uncertainty": {"std_xyxy_px": std, "entropy": float(ent)}})
    return out


def _select(detections: list[dict], image_id: int | None, min_score: float,
            top_k: int) -> tuple[list[dict], int]:
    ids = sorted({d.get("image_id") for d in detections})
    if image_id is None:
        if len(ids) > 1:
            raise SystemExit(f"detections cover {len(ids)} images; pick one with --image-id "
                             f"(first ids: {ids[:10]})")
        image_id = ids[0] if ids else None
    chosen = [d for d in detections if d.get("image_id") == image_id]
    kept = sorted((d for d in chosen if d["score"] >= min_score), key=lambda d: -d["score"])[:top_k]
    return kept, len(chosen) - len(kept)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--detections", type=Path, help="COCO results JSON with per-detection uncertainty")
    ap.add_argument("--config", help="with --checkpoint: run this UGS config on --image (no JSON needed)")
    ap.add_argument("--opt", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="dotted config overrides, as in main.py: several after one --opt, or --opt repeated")
    ap.add_argument("--checkpoint", type=Path,
                    help="UGS-DINO weights ({'model': state_dict} or a bare state dict)")
    ap.add_argument("--image", type=Path, help="the image the detections belong to (default: synthetic)")
    ap.add_argument("--image-id", type=int, default=None, help="which image_id of the JSON to draw")
    ap.add_argument("--image-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                    help="size of the synthetic background when --image is not given")
    ap.add_argument("--min-score", type=float, default=0.3)
    ap.add_argument("--top-k", type=int, default=200, help="draw at most this many, highest score first")
    ap.add_argument("--entropy-max", type=float, default=None,
                    help="top of the colour scale (e.g. log(n+1) = 2.83 for n=16); default: largest drawn")
    ap.add_argument("--scale", type=float, default=None, help="output pixels per image pixel "
                    "(default: so that the long side is at least 800 px)")
    ap.add_argument("--demo", action="store_true", help="draw synthetic detections (no JSON needed)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    add_debug_option(ap)
    return ap


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    h, w = args.image_size
    image = _load_image(args.image) if args.image else synthetic_image(h, w)
    if args.demo:
        detections, dropped = synthetic_detections(*image.shape[:2]), 0
    elif args.checkpoint or args.config:
        if not (args.checkpoint and args.config and args.image):
            raise SystemExit("--checkpoint needs --config and --image")
        detections = detect(image, args.config, args.opt, args.checkpoint)
        detections, dropped = _select(detections, 0, args.min_score, args.top_k)
    elif args.detections:
        from datasets.coco_eval import load_results

        detections, _ = load_results(args.detections)  # CocoEvalError: missing file, bad JSON, not a list
        check_detections(detections, str(args.detections))
        detections, dropped = _select(detections, args.image_id, args.min_score, args.top_k)
    else:
        raise SystemExit("give --detections (COCO results JSON), --config with --checkpoint, or --demo")
    scale = args.scale or max(1.0, 800.0 / max(image.shape[:2]))
    out = draw_uncertainty(image, detections, args.out, scale=scale, entropy_max=args.entropy_max,
                           title=f"{len(detections)} detections, +-1 std edge bands")
    print(f"wrote {out}: {len(detections)} detections drawn, {dropped} below --min-score or beyond --top-k")
    return 0


if __name__ == "__main__":
    sys.exit(main())
