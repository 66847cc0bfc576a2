"""COCO-format detection dataset: COCO, converted VisDrone and the synthetic set share this class.

Annotations are validated once at construction (so the counts live in the main process):
annotations pointing at unknown images or categories, malformed or negative-size boxes, boxes
entirely outside their image, missing image files — each an error naming the file and record, or
skipped and counted with `skip_bad_records=True`. Boxes partly outside the image are clipped and
zero-area boxes dropped (the official loader does both silently; here they are counted).
`dataset.drop_stats` holds every count, including what augmentation removed in any worker.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, get_worker_info
from torchvision import tv_tensors

from datasets.transforms import DropStats, build_transforms

# Reasons the transforms / loader may count per sample (shared-memory counters, one row per worker).
AUGMENT_REASONS = ("boxes_outside_crop", "ignore_boxes_outside_crop", "cut_to_ignore", "degenerate_boxes",
                   "degenerate_ignore_boxes", "corrupt_images_skipped")
_MAX_WORKER_ROWS = 64
# Offending records kept per reason for the data report (datasets/report.py): the first few.
MAX_EXAMPLES = 5


class DatasetError(ValueError):
    """A bad input file or record; the message names the file and the record."""


def _quiet_coco(dataset: dict):  # noqa: ANN202 - pycocotools.coco.COCO
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco_json(path: str | Path) -> dict:
    """Read and shape-check a COCO annotation file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"annotation file {path} is not valid JSON: {err}") from None
    return data


class CocoDetection(Dataset):
    """`(image (3, H, W) float normalised, target)` items; target per docs/conventions.md.

    Args:
        annotations: a COCO JSON path or an in-memory COCO dict.
        images: the images folder (file names from the JSON) or `{image_id: uint8 (3, H, W)}`.
        transforms: `(tv Image uint8, target with XYXY BoundingBoxes) -> (image float, target)`;
            default: normalise only (`build_transforms("none", train=False)`).
        label_mapping: "category_id" (label = category id) or "contiguous" (index in sorted ids).
        keep_crowd: crowd annotations become `ignore_boxes`; False drops them (counted).
        skip_bad_records: skip and count bad records instead of raising.
    """

    def __init__(self, annotations: str | Path | dict, images: str | Path | Mapping[int, torch.Tensor],
                 transforms: Callable | None = None, label_mapping: str = "category_id",
                 keep_crowd: bool = True, skip_bad_records: bool = False) -> None:
        if label_mapping not in ("category_id", "contiguous"):
            raise ValueError(f"label_mapping must be 'category_id' or 'contiguous', got {label_mapping!r}")
        if isinstance(annotations, (str, Path)):
            self.source = str(annotations)
            data = load_coco_json(annotations)
        else:
            self.source, data = "<in-memory COCO dict>", annotations
        self.skip_bad_records = skip_bad_records
        self.load_stats = Counter()
        # reason -> the first MAX_EXAMPLES offending records ("image 3 (a.jpg)", "annotation 7 ...")
        self.bad_examples: dict[str, list[str]] = {}
        self.transforms = transforms if transforms is not None else build_transforms("none", train=False)
        self.image_root: Path | None = None
        self.memory_images: Mapping[int, torch.Tensor] | None = None
        if isinstance(images, (str, Path)):
            self.image_root = Path(images)
            if not self.image_root.is_dir():
                raise DatasetError(f"image folder {self.image_root} does not exist "
                                   f"(annotations: {self.source})")
        else:
            self.memory_images = images

        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DatasetError(f"{self.source}: missing or non-list '{key}' "
                                   "(expected COCO detection format)")
        cat_ids = sorted(int(c["id"]) for c in data["categories"])
        if len(set(cat_ids)) != len(cat_ids):
            raise DatasetError(f"{self.source}: duplicate category ids in 'categories': {cat_ids}")
        self.categories = [dict(c) for c in sorted(data["categories"], key=lambda c: int(c["id"]))]
        self.category_names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        if label_mapping == "contiguous":
            self.label_to_category_id = dict(enumerate(cat_ids))
        else:
            self.label_to_category_id = {cid: cid for cid in cat_ids}
        self._cat_to_label = {cid: label for label, cid in self.label_to_category_id.items()}
        self.num_classes = (max(self.label_to_category_id) + 1) if cat_ids else 0

        self.images = self._check_images(data["images"])
        per_image, kept_anns = self._check_annotations(data["annotations"], keep_crowd)
        self.ids = sorted(self.images)
        self.targets = per_image
        # Ground truth for COCO evaluation: the records that passed validation, unclipped, crowd
        # annotations included, without segmentation polygons (bbox evaluation does not use them).
        self._gt = dict(data, images=[self.images[i]["raw"] for i in self.ids], annotations=kept_anns)
        self._coco = None
        self._augment_counts = torch.zeros((_MAX_WORKER_ROWS + 1, len(AUGMENT_REASONS)),
                                           dtype=torch.int64).share_memory_()
        # ids of the first images that failed to decode, per worker row (-1: free slot)
        self._corrupt_ids = torch.full((_MAX_WORKER_ROWS + 1, MAX_EXAMPLES), -1,
                                       dtype=torch.int64).share_memory_()

    def coco_gt(self) -> dict:
        """The evaluation ground truth as a COCO dict (what datasets.coco_eval consumes)."""
        return self._gt

    @property
    def coco(self):  # noqa: ANN201 - pycocotools.coco.COCO, built on first use
        if self._coco is None:
            self._coco = _quiet_coco(self._gt)
        return self._coco

    # ---- validation --------------------------------------------------------------------------
    def _bad(self, reason: str, message: str, example: str) -> None:
        """Raise for a bad record, or (skip_bad_records) count it and keep it as an example."""
        if not self.skip_bad_records:
            raise DatasetError(f"{message} (set skip_bad_records / data.skip_bad_records=true "
                               "to skip and count)")
        self.load_stats[reason] += 1
        examples = self.bad_examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(example)

    def _check_images(self, records: list) -> dict[int, dict]:
        images: dict[int, dict] = {}
        self._skipped_image_ids: set = set()
        for rec in records:
            try:
                image_id, h, w, name = int(rec["id"]), int(rec["height"]), int(rec["width"]), rec["file_name"]
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{self.source}: image record {rec!r} needs integer 'id', 'height', "
                                   "'width' and a 'file_name'") from None
            if image_id in images:
                raise DatasetError(f"{self.source}: duplicate image id {image_id} ({name})")
            if self.image_root is not None:
                path = self.image_root / name
                if not path.is_file():
                    self._bad("missing_image_files",
                              f"{self.source}: image id {image_id}: file {path} does not exist",
                              f"image {image_id} ({name})")
                    self._skipped_image_ids.add(rec["id"])
                    continue
            elif image_id not in self.memory_images:
                self._bad("missing_image_files",
                          f"{self.source}: image id {image_id} ({name}) has no in-memory image",
                          f"image {image_id} ({name})")
                self._skipped_image_ids.add(rec["id"])
                continue
            images[image_id] = {"height": h, "width": w, "file_name": name, "raw": rec}
        return images

    def _check_annotations(self, records: list, keep_crowd: bool) -> tuple[dict[int, dict], list]:
        boxes: dict[int, list] = {i: [] for i in self.images}
        labels: dict[int, list] = {i: [] for i in self.images}
        ignore: dict[int, set] = {i: set() for i in self.images}
        kept = []
        for ann in records:
            example = f"annotation {ann.get('id')} (image {ann.get('image_id')})"
            where = f"{self.source}: annotation id {ann.get('id')} (image id {ann.get('image_id')})"
            image_id = ann.get("image_id")
            if image_id in self._skipped_image_ids:
                self.load_stats["annotations_of_skipped_images"] += 1
                continue
            if image_id not in self.images:
                self._bad("skipped_unknown_image_id", f"{where}: image id not in 'images'", example)
                continue
            if ann.get("category_id") not in self._cat_to_label:
                self._bad("skipped_unknown_category", f"{where}: category_id {ann.get('category_id')!r} "
                          f"not in 'categories' {sorted(self._cat_to_label)}", example)
                continue
            bbox = ann.get("bbox")
            if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
                self._bad("skipped_malformed_bbox",
                          f"{where}: bbox {bbox!r} is not 4 finite numbers [x, y, w, h]", example)
                continue
            x, y, w, h = (float(v) for v in bbox)
            if w < 0 or h < 0:
                self._bad("skipped_negative_size", f"{where}: bbox {bbox} has negative width or height",
                          example)
                continue
            W, H = self.images[image_id]["width"], self.images[image_id]["height"]
            x1, y1 = min(max(x, 0), W), min(max(y, 0), H)
            x2, y2 = min(max(x + w, 0), W), min(max(y + h, 0), H)
            if w > 0 and h > 0 and (x2 <= x1 or y2 <= y1):
                self._bad("skipped_outside_image", f"{where}: bbox {bbox} lies entirely outside the "
                          f"{W}x{H} image", example)
                continue
            kept.append({k: v for k, v in ann.items() if k != "segmentation"})
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                self.load_stats["boxes_clipped_to_image"] += 1
            if x2 <= x1 or y2 <= y1:
                self.load_stats["zero_area_boxes_dropped"] += 1
                continue
            if ann.get("iscrowd", 0):
                if not keep_crowd:
                    self.load_stats["crowd_boxes_dropped"] += 1
                elif (x1, y1, x2, y2) in ignore[image_id]:
                    # crowd copies emitted once per category (see tools/convert_visdrone.py)
                    self.load_stats["crowd_copies_merged"] += 1
                else:
                    ignore[image_id].add((x1, y1, x2, y2))
                continue
            boxes[image_id].append((x1, y1, x2, y2))
            labels[image_id].append(self._cat_to_label[ann["category_id"]])
        targets = {i: {"boxes": np.asarray(boxes[i], dtype=np.float32).reshape(-1, 4),
                       "labels": np.asarray(labels[i], dtype=np.int64),
                       "ignore_boxes": np.asarray(sorted(ignore[i]), dtype=np.float32).reshape(-1, 4)}
                   for i in self.images}
        return targets, kept

    # ---- loading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> torch.Tensor:
        """uint8 (3, H, W) RGB; errors name the file and image id."""
        info = self.images[image_id]
        if self.memory_images is not None:
            image = self.memory_images[image_id]
            where = f"in-memory image id {image_id}"
        else:
            path = self.image_root / info["file_name"]
            where = f"image file {path} (image id {image_id})"
            try:   # PIL, as the official loader (torchvision.io decoding is deprecated from 0.29)
                with Image.open(path) as im:
                    array = np.array(im if im.mode == "RGB" else im.convert("RGB"))   # (H, W, 3) uint8
            except (UnidentifiedImageError, OSError, ValueError) as err:
                raise DatasetError(f"{where} cannot be decoded: {err}") from None
            image = torch.from_numpy(array).permute(2, 0, 1)
        if tuple(image.shape[-2:]) != (info["height"], info["width"]):
            raise DatasetError(f"{where} is {tuple(image.shape[-2:])} (h, w) but {self.source} says "
                               f"({info['height']}, {info['width']})")
        return image

    def _count(self, counts: dict[str, int]) -> None:
        info = get_worker_info()
        row = 0 if info is None else 1 + info.id % _MAX_WORKER_ROWS
        for reason, n in counts.items():
            if reason not in AUGMENT_REASONS:
                raise KeyError(f"transform reported unknown drop reason {reason!r}; "
                               "add it to AUGMENT_REASONS")
            self._augment_counts[row, AUGMENT_REASONS.index(reason)] += n

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, dict]:
        for attempt in range(len(self.ids)):
            image_id = self.ids[(idx + attempt) % len(self.ids)]
            try:
                image = self.load_image(image_id)
                break
            except DatasetError as err:
                if not self.skip_bad_records:
                    raise DatasetError(f"{err}; to skip and count such images instead, set "
                                       "data.skip_bad_records=true (--opt data.skip_bad_records=true)"
                                       ) from None
                self._count({"corrupt_images_skipped": 1})
                self._remember_corrupt(image_id)
        else:
            raise DatasetError(f"{self.source}: no image of the dataset could be loaded")
        h, w = image.shape[-2:]
        raw = self.targets[image_id]
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(raw["boxes"]), format="XYXY",
                                              canvas_size=(h, w)),
            "labels": torch.from_numpy(raw["labels"]),
            "ignore_boxes": tv_tensors.BoundingBoxes(torch.from_numpy(raw["ignore_boxes"]), format="XYXY",
                                                     canvas_size=(h, w)),
            "dropped": {},
        }
        image, target = self.transforms(tv_tensors.Image(image), target)
        self._count(target.get("dropped", {}))
        new_hw = tuple(image.shape[-2:])
        return image.as_subclass(torch.Tensor), finalize_target(target, image_id, (h, w), new_hw)

    def _remember_corrupt(self, image_id: int) -> None:
        info = get_worker_info()
        row = self._corrupt_ids[0 if info is None else 1 + info.id % _MAX_WORKER_ROWS]
        if bool((row == image_id).any()):
            return
        free = (row < 0).nonzero()
        if len(free):
            row[int(free[0])] = image_id

    # ---- reporting ---------------------------------------------------------------------------
    @property
    def corrupt_image_examples(self) -> list[str]:
        """The first images that failed to decode (from every DataLoader worker), with file names."""
        ids = sorted({int(i) for i in self._corrupt_ids.flatten().tolist() if i >= 0})[:MAX_EXAMPLES]
        return [f"image {i} ({self.images[i]['file_name']})" for i in ids]

    @property
    def augment_stats(self) -> dict[str, int]:
        totals = self._augment_counts.sum(dim=0).tolist()
        return {r: int(n) for r, n in zip(AUGMENT_REASONS, totals, strict=True) if n}

    @property
    def drop_stats(self) -> DropStats:
        """Everything removed, clipped or skipped so far: load-time counts + augmentation counts
        (summed over DataLoader workers through shared memory)."""
        stats = DropStats()
        stats.update(dict(self.load_stats))
        stats.update(self.augment_stats)
        return stats


def xyxy_to_cxcywh_norm(boxes_xyxy: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    h, w = hw
    x1, y1, x2, y2 = boxes_xyxy.unbind(-1)
    out = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)
    # resizing leaves edges a rounding error past the image (a full-height box became h = 1 + 1e-7)
    return (out / torch.tensor([w, h, w, h], dtype=out.dtype)).clamp(0.0, 1.0).to(torch.float32)


def finalize_target(target: dict, image_id: int, orig_hw: tuple[int, int], hw: tuple[int, int]) -> dict:
    """Pipeline target (XYXY absolute) -> the model's target dict (docs/conventions.md)."""
    boxes = target["boxes"].as_subclass(torch.Tensor).to(torch.float64)
    ignore = target["ignore_boxes"].as_subclass(torch.Tensor).to(torch.float64)
    return {
        "boxes": xyxy_to_cxcywh_norm(boxes, hw),
        "labels": target["labels"].to(torch.int64),
        "ignore_boxes": xyxy_to_cxcywh_norm(ignore, hw),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "orig_size": torch.tensor(orig_hw, dtype=torch.int64),
        "size": torch.tensor(hw, dtype=torch.int64),
        "area": ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).to(torch.float32),
        "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
    }
