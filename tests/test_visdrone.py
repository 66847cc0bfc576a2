"""VisDrone-DET -> COCO converter on a tiny fake split written by the test."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from configs import apply_overrides
from configs.schema import Config
from datasets import build_dataset
from datasets.coco import CocoDetection, DatasetError
from datasets.visdrone import VisDroneFormatError, convert_split, parse_annotation_text

ROOT = Path(__file__).resolve().parents[1]


def converter_main(argv: list[str]) -> int:
    """tools/convert_visdrone.py's main(), in-process (a subprocess would re-import torch)."""
    spec = importlib.util.spec_from_file_location("convert_visdrone", ROOT / "tools" / "convert_visdrone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)

# image a: 100x80 (w x h). Lines: a car with a trailing comma; a pedestrian sticking out of the
# bottom-right corner (clipped to 10x10); an ignored region (category 0, score 0) reaching past
# the bottom (clipped to 30x20); an "others"
# box (category 11); a zero-width bicycle (dropped); a box entirely outside (zero area after clipping).
A_TXT = (b"10,10,20,20,1,4,0,1,\r\n"
         b"90,70,20,20,1,1,1,2,\r\n"
         b"5,60,30,30,0,0,0,0,\r\n"
         b"60,5,10,10,1,11,0,0\r\n"
         b"40,40,0,5,1,3,0,0\r\n"
         b"120,5,10,10,1,5,0,1\r\n")
B_TXT = b""                                   # empty annotation files are normal (no objects)


def make_split(root: Path, a_txt: bytes = A_TXT, with_b_ann: bool = True) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.new("RGB", (100, 80)).save(root / "images" / "a.jpg")
    Image.new("RGB", (50, 40)).save(root / "images" / "b.jpg")
    (root / "annotations" / "a.txt").write_bytes(a_txt)
    if with_b_ann:
        (root / "annotations" / "b.txt").write_bytes(B_TXT)
    return root


def test_converter_handles_real_format_quirks(tmp_path):
    coco, stats = convert_split(make_split(tmp_path / "vd"))
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
    assert coco["categories"][0]["name"] == "pedestrian" and coco["categories"][9]["name"] == "motor"
    assert [(i["id"], i["file_name"], i["height"], i["width"]) for i in coco["images"]] == \
        [(1, "a.jpg", 80, 100), (2, "b.jpg", 40, 50)]
    objects = [a for a in coco["annotations"] if not a["iscrowd"]]
    assert [(a["category_id"], a["bbox"], a["truncation"], a["occlusion"]) for a in objects] == \
        [(4, [10.0, 10.0, 20.0, 20.0], 0, 1), (1, [90.0, 70.0, 10.0, 10.0], 1, 2)]
    assert objects[1]["area"] == 100.0
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    # two ignored regions (category 0 and 11), each emitted once per evaluated category
    assert len(crowd) == 20
    for region, visdrone_cat in (([5.0, 60.0, 30.0, 20.0], 0), ([60.0, 5.0, 10.0, 10.0], 11)):
        copies = [a for a in crowd if a["bbox"] == region]
        assert sorted(a["category_id"] for a in copies) == list(range(1, 11))
        assert all(a["visdrone_category"] == visdrone_cat for a in copies)
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    assert stats["objects_clipped_to_image"] == 2          # the corner box and the box outside
    assert stats["ignored_regions_clipped_to_image"] == 1
    assert stats["objects_zero_area_dropped"] == 2
    assert stats["empty_annotation_files"] == 1 and stats["images"] == 2
    assert stats["ignored_category_0_as_crowd"] == 1 and stats["ignored_category_11_as_crowd"] == 1


def test_drop_ignored(tmp_path):
    coco, stats = convert_split(make_split(tmp_path / "vd"), drop_ignored=True)
    assert not any(a["iscrowd"] for a in coco["annotations"]) and len(coco["annotations"]) == 2
    assert stats["ignored_category_0_dropped"] == 1 and stats["ignored_category_11_dropped"] == 1


@pytest.mark.parametrize("line,message", [
    (b"1,2,3,4,1,4,0\r\n", "expected 8 comma-separated fields"),
    (b"1,2,x,4,1,4,0,0\n", "could not convert string to float: 'x'"),
    (b"1,2,3,4,1,12,0,0\n", "unknown category 12"),
    (b"1,2,-3,4,1,4,0,0\n", "negative box size"),
    (b"1,2,3,4,1,4.5,0,0\n", "is not an integer"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):  # noqa: ANN001
    root = make_split(tmp_path / "vd", a_txt=b"10,10,20,20,1,4,0,1,\r\n" + line)
    with pytest.raises(VisDroneFormatError, match=rf"a\.txt, line 2: .*{message}"):
        convert_split(root)
    coco, stats = convert_split(root, skip_bad_lines=True)
    assert stats["bad_lines_skipped"] == 1 and len(coco["annotations"]) == 1


def test_parser_line_ends_and_blank_lines():
    text = "1,2,3,4,1,4,0,0,\r\n\r\n5,6,7,8,1,5,1,2\r" + "9,9,1,1,1,6,0,0"
    boxes = parse_annotation_text(text, "x.txt")
    assert [(b.left, b.category, b.line) for b in boxes] == [(1.0, 4, 1), (5.0, 5, 3), (9.0, 6, 4)]


def test_missing_annotation_file(tmp_path):
    root = make_split(tmp_path / "vd", with_b_ann=False)
    with pytest.raises(VisDroneFormatError, match=r"image .*b\.jpg has no annotation file .*b\.txt"):
        convert_split(root)
    coco, stats = convert_split(root, allow_missing=True)
    assert len(coco["images"]) == 2 and stats["images_without_annotation_file"] == 1


def test_cli_summary_and_dataset_round_trip(tmp_path, capsys):
    root = make_split(tmp_path / "vd")
    (root / "annotations" / "orphan.txt").write_text("1,1,2,2,1,4,0,0\n")
    out = tmp_path / "vd.json"
    assert converter_main([str(root), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "objects_zero_area_dropped" in printed and "annotation_files_without_image" in printed
    coco = json.loads(out.read_text())
    assert len(coco["images"]) == 2
    # the converted split loads through the one dataset class; crowd copies merge to one ignore box each
    ds = CocoDetection(out, root / "images", label_mapping="contiguous")
    _, t = ds[0]
    assert t["labels"].tolist() == [3, 0] and t["ignore_boxes"].shape == (2, 4)
    assert ds.load_stats["crowd_copies_merged"] == 18
    cfg = apply_overrides(Config(), ["data.dataset=visdrone", f"data.val_images={root / 'images'}",
                                     f"data.val_annotations={out}", "data.label_mapping=contiguous"])
    val = build_dataset(cfg.data, "val")
    assert val.num_classes == 10 and len(val) == 2
    renamed = [dict(c, name="person") if c["id"] == 1 else c for c in coco["categories"]]
    (tmp_path / "other.json").write_text(json.dumps(dict(coco, categories=renamed)))
    with pytest.raises(DatasetError, match="not the 10 VisDrone-DET classes"):
        build_dataset(apply_overrides(cfg, [f"data.val_annotations={tmp_path / 'other.json'}"]).data, "val")
    bad = make_split(tmp_path / "bad", a_txt=b"1,2,3\n")
    assert converter_main([str(bad), str(out)]) == 1
    assert "a.txt, line 1" in capsys.readouterr().err
