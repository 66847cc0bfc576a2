"""Data section of the config: dataset location, augmentation policy, loader settings.

Only `datasets.build_dataset` / `datasets.build_dataloader` read this section; the dataset and
transform classes take plain arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from configs.errors import ConfigError

DatasetKind = Literal["coco", "visdrone", "synthetic"]
TrainPolicy = Literal["detr", "small_object", "none"]
EvalPolicy = Literal["detr", "none"]


def _official_scales() -> list[int]:
    return list(range(480, 801, 32))          # 480, 512, ..., 800 (official DINO / DETR)


def _small_object_scales() -> list[int]:
    return list(range(640, 1025, 32))         # 640 .. 1024: larger than COCO for tiny objects


@dataclass
class DataConfig:
    # --- which data -------------------------------------------------------------------------
    dataset: DatasetKind = "synthetic"
    # COCO-format splits (COCO itself, or VisDrone converted by tools/convert_visdrone.py).
    train_images: str = ""
    train_annotations: str = ""
    val_images: str = ""
    val_annotations: str = ""
    # "category_id": label = COCO category id (official DINO COCO models, 91 classes);
    # "contiguous": label = index in the sorted category list (VisDrone: 10 classes).
    label_mapping: Literal["category_id", "contiguous"] = "category_id"
    # Crowd / ignored regions (iscrowd=1) become target["ignore_boxes"]; False drops them (counted).
    keep_crowd: bool = True
    # Bad records (missing/corrupt images, annotations with unknown image or category ids,
    # malformed boxes, boxes with negative size or entirely outside the image): an error naming
    # the file and record by default; True skips and counts them. Each run writes the counts by
    # reason, with the first offending image / annotation ids, to run_dir/data_report.json and
    # logs one line per dataset (datasets/report.py); corrupt images are found while loading, so
    # the report is refreshed after each evaluation.
    skip_bad_records: bool = False

    # --- embedded synthetic small-object dataset (no download) --------------------------------
    synthetic_train_images: int = 64
    synthetic_val_images: int = 16
    synthetic_image_size: tuple[int, int] = (256, 256)   # (h, w)
    synthetic_min_objects: int = 10
    synthetic_max_objects: int = 200
    synthetic_seed: int = 0
    # ignored regions (crowds of unannotated 2-5 px objects, VisDrone's "ignored regions") per image:
    # 0..this many; and the small objects' side in pixels (min, median, max), log-normal.
    synthetic_max_ignored_regions: int = 2
    synthetic_small_side_px: tuple[float, float, float] = (4.0, 10.0, 31.0)
    # up to this many unannotated distractors (thin strokes, specks) per image; 0 = none
    synthetic_clutter: int = 0

    # --- augmentation -------------------------------------------------------------------------
    train_policy: TrainPolicy = "detr"
    eval_policy: EvalPolicy = "detr"
    # "detr" policy (official): flip; then either multi-scale resize of the shorter side, or
    # resize to crop_resize_scales -> random crop [crop_min_size, crop_max_size] -> multi-scale.
    train_scales: list[int] = field(default_factory=_official_scales)
    train_max_size: int = 1333
    crop_resize_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min_size: int = 384
    crop_max_size: int = 600
    eval_size: int = 800
    eval_max_size: int = 1333
    # "small_object" policy (VisDrone): flip; with small_object_crop_prob an object-keeping crop
    # (side fraction in small_object_crop_fraction, placed to cut as few boxes as possible);
    # then a multi-scale resize that never shrinks a box side below min_box_px.
    small_object_scales: list[int] = field(default_factory=_small_object_scales)
    small_object_max_size: int = 1600
    small_object_crop_prob: float = 0.5
    small_object_crop_fraction: tuple[float, float] = (0.5, 0.9)
    # A box cut by a crop that keeps less than this fraction of its area becomes an ignore box.
    small_object_min_visible: float = 0.5
    min_box_px: float = 1.0

    # --- loader -------------------------------------------------------------------------------
    num_workers: int = 2
    pin_memory: bool = True
    # Pad each batch to a multiple of this (1 = official: pad to the largest image only).
    pad_size_divisor: int = 1

    def check(self) -> None:
        """Validate after overrides; errors name the key and what was expected."""
        positive_ints = ("synthetic_train_images", "synthetic_val_images", "train_max_size",
                         "crop_min_size", "crop_max_size", "eval_size", "eval_max_size",
                         "small_object_max_size", "pad_size_divisor")
        for key in positive_ints:
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        h, w = self.synthetic_image_size
        if h < 32 or w < 32:
            raise ConfigError(f"data.synthetic_image_size must be at least (32, 32), got {(h, w)}")
        if self.synthetic_clutter < 0:
            raise ConfigError(f"data.synthetic_clutter must be >= 0, got {self.synthetic_clutter}")
        if self.synthetic_max_ignored_regions < 0:
            raise ConfigError("data.synthetic_max_ignored_regions must be >= 0, got "
                              f"{self.synthetic_max_ignored_regions}")
        side = tuple(self.synthetic_small_side_px)
        if len(side) != 3 or not 2 <= side[0] <= side[1] <= side[2] <= 31:
            raise ConfigError("data.synthetic_small_side_px must be (min, median, max) with "
                              f"2 <= min <= median <= max <= 31 (COCO small), got {side}")
        if not 0 <= self.synthetic_min_objects <= self.synthetic_max_objects:
            raise ConfigError("data.synthetic_min_objects must be in [0, synthetic_max_objects], got "
                              f"{self.synthetic_min_objects} and {self.synthetic_max_objects}")
        for key in ("train_scales", "crop_resize_scales", "small_object_scales"):
            scales = getattr(self, key)
            if not scales or any(s < 1 for s in scales):
                raise ConfigError(f"data.{key} must be a non-empty list of positive sizes, got {scales}")
        if self.crop_min_size > self.crop_max_size:
            raise ConfigError(f"data.crop_min_size ({self.crop_min_size}) must be <= "
                              f"data.crop_max_size ({self.crop_max_size})")
        lo, hi = self.small_object_crop_fraction
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError("data.small_object_crop_fraction must satisfy 0 < min <= max <= 1, "
                              f"got {self.small_object_crop_fraction}")
        if not 0.0 <= self.small_object_crop_prob <= 1.0:
            raise ConfigError("data.small_object_crop_prob must be in [0, 1], got "
                              f"{self.small_object_crop_prob}")
        if not 0.0 <= self.small_object_min_visible <= 1.0:
            raise ConfigError("data.small_object_min_visible must be in [0, 1], got "
                              f"{self.small_object_min_visible}")
        if self.min_box_px < 0:
            raise ConfigError(f"data.min_box_px must be >= 0, got {self.min_box_px}")
