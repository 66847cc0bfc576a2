"""tools/infer.py outputs: boxes inside the image, per-box uncertainty from a UGS model, strict
JSON, a picture; one --opt syntax (several pairs after one flag, or the flag repeated)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from configs import load_config, to_dict


@pytest.fixture(scope="module")
def ugs_checkpoint(tmp_path_factory):
    from models import build_model

    torch.manual_seed(0)
    cfg = load_config("demo_synthetic")
    model, _, _ = build_model(cfg)
    root = tmp_path_factory.mktemp("infer")
    path = root / "ckpt.pth"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, path)
    return path


def _image(path, hw=(96, 144)):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path)
    return path


def test_infer_clips_boxes_and_writes_uncertainty(tmp_path, ugs_checkpoint, monkeypatch):
    import tools.infer as infer

    image = _image(tmp_path / "scene.png")
    raw = []
    real_detect = infer.detect

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = real_detect(*args, **kwargs)
        raw.extend(out)
        return out

    monkeypatch.setattr(infer, "detect", spy)
    out = tmp_path / "out"
    assert infer.main([str(image), "--checkpoint", str(ugs_checkpoint), "--out", str(out), "--device", "cpu",
                       "--opt", "eval.draw_score_threshold=0.0", "--opt", "eval.max_dets=50",
                       "--score-threshold", "0.0"]) == 0
    boxes = raw[0]["boxes"]
    outside = ((boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > 144) | (boxes[:, 3] > 96)).sum()
    assert outside > 0                                  # the model's raw boxes do reach past the border
    text = (out / "results.json").read_text()
    records = json.loads(text)
    assert len(records) == 50 and "NaN" not in text
    for r in records:
        x, y, w, h = r["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 144 + 1e-3 and y + h <= 96 + 1e-3, r["bbox"]
        unc = r["uncertainty"]
        assert len(unc["std_xyxy_px"]) == 4 and all(v >= 0 for v in unc["std_xyxy_px"])
        assert math.isfinite(unc["entropy"]) and unc["entropy"] >= 0
    assert json.loads((out / "images.json").read_text())[0]["width"] == 144
    assert (out / "scene_det.png").stat().st_size > 5_000


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_sliced_inference_keeps_per_box_uncertainty(tmp_path, ugs_checkpoint, merge):
    import tools.infer as infer

    image = _image(tmp_path / "scene.png")
    out = tmp_path / "out"
    assert infer.main([str(image), "--checkpoint", str(ugs_checkpoint), "--out", str(out), "--device", "cpu",
                       "--slice", "96", "--overlap", "0.25", "--merge", merge, "--opt", "eval.max_dets=40",
                       "--no-draw"]) == 0
    records = json.loads((out / "results.json").read_text())
    assert 0 < len(records) <= 40
    for r in records:
        assert len(r["uncertainty"]["std_xyxy_px"]) == 4 and all(v >= 0 for v in r["uncertainty"]["std_xyxy_px"])
        assert math.isfinite(r["uncertainty"]["entropy"])


def test_clip_to_image_keeps_other_fields():
    from tools.infer import clip_to_image

    dets = {"boxes": torch.tensor([[-5.0, 2.0, 30.0, 50.0], [10.0, -1.0, 12.0, 3.0]]),
            "scores": torch.tensor([0.9, 0.5]), "entropy": torch.tensor([1.0, 2.0])}
    out = clip_to_image(dets, (40, 20))
    assert out["boxes"].tolist() == [[0.0, 2.0, 20.0, 40.0], [10.0, 0.0, 12.0, 3.0]]
    assert out["entropy"] is dets["entropy"] and dets["boxes"][0, 0] == -5.0   # input untouched


def test_tools_take_opt_like_main():
    from tools.infer import parse_args
    from tools.visualize_uncertainty import build_parser

    argv = ["--opt", "a.b=1", "c.d=2", "--opt", "e.f=3"]
    assert parse_args(["x.png", "--checkpoint", "c", "--out", "o", *argv]).opt == ["a.b=1", "c.d=2", "e.f=3"]
    assert build_parser().parse_args(["--out", "o.png", *argv]).opt == ["a.b=1", "c.d=2", "e.f=3"]


def test_every_entry_point_declares_opt_the_same_way():
    """main.py and every tool: `--opt` takes several KEY=VALUE and may be repeated (argparse's
    nargs="*" with action="extend"); a plain nargs="*" would silently keep only the last --opt."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    declared = 0
    for path in [root / "main.py", *sorted((root / "tools").glob("*.py"))]:
        for call in re.findall(r'add_argument\(\s*"--opt"[^)]*\)', path.read_text()):
            declared += 1
            assert 'nargs="*"' in call and 'action="extend"' in call, f"{path.name}: {call}"
    assert declared >= 8
