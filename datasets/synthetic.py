"""Embedded synthetic small-object dataset: drone-like scenes generated in memory, no download.

Each image is a textured background (low-frequency noise, a gradient, "roads" and "fields") with
tens to a couple of hundred objects, mostly tiny (COCO small: area < 32^2), some medium, few large,
clustered like traffic, drawn over each other (partial occlusion, visibility recorded), plus a few
"ignored regions": patches crowded with unannotated tiny objects, emitted as crowd annotations.
The classes differ only by shape and colour pattern; colours are random per instance, so colour
alone says nothing about the class.

Deterministic: image `i` of seed `s` depends only on (s, i), so a larger set extends a smaller one.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch

# (category id, name, shape, pattern)
CLASSES: tuple[tuple[int, str, str, str], ...] = (
    (1, "disc", "disc", "solid"),
    (2, "striped_disc", "disc", "striped"),
    (3, "square", "square", "solid"),
    (4, "checker_square", "square", "checker"),
    (5, "triangle", "triangle", "solid"),
    (6, "cross", "cross", "solid"),
    (7, "ring", "ring", "solid"),
)
CATEGORIES = [{"id": cid, "name": name, "supercategory": shape} for cid, name, shape, _ in CLASSES]
SMALL_AREA, MEDIUM_AREA = 32 ** 2, 96 ** 2          # COCO size buckets
MIN_VISIBILITY = 0.1                               # objects hidden more than this are not annotated


def _shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    """Soft coverage (h, w) in [0, 1] of `shape` filling an h x w box (2x2 supersampled); the
    renderer reads it through the cached `_stamp`."""
    ys = (np.arange(2 * h) + 0.5) / (2 * h) * 2 - 1
    xs = (np.arange(2 * w) + 0.5) / (2 * w) * 2 - 1
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    if shape == "disc":
        m = xx ** 2 + yy ** 2 <= 1.0
    elif shape == "ring":
        r2 = xx ** 2 + yy ** 2
        m = (r2 <= 1.0) & (r2 >= 0.3)
    elif shape == "square":
        m = np.ones_like(xx, dtype=bool)
    elif shape == "triangle":
        m = np.abs(xx) <= (yy + 1) / 2
    elif shape == "cross":
        m = (np.abs(xx) <= 0.34) | (np.abs(yy) <= 0.34)
    else:
        raise ValueError(f"unknown synthetic shape {shape!r}")
    return m.reshape(h, 2, w, 2).mean(axis=(1, 3)).astype(np.float32)


class _Stamp(NamedTuple):
    """An object's shape at one size, precomputed once: scenes repeat the same few hundred sizes."""
    alpha: np.ndarray      # (h, w, 1) float32 coverage
    keep: np.ndarray       # (h, w, 1) float32 1 - coverage: what is left of the pixels below
    covered: np.ndarray    # (h, w) bool, coverage > 0.5: the pixels the object owns
    num_covered: int


@functools.lru_cache(maxsize=4096)
def _stamp(shape: str, h: int, w: int) -> _Stamp:
    alpha = _shape_mask(shape, h, w)[..., None]
    stamp = _Stamp(alpha, 1 - alpha, alpha[..., 0] > 0.5, int((alpha > 0.5).sum()))
    for array in stamp[:3]:
        array.flags.writeable = False                        # shared between calls
    return stamp


@functools.lru_cache(maxsize=4096)
def _pattern_selector(pattern: str, h: int, w: int) -> np.ndarray:
    """(h, w, 1) bool: where a two-colour pattern shows its first colour."""
    yy, xx = np.mgrid[0:h, 0:w]
    period = max(2, min(h, w) // 3)
    if pattern == "striped":
        sel = ((xx + yy) // max(1, period // 2)) % 2 == 0
    elif pattern == "checker":
        sel = ((xx // max(1, period // 2)) + (yy // max(1, period // 2))) % 2 == 0
    else:
        raise ValueError(f"unknown synthetic pattern {pattern!r}")
    sel = sel[..., None]
    sel.flags.writeable = False
    return sel


def _pattern(pattern: str, h: int, w: int, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """Colour of the object's surface: (h, w, 3), or (3,) for a solid colour (it broadcasts)."""
    if pattern == "solid":
        return c1
    return np.where(_pattern_selector(pattern, h, w), c1, c2)


def _interp_axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation indices and weights along one axis (align_corners=False)."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), (pos - lo).astype(np.float32)


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a coarse (gh, gw, C) grid to (h, w, C) (element-wise, no BLAS)."""
    lo, hi, f = _interp_axis(h, grid.shape[0])
    rows = grid[lo] * (1 - f)[:, None, None] + grid[hi] * f[:, None, None]          # (h, gw, C)
    lo, hi, f = _interp_axis(w, grid.shape[1])
    out = np.take(rows, lo, axis=1)                                                 # (h, w, C)
    out *= (1 - f)[None, :, None]
    right = np.take(rows, hi, axis=1)
    right *= f[None, :, None]
    out += right
    return out


def _add_noise(img: np.ndarray, noise: np.ndarray, amplitude: float) -> None:
    """img += amplitude * (noise - 0.5), in place (noise is overwritten)."""
    noise -= 0.5
    noise *= amplitude
    img += noise


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured ground (h, w, 3) float32 in [0, 1]: earth tones, noise, gradient, roads, fields."""
    base = rng.uniform(0.25, 0.55, size=3) * np.array([1.0, 0.95, 0.8])
    img = np.empty((h, w, 3), dtype=np.float32)
    img[...] = base.astype(np.float32)
    _add_noise(img, _upsample(rng.random((h // 32 + 2, w // 32 + 2, 3)).astype(np.float32), h, w), 0.12)
    _add_noise(img, _upsample(rng.random((h // 8 + 2, w // 8 + 2, 1)).astype(np.float32), h, w), 0.05)
    yy = np.arange(h, dtype=np.float32)[:, None]             # broadcast (h, 1) x (1, w)
    xx = np.arange(w, dtype=np.float32)[None, :]
    angle = rng.uniform(0, 2 * np.pi)
    img += (0.1 * ((np.cos(angle) * xx / w + np.sin(angle) * yy / h) - 0.5))[..., None]
    for _ in range(rng.integers(2, 8)):                      # fields: ellipses, drawn in their box
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.05, 0.3) * h, rng.uniform(0.05, 0.3) * w
        y0, y1 = int(max(cy - ry, 0)), int(min(cy + ry + 1, h))
        x0, x1 = int(max(cx - rx, 0)), int(min(cx + rx + 1, w))
        inside = ((yy[y0:y1] - cy) / ry) ** 2 + ((xx[:, x0:x1] - cx) / rx) ** 2 <= 1
        patch = img[y0:y1, x0:x1]
        patch[inside] = 0.5 * patch[inside] + 0.5 * rng.uniform(0.15, 0.6, size=3)
    for _ in range(rng.integers(1, 4)):                      # roads: straight bands with lane marks
        angle = rng.uniform(0, np.pi)
        nx, ny = -np.sin(angle), np.cos(angle)
        d = np.abs(nx * (xx - rng.uniform(0, w)) + ny * (yy - rng.uniform(0, h)))
        img[d < rng.uniform(5, 18)] = rng.uniform(0.3, 0.45) + rng.normal(0, 0.02, size=3)
        rows, cols = np.nonzero(d < 0.7)                     # lane marks: every other 6 px
        along = np.cos(angle) * xx[0, cols] + np.sin(angle) * yy[rows, 0]
        dash = (along // 6) % 2 == 0
        img[rows[dash], cols[dash]] = 0.85
    img += 0.025 * rng.standard_normal(size=img.shape, dtype=np.float32)
    return np.clip(img, 0, 1, out=img)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    pair = rng.uniform(0, 1, size=(2, 3))                    # the same draws as two calls of 3
    if np.abs(pair[0] - pair[1]).sum() < 0.9:                # keep patterns visible
        pair[1] = 1.0 - pair[0]
    c1, c2 = (0.5 + 0.8 * (pair - 0.5)).astype(np.float32)   # vehicle-like, less saturated
    return c1, c2


def _draw(img: np.ndarray, idmap: np.ndarray | None, obj_id: int, cls: int, y: int, x: int, h: int,
          w: int, rng: np.random.Generator) -> int:
    """Paint class `cls` into box (x, y, w, h); returns the number of covered pixels."""
    _, _, shape, pattern = CLASSES[cls]
    stamp = _stamp(shape, h, w)
    c1, c2 = _colours(rng)
    region = img[y:y + h, x:x + w]
    region *= stamp.keep
    region += stamp.alpha * _pattern(pattern, h, w, c1, c2)
    if idmap is not None:
        idmap[y:y + h, x:x + w][stamp.covered] = obj_id
    return stamp.num_covered


SMALL_SIDE_PX = (4.0, 10.0, 31.0)                  # small objects' side: (min, median, max) pixels
_log = functools.lru_cache(maxsize=64)(np.log)     # the per-object constants, computed once
_LOG_32, _LOG_64, _LOG_0_6, _LOG_1_6 = np.log(32), np.log(64), np.log(0.6), np.log(1.6)


def _clutter(img: np.ndarray, rng: np.random.Generator, count: int) -> None:
    """Unannotated distractors, like debris and markings in aerial images: thin strokes (1-2 px
    wide, 4-24 px long) and irregular specks (clusters of 2-5 single-pixel-to-3-px dots), in object-like
    colours. None has the shape of a class, so a detector must tell them from small objects.

    Each mark is evaluated only in a window that holds all of its pixels (the per-pixel arithmetic
    is the same as over the whole image, so the pixels are too)."""
    H, W = img.shape[:2]
    for _ in range(count):
        colour = _colours(rng)[0]
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        if rng.random() < 0.5:  # stroke
            angle, length = rng.uniform(0, np.pi), rng.uniform(4, 24)
            width = rng.uniform(0.5, 1.0)
            dx, dy = np.cos(angle), np.sin(angle)
            reach = length / 2 + width + 1                   # > the farthest pixel's distance
            yy, xx = _window(H, W, cy - reach, cy + reach, cx - reach, cx + reach)
            along = (xx - cx) * dx + (yy - cy) * dy
            across = np.abs(-(xx - cx) * dy + (yy - cy) * dx)
            mask = (np.abs(along) <= length / 2) & (across <= width)
        else:  # speck cluster: dots of squared radius <= 2.3 (radius < 1.6)
            dots = []
            for _ in range(int(rng.integers(2, 6))):
                py, px = cy + rng.normal(0, 3), cx + rng.normal(0, 3)
                dots.append((py, px, rng.uniform(0.3, 2.3)))
            ys, xs = [d[0] for d in dots], [d[1] for d in dots]
            yy, xx = _window(H, W, min(ys) - 2, max(ys) + 2, min(xs) - 2, max(xs) + 2)
            mask = np.zeros((len(yy), xx.shape[1]), dtype=bool)
            for py, px, r2 in dots:
                mask |= (yy - py) ** 2 + (xx - px) ** 2 <= r2
        if mask.size:
            patch = img[yy[0, 0]:yy[-1, 0] + 1, xx[0, 0]:xx[0, -1] + 1]
            patch[mask] = 0.3 * patch[mask] + 0.7 * colour


def _window(H: int, W: int, y0: float, y1: float, x0: float, x1: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixel coordinates `(rows (n, 1), columns (1, m))` of the image pixels in
    [y0, y1] x [x0, x1] (either may be empty)."""
    ys = np.arange(max(int(np.floor(y0)), 0), min(int(np.ceil(y1)) + 1, H))
    xs = np.arange(max(int(np.floor(x0)), 0), min(int(np.ceil(x1)) + 1, W))
    return ys[:, None], xs[None, :]


def _object_size(rng: np.random.Generator, H: int, W: int, allow_large: bool,
                 small_side: tuple[float, float, float] = SMALL_SIDE_PX) -> tuple[int, int]:
    """(h, w) with area mostly small (< 32^2), some medium, few large (>= 96^2); the small ones'
    side is log-normal around `small_side[1]`, clipped to [small_side[0], small_side[2]]."""
    lo, median, hi = small_side
    u = rng.random()
    if u < 0.95 or (u >= 0.993 and not allow_large):
        side = min(max(float(np.exp(rng.normal(_log(median), 0.45))), lo), hi)
    elif u < 0.993:
        side = np.exp(rng.uniform(_LOG_32, _LOG_64))
    else:
        side = rng.uniform(97, max(98, 0.5 * min(H, W)))
    aspect = np.exp(rng.uniform(_LOG_0_6, _LOG_1_6))
    h = int(round(side / np.sqrt(aspect)))
    w = int(round(side * np.sqrt(aspect)))
    return min(max(h, 3), H), min(max(w, 3), W)


def render_image(seed: int, index: int, image_size: tuple[int, int] = (256, 256), min_objects: int = 10,
                 max_objects: int = 200, max_ignored_regions: int = 2,
                 small_side: tuple[float, float, float] = SMALL_SIDE_PX, clutter: int = 0
                 ) -> tuple[np.ndarray, list[dict], list[tuple[int, int, int, int]], Counter]:
    """One scene: `(image uint8 (H, W, 3), objects, ignored regions (x, y, w, h), stats)`.

    Each object is `{category_id, bbox [x, y, w, h], visibility}` (amodal box; visibility = the
    fraction of its pixels left uncovered by objects drawn later). `clutter`: up to this many
    unannotated distractors under the objects, from their own random stream, so the scene's
    objects are the same with and without them."""
    rng = np.random.default_rng([seed, index])
    H, W = image_size
    img = _background(rng, H, W)
    if clutter > 0:
        clutter_rng = np.random.default_rng([seed, index, 1])
        _clutter(img, clutter_rng, int(clutter_rng.integers(clutter // 2, clutter + 1)))
    stats: Counter = Counter()
    regions = []
    for _ in range(rng.integers(0, max_ignored_regions + 1)):
        rh, rw = int(rng.integers(20, min(64, H // 3) + 1)), int(rng.integers(20, min(64, W // 3) + 1))
        ry, rx = int(rng.integers(0, H - rh + 1)), int(rng.integers(0, W - rw + 1))
        for _ in range(rh * rw // 40):                       # a crowd of tiny unannotated objects
            oh, ow = int(rng.integers(2, 6)), int(rng.integers(2, 6))
            _draw(img, None, 0, int(rng.integers(len(CLASSES))), ry + int(rng.integers(0, rh - oh + 1)),
                  rx + int(rng.integers(0, rw - ow + 1)), oh, ow, rng)
        regions.append((rx, ry, rw, rh))

    n = int(round(np.exp(rng.uniform(np.log(max(min_objects, 1)), np.log(max(max_objects, 1))))))
    n = min(max(n, min_objects), max_objects)
    centres = rng.uniform((0, 0), (H, W), size=(int(rng.integers(1, 5)), 2))
    spreads = rng.uniform(0.05, 0.25, size=len(centres)) * min(H, W)
    occupied = np.zeros((H, W), dtype=bool)
    boxes: list[tuple[int, int, int, int, int]] = []          # (x, y, w, h, class index)
    attempts, has_large = 0, False
    while len(boxes) < n and attempts < 5 * n:
        attempts += 1
        h, w = _object_size(rng, H, W, allow_large=not has_large, small_side=small_side)
        if rng.random() < 0.6:                               # clustered, like traffic
            k = int(rng.integers(len(centres)))
            cy, cx = rng.normal(centres[k], spreads[k])
        else:
            cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        y, x = int(min(max(cy - h / 2, 0), H - h)), int(min(max(cx - w / 2, 0), W - w))
        if any(rx <= x + w / 2 < rx + rw and ry <= y + h / 2 < ry + rh for rx, ry, rw, rh in regions):
            stats["placements_rejected_in_ignored_region"] += 1
            continue
        if np.count_nonzero(occupied[y:y + h, x:x + w]) / (h * w) > 0.35:  # partial occlusion only
            stats["placements_rejected_overlap"] += 1
            continue
        occupied[y:y + h, x:x + w] = True
        has_large = has_large or h * w >= MEDIUM_AREA
        boxes.append((x, y, w, h, int(rng.integers(len(CLASSES)))))
    boxes.sort(key=lambda b: -b[2] * b[3])                  # big ones first: small ones lie on top
    idmap = np.zeros((H, W), dtype=np.int32)
    objects, covered = [], []
    for x, y, w, h, cls in boxes:
        covered.append(_draw(img, idmap, len(objects) + 1, cls, y, x, h, w, rng))
        objects.append({"category_id": CLASSES[cls][0], "bbox": [x, y, w, h]})
    visible = np.bincount(idmap.ravel(), minlength=len(objects) + 1)[1:]
    kept = []
    for obj, vis, cov in zip(objects, visible, covered, strict=True):
        obj["visibility"] = round(float(vis) / max(cov, 1), 4)
        if obj["visibility"] < MIN_VISIBILITY:
            stats["objects_hidden_not_annotated"] += 1
            continue
        kept.append(obj)
    return (img * 255 + 0.5).astype(np.uint8), kept, regions, stats


def generate_synthetic(num_images: int, image_size: tuple[int, int] = (256, 256), min_objects: int = 10,
                       max_objects: int = 200, seed: int = 0, file_ext: str = "png",
                       max_ignored_regions: int = 2, small_side: tuple[float, float, float] = SMALL_SIDE_PX,
                       clutter: int = 0) -> tuple[dict, dict[int, torch.Tensor], Counter]:
    """`(coco_dict, images {image_id: uint8 (3, H, W)}, stats)` for `num_images` scenes.

    Ignored regions become crowd annotations (`iscrowd=1`), one per category, because COCOeval
    lets a crowd region absorb only detections of its own category; the dataset merges the copies
    back into one `ignore_boxes` entry. Annotations carry the extra field `visibility`."""
    H, W = image_size
    coco = {"info": {"description": f"synthetic small-object scenes, seed {seed}"},
            "images": [], "annotations": [], "categories": [dict(c) for c in CATEGORIES]}
    images: dict[int, torch.Tensor] = {}
    stats: Counter = Counter()
    ann_id = 1
    for index in range(num_images):
        image_id = index + 1
        img, objects, regions, s = render_image(seed, index, image_size, min_objects, max_objects,
                                                max_ignored_regions, tuple(small_side), clutter)
        stats.update(s)
        images[image_id] = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        coco["images"].append({"id": image_id, "file_name": f"{seed:04d}_{index:06d}.{file_ext}",
                               "height": H, "width": W})
        for obj in objects:
            x, y, w, h = obj["bbox"]
            coco["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": obj["category_id"],
                                        "bbox": [float(x), float(y), float(w), float(h)],
                                        "area": float(w * h), "iscrowd": 0, "visibility": obj["visibility"]})
            ann_id += 1
        for x, y, w, h in regions:
            for cat in CATEGORIES:
                coco["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": cat["id"],
                                            "bbox": [float(x), float(y), float(w), float(h)],
                                            "area": float(w * h), "iscrowd": 1})
                ann_id += 1
            stats["ignored_regions"] += 1
    return coco, images, stats


def size_bucket_counts(coco: dict) -> dict[str, int]:
    """Non-crowd annotation counts per COCO area bucket (small < 32^2 <= medium < 96^2 <= large)."""
    counts = {"small": 0, "medium": 0, "large": 0}
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        area = ann["bbox"][2] * ann["bbox"][3]
        counts["small" if area < SMALL_AREA else "medium" if area < MEDIUM_AREA else "large"] += 1
    return counts
