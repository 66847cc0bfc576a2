"""tools/evaluate.py defaults: --max-dets follows --config (else 100, as its help says); the
backend is faster-coco-eval when installed (same numbers as pycocotools); images without
detections are counted."""
from __future__ import annotations

import json

import pytest

from datasets.coco_eval import evaluate_detections, resolve_backend
from tools.evaluate import main, synthetic_case


@pytest.fixture
def small_case(tmp_path):
    gt, results = synthetic_case(3, 20, 150, num_categories=2, seed=1)
    results = [r for r in results if r["image_id"] != 3]          # image 3: no detections
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    return tmp_path / "gt.json", tmp_path / "res.json", gt, results


def test_max_dets_default_is_100_or_the_configs(small_case, capsys):
    gt_path, res_path, gt, results = small_case
    assert main([str(gt_path), str(res_path), "--json"]) == 0
    out = capsys.readouterr().out
    assert "maxDets=100 (default)" in out
    assert json.loads(out.strip().splitlines()[-1])["max_dets"] == 100
    assert main([str(gt_path), str(res_path), "--json", "--config", "dino_5scale_r50_visdrone"]) == 0
    out = capsys.readouterr().out
    assert "maxDets=1500 from dino_5scale_r50_visdrone" in out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["max_dets"] == 1500 and last["num_truncated"] == 0
    # --opt overrides the config (several after one --opt, or repeated); --max-dets wins over both
    assert main([str(gt_path), str(res_path), "--json", "--config", "dino_5scale_r50_visdrone",
                 "--opt", "eval.max_dets=120", "eval.num_select=300", "--opt", "eval.interval=2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["max_dets"] == 120
    assert main([str(gt_path), str(res_path), "--json", "--config", "dino_5scale_r50_visdrone",
                 "--max-dets", "10"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["max_dets"] == 10


def test_help_states_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "else 100" in " ".join(capsys.readouterr().out.split())


def test_backend_auto_prefers_faster_and_both_agree(small_case, capsys):
    pytest.importorskip("faster_coco_eval")
    from configs import Config, load_config

    assert Config().eval.backend == "auto" and load_config("dino_5scale_r50_visdrone").eval.backend == "auto"
    assert resolve_backend("auto") == "faster"
    gt_path, res_path, gt, results = small_case
    assert main([str(gt_path), str(res_path), "--max-dets", "150"]) == 0
    assert "backend=faster" in capsys.readouterr().out
    assert main([str(gt_path), str(res_path), "--max-dets", "150", "--backend", "pycocotools"]) == 0
    assert "backend=pycocotools" in capsys.readouterr().out
    ref = evaluate_detections(gt, results, 150, backend="pycocotools")
    fast = evaluate_detections(gt, results, 150, backend="auto")
    assert fast["backend"] == "faster" and ref["backend"] == "pycocotools"
    for key in ("AP", "AP50", "AP75", "APs", "APm", "AR", "AR@1", "AR@10", "AR@100"):
        assert fast[key] == pytest.approx(ref[key], abs=1e-12), key


def test_images_without_detections_are_stated(small_case, capsys):
    gt_path, res_path, gt, results = small_case
    metrics = evaluate_detections(gt, results, 150)
    assert metrics["num_images_without_detections"] == 1 and metrics["num_images"] == 3
    assert main([str(gt_path), str(res_path)]) == 0
    out = capsys.readouterr().out
    assert "on 3 images, 1 of them without any" in out
    assert "images without any detection: 1" in out
