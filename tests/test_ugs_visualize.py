"""tools/visualize_uncertainty.py: the drawing function and the CLI on synthetic detections."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    path = ROOT / "tools" / "visualize_uncertainty.py"
    spec = importlib.util.spec_from_file_location("visualize_uncertainty", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size[1], im.size[0]  # (h, w)


def test_draw_writes_png_of_expected_size_and_colours_by_entropy(tmp_path):
    tool = _tool()
    h, w = 120, 160
    image = np.full((h, w, 3), 128, dtype=np.uint8)
    dets = [{"image_id": 1, "category_id": 3, "bbox": [20.0, 30.0, 40.0, 20.0], "score": 0.9,
             "uncertainty": {"std_xyxy_px": [2.0, 1.0, 2.0, 1.0], "entropy": 0.1}},
            {"image_id": 1, "category_id": 3, "bbox": [100.0, 60.0, 12.0, 10.0], "score": 0.5,
             "uncertainty": {"std_xyxy_px": [4.0, 4.0, 4.0, 4.0], "entropy": 2.0}}]
    out = tool.draw_uncertainty(image, dets, tmp_path / "sub" / "u.png", scale=2.0, entropy_max=math.log(17))
    assert out.is_file() and out.stat().st_size > 1000
    assert _png_size(out) == (2 * h, 2 * w + tool.COLORBAR_PX)
    assert not list(out.parent.glob("*.tmp.png"))  # atomic write leaves no temporary file
    from PIL import Image

    px = np.asarray(Image.open(out).convert("RGB")).astype(int)
    # drawn pixels differ from the flat gray background, undrawn ones do not
    assert np.abs(px[2 * 30, 2 * 20] - 128).sum() > 30  # top-left corner of the first box
    assert np.abs(px[2 * 100, 2 * 10] - 128).sum() < 6  # empty area
    # the two boxes get different colours (low vs high entropy)
    c_low, c_high = px[2 * 30, 2 * 40], px[2 * 60, 2 * 106]
    assert np.abs(c_low - c_high).sum() > 60


def test_draw_rejects_missing_uncertainty(tmp_path):
    tool = _tool()
    with pytest.raises(ValueError, match="uncertainty"):
        tool.draw_uncertainty(np.zeros((10, 10, 3), np.uint8),
                              [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}],
                              tmp_path / "x.png")
    with pytest.raises(ValueError, match="negative std"):
        tool.check_detections([{"bbox": [0, 0, 1, 1], "score": 1.0,
                                "uncertainty": {"std_xyxy_px": [1, -1, 1, 1], "entropy": 0.3}}])


def test_cli_on_results_json(tmp_path, capsys):
    tool = _tool()
    dets = tool.synthetic_detections(90, 120, count=12, seed=1)
    for i, d in enumerate(dets):
        d["image_id"] = 7 if i % 2 else 8
        d["score"] = 0.9 if i < 10 else 0.1
    path = tmp_path / "results.json"
    path.write_text(json.dumps(dets))
    out = tmp_path / "vis.png"
    assert tool.main(["--detections", str(path), "--image-id", "7", "--image-size", "90", "120",
                      "--scale", "1", "--out", str(out)]) == 0
    assert _png_size(out) == (90, 120 + tool.COLORBAR_PX)
    msg = capsys.readouterr().out
    assert "5 detections drawn, 1 below --min-score" in msg
    with pytest.raises(SystemExit, match="--image-id"):
        tool.main(["--detections", str(path), "--out", str(out)])


@pytest.mark.slow
def test_cli_runs_a_ugs_checkpoint_on_an_image(tmp_path, capsys):
    import torch
    from PIL import Image

    from configs import load_config
    from models.build import build_model

    opts = ["ugs.ablation=full", "model.num_queries=40", "eval.num_select=30", "data.eval_size=48",
            "data.eval_max_size=64"]
    torch.manual_seed(0)
    model, _, _ = build_model(load_config("dino_tiny", opts))
    with torch.no_grad():  # non-uniform bins so the drawing has something to show
        model.bbox_embed[0].layers[-1].weight.normal_(0, 0.3)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    tool = _tool()
    argv = ["--config", "dino_tiny", "--checkpoint", str(tmp_path / "ckpt.pth"), "--image", str(tmp_path / "im.png"),
            "--min-score", "0", "--scale", "2", "--out", str(tmp_path / "vis.png")]
    for o in opts:
        argv += ["--opt", o]
    assert tool.main(argv) == 0
    assert _png_size(tmp_path / "vis.png") == (120, 160 + tool.COLORBAR_PX)
    msg = capsys.readouterr().out
    assert "30 detections drawn" in msg and "0 re-initialised" in msg
