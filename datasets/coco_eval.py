"""COCO box evaluation at N detections per image, and the glue around it.

Why this exists: pycocotools' `summarize()` reports the headline AP at maxDets=100 whatever
`params.maxDets` says, so a dense-scene evaluation at 1500 detections silently mixes caps. Here
every summary row (AP, AP50, AP75, APs, APm, APl, AR, ARs, ARm, ARl) is read from the
accumulated `eval["precision"]` / `eval["recall"]` arrays at the index of N itself.

Conventions (see docs/evaluation.md):
- maxDets evaluated: sorted unique {1, 10, 100, N}; AR@1, AR@10, AR@100 are reported for reference.
- The cap is per image (top-N by score over all categories), applied here before COCOeval, whose
  own cap is per (image, category). Truncated detections are counted and logged, never hidden.
- Undefined rows (no ground truth in that area range / category) are NaN (pycocotools prints -1);
  averages use only defined entries, as COCO does.
- Crowd ground truth (`iscrowd=1`) follows COCO: detections matched to it are ignored, neither
  true nor false positives. VisDrone "ignored regions" must be written as crowd annotations.
- Two backends with identical numbers: "pycocotools" (reference) and "faster"
  (faster-coco-eval, C++ matching; imported lazily).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

BACKENDS = ("pycocotools", "faster")
# What a config or the command line may name: a backend, or "auto" (faster when installed).
BACKEND_CHOICES = ("auto", *BACKENDS)
# Keys of the summary, all at N unless the key names its own cap.
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR", "ARs", "ARm", "ARl",
                "AR@1", "AR@10", "AR@100")
_AREA_INDEX = {"all": 0, "small": 1, "medium": 2, "large": 3}  # COCOeval params.areaRngLbl order


class CocoEvalError(ValueError):
    """Bad ground truth or results input; the message names the source and the record."""


# --------------------------------------------------------------------------------------------
# Input normalisation and validation
# --------------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> Any:
    """The parsed JSON at `path`; errors name `what` ("results file", ...) and the path."""
    if not path.is_file():
        raise CocoEvalError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CocoEvalError(f"{what} {path} is not valid JSON: {exc}") from exc


def load_ground_truth(gt: Any) -> dict:
    """Return the GT as a COCO dataset dict: a copy, with 'info'/'licenses' filled in if absent,
    and per annotation `iscrowd` (default 0) and `area` (default bbox w * h, as for box-only data).

    `gt` may be a path, a dataset dict, or an object with a `.dataset` dict (pycocotools or
    faster-coco-eval COCO).
    """
    if isinstance(gt, (str, Path)):
        dataset, source = _read_json(Path(gt), "ground-truth file"), str(Path(gt))
    elif isinstance(gt, Mapping):
        dataset, source = gt, "<ground-truth dict>"
    elif isinstance(getattr(gt, "dataset", None), Mapping):
        dataset, source = gt.dataset, "<ground-truth COCO object>"
    else:
        raise CocoEvalError(f"ground truth must be a path, a COCO dict or a COCO object, got {type(gt)}")
    if not isinstance(dataset, Mapping):
        raise CocoEvalError(f"{source}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise CocoEvalError(f"{source}: missing key '{key}' (COCO ground truth needs images, "
                                "annotations and categories)")
    out = dict(dataset)
    out.setdefault("info", {})
    out.setdefault("licenses", [])
    annotations = []
    for i, ann in enumerate(out["annotations"]):
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in ann:
                raise CocoEvalError(f"{source}: annotation #{i} (id {ann.get('id')}) has no '{key}'")
        ann = dict(ann)  # the COCO loaders add keys ('ignore') to annotations in place
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))  # box-only datasets
        annotations.append(ann)
    out["annotations"] = annotations
    return out


def load_results(results: Any) -> tuple[list[dict], str]:
    """Return (list of result records, source name) from a path or a list."""
    if isinstance(results, (str, Path)):
        records, source = _read_json(Path(results), "results file"), str(Path(results))
    else:
        records, source = results, "<results list>"
    if not isinstance(records, list):
        raise CocoEvalError(f"{source}: COCO results must be a JSON list of "
                            "{image_id, category_id, bbox, score} objects, got {type(records).__name__}")
    return records, source


def validate_results(records: Sequence[Mapping], gt: Mapping, source: str = "<results>") -> None:
    """Check every record against the GT; raise naming the source, record index and field."""
    image_ids = {img["id"] for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise CocoEvalError(f"{source}: record #{i} is not an object: {rec!r}")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in rec:
                raise CocoEvalError(f"{source}: record #{i} has no '{key}': {rec!r}")
        if rec["image_id"] not in image_ids:
            raise CocoEvalError(f"{source}: record #{i} has image_id {rec['image_id']!r}, which is not "
                                "in the ground truth's images")
        if rec["category_id"] not in category_ids:
            raise CocoEvalError(f"{source}: record #{i} has category_id {rec['category_id']!r}, which is "
                                f"not in the ground truth's categories {sorted(category_ids)}")
        bbox = rec["bbox"]
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
                or bbox[2] < 0 or bbox[3] < 0):
            raise CocoEvalError(f"{source}: record #{i} has bbox {bbox!r}; expected [x, y, w, h] with 4 "
                                "finite numbers and w, h >= 0")
        score = rec["score"]
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise CocoEvalError(f"{source}: record #{i} has score {score!r}; expected a finite number")


def cap_per_image(records: Sequence[Mapping], max_dets: int) -> tuple[list[dict], int]:
    """Keep the top `max_dets` records per image by score; return (kept copies, number dropped).

    Records are shallow-copied because the COCO loaders add fields (area, id) in place.
    """
    by_image: dict[Any, list[Mapping]] = {}
    for rec in records:
        by_image.setdefault(rec["image_id"], []).append(rec)
    kept: list[dict] = []
    dropped = 0
    for recs in by_image.values():
        if len(recs) > max_dets:
            recs = sorted(recs, key=lambda r: -r["score"])  # stable: ties keep file order
            dropped += len(recs) - max_dets
            recs = recs[:max_dets]
        kept.extend(dict(r) for r in recs)
    return kept, dropped


# --------------------------------------------------------------------------------------------
# Running COCOeval
# --------------------------------------------------------------------------------------------
def max_dets_list(max_dets: int) -> list[int]:
    """The maxDets COCOeval runs with: {1, 10, 100, N}, sorted (N = 100 gives the COCO default)."""
    if int(max_dets) < 1:
        raise CocoEvalError(f"max_dets must be >= 1, got {max_dets}")
    return sorted({1, 10, 100, int(max_dets)})


def _empty_results_coco(coco_cls: type, gt: Mapping) -> Any:
    """A results COCO object with no annotations (pycocotools' loadRes fails on an empty list)."""
    coco = coco_cls()
    coco.dataset = {"info": {}, "licenses": [], "images": list(gt["images"]),
                    "categories": copy.deepcopy(gt["categories"]), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def resolve_backend(backend: str) -> str:
    """"auto" -> "faster" when faster-coco-eval is installed, else "pycocotools"; others unchanged."""
    if backend == "auto":
        import importlib.util

        return "faster" if importlib.util.find_spec("faster_coco_eval") is not None else "pycocotools"
    if backend not in BACKENDS:
        raise CocoEvalError(f"unknown backend {backend!r}; choose one of {BACKEND_CHOICES}")
    return backend


def run_cocoeval(gt: Mapping, records: list[dict], max_dets: int, backend: str = "pycocotools") -> Any:
    """Run evaluate + accumulate; return the COCOeval object (its `.eval` has precision/recall)."""
    backend = resolve_backend(backend)
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        try:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as COCOeval
        except ImportError as exc:
            raise CocoEvalError("backend 'faster' needs the faster-coco-eval package "
                                "(pip install faster-coco-eval)") from exc
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        coco_gt = COCO()
        coco_gt.dataset = dict(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(records) if records else _empty_results_coco(COCO, gt)
        if backend == "pycocotools":
            evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        else:
            evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox", print_function=logger.debug)
        evaluator.params.maxDets = max_dets_list(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _mean_defined(values: np.ndarray) -> float:
    """COCO's average: only entries > -1 count; NaN if none is defined."""
    values = np.asarray(values, dtype=np.float64)
    values = values[values > -1]
    return float(values.mean()) if values.size else float("nan")


def summarize(evaluator: Any, max_dets: int) -> dict[str, float]:
    """Summary rows from the accumulated arrays, all at `max_dets` unless the key says otherwise.

    precision: (T iou thresholds, R recall thresholds, K categories, A areas, M maxDets);
    recall: (T, K, A, M). Same reductions as COCOeval.summarize(), at our own M index.
    """
    params = evaluator.params
    mdets = list(params.maxDets)
    precision = np.asarray(evaluator.eval["precision"])
    recall = np.asarray(evaluator.eval["recall"])
    iou_thrs = np.asarray(params.iouThrs)

    def iou_index(thr: float) -> int:
        return int(np.where(np.isclose(iou_thrs, thr))[0][0])

    def ap(area: str = "all", iou: float | None = None, cap: int = max_dets) -> float:
        p = precision[..., _AREA_INDEX[area], mdets.index(cap)]
        if iou is not None:
            p = p[iou_index(iou)]
        return _mean_defined(p)

    def ar(area: str = "all", cap: int = max_dets) -> float:
        return _mean_defined(recall[..., _AREA_INDEX[area], mdets.index(cap)])

    return {
        "AP": ap(), "AP50": ap(iou=0.5), "AP75": ap(iou=0.75),
        "APs": ap("small"), "APm": ap("medium"), "APl": ap("large"),
        "AR": ar(), "ARs": ar("small"), "ARm": ar("medium"), "ARl": ar("large"),
        "AR@1": ar(cap=1), "AR@10": ar(cap=10), "AR@100": ar(cap=100),
    }


def per_class_ap(evaluator: Any, gt: Mapping, max_dets: int) -> list[dict]:
    """Per-category AP, AP50 and AR at `max_dets` (NaN where the category has no GT)."""
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]}
    mdets = list(evaluator.params.maxDets)
    m = mdets.index(max_dets)
    i50 = int(np.where(np.isclose(np.asarray(evaluator.params.iouThrs), 0.5))[0][0])
    precision = np.asarray(evaluator.eval["precision"])
    recall = np.asarray(evaluator.eval["recall"])
    rows = []
    for k, cat_id in enumerate(evaluator.params.catIds):
        rows.append({"category_id": int(cat_id), "name": names.get(cat_id, str(cat_id)),
                     "AP": _mean_defined(precision[:, :, k, 0, m]),
                     "AP50": _mean_defined(precision[i50, :, k, 0, m]),
                     "AR": _mean_defined(recall[:, k, 0, m])})
    return rows


def evaluate_detections(gt: Any, results: Any, max_dets: int = 100, *, backend: str = "pycocotools",
                        per_class: bool = False, validate: bool = True) -> dict[str, Any]:
    """COCO box metrics with every summary row at `max_dets` detections per image.

    Args:
        gt: COCO ground truth (path, dataset dict, or COCO object).
        results: COCO results (path or list of {image_id, category_id, bbox xywh abs, score}).
        max_dets: N, the per-image detection cap (1500 VisDrone, 100 COCO).
        backend: "pycocotools", "faster" (faster-coco-eval) or "auto" (faster when installed);
            same numbers.
        per_class: add "per_class": list of {category_id, name, AP, AP50, AR}.
        validate: check every record against the GT first (clear errors naming the record).

    Returns: {AP, AP50, AP75, APs, APm, APl, AR, ARs, ARm, ARl, AR@1, AR@10, AR@100} as fractions
    in [0, 1] (NaN when undefined), plus "max_dets", "num_images", "num_detections" (after the
    cap), "num_truncated" (dropped by the per-image cap), "num_images_without_detections" (ground
    truth images no result names: each of their objects is a miss), "backend" (the one that ran)
    and optionally "per_class".
    """
    gt_data = load_ground_truth(gt)
    records, source = load_results(results)
    if validate:
        validate_results(records, gt_data, source)
    capped, dropped = cap_per_image(records, int(max_dets))
    if dropped:
        logger.info("%s: kept the top %d detections per image; %d lower-scored detections dropped",
                    source, max_dets, dropped)
    if not capped:
        warnings.warn(f"{source}: no detections to evaluate; every defined AP/AR is 0", stacklevel=2)
    backend = resolve_backend(backend)
    evaluator = run_cocoeval(gt_data, capped, int(max_dets), backend)
    metrics: dict[str, Any] = summarize(evaluator, int(max_dets))
    predicted = {rec["image_id"] for rec in capped}
    without = sum(1 for img in gt_data["images"] if img["id"] not in predicted)
    if without:
        logger.info("%s: %d of %d images have no detections (their objects count as misses)",
                    source, without, len(gt_data["images"]))
    metrics.update(max_dets=int(max_dets), num_images=len(gt_data["images"]),
                   num_detections=len(capped), num_truncated=dropped,
                   num_images_without_detections=without, backend=backend)
    if per_class:
        metrics["per_class"] = per_class_ap(evaluator, gt_data, int(max_dets))
    return metrics


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def format_summary(metrics: Mapping[str, Any]) -> str:
    """The familiar COCO table, with the cap each row was computed at."""
    n = metrics["max_dets"]

    def fmt(v: float) -> str:
        return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    rows = [
        ("Average Precision", "0.50:0.95", "all", n, "AP"),
        ("Average Precision", "0.50", "all", n, "AP50"),
        ("Average Precision", "0.75", "all", n, "AP75"),
        ("Average Precision", "0.50:0.95", "small", n, "APs"),
        ("Average Precision", "0.50:0.95", "medium", n, "APm"),
        ("Average Precision", "0.50:0.95", "large", n, "APl"),
        ("Average Recall", "0.50:0.95", "all", 1, "AR@1"),
        ("Average Recall", "0.50:0.95", "all", 10, "AR@10"),
        ("Average Recall", "0.50:0.95", "all", 100, "AR@100"),
        ("Average Recall", "0.50:0.95", "all", n, "AR"),
        ("Average Recall", "0.50:0.95", "small", n, "ARs"),
        ("Average Recall", "0.50:0.95", "medium", n, "ARm"),
        ("Average Recall", "0.50:0.95", "large", n, "ARl"),
    ]
    lines = [f" {name:<18} ({'AP' if name.endswith('Precision') else 'AR'}) @[ IoU={iou:<9} | "
             f"area={area:>6} | maxDets={cap:>4} ] = {fmt(metrics[key])}   [{key}]"
             for name, iou, area, cap, key in rows]
    if "num_images_without_detections" in metrics:
        lines.append(f" {metrics['num_detections']} detections on {metrics['num_images']} images; "
                     f"images without any detection: {metrics['num_images_without_detections']}")
    if metrics.get("per_class"):
        lines.append("")
        lines.append(f" {'category':<24} {'id':>5} {'AP':>7} {'AP50':>7} {'AR':>7}   (maxDets={n})")
        for row in metrics["per_class"]:
            lines.append(f" {row['name'][:24]:<24} {row['category_id']:>5} {fmt(row['AP']):>7} "
                         f"{fmt(row['AP50']):>7} {fmt(row['AR']):>7}")
    return "\n".join(lines)


def metrics_to_json(metrics: Mapping[str, Any]) -> str:
    """One-line strict JSON (NaN becomes null)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, Mapping):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(dict(metrics)), allow_nan=False)


# --------------------------------------------------------------------------------------------
# Post-processor outputs -> COCO results, and the distributed merge
# --------------------------------------------------------------------------------------------
def _to_list(x: Any) -> list:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x).tolist()


def predictions_to_coco_results(predictions: Sequence[Mapping[str, Any]], image_ids: Sequence[int],
                                label_to_category_id: Mapping[int, int] | Sequence[int] | None = None,
                                ) -> list[dict]:
    """Post-processor outputs -> COCO results records (bbox xywh, absolute pixels).

    Args:
        predictions: per image {scores (K,), labels (K,), boxes (K, 4) xyxy absolute}; with UGS
            optionally {"uncertainty": {"std_xyxy_px": (K, 4), "entropy": (K,)}} (or the two keys
            at top level), carried to each record as `uncertainty: {std_xyxy_px: [4], entropy}`.
        image_ids: COCO image id of each prediction, same order.
        label_to_category_id: model label -> COCO category id (dict or sequence indexed by label);
            None means labels already are category ids ("category_id" label mapping).
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"got {len(predictions)} predictions for {len(image_ids)} image ids")
    records: list[dict] = []
    for pred, image_id in zip(predictions, image_ids):
        scores, labels, boxes = _to_list(pred["scores"]), _to_list(pred["labels"]), _to_list(pred["boxes"])
        if not (len(scores) == len(labels) == len(boxes)):
            raise ValueError(f"image {image_id}: scores/labels/boxes lengths differ "
                             f"({len(scores)}, {len(labels)}, {len(boxes)})")
        unc = pred.get("uncertainty", pred)
        std = _to_list(unc["std_xyxy_px"]) if "std_xyxy_px" in unc else None
        ent = _to_list(unc["entropy"]) if "entropy" in unc else None
        for j, (score, label, (x0, y0, x1, y1)) in enumerate(zip(scores, labels, boxes)):
            label = int(label)
            if label_to_category_id is None:
                cat = label
            else:
                try:
                    cat = int(label_to_category_id[label])
                except (KeyError, IndexError):
                    raise ValueError(f"image {image_id}: label {label} has no entry in "
                                     "label_to_category_id") from None
            rec = {"image_id": int(image_id), "category_id": cat,
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)}
            if std is not None or ent is not None:
                rec["uncertainty"] = {}
                if std is not None:
                    rec["uncertainty"]["std_xyxy_px"] = [float(v) for v in std[j]]
                if ent is not None:
                    rec["uncertainty"]["entropy"] = float(ent[j])
            records.append(rec)
    return records


def _max_difference(a: Any, b: Any) -> float:
    """0 if equal; the largest numeric difference; inf on a structural mismatch."""
    if hasattr(a, "detach") or hasattr(b, "detach") or isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a_arr, b_arr = np.asarray(_to_list(a), dtype=object), np.asarray(_to_list(b), dtype=object)
        if a_arr.shape != b_arr.shape:
            return math.inf
        if a_arr.size == 0:
            return 0.0
        return float(np.max(np.abs(a_arr.astype(np.float64) - b_arr.astype(np.float64))))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return math.inf
        return max((_max_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return math.inf
        return max((_max_difference(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b))
    return 0.0 if a == b else math.inf


def merge_predictions(parts: Sequence[Mapping[int, Any]], *, atol: float = 1e-4,
                      on_conflict: str = "error") -> dict[int, Any]:
    """Merge per-process {image_id: prediction} dicts so that every image appears exactly once.

    Distributed samplers pad the last batches with repeats of the first images, so an image can
    come back from two processes. Identical repeats (numeric entries within `atol`) are dropped
    and counted. Two *different* predictions for one image id raise, unless
    `on_conflict="first"`, which keeps the first part's prediction and logs the count (a padded
    repeat lands in a batch with other images, so padding-dependent numerics can differ).
    Returns a dict sorted by image id.
    """
    if on_conflict not in ("error", "first"):
        raise ValueError(f"on_conflict must be 'error' or 'first', got {on_conflict!r}")
    merged: dict[int, Any] = {}
    duplicates = conflicts = 0
    for rank, part in enumerate(parts):
        for image_id, pred in part.items():
            key = int(image_id)
            if key not in merged:
                merged[key] = pred
                continue
            duplicates += 1
            diff = _max_difference(merged[key], pred)
            if diff > atol:
                if on_conflict == "error":
                    raise ValueError(
                        f"image id {key}: part {rank} holds a prediction that differs from an earlier "
                        f"part's (max difference {diff:.3g} > atol {atol:g}); two different predictions "
                        "for one image. Pass on_conflict='first' to keep the first one.")
                conflicts += 1
    if duplicates:
        logger.info("merge_predictions: %d images from %d parts; %d repeated entries removed "
                    "(%d differed, first kept)", len(merged), len(parts), duplicates, conflicts)
    return dict(sorted(merged.items()))
