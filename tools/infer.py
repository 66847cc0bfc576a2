"""Run a trained detector on image files: COCO-format results and drawn detections.

    python tools/infer.py img1.jpg img2.jpg --checkpoint outputs/demo/checkpoint_best.pth --out preds/
    python tools/infer.py big_drone.jpg --checkpoint ckpt.pth --out preds/ --slice 1024 --overlap 0.2 --merge wbf

Whole-image mode resizes like evaluation (data.eval_policy). `--slice SIZE` runs the model on
overlapping SIZE x SIZE tiles at native resolution instead -- small objects in 4000 x 3000 drone
images stay several pixels wide -- and merges the tiles' detections class-wise (NMS or weighted
box fusion, util/tiling.py). Writes OUT/results.json (COCO results; image ids are the positions
of the images on the command line, 1-based, listed in OUT/images.json) and OUT/<name>_det.png.
Boxes are clipped to the image. With a UGS model each record also carries the box's
`uncertainty: {std_xyxy_px: [4], entropy}`, as evaluation results do (with `--slice`, that of
the detection NMS kept or of the highest-scoring member of a WBF cluster).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import Config  # noqa: E402
from util.checkpoint import extract_state_dict, import_weights  # noqa: E402
from util.cli import add_debug_option, entry_point  # noqa: E402
from util.run_start import checkpoint_config, load_model_checkpoint, without_replaced_download  # noqa: E402
from util.logging import write_json_atomic  # noqa: E402
from util.tiling import merge_tile_detections, tile_grid  # noqa: E402
from util.weight_downloads import explain_download_failure  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files (jpg/png)")
    p.add_argument("--checkpoint", required=True,
                   help="our training checkpoint, an official one, or a .safetensors export "
                        "(config.json beside it)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default=None,
                   help="config name/path (default: the config stored in the checkpoint)")
    p.add_argument("--opt", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted config overrides (several after one --opt, or --opt repeated)")
    p.add_argument("--slice", type=int, default=0, metavar="SIZE", help="tile size in pixels (0: whole image)")
    p.add_argument("--overlap", type=float, default=0.2, help="tile overlap fraction (default 0.2)")
    p.add_argument("--merge", choices=["nms", "wbf"], default="nms", help="merging of tile detections")
    p.add_argument("--merge-iou", type=float, default=0.5, help="IoU above which tile detections merge")
    p.add_argument("--max-dets", type=int, default=None, help="detections kept per image (default eval.max_dets)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="drawn detections' minimum score (default eval.draw_score_threshold)")
    p.add_argument("--categories", default=None,
                   help="COCO JSON whose 'categories' name the classes and map labels to category ids "
                        "(needed with data.label_mapping=contiguous unless the checkpoint's dataset is synthetic)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    p.add_argument("--no-draw", action="store_true", help="skip the PNGs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_debug_option(p)
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace, ckpt: dict) -> Config:
    """--config when given, else the config stored with the checkpoint (or config.json beside it)."""
    cfg, source = checkpoint_config(args.checkpoint, ckpt, args.config, args.opt)
    print(f"config: {source}" + (f", with --opt {' '.join(args.opt)}" if args.opt else ""))
    cfg.check_detections_per_image()
    return cfg


def label_mapping(cfg: Config, categories_file: str | None) -> tuple[dict[int, int], dict[int, str]]:
    """label -> category id and label -> name, following data.label_mapping."""
    if categories_file is not None:
        cats = json.loads(Path(categories_file).read_text())["categories"]
    elif cfg.data.dataset == "synthetic":
        from datasets.synthetic import CATEGORIES as cats
    else:
        cats = None
    if cats is None:
        if cfg.data.label_mapping == "contiguous":
            raise SystemExit("data.label_mapping=contiguous: pass --categories ANNOTATIONS.json to map "
                             "labels to category ids")
        return {}, {}
    ids = sorted(int(c["id"]) for c in cats)
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
    if cfg.data.label_mapping == "contiguous":
        return dict(enumerate(ids)), {i: names[c] for i, c in enumerate(ids)}
    return {c: c for c in ids}, dict(names)


def read_image(path: str) -> torch.Tensor:
    """uint8 (3, H, W) RGB, decoded by PIL like the datasets (torchvision's decoders are deprecated)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            array = np.array(im if im.mode == "RGB" else im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - name the file whatever the decoder raised
        raise SystemExit(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def normalise(image_u8: torch.Tensor) -> torch.Tensor:
    x = image_u8.float() / 255.0
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@torch.no_grad()
def detect(model: torch.nn.Module, postprocessor: torch.nn.Module, crops: list[torch.Tensor],
           out_hw: list[tuple[int, int]], device: str, batch_size: int) -> list[dict]:
    """Detections for each crop (3, h, w) normalised, boxes xyxy in `out_hw` pixels."""
    from datasets.collate import collate_detection

    results: list[dict] = []
    for i in range(0, len(crops), batch_size):
        chunk = crops[i:i + batch_size]
        images, masks, _ = collate_detection([(c, {}) for c in chunk])
        outputs = model(images.to(device), masks.to(device))
        sizes = torch.tensor(out_hw[i:i + batch_size], device=device)
        results.extend({k: v.cpu() for k, v in r.items() if torch.is_tensor(v)}
                       for r in postprocessor(outputs, sizes))
    return results


def clip_to_image(dets: dict[str, torch.Tensor], hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Detections with their xyxy boxes clipped to the (h, w) image (the model's cxcywh boxes may
    reach past the border; COCO results and drawings stay inside it)."""
    h, w = hw
    boxes = dets["boxes"].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return {**dets, "boxes": boxes}


def to_records(dets: dict[str, torch.Tensor], image_id: int, l2c: dict[int, int]) -> list[dict]:
    """COCO results records (bbox xywh); with `std_xyxy_px` and `entropy` (UGS) each record also
    gets `uncertainty: {std_xyxy_px, entropy}` as in evaluation results (docs/conventions.md)."""
    records = []
    has_uncertainty = "std_xyxy_px" in dets and "entropy" in dets
    for j, ((x0, y0, x1, y1), score, label) in enumerate(zip(dets["boxes"].tolist(), dets["scores"].tolist(),
                                                              dets["labels"].tolist())):
        rec = {"image_id": image_id, "category_id": int(l2c.get(int(label), int(label))),
               "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)}
        if has_uncertainty:
            rec["uncertainty"] = {"std_xyxy_px": [float(v) for v in dets["std_xyxy_px"][j].tolist()],
                                  "entropy": float(dets["entropy"][j])}
        records.append(rec)
    return records



@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from models import build_model
    from util.plots import draw_image_detections

    ckpt = load_model_checkpoint(args.checkpoint)
    cfg = resolve_config(args, ckpt)
    max_dets = args.max_dets or cfg.eval.max_dets
    threshold = cfg.eval.draw_score_threshold if args.score_threshold is None else args.score_threshold
    weights = ckpt["ema"]["model"] if "ema" in ckpt and cfg.runtime.eval_ema else extract_state_dict(ckpt)
    build_cfg = without_replaced_download(cfg, weights, f"--checkpoint {args.checkpoint}")
    with explain_download_failure(build_cfg.model.backbone, build_cfg.model.backbone_weights):
        model, _, postprocessor = build_model(build_cfg)
    report = import_weights(model, weights)
    if not report.clean:
        print(report)
    model.to(args.device).eval()
    postprocessor.to(args.device)
    l2c, names = label_mapping(cfg, args.categories)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    records, image_list = [], []
    for image_id, path in enumerate(args.images, start=1):
        image = read_image(path)
        h, w = image.shape[-2:]
        if args.slice:
            tiles = tile_grid((h, w), args.slice, args.overlap)
            crops = [normalise(image[:, y0:y1, x0:x1]) for y0, x0, y1, x1 in tiles]
            per_tile = detect(model, postprocessor, crops, [(y1 - y0, x1 - x0) for y0, x0, y1, x1 in tiles],
                              args.device, args.batch_size)
            dets = merge_tile_detections(per_tile, tiles, args.merge, args.merge_iou, max_dets)
        else:
            from datasets.transforms import official_resize_hw

            x = normalise(image)
            if cfg.data.eval_policy == "detr":
                rh, rw = official_resize_hw((h, w), cfg.data.eval_size, cfg.data.eval_max_size)
                x = torch.nn.functional.interpolate(x[None], size=(rh, rw), mode="bilinear",
                                                    align_corners=False)[0]
            dets = detect(model, postprocessor, [x], [(h, w)], args.device, 1)[0]
            order = torch.argsort(dets["scores"], descending=True)[:max_dets]
            dets = {k: v[order] for k, v in dets.items()}
        dets = clip_to_image(dets, (h, w))
        records.extend(to_records(dets, image_id, l2c))
        image_list.append({"id": image_id, "file_name": str(path), "height": int(h), "width": int(w)})
        kept = int((dets["scores"] >= threshold).sum())
        print(f"{path}: {len(dets['scores'])} detections ({kept} >= {threshold})"
              + (f", {len(tiles)} tiles of {args.slice} px merged by {args.merge}" if args.slice else ""))
        if not args.no_draw:
            draw_image_detections(image, dets["boxes"], dets["scores"], dets["labels"],
                                  out / f"{Path(path).stem}_det.png", threshold, names or None,
                                  title=Path(path).name)
    write_json_atomic(out / "results.json", records, indent=None)
    write_json_atomic(out / "images.json", image_list, indent=1)
    print(f"wrote {out / 'results.json'} ({len(records)} detections) and {out / 'images.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
