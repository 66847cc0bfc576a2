"""COCO-format dataset (files and in-memory), synthetic set, collate, label mapping, bad inputs."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from configs import ConfigError, apply_overrides
from configs.schema import Config
from datasets import build_dataset, collate_detection
from datasets.coco import CocoDetection, DatasetError
from datasets.synthetic import generate_synthetic, size_bucket_counts

CATS = [{"id": 1, "name": "car"}, {"id": 3, "name": "bus"}, {"id": 7, "name": "bike"}]


def tiny_coco() -> dict:
    """Two images; image 1 has an object, a box sticking out on the right (clipped), a zero-width
    box, and a crowd region duplicated per category (as the VisDrone converter writes it)."""
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60},
                   {"id": 2, "file_name": "b.png", "height": 30, "width": 20}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [6, 4, 12, 8], "area": 96, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [50, 10, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 5], "area": 0, "iscrowd": 0},
            {"id": 13, "image_id": 1, "category_id": 1, "bbox": [0, 20, 30, 20], "area": 600, "iscrowd": 1},
            {"id": 14, "image_id": 1, "category_id": 3, "bbox": [0, 20, 30, 20], "area": 600, "iscrowd": 1},
            {"id": 15, "image_id": 2, "category_id": 1, "bbox": [2, 3, 4, 5], "area": 20, "iscrowd": 0},
        ],
        "categories": CATS,
    }


def write_png(image: torch.Tensor, path: str) -> None:
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def write_tiny(root: Path, data: dict | None = None) -> tuple[Path, Path]:
    data = data if data is not None else tiny_coco()
    (root / "images").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for rec in data["images"]:
        img = torch.randint(0, 256, (3, rec["height"], rec["width"]), generator=g, dtype=torch.uint8)
        write_png(img, str(root / "images" / rec["file_name"]))
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, root / "images"


def test_coco_dataset_item_matches_the_contract(tmp_path):
    ann, images = write_tiny(tmp_path)
    ds = CocoDetection(ann, images)
    assert len(ds) == 2 and ds.num_classes == 8 and ds.label_to_category_id == {1: 1, 3: 3, 7: 7}
    image, t = ds[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.float32
    assert set(t) == {"boxes", "labels", "ignore_boxes", "image_id", "orig_size", "size", "area", "iscrowd"}
    # [6,4,12,8] -> cxcywh (12, 8, 12, 8) / (60, 40, 60, 40); [50,10,20,10] clipped to [50,10,10,10]
    ref = torch.tensor([[12 / 60, 8 / 40, 12 / 60, 8 / 40], [55 / 60, 15 / 40, 10 / 60, 10 / 40]])
    torch.testing.assert_close(t["boxes"], ref, rtol=0, atol=1e-7)
    assert t["boxes"].dtype == torch.float32 and t["labels"].tolist() == [3, 7]
    torch.testing.assert_close(t["ignore_boxes"], torch.tensor([[15 / 60, 30 / 40, 30 / 60, 20 / 40]]))
    torch.testing.assert_close(t["area"], torch.tensor([96.0, 100.0]))
    assert t["iscrowd"].tolist() == [0, 0] and t["image_id"].item() == 1
    assert t["orig_size"].tolist() == [40, 60] and t["size"].tolist() == [40, 60]
    stats = ds.drop_stats.as_dict()
    assert stats["boxes_clipped_to_image"] == 1 and stats["zero_area_boxes_dropped"] == 1
    assert stats["crowd_copies_merged"] == 1
    # evaluation GT keeps every valid record, crowd copies included, unclipped
    assert len(ds.coco_gt()["annotations"]) == 6
    assert len(ds.coco.getAnnIds(imgIds=[1], iscrowd=None)) == 5      # pycocotools view of the same


def test_contiguous_label_mapping_and_crowd_drop(tmp_path):
    ann, images = write_tiny(tmp_path)
    ds = CocoDetection(ann, images, label_mapping="contiguous", keep_crowd=False)
    assert ds.label_to_category_id == {0: 1, 1: 3, 2: 7} and ds.num_classes == 3
    _, t = ds[0]
    assert t["labels"].tolist() == [1, 2] and t["ignore_boxes"].shape == (0, 4)
    assert ds.load_stats["crowd_boxes_dropped"] == 2


def _tool(name: str):  # noqa: ANN202 - the tool module, loaded in-process
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_make_synthetic_tool_and_in_memory_dataset_agree(tmp_path, capsys):
    out = tmp_path / "syn"
    assert _tool("make_synthetic").main([str(out), "--images", "3", "--seed", "11", "--size", "64", "80",
                                         "--min-objects", "5", "--max-objects", "30"]) == 0
    for name in ("annotations.json", "statistics.json", "size_histogram.png", "sample_boxes.png"):
        assert (out / name).is_file(), name
    stats = json.loads((out / "statistics.json").read_text())
    assert stats["images"] == 3 and stats["objects"] == sum(stats["size_buckets"].values())
    coco, images, _ = generate_synthetic(3, (64, 80), 5, 30, seed=11)
    assert json.loads((out / "annotations.json").read_text()) == coco
    mem = CocoDetection(coco, images)
    disk = CocoDetection(out / "annotations.json", out / "images")     # the same class, from files
    for i in range(3):
        (a, ta), (b, tb) = mem[i], disk[i]
        assert torch.equal(a, b)                                          # PNG is lossless
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_synthetic_is_deterministic_and_realistic():
    coco1, img1, _ = generate_synthetic(12, (256, 256), seed=3)
    coco2, img2, _ = generate_synthetic(5, (256, 256), seed=3)          # a prefix of the same set
    assert coco1["annotations"][:10] == coco2["annotations"][:10]
    assert all(torch.equal(img1[i], img2[i]) for i in img2)
    coco3, img3, _ = generate_synthetic(5, (256, 256), seed=4)
    assert not torch.equal(img1[1], img3[1])
    buckets = size_bucket_counts(coco1)
    assert buckets["small"] > 5 * buckets["medium"] > 0 and buckets["large"] > 0
    objects = [a for a in coco1["annotations"] if not a["iscrowd"]]
    per_image = torch.bincount(torch.tensor([a["image_id"] for a in objects]))
    assert per_image[1:].min() >= 10 and per_image.max() >= 80
    assert len({a["category_id"] for a in objects}) >= 5
    assert any(a["visibility"] < 0.9 for a in objects)                     # partial occlusion
    crowd = [a for a in coco1["annotations"] if a["iscrowd"]]
    assert crowd and len(crowd) % len(coco1["categories"]) == 0            # one copy per category
    for a in objects:
        x, y, w, h = a["bbox"]
        assert w >= 3 and h >= 3 and x >= 0 and y >= 0 and x + w <= 256 and y + h <= 256


def test_synthetic_knobs_remove_crowds_and_bound_small_sides():
    coco, _, stats = generate_synthetic(6, (128, 128), 5, 40, seed=1, max_ignored_regions=0,
                                        small_side=(8.0, 12.0, 16.0))
    assert not any(a["iscrowd"] for a in coco["annotations"]) and stats["ignored_regions"] == 0
    sides = [(a["bbox"][2] * a["bbox"][3]) ** 0.5 for a in coco["annotations"]]
    small = [s for s in sides if s < 30]  # medium objects start at a 32 px side (aspect rounding: 31+)
    assert len(small) > 0.8 * len(sides)
    for side in small:  # side from [8, 16], then an aspect ratio in [0.6, 1.6] splits it into h, w
        assert 8 * 0.9 <= side <= 16 * 1.1, side
    default, _, _ = generate_synthetic(3, (128, 128), 5, 40, seed=1)
    explicit, _, _ = generate_synthetic(3, (128, 128), 5, 40, seed=1, max_ignored_regions=2,
                                        small_side=(4.0, 10.0, 31.0))
    assert default == explicit  # the defaults are the documented dataset


def test_synthetic_knob_bad_values_are_rejected():
    from configs import load_config
    from configs.overrides import ConfigError

    with pytest.raises(ConfigError, match="synthetic_small_side_px"):
        load_config("demo_synthetic", ["data.synthetic_small_side_px=[12,8,16]"])
    with pytest.raises(ConfigError, match="synthetic_max_ignored_regions"):
        load_config("demo_synthetic", ["data.synthetic_max_ignored_regions=-1"])


def test_collate_pads_bottom_right_and_masks_padding():
    a = (torch.ones(3, 4, 6), {"id": 0})
    b = (torch.full((3, 5, 3), 2.0), {"id": 1})
    images, masks, targets = collate_detection([a, b])
    assert images.shape == (2, 3, 5, 6) and masks.shape == (2, 5, 6) and masks.dtype == torch.bool
    assert masks[0, :4, :6].logical_not().all() and masks[0, 4].all()
    assert masks[1, :, :3].logical_not().all() and masks[1, :, 3:].all()
    assert images[0, :, 4].abs().sum() == 0 and images[1, :, :, 3:].abs().sum() == 0
    assert torch.equal(images[1, :, :5, :3], b[0]) and [t["id"] for t in targets] == [0, 1]
    images, masks, _ = collate_detection([a, b], size_divisor=32)
    assert images.shape == (2, 3, 32, 32) and masks[0, :4, :6].logical_not().all()
    assert masks[0].sum() == 32 * 32 - 24
    with pytest.raises(ValueError, match="item 0 image has shape"):
        collate_detection([(torch.ones(4, 4), {})])


def test_build_dataset_from_config_and_loader_counts():
    cfg = apply_overrides(Config(), ["data.synthetic_train_images=4", "data.synthetic_val_images=2",
                                     "data.synthetic_image_size=[96,128]", "data.train_policy=small_object",
                                     "data.small_object_scales=[96]", "data.small_object_max_size=200",
                                     "data.small_object_crop_prob=1.0", "data.eval_policy=none",
                                     "data.label_mapping=contiguous"])
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert len(train) == 4 and len(val) == 2 and train.num_classes == 7
    assert not torch.equal(train[0][0][:, :10, :10], val[0][0][:, :10, :10])
    loader = torch.utils.data.DataLoader(train, batch_size=2, collate_fn=collate_detection)
    for images, masks, targets in loader:
        assert images.shape[0] == 2 and masks.shape == (2, *images.shape[-2:])
        for t in targets:
            assert (t["boxes"] >= 0).all() and (t["boxes"] <= 1).all() and t["labels"].max() < 7
    assert train.drop_stats.total() > 0     # crops at p=1 always remove something; counted
    image, t = val[0]
    assert image.shape == (3, 96, 128) and t["size"].tolist() == [96, 128]


def test_drop_counts_are_summed_over_loader_workers():
    cfg = apply_overrides(Config(), ["data.synthetic_train_images=6", "data.synthetic_image_size=[96,128]",
                                     "data.train_policy=small_object", "data.small_object_scales=[96]",
                                     "data.small_object_max_size=200", "data.small_object_crop_prob=1.0"])
    ds = build_dataset(cfg.data, "train")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_detection)
    removed = 0
    for _, _, targets in loader:
        for t in targets:
            removed += len(ds.targets[int(t["image_id"])]["boxes"]) - len(t["boxes"])
    stats = ds.drop_stats.as_dict()      # read in the main process: counted in the workers
    counted = sum(stats.get(k, 0) for k in ("boxes_outside_crop", "cut_to_ignore", "degenerate_boxes"))
    assert removed > 0 and counted == removed


def test_config_check_rejects_bad_values():
    with pytest.raises(ConfigError, match="crop_min_size"):
        apply_overrides(Config(), ["data.crop_min_size=700"])
    with pytest.raises(ConfigError, match="small_object_crop_fraction"):
        apply_overrides(Config(), ["data.small_object_crop_fraction=[0.9,0.5]"])
    with pytest.raises(ConfigError, match="not one of"):
        apply_overrides(Config(), ["data.train_policy=fancy"])


# ---- bad inputs: an error naming file + record, or skipped and counted when opted in ------------
def _break(mutate) -> dict:  # noqa: ANN001
    data = copy.deepcopy(tiny_coco())
    mutate(data)
    return data


BAD_RECORDS = [
    ("unknown image id", lambda d: d["annotations"].append(
        {"id": 99, "image_id": 5, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 0}),
     r"annotation id 99 \(image id 5\): image id not in 'images'", "skipped_unknown_image_id"),
    ("unknown category", lambda d: d["annotations"][0].update(category_id=2),
     r"annotation id 10 .*category_id 2 not in 'categories' \[1, 3, 7\]", "skipped_unknown_category"),
    ("negative size", lambda d: d["annotations"][0].update(bbox=[6, 4, -3, 8]),
     r"annotation id 10 .*negative width or height", "skipped_negative_size"),
    ("outside image", lambda d: d["annotations"][0].update(bbox=[70, 4, 5, 5]),
     r"annotation id 10 .*entirely outside the 60x40 image", "skipped_outside_image"),
    ("malformed bbox", lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
     r"annotation id 10 .*not 4 finite numbers", "skipped_malformed_bbox"),
]


@pytest.mark.parametrize("name,mutate,message,counter", BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_bad_annotation_records(tmp_path, name, mutate, message, counter):  # noqa: ANN001
    ann, images = write_tiny(tmp_path, _break(mutate))
    with pytest.raises(DatasetError, match=message) as err:
        CocoDetection(ann, images)
    assert str(ann) in str(err.value)
    ds = CocoDetection(ann, images, skip_bad_records=True)
    assert ds.load_stats[counter] == 1 and len(ds) == 2
    ds[0]


def test_missing_image_file(tmp_path):
    ann, images = write_tiny(tmp_path)
    (images / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"image id 1: file .*a\.png does not exist"):
        CocoDetection(ann, images)
    ds = CocoDetection(ann, images, skip_bad_records=True)
    assert len(ds) == 1 and ds.load_stats["missing_image_files"] == 1
    assert ds.load_stats["annotations_of_skipped_images"] == 5
    assert [img["id"] for img in ds.coco_gt()["images"]] == [2]


def test_corrupt_image_file(tmp_path):
    ann, images = write_tiny(tmp_path)
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    ds = CocoDetection(ann, images)
    with pytest.raises(DatasetError, match=r"image file .*a\.png \(image id 1\) cannot be decoded"):
        ds[0]
    ds = CocoDetection(ann, images, skip_bad_records=True)
    _, t = ds[0]                                    # falls through to the next image, counted
    assert t["image_id"].item() == 2 and ds.drop_stats.as_dict()["corrupt_images_skipped"] == 1


def test_image_size_mismatch_and_bad_json(tmp_path):
    ann, images = write_tiny(tmp_path)
    ann.write_text(json.dumps(_break(lambda d: d["images"][1].update(height=31))))
    message = r"b\.png \(image id 2\) is \(30, 20\) \(h, w\) but .* says \(31, 20\)"
    with pytest.raises(DatasetError, match=message):
        CocoDetection(ann, images)[1]
    ann.write_text("{not json")
    with pytest.raises(DatasetError, match="is not valid JSON"):
        CocoDetection(ann, images)
    with pytest.raises(DatasetError, match="does not exist"):
        CocoDetection(tmp_path / "nope.json", images)


def test_grayscale_and_palette_images_load_as_rgb(tmp_path):
    ann, images = write_tiny(tmp_path)
    Image.new("L", (60, 40), color=128).save(images / "a.png")
    Image.new("P", (20, 30)).save(images / "b.png")
    ds = CocoDetection(ann, images)
    assert ds[0][0].shape == (3, 40, 60) and ds[1][0].shape == (3, 30, 20)
    torch.testing.assert_close(ds[0][0][:, 0, 0], (torch.tensor([128 / 255] * 3) - torch.tensor(
        [0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_normalised_boxes_stay_in_unit_range_despite_rounding():
    from datasets.coco import xyxy_to_cxcywh_norm

    # a full-height box after a float resize: y2 - y1 = 96.00001 on a 96-pixel-high image
    boxes = torch.tensor([[10.0, -0.0, 87.0, 96.00001], [0.0, 0.0, 128.0, 96.0]])
    out = xyxy_to_cxcywh_norm(boxes, (96, 128))
    assert (out >= 0).all() and (out <= 1).all()
    assert out[1].tolist() == [0.5, 0.5, 1.0, 1.0]


def test_seeded_samples_augment_the_same_with_or_without_workers():
    from datasets.collate import make_collate
    from datasets.seeded import SeededSamples

    cfg = apply_overrides(Config(), ["data.synthetic_train_images=6", "data.synthetic_image_size=[64,96]",
                                     "data.synthetic_max_objects=20", "data.train_policy=detr",
                                     "data.train_scales=[48,64,80]", "data.train_max_size=128"])
    ds = SeededSamples(build_dataset(cfg.data, "train"), seed=3)

    def images(workers: int) -> list[torch.Tensor]:
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=make_collate(1),
                                             generator=torch.Generator().manual_seed(1))  # as main.py
        return [batch[0] for batch in loader]

    torch.manual_seed(0)
    before = torch.get_rng_state()
    serial = images(0)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is left untouched
    parallel = images(2)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))
    ds.use_epoch(1)  # another epoch draws other augmentations
    other = images(0)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(serial, other, strict=True))
    assert ds.num_classes == ds.dataset.num_classes and ds.categories  # attributes pass through
