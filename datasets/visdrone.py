"""VisDrone-DET annotation format -> COCO detection dict (used by tools/convert_visdrone.py).

A split is `ROOT/images/*.jpg` and `ROOT/annotations/<same stem>.txt`, one object per line:
`left,top,width,height,score,category,truncation,occlusion` (pixels; score 1 = evaluated, 0 =
ignored; category 0 = ignored region, 1..10 the evaluated classes, 11 = others). Real files have
trailing commas, CRLF line ends and may be empty: all normal.

Ignored regions (category 0, or score 0) and "others" (category 11) must not count as misses or
false positives. COCOeval lets a crowd annotation (`iscrowd=1`) absorb detections of its OWN
category only, so each such region is emitted once per evaluated category (10 crowd annotations with
the same box); `datasets.CocoDetection` merges the copies back into one `ignore_boxes` entry for
training. `drop_ignored=True` drops them instead (counted).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CATEGORIES = ("pedestrian", "people", "bicycle", "car", "van", "truck", "tricycle", "awning-tricycle",
              "bus", "motor")                      # ids 1..10 in this order
IGNORED_REGION, OTHERS = 0, 11
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class VisDroneFormatError(ValueError):
    """A malformed annotation line or a missing/unreadable file; the message names it."""


@dataclass
class VisDroneBox:
    left: float
    top: float
    width: float
    height: float
    score: int
    category: int
    truncation: int
    occlusion: int
    line: int

    @property
    def ignored(self) -> bool:
        return self.category in (IGNORED_REGION, OTHERS) or self.score == 0


def _number(text: str, integer: bool) -> float | int:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    if integer:
        if not value.is_integer():
            raise ValueError(f"{text!r} is not an integer")
        return int(value)
    return value


def parse_annotation_text(text: str, source: str, skip_bad_lines: bool = False,
                          stats: Counter | None = None) -> list[VisDroneBox]:
    """Parse one annotation file's text. Malformed lines (wrong field count, non-numbers, unknown
    category, negative size) raise `VisDroneFormatError` naming `source` and the line number, or are
    skipped and counted under `stats["bad_lines_skipped"]` with `skip_bad_lines`."""
    stats = stats if stats is not None else Counter()
    boxes = []
    for lineno, raw in enumerate(text.splitlines(), start=1):      # handles \n, \r\n, \r
        line = raw.strip()
        if not line:
            stats["blank_lines"] += 1
            continue
        fields = [f.strip() for f in line.rstrip(",").split(",")]   # trailing commas are normal
        try:
            if len(fields) != 8:
                raise ValueError(f"expected 8 comma-separated fields "
                                 "(left,top,width,height,score,category,truncation,occlusion), "
                                 f"got {len(fields)}")
            left, top, width, height = (_number(f, integer=False) for f in fields[:4])
            score, category, truncation, occlusion = (_number(f, integer=True) for f in fields[4:])
            if not 0 <= category <= OTHERS:
                raise ValueError(f"unknown category {category} (expected 0..11)")
            if width < 0 or height < 0:
                raise ValueError(f"negative box size {width}x{height}")
        except ValueError as err:
            if not skip_bad_lines:
                raise VisDroneFormatError(f"{source}, line {lineno}: {err}: {raw!r} "
                                          "(pass --skip-bad-lines to skip and count such lines)") from None
            stats["bad_lines_skipped"] += 1
            continue
        boxes.append(VisDroneBox(left, top, width, height, score, category, truncation, occlusion, lineno))
    return boxes


def read_image_size(path: Path) -> tuple[int, int]:
    """(h, w) from the image file header (no full decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, UnidentifiedImageError) as err:
        raise VisDroneFormatError(f"image file {path} cannot be read: {err}") from None
    return h, w


def _clip(box: VisDroneBox, h: int, w: int) -> tuple[float, float, float, float]:
    x1, y1 = min(max(box.left, 0.0), w), min(max(box.top, 0.0), h)
    x2, y2 = min(max(box.left + box.width, 0.0), w), min(max(box.top + box.height, 0.0), h)
    return x1, y1, x2, y2


def boxes_to_annotations(boxes: Iterable[VisDroneBox], image_id: int, hw: tuple[int, int], first_id: int,
                         drop_ignored: bool, stats: Counter) -> list[dict]:
    """COCO annotations for one image: boxes clipped to the image, zero-area dropped, ignored regions
    as one crowd annotation per evaluated category (or dropped); every change counted in `stats`."""
    h, w = hw
    out: list[dict] = []
    for box in boxes:
        kind = "ignored_regions" if box.ignored else "objects"
        x1, y1, x2, y2 = _clip(box, h, w)
        if (x1, y1, x2, y2) != (box.left, box.top, box.left + box.width, box.top + box.height):
            stats[f"{kind}_clipped_to_image"] += 1
        if x2 <= x1 or y2 <= y1:
            stats[f"{kind}_zero_area_dropped"] += 1
            continue
        common = {"image_id": image_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                  "truncation": box.truncation, "occlusion": box.occlusion}
        if not box.ignored:
            out.append({"id": first_id + len(out), "category_id": box.category, "iscrowd": 0, **common})
            stats["objects"] += 1
            continue
        what = (f"category_{box.category}" if box.category in (IGNORED_REGION, OTHERS)
                else "score_0_objects")            # evaluated class but score 0: ignored by the toolkit
        if drop_ignored:
            stats[f"ignored_{what}_dropped"] += 1
            continue
        stats[f"ignored_{what}_as_crowd"] += 1
        for cat_id in range(1, len(CATEGORIES) + 1):
            out.append({"id": first_id + len(out), "category_id": cat_id, "iscrowd": 1,
                        "visdrone_category": box.category, **common})
    return out


def list_split(root: Path) -> tuple[list[Path], Path]:
    images_dir, ann_dir = root / "images", root / "annotations"
    if not images_dir.is_dir():
        raise VisDroneFormatError(f"{images_dir} does not exist (expected ROOT/images/*.jpg)")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise VisDroneFormatError(f"{images_dir} holds no .jpg/.jpeg/.png images")
    return images, ann_dir


def convert_split(root: str | Path, drop_ignored: bool = False, skip_bad_lines: bool = False,
                  allow_missing: bool = False, progress: bool = False) -> tuple[dict, Counter]:
    """`(coco_dict, stats)` for the split at `root`; image ids follow sorted file names from 1.

    An image without an annotation file is an error unless `allow_missing` (then it has no
    annotations and is counted); annotation files without an image are counted."""
    root = Path(root)
    images, ann_dir = list_split(root)
    if not ann_dir.is_dir() and not allow_missing:
        raise VisDroneFormatError(f"{ann_dir} does not exist (expected ROOT/annotations/*.txt; "
                                  "--allow-missing converts images without annotations)")
    stats: Counter = Counter()
    coco = {"info": {"description": f"VisDrone-DET converted from {root}"}, "licenses": [],
            "images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": n, "supercategory": "visdrone"}
                           for i, n in enumerate(CATEGORIES)]}
    iterator: Iterable[Path] = images
    if progress:
        from tqdm import tqdm
        iterator = tqdm(images, desc=f"converting {root.name}", unit="img")
    for image_id, path in enumerate(iterator, start=1):
        h, w = read_image_size(path)
        coco["images"].append({"id": image_id, "file_name": path.name, "height": h, "width": w})
        stats["images"] += 1
        ann_path = ann_dir / f"{path.stem}.txt"
        if not ann_path.is_file():
            if not allow_missing:
                raise VisDroneFormatError(f"image {path} has no annotation file {ann_path} "
                                          "(pass --allow-missing to convert it without annotations)")
            stats["images_without_annotation_file"] += 1
            continue
        try:
            text = ann_path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise VisDroneFormatError(f"{ann_path} is not UTF-8 text: {err}") from None
        if not text.strip():
            stats["empty_annotation_files"] += 1
        boxes = parse_annotation_text(text, str(ann_path), skip_bad_lines, stats)
        coco["annotations"] += boxes_to_annotations(boxes, image_id, (h, w), len(coco["annotations"]) + 1,
                                                    drop_ignored, stats)
    if ann_dir.is_dir():
        stems = {p.stem for p in images}
        orphans = sum(1 for p in ann_dir.glob("*.txt") if p.stem not in stems)
        stats["annotation_files_without_image"] += orphans
    return coco, +stats


def format_summary(stats: Counter) -> str:
    """One line per count, for the converter's closing summary."""
    width = max((len(k) for k in stats), default=0)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in sorted(stats.items()))
