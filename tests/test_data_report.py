"""Skipped records are reported: data_report.json counts by reason with the offending records, one
log line per dataset, and a corrupt image's error names the option that skips it."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs.data import DataConfig
from datasets import build_dataloader, build_dataset
from datasets.coco import DatasetError
from datasets.report import REPORT_NAME, write_data_report


def _bad_coco_folder(root: Path) -> DataConfig:
    """4 images (one a corrupt JPEG), 6 annotations: one with a negative width, one with an unknown
    category; the rest valid."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / name)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    coco = {
        "images": [{"id": i, "file_name": n, "height": 40, "width": 48}
                   for i, n in enumerate(("a.jpg", "b.jpg", "broken.jpg", "c.jpg"), start=1)],
        "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [20, 5, -4, 6]},    # negative width
            {"id": 12, "image_id": 2, "category_id": 9, "bbox": [5, 5, 8, 8]},     # unknown category
            {"id": 13, "image_id": 2, "category_id": 2, "bbox": [30, 20, 6, 6]},
            {"id": 14, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 15, "image_id": 4, "category_id": 1, "bbox": [3, 3, 9, 9]},
        ],
    }
    (root / "ann.json").write_text(json.dumps(coco))
    return DataConfig(dataset="coco", train_images=str(images), train_annotations=str(root / "ann.json"),
                      val_images=str(images), val_annotations=str(root / "ann.json"),
                      train_policy="none", eval_policy="none", num_workers=0)


def test_report_counts_skipped_records_by_reason_with_examples(tmp_path, caplog):
    data = _bad_coco_folder(tmp_path / "coco")
    data.skip_bad_records = True
    train = build_dataset(data, "train")
    val = build_dataset(data, "val")
    # loading finds the corrupt JPEG (image 3), skipped and counted, here in a DataLoader worker
    data.num_workers = 1
    for _ in build_dataloader(data, train, batch_size=1, train=False):
        pass
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="datasets.report"):
        write_data_report(run_dir, {"train": train, "val": val})
    report = json.loads((run_dir / REPORT_NAME).read_text())
    t = report["train"]
    assert t["skip_bad_records"] is True and t["images"] == 4
    assert t["skipped"] == {"corrupt_images_skipped": 1, "skipped_negative_size": 1,
                            "skipped_unknown_category": 1}
    assert t["examples"] == {"corrupt_images_skipped": ["image 3 (broken.jpg)"],
                             "skipped_negative_size": ["annotation 11 (image 1)"],
                             "skipped_unknown_category": ["annotation 12 (image 2)"]}
    assert report["val"]["skipped"] == {"skipped_negative_size": 1, "skipped_unknown_category": 1}
    lines = [r for r in caplog.records if r.name == "datasets.report"]
    assert len(lines) == 2 and all(r.levelno == logging.WARNING for r in lines)
    train_line = lines[0].getMessage()
    assert "data train" in train_line and "ann.json" in train_line and "skipped 3 record(s)" in train_line
    assert "corrupt_images_skipped=1 (first: image 3 (broken.jpg))" in train_line
    assert "skipped_negative_size=1 (first: annotation 11 (image 1))" in train_line
    assert str(run_dir / REPORT_NAME) in train_line

    # refreshed after an evaluation: only a dataset whose counts changed is logged again
    caplog.clear()
    for i in range(len(val)):
        val[i]
    with caplog.at_level(logging.INFO, logger="datasets.report"):
        write_data_report(run_dir, {"train": train, "val": val}, only_changes=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "datasets.report"]
    assert len(lines) == 1 and lines[0].startswith("data val") and "corrupt_images_skipped=1" in lines[0]
    assert json.loads((run_dir / REPORT_NAME).read_text())["val"]["skipped"]["corrupt_images_skipped"] == 1


def test_clean_dataset_reports_nothing_skipped(tmp_path, caplog):
    data = DataConfig(synthetic_train_images=2, synthetic_val_images=1, synthetic_min_objects=1,
                      synthetic_max_objects=5)
    with caplog.at_level(logging.INFO, logger="datasets.report"):
        report = write_data_report(tmp_path, {"train": build_dataset(data, "train")})
    assert report["train"]["skipped"] == {} and report["train"]["images"] == 2
    assert report["train"]["source"] == "synthetic train set (seed 0, 2 images)"
    assert [r.getMessage().endswith(f"nothing skipped; see {tmp_path / REPORT_NAME}")
            for r in caplog.records if r.name == "datasets.report"] == [True]


def test_bad_records_without_skipping_name_the_option(tmp_path):
    data = _bad_coco_folder(tmp_path / "coco")
    with pytest.raises(DatasetError, match=r"annotation id 11 .*data\.skip_bad_records=true"):
        build_dataset(data, "train")
    # with only the corrupt JPEG left, loading it fails with the way out in the message
    coco = json.loads(Path(data.train_annotations).read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["id"] not in (11, 12)]
    Path(data.train_annotations).write_text(json.dumps(coco))
    train = build_dataset(data, "train")
    with pytest.raises(DatasetError) as err:
        train[2]
    message = str(err.value)
    assert "broken.jpg (image id 3) cannot be decoded" in message
    assert "--opt data.skip_bad_records=true" in message
