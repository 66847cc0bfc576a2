"""Smoke and invariant tests of the UGS diagnostics tools (tools/target_stats.py, tools/gradvar.py,
the DINO vs UGS comparison of tools/benchmark_model.py) on tiny inputs, CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

from configs import load_config
from models.build import build_model
from tools import gradvar, target_stats
from util.box_ops import inverse_sigmoid

TINY = ["model.num_queries=40", "model.dn_number=4", "eval.num_select=100"]
# Tiny synthetic data: few 64x64 images, no resize, in-process loading.
TINY_DATA = ["data.synthetic_train_images=4", "data.synthetic_image_size=[64,64]", "data.synthetic_min_objects=2",
             "data.synthetic_max_objects=6", "data.train_policy=none", "data.num_workers=0", "optim.batch_size=2"]


def _batch():
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 32, 48, dtype=torch.bool)
    masks[1, :, 40:] = True
    targets = [{"labels": torch.tensor([1, 2]), "size": torch.tensor([32, 48]),
                "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.5, 0.9, 0.9]])},
               {"labels": torch.tensor([0]), "size": torch.tensor([32, 40]),
                "boxes": torch.tensor([[0.5, 0.5, 0.05, 0.06]])}]
    return images, masks, targets


def test_size_bucket_uses_coco_thresholds_in_input_pixels():
    hw = torch.tensor([[100.0, 200.0]] * 4, dtype=torch.float64)
    # areas in pixels: 31^2, 32^2, 95.9^2, 96^2 (w normalised by 200, h by 100)
    sides = torch.tensor([31.0, 32.0, 95.9, 96.0], dtype=torch.float64)
    boxes = torch.stack([torch.full_like(sides, 0.5), torch.full_like(sides, 0.5), sides / 200, sides / 100], 1)
    assert target_stats.size_bucket(boxes, hw).tolist() == [0, 1, 1, 2]


def test_summarize_percentiles_and_fraction_outside_range():
    values = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    s = target_stats.summarize(values, r=4.0)
    assert s["n"] == 2001
    assert s["p50"] == pytest.approx(0.0, abs=1e-12)
    assert s["p1"] == pytest.approx(-9.8, abs=1e-9) and s["p99"] == pytest.approx(9.8, abs=1e-9)
    assert s["max_abs"] == 10.0
    assert s["frac_outside_R"] == pytest.approx(1200 / 2001, abs=1e-12)  # |v| > 4: 600 on each side
    assert target_stats.summarize(values[:0], 4.0) == {"n": 0}


def test_suggest_range_picks_smallest_covering_candidate():
    records = [{"set": "dec_all", "coords": "all", "size": "all", "n": 10, "abs_p99": 3.2, "abs_p99.9": 5.5}]
    assert target_stats.suggest_range(records, "dec_all", 0.01) == 3.5
    assert target_stats.suggest_range(records, "dec_all", 0.001) == 6
    assert target_stats.suggest_range(records, "interm", 0.01) is None


@pytest.mark.slow
def test_targets_from_dino_references_equal_ugs_ref_boxes_logit_at_init():
    """The two ways the tool reads reference boxes (DINO: the decoder's returned references;
    UGS-DINO: `ref_boxes_logit`) give the same targets when the models give the same boxes (same
    seed, zero-initialised last layers), and every target is matched once per set."""
    collected = {}
    for row in ("l1", "full"):
        torch.manual_seed(0)
        cfg = load_config("dino_tiny", TINY + [f"ugs.ablation={row}"])
        model, criterion, _ = build_model(cfg)
        torch.manual_seed(1)  # the same denoising noise
        collected[row] = target_stats.collect_targets(model, criterion, [_batch()], torch.device("cpu"))
    assert set(collected["l1"]) == set(collected["full"]) == {"dec0", "dec1", "interm", "dn"}
    for name in collected["l1"]:
        a, b = collected["l1"][name], collected["full"][name]
        torch.testing.assert_close(a["y"], b["y"], rtol=0, atol=1e-5)
        assert torch.equal(a["bucket"], b["bucket"])
    for name in ("dec0", "dec1", "interm"):
        assert collected["l1"][name]["y"].shape == (3, 4)  # 3 targets, each matched once
        assert collected["l1"][name]["bucket"].tolist().count(2) == 0  # the 0.9 x 0.9 box is 43x29 px
    # denoising: 3 targets x groups x 2 decoder layers; y = logit(t) - logit(noised t)
    dn = collected["l1"]["dn"]["y"]
    assert dn.shape[0] % 6 == 0 and dn.shape[0] > 0 and torch.isfinite(dn).all()
    records = target_stats.build_records(collected["l1"], 4.0, 3.0)
    dec_all = [r for r in records if r["set"] == "dec_all" and r["coords"] == "all" and r["size"] == "all"][0]
    assert dec_all["n"] == 2 * 3 * 4 and dec_all["R"] == 4.0
    interm = [r for r in records if r["set"] == "interm" and r["coords"] == "all" and r["size"] == "all"][0]
    assert interm["R"] == 3.0
    assert "| dec_all | all | all | 24 |" in target_stats.format_table(records)


def test_series_stats_and_ratios():
    s = gradvar.series_stats([1.0, 2.0, 3.0, float("nan")])
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0) and s["variance"] == pytest.approx(1.0)
    assert s["cv"] == pytest.approx(0.5)
    assert math.isnan(gradvar.series_stats([1.0])["variance"])


@pytest.mark.slow
def test_benchmark_ugs_comparison_cpu_one_step():
    from tools import benchmark_model

    res = benchmark_model.ugs_comparison("dino_tiny", TINY, torch.device("cpu"), 1, 64, 64, 3, iters=1, warmup=0)
    for key in ("dino", "ugs_ur_off", "ugs_ur_on"):
        assert res[key]["step_ms"] > 0 and len(res[key]["step_ms_all"]) == 1
    assert res["ugs_ur_on_time_ratio"] > 0 and "ugs_ur_on_mem_ratio" not in res  # no CPU memory numbers
    table = benchmark_model.ugs_table(res, "cpu")
    assert table.count("\n| ") == 4 and "UGS, UR on (full)" in table  # header + 3 variants
    assert f"UR on vs DINO (CPU, not the target's device): time x{res['ugs_ur_on_time_ratio']:.3f}" in table
    fake = {"setup": {"device": "cuda"}, "ugs_ur_on_time_ratio": 1.095, "ugs_ur_on_min_time_ratio": 1.12,
            "ugs_ur_on_mem_ratio": 1.06}
    assert benchmark_model.target_verdict(fake) == ("UR on vs DINO (GPU): time x1.095 median / x1.120 fastest "
                                                    "(above x1.10); peak memory x1.060 (within x1.08)")
    assert res["ugs_ur_on_cpu_time_ratio"] > 0 and res["dino"]["step_cpu_ms"] > 0
    # under bfloat16 autocast (criterion inside autocast, as in util/engine.py): every variant runs
    res = benchmark_model.ugs_comparison("dino_tiny", TINY, torch.device("cpu"), 1, 64, 64, 3, iters=1, warmup=0,
                                         bf16=True)
    assert res["setup"]["bf16_autocast"] and all(res[k]["step_ms"] > 0 for k in ("dino", "ugs_ur_on"))


@pytest.mark.slow
def test_benchmark_profile_variants_cpu():
    from tools import benchmark_model

    res, text = benchmark_model.profile_variants("dino_tiny", TINY, torch.device("cpu"), 1, 64, 64, 3, warmup=0,
                                                 top=5)
    assert set(res) == {"dino", "ugs_ur_off", "ugs_ur_on"}
    assert all(r["wall_ms"] > 0 and r["ops"] > 10 and r["device_busy_ms"] == 0 for r in res.values())
    assert "UGS, UR on (full)" in text and "aten::" in text
    # per-op differences between consecutive variants; the UR pass shows up under its profiler range
    assert "### UGS, UR on (full) minus UGS, UR off (ce_in_um)" in text
    assert not any(k.startswith("ugs_ur/") for k in res["ugs_ur_off"]["ranges_ms"])
    ranges = res["ugs_ur_on"]["ranges_ms"]
    assert {"ugs_ur/um_gradient", "ugs_ur/second_decoder_pass"} <= set(ranges) and min(ranges.values()) > 0
    assert "ugs_ur/second_decoder_pass" in text and not any(k.startswith("ugs_ur/") for k in res["ugs_ur_on"]["op_ms"])
    assert all(r["runtime_calls"] == {} for r in res.values())  # no CUDA runtime on a CPU


def test_benchmark_runtime_calls_keep_only_waits_and_launches_in_a_fixed_order():
    from types import SimpleNamespace

    from util import profiling

    events = [SimpleNamespace(key=k, count=c) for k, c in
              [("aten::mm", 50), ("cudaStreamSynchronize", 3), ("cudaLaunchKernel", 4000), ("cudaMemcpyAsync", 2)]]
    assert list(profiling.runtime_calls(events).items()) == [
        ("cudaLaunchKernel", 4000), ("cudaMemcpyAsync", 2), ("cudaStreamSynchronize", 3)]


def test_per_object_loss_weights_match_the_criterion():
    """The per-object localisation loss summed and divided by num_boxes equals the criterion's
    weighted box-regression term (baseline: L1; UGS: CE) for the final layer."""
    from models.criterion import MatchedPairs

    src = torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)
    tgt = torch.tensor([[0.32, 0.29, 0.12, 0.08], [0.45, 0.55, 0.25, 0.15]], dtype=torch.float64)
    ref = inverse_sigmoid(src)
    logits = torch.randn(1, 2, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outputs = {"pred_boxes": src[None], "pred_box_logits": logits, "ref_boxes_logit": ref[None]}
    idx = torch.arange(2)
    matched = MatchedPairs(outputs=outputs, indices=[(idx, idx)], batch_idx=torch.zeros(2, dtype=torch.long),
                           query_idx=idx, src_boxes_cxcywh=src, target_boxes_cxcywh=tgt, num_boxes=2.0)
    l1 = gradvar.per_object_loc_loss(matched, {"loss_bbox": 5.0}, None)
    torch.testing.assert_close(l1, 5.0 * (src - tgt).abs().sum(-1))
    import ugs

    grid = ugs.make_grid(2.0, 1.0, 4, dtype=torch.float64)
    ce = gradvar.per_object_loc_loss(matched, {"loss_bbox": 0.0, "loss_box_ce": 1.0}, grid)
    torch.testing.assert_close(ce, ugs.ce_loss(logits[0], inverse_sigmoid(tgt) - ref, grid).mean(-1))


def test_detrended_oscillation_ignores_a_steady_trend():
    trend = [0.01 * 1.05 ** i for i in range(40)]  # steady growth: large CV, no oscillation
    wiggly = [v * (1.3 if i % 2 else 0.7) for i, v in enumerate(trend)]
    smooth, noisy = gradvar.series_stats(trend), gradvar.series_stats(wiggly)
    assert smooth["cv"] > 0.5 and smooth["detrended_osc"] < 0.02
    assert noisy["detrended_osc"] > 10 * smooth["detrended_osc"]


def test_count_ops_counts_every_phase_and_the_ur_pass():
    """tools/count_ops.py: forward, criterion and backward are all counted (the backward through
    autograd's engine too), views are told apart, UR on dispatches more than UR off, which
    dispatches more than DINO."""
    from tools import count_ops

    counts = {key: count_ops.count_step("dino_tiny", TINY, override, (32, 48), boxes=3, steps=1)
              for key, _label, override in count_ops.UGS_VARIANTS[:3]}
    for c in counts.values():
        for phase in ("forward", "criterion", "backward"):
            assert c[phase]["kernels"] > 50 and c[phase]["views"] > 0
        assert c["step"]["total"] == sum(c[p]["total"] for p in ("forward", "criterion", "backward"))
        assert c["step"]["syncs"] > 0 and ("addmm" in c["top_ops"] or "mm" in c["top_ops"])
    assert counts["dino"]["step"]["kernels"] < counts["ugs_ur_off"]["step"]["kernels"] \
        < counts["ugs_ur_on"]["step"]["kernels"]
    # the UR pass is a decoder forward in the criterion and its backward
    assert counts["ugs_ur_on"]["criterion"]["kernels"] > counts["ugs_ur_off"]["criterion"]["kernels"] + 50
    table = count_ops.table(counts, {k: label for k, label, _o in count_ops.UGS_VARIANTS})
    assert table.count("\n| ") == 4 and "UGS, UR on (full)" in table


def test_benchmark_gpu_comparison_loop_survives_a_failing_setting(monkeypatch, capsys):
    """The GPU branch of benchmark_model.main, with the comparison itself faked (no GPU here): every
    setting asked for runs in order, one that raises is recorded and the rest still run, TF32 is on
    only inside its own setting and restored afterwards."""
    from tools import benchmark_model

    calls = []

    def fake_comparison(config, overrides, device, *args, bf16=False, variants=(), **kwargs):
        tf32 = torch.backends.cuda.matmul.allow_tf32
        calls.append((tuple(overrides), bf16, len(variants), tf32))
        if "model.compile_decoder_layers=true" in overrides:
            raise RuntimeError("compiler exploded")
        keys = [k for k, _l, _o in variants]
        return {"setup": {"config": config, "overrides": overrides, "batch": 2, "h": 8, "w": 8, "boxes_per_image": 1,
                          "iters": 1, "warmup": 0, "device": "cuda", "msda_backend": "x"},
                **{k: {"step_ms": 1.0, "step_ms_min": 1.0, "peak_mem_gib": 1.0} for k in keys},
                **{f"{k}_{r}_ratio": 1.0 for k in keys[1:] for r in ("time", "min_time", "mem")}}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(benchmark_model, "ugs_comparison", fake_comparison)
    before = torch.backends.cuda.matmul.allow_tf32
    rc = benchmark_model.main(["--skip-dino", "--gpu-only", "--compile-decoder", "--ugs-bf16", "--tf32"])
    out = capsys.readouterr().out
    assert rc == 0 and torch.backends.cuda.matmul.allow_tf32 == before
    # fp32, bf16, TF32, then the compiled one (slowest to start) last
    assert [(c[1], c[2], c[3]) for c in calls] == [(False, 3, before), (True, 3, before), (False, 3, True),
                                                  (False, 3, before)]
    assert "model.compile_decoder_layers=true" in calls[-1][0]
    assert "compiler exploded" in out and "TF32" in out and "bf16 autocast" in out
    results = json.loads(out.strip().splitlines()[-1])
    assert results["ugs_cuda_compiled"] == {"error": "RuntimeError: compiler exploded"}
    assert {"ugs_cuda", "ugs_cuda_bf16", "ugs_cuda_tf32"} <= set(results)
