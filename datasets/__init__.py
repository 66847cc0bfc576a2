"""Datasets: one COCO-format dataset class for COCO, converted VisDrone and the synthetic set.

`build_dataset(cfg.data, split)` is the only code that reads the data config. Distributed
training: accelerate shards the DataLoader itself (`accelerator.prepare`), so the samplers here are
plain Random/Sequential ones. The duplicate samples accelerate pads the last batch with are removed
after evaluation, not here: `util.engine.evaluate` gathers each process's {image_id: results} with
`accelerate.utils.gather_object` and merges them with
`datasets.coco_eval.merge_predictions(on_conflict="first")`, so every image is scored once.
"""
from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from configs.data import DataConfig
    from datasets.coco import CocoDetection

# Submodules load on first use (module-level __getattr__ below), so `import datasets.coco_eval`
# (tools/evaluate.py) does not pay for torch / torchvision transforms. name -> (module, attribute)
_LAZY = {
    "CocoDetection": ("datasets.coco", "CocoDetection"),
    "DatasetError": ("datasets.coco", "DatasetError"),
    "collate_detection": ("datasets.collate", "collate_detection"),
    "make_collate": ("datasets.collate", "make_collate"),
    "generate_synthetic": ("datasets.synthetic", "generate_synthetic"),
    "DropStats": ("datasets.transforms", "DropStats"),
    "build_transforms": ("datasets.transforms", "build_transforms"),
    "VISDRONE_CATEGORIES": ("datasets.visdrone", "CATEGORIES"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'datasets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


SPLITS = ("train", "val")
_SYNTHETIC_VAL_SEED_OFFSET = 1_000_003      # val scenes never repeat train scenes


def transforms_from_config(data: DataConfig, train: bool):  # noqa: ANN201 - v2.Compose
    """The augmentation pipeline named by `data.train_policy` / `data.eval_policy`."""
    from datasets.transforms import build_transforms

    return build_transforms(
        data.train_policy if train else data.eval_policy, train,
        scales=data.train_scales, max_size=data.train_max_size, crop_resize_scales=data.crop_resize_scales,
        crop_min_size=data.crop_min_size, crop_max_size=data.crop_max_size, eval_size=data.eval_size,
        eval_max_size=data.eval_max_size, small_object_scales=data.small_object_scales,
        small_object_max_size=data.small_object_max_size, crop_prob=data.small_object_crop_prob,
        crop_fraction=tuple(data.small_object_crop_fraction), min_visible=data.small_object_min_visible,
        min_box_px=data.min_box_px)


@functools.lru_cache(maxsize=4)
def _synthetic_split(num_images: int, image_size: tuple[int, int], min_objects: int, max_objects: int,
                     seed: int, max_ignored_regions: int, small_side: tuple[float, float, float],
                     clutter: int = 0) -> tuple[dict, dict]:
    from datasets.synthetic import generate_synthetic

    coco, images, _ = generate_synthetic(num_images, image_size, min_objects, max_objects, seed,
                                         max_ignored_regions=max_ignored_regions, small_side=small_side,
                                         clutter=clutter)
    return coco, images


def build_dataset(data: DataConfig, split: str) -> CocoDetection:
    """The `split` ("train" or "val") dataset described by the data config section."""
    from datasets.coco import CocoDetection, DatasetError
    from datasets.visdrone import CATEGORIES as VISDRONE_CATEGORIES

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train = split == "train"
    transforms = transforms_from_config(data, train)
    common = dict(transforms=transforms, label_mapping=data.label_mapping, keep_crowd=data.keep_crowd,
                  skip_bad_records=data.skip_bad_records)
    if data.dataset == "synthetic":
        seed = data.synthetic_seed + (0 if train else _SYNTHETIC_VAL_SEED_OFFSET)
        n = data.synthetic_train_images if train else data.synthetic_val_images
        coco, images = _synthetic_split(n, tuple(data.synthetic_image_size), data.synthetic_min_objects,
                                        data.synthetic_max_objects, seed, data.synthetic_max_ignored_regions,
                                        tuple(float(v) for v in data.synthetic_small_side_px),
                                        data.synthetic_clutter)
        dataset = CocoDetection(coco, images, **common)
        dataset.source = f"synthetic {split} set (seed {seed}, {n} images)"   # names it in reports
        return dataset
    if data.dataset in ("coco", "visdrone"):
        images, annotations = ((data.train_images, data.train_annotations) if train
                               else (data.val_images, data.val_annotations))
        if not images or not annotations:
            raise DatasetError(f"data.dataset={data.dataset!r} needs data.{split}_images and "
                               f"data.{split}_annotations (got {images!r}, {annotations!r})")
        dataset = CocoDetection(annotations, images, **common)
        names = tuple(c.get("name") for c in dataset.categories)
        if data.dataset == "visdrone" and names != VISDRONE_CATEGORIES:
            raise DatasetError(f"{annotations}: categories {names} are not the 10 VisDrone-DET classes "
                               f"{VISDRONE_CATEGORIES}; convert the split with tools/convert_visdrone.py")
        return dataset
    raise ValueError(f"unknown data.dataset {data.dataset!r}; expected coco, visdrone or synthetic")


def build_sampler(dataset: torch.utils.data.Dataset, train: bool, seed: int = 0
                  ) -> torch.utils.data.Sampler:
    """Random order from a seeded generator for training, dataset order for evaluation.

    accelerate wraps these for distributed runs; re-seed the generator per epoch for exact resume.
    """
    import torch

    if train:
        generator = torch.Generator()
        generator.manual_seed(seed)
        return torch.utils.data.RandomSampler(dataset, generator=generator)
    return torch.utils.data.SequentialSampler(dataset)


def build_dataloader(data: DataConfig, dataset: torch.utils.data.Dataset, batch_size: int, train: bool,
                     seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader with the detection collate and the config's worker / pinning settings."""
    import torch

    from datasets.collate import make_collate

    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=build_sampler(dataset, train, seed),
        drop_last=train and len(dataset) >= batch_size, collate_fn=make_collate(data.pad_size_divisor),
        num_workers=data.num_workers, pin_memory=data.pin_memory and torch.cuda.is_available(),
        persistent_workers=data.num_workers > 0)


__all__ = ["CocoDetection", "DatasetError", "DropStats", "VISDRONE_CATEGORIES", "build_dataloader",
           "build_dataset", "build_sampler", "build_transforms", "collate_detection", "generate_synthetic",
           "make_collate", "transforms_from_config"]
