"""COCO evaluation at N detections: the summary indexing, both backends, the input edge cases."""
from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.coco_eval import (CocoEvalError, evaluate_detections, merge_predictions,
                                predictions_to_coco_results, run_cocoeval, summarize)
from tools.evaluate import synthetic_case

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR", "ARs", "ARm", "ARl", "AR@1", "AR@10", "AR@100")


def _same(a: float, b: float, tol: float = 1e-12) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


@pytest.fixture(scope="module")
def dense_case() -> tuple[dict, list[dict]]:
    # One category, 150 small objects per image, 300 detections per image: top-100 cannot
    # reach the recall that top-1500 reaches, so the two caps must give different AP.
    return synthetic_case(num_images=2, gts_per_image=150, dets_per_image=300, num_categories=1, seed=3)


def test_dense_case_ap_at_1500_differs_from_100_and_backends_agree(dense_case):
    gt, results = dense_case
    at_1500 = {b: evaluate_detections(gt, results, 1500, backend=b) for b in ("pycocotools", "faster")}
    at_100 = {b: evaluate_detections(gt, results, 100, backend=b) for b in ("pycocotools", "faster")}
    ref = at_1500["pycocotools"]
    assert ref["num_detections"] == 600 and ref["num_truncated"] == 0
    assert at_100["pycocotools"]["num_truncated"] == 400
    # The larger cap reaches more ground truth: AP and AR both strictly higher.
    assert ref["AP"] > at_100["pycocotools"]["AP"] + 0.01
    assert ref["AR"] > at_100["pycocotools"]["AR"] + 0.1
    # AR@100 is the same quantity whichever cap the summary uses.
    assert _same(ref["AR@100"], at_100["pycocotools"]["AR"])
    for key in KEYS:  # faster-coco-eval gives the same numbers (measured: exactly equal)
        assert _same(at_1500["faster"][key], ref[key], 1e-9), key
        assert _same(at_100["faster"][key], at_100["pycocotools"][key], 1e-9), key


def test_summary_at_100_equals_pycocotools_summarize():
    # At most 100 detections per image, three categories, objects of all three COCO sizes:
    # the standard COCOeval (maxDets 1, 10, 100) summarize() must give our numbers exactly.
    gt, results = synthetic_case(num_images=3, gts_per_image=60, dets_per_image=100, num_categories=3,
                                 seed=5, image_hw=(600, 800), size_range=(6.0, 150.0))
    ours = evaluate_detections(gt, results, 100)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    order = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs", "ARm", "ARl")
    for key, stat in zip(order, ev.stats):
        expected = float("nan") if stat == -1 else float(stat)
        assert _same(ours[key], expected), (key, ours[key], stat)
    assert not math.isnan(ours["APl"])  # the case has large objects: all rows are exercised
    assert _same(ours["AR"], ours["AR@100"])


def test_pycocotools_summarize_is_wrong_at_1500(dense_case):
    # Documents why we summarise ourselves: with maxDets (1, 10, 1500) summarize() reports the
    # AP row at 100 detections, which is not evaluated at all (-1), while AP50 is at 1500.
    gt, results = dense_case
    ev = run_cocoeval(gt, [dict(r) for r in results], 1500)
    ours = summarize(ev, 1500)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.params.maxDets = [1, 10, 1500]
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == -1
    assert _same(ours["AP50"], float(ev.stats[1]))


def test_empty_detections_give_zero_with_warning(dense_case):
    gt, _ = dense_case
    for backend in ("pycocotools", "faster"):
        with pytest.warns(UserWarning, match="no detections"):
            metrics = evaluate_detections(gt, [], 1500, backend=backend)
        assert metrics["AP"] == 0.0 and metrics["AR"] == 0.0 and metrics["num_detections"] == 0
        assert math.isnan(metrics["APl"])  # no large ground truth: undefined, not 0


def _crowd_gt(with_crowd: bool) -> dict:
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0}]
    if with_crowd:
        anns.append({"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 100, 80, 80], "area": 6400,
                     "iscrowd": 1})
    return {"images": [{"id": 1, "height": 300, "width": 300}], "categories": [{"id": 1, "name": "person"}],
            "annotations": anns}


def test_crowd_region_ignores_matched_detections():
    results = [  # two high-scoring detections inside the crowd region, then the true object
        {"image_id": 1, "category_id": 1, "bbox": [105, 105, 30, 30], "score": 0.95},
        {"image_id": 1, "category_id": 1, "bbox": [140, 140, 30, 30], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.8},
    ]
    for backend in ("pycocotools", "faster"):
        with_crowd = evaluate_detections(_crowd_gt(True), results, 100, backend=backend)
        without = evaluate_detections(_crowd_gt(False), results, 100, backend=backend)
        assert with_crowd["AP"] == pytest.approx(1.0, abs=1e-12)  # crowd detections: neither TP nor FP
        assert without["AP"] < 0.5  # the same detections are false positives without the crowd region


def test_per_image_cap_and_per_class_table(dense_case):
    gt, results = dense_case
    metrics = evaluate_detections(gt, results, 50, per_class=True)
    assert metrics["num_detections"] == 100 and metrics["num_truncated"] == 500
    (row,) = metrics["per_class"]
    assert row["category_id"] == 1 and _same(row["AP"], metrics["AP"])  # one class: class AP == AP


def test_bad_results_name_record():
    gt = _crowd_gt(False)
    with pytest.raises(CocoEvalError, match=r"record #1 has image_id 7"):
        evaluate_detections(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5},
                                 {"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(CocoEvalError, match=r"record #0 has category_id 3"):
        evaluate_detections(gt, [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(CocoEvalError, match=r"record #0 has bbox"):
        evaluate_detections(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1], "score": 0.5}])


def test_predictions_to_coco_results_with_uncertainty():
    preds = [{"scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([0, 2]),
              "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0]]),
              "uncertainty": {"std_xyxy_px": torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]]),
                              "entropy": torch.tensor([1.5, 2.5])}},
             {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
              "boxes": torch.zeros(0, 4)}]
    recs = predictions_to_coco_results(preds, [42, 43], {0: 1, 1: 2, 2: 3})
    assert len(recs) == 2
    assert recs[0]["image_id"] == 42 and recs[0]["category_id"] == 1
    assert recs[0]["bbox"] == [10.0, 20.0, 20.0, 40.0]
    assert recs[0]["uncertainty"] == {"std_xyxy_px": [1.0, 2.0, 3.0, 4.0], "entropy": 1.5}
    assert recs[1]["category_id"] == 3 and recs[1]["score"] == pytest.approx(0.2)
    json.dumps(recs)  # plain Python types only
    # the UGS post-processor's flat keys work the same way
    flat = {k: v for k, v in preds[0].items() if k != "uncertainty"} | preds[0]["uncertainty"]
    assert predictions_to_coco_results([flat], [42], {0: 1, 1: 2, 2: 3}) == recs
    with pytest.raises(ValueError, match="label 2 has no entry"):
        predictions_to_coco_results(preds[:1], [42], {0: 1})


def test_merge_predictions_dedupes_padding_repeats():
    def pred(v: float) -> dict:
        return {"scores": torch.tensor([v]), "labels": torch.tensor([1]),
                "boxes": torch.tensor([[0.0, 0, 1, 1]])}
    # A 5-image set on 2 processes: the sampler pads process 1 with image 0 again.
    rank0 = {0: pred(0.5), 2: pred(0.2), 4: pred(0.4)}
    rank1 = {1: pred(0.1), 3: pred(0.3), 0: pred(0.5)}
    merged = merge_predictions([rank0, rank1])
    assert list(merged) == [0, 1, 2, 3, 4]
    assert merged[0]["scores"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="image id 0"):
        merge_predictions([rank0, {0: pred(0.9)}])
    kept = merge_predictions([rank0, {0: pred(0.9)}], on_conflict="first")
    assert kept[0]["scores"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="image id 2"):  # different number of detections
        merge_predictions([rank0, {2: {**pred(0.2), "scores": torch.tensor([0.2, 0.1])}}])


@pytest.mark.slow  # a subprocess: the real command line (imports take seconds on a loaded machine)
def test_evaluate_tool_json_last_line(tmp_path, dense_case):
    gt, results = dense_case
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    out = subprocess.run([sys.executable, str(ROOT / "tools/evaluate.py"), str(tmp_path / "gt.json"),
                          str(tmp_path / "res.json"), "--max-dets", "1500", "--json", "--backend", "faster"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.strip().splitlines()[-1])
    expected = evaluate_detections(gt, results, 1500)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR"):
        value = float("nan") if last[key] is None else last[key]
        assert _same(value, expected[key], 1e-9), key
    assert "maxDets=1500" in out.stdout



def test_evaluate_tool_errors_name_file_and_record(tmp_path, capsys, dense_case):
    from tools.evaluate import main
    gt, results = dense_case
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "bad.json").write_text(json.dumps([dict(results[0], image_id=999)]))
    assert main([str(tmp_path / "gt.json"), str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "record #0" in err and "999" in err
    assert main([str(tmp_path / "missing.json"), str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and "does not exist" in err
    (tmp_path / "broken.json").write_text("[{")
    assert main([str(tmp_path / "gt.json"), str(tmp_path / "broken.json")]) == 2
    assert "broken.json is not valid JSON" in capsys.readouterr().err


def test_evaluate_tool_benchmark_mode_runs(capsys):
    from tools.evaluate import main
    assert main(["--benchmark-synthetic", "2", "--max-dets", "150", "--benchmark-gts", "20"]) == 0
    out = capsys.readouterr().out
    assert "pycocotools" in out and "faster" in out and "between backends" in out


def test_ground_truth_without_optional_keys(tmp_path):
    gt = _crowd_gt(False)
    assert "info" not in gt and "licenses" not in gt
    for key in ("iscrowd", "area"):  # optional too: defaults 0 and the box area
        del gt["annotations"][0][key]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    res = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.5}]
    assert evaluate_detections(path, res, 100)["AP"] == pytest.approx(1.0)
    assert np.isnan(evaluate_detections(path, res, 100)["APl"])
