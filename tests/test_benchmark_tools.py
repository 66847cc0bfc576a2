"""The parts of tools/benchmark_official.py and tools/benchmark_ops.py that need neither a GPU nor
the official code: the batch, the same-weights agreement check, the ratios with their spread and
the tables."""
from __future__ import annotations

import pytest
import torch

from tools import benchmark_official as official
from tools import benchmark_ops


def test_batch_is_seeded_with_boxes_in_range():
    a, b = official.make_batch(64, 96, 20, 100, seed=3), official.make_batch(64, 96, 20, 100, seed=3)
    assert a["images"].shape == (2, 3, 64, 96) and torch.equal(a["images"], b["images"])
    for t, u in zip(a["targets"], b["targets"]):
        assert 20 <= len(t["labels"]) <= 100 and torch.equal(t["boxes"], u["boxes"])
        assert t["labels"].min() >= 1 and t["labels"].max() <= 90
        cx, cy, w, h = t["boxes"].unbind(-1)
        assert (w >= 0.01).all() and (w <= 0.1).all() and (h <= 0.1).all()
        assert (cx - w / 2 >= 0).all() and (cx + w / 2 <= 1).all() and (cy + h / 2 <= 1).all()


def _outputs(seed: int, queries: int = 30, classes: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(2, queries, classes, generator=gen),
            "pred_boxes": torch.rand(2, queries, 4, generator=gen)}


def _eval(seed: int) -> dict:
    out = _outputs(seed)
    return {"float32": out, "float64": {k: v.double() for k, v in out.items()}, "float32_proposals": _outputs(seed + 1)}


def test_agreement_ignores_the_order_of_proposals_but_not_their_values():
    ref = _eval(0)
    permuted = _eval(0)
    order = torch.randperm(30)
    permuted["float32_proposals"] = {k: v[:, order] for k, v in ref["float32_proposals"].items()}
    result = official.agreement(permuted, ref)
    assert result["agree"] and max(result["float32_proposals_as_set"].values()) == 0.0

    changed = _eval(0)
    changed["float32_proposals"]["pred_boxes"] = changed["float32_proposals"]["pred_boxes"] + 2e-3
    assert not official.agreement(changed, ref)["agree"]
    other = _eval(0)
    other["float64"]["pred_logits"] = other["float64"]["pred_logits"] + 1e-4
    result = official.agreement(other, ref)
    assert not result["agree"] and result["float64_by_index"]["pred_logits"] == pytest.approx(1e-4, rel=1e-3)


def test_lexsorted_breaks_ties_of_the_best_logit_by_the_boxes():
    logits = torch.zeros(1, 3, 2)
    boxes = torch.tensor([[[0.2, 0, 0, 0], [0.9, 0, 0, 0], [0.5, 0, 0, 0]]])
    ordered = official.lexsorted({"pred_logits": logits, "pred_boxes": boxes})
    assert ordered["pred_boxes"][0, :, 0].tolist() == pytest.approx([0.9, 0.5, 0.2])


def test_ratios_per_round_verdict_and_table():
    side = {"fp32": {"step_ms": [400.0, 410.0, 420.0], "peak_mib": 20000.0},
            "best": {"step_ms": [300.0, 290.0, 310.0], "peak_mib": 15000.0}}
    ours = {"fp32": {"step_ms": [300.0, 300.0, 350.0], "peak_mib": 18000.0},
            "best": {"error": "RuntimeError: out of memory"}}
    rows = official.compare(side, ours)
    fp32, best = rows
    assert fp32["speedup"] == pytest.approx([400 / 300, 410 / 300, 420 / 350])
    assert fp32["ours_images_per_s"] == pytest.approx([2000 / 300, 2000 / 300, 2000 / 350])
    assert fp32["memory_ratio"] == pytest.approx(0.9)
    # median x1.333 but the slowest round x1.2: the target x1.3 is not met in every round
    assert official.verdict(fp32) == "speed x1.33 misses >= x1.3; memory x0.900 meets <= x1"
    assert "speedup" not in best and official.verdict(best) == "not measured"
    meta = {"dry_run": False, "device": "GPU", "torch": "2.11", "commit": "abc", "date": "today",
            "command": "python tools/benchmark_official.py", "size": [800, 1333], "boxes": "20+100",
            "steps": 10, "warmup": 5, "repeats": 3}
    agree = {"atol_float32": 1e-3, "atol_float64": 1e-8, "agree": True,
             "float64_by_index": {"pred_logits": 1e-12, "pred_boxes": 1e-13}}
    text = official.markdown(rows, agree, meta)
    assert "DRY RUN" not in text and "same outputs" in text and ": yes (" in text
    assert "| 410.0 (400.0-420.0) | 300.0 (300.0-350.0) |" in text
    assert "| 1.333 (1.200-1.367) |" in text
    assert "RuntimeError: out of memory" in text
    assert official.markdown(rows, {}, dict(meta, dry_run=True)).startswith("**DRY RUN**")


def test_benchmark_ops_spread_and_round_ratios():
    assert benchmark_ops.spread([3.0, 1.0, 2.0], 2) == "2.00 (1.00-3.00)"
    assert benchmark_ops.spread([], 2) == "-"
    assert benchmark_ops.round_ratios([2.0, 3.0, 4.0], [1.0, 1.5, 0.0]) == [2.0, 2.0]
    row = dict(shape="encoder", dtype="float32", impl="original", fwd=[2.0, 2.2, 2.1], both=[8.0, 8.0, 8.0],
               fwd_ratio=[1.5, 1.6, 1.4], both_ratio=[2.0, 2.0, 2.0], peak_mib=600.0, gbps=300.0,
               floor_ratio=9.5, diff=1e-6, note="")
    line = benchmark_ops.table_row(row)
    assert line.startswith("| encoder | float32 | original | 2.100 (2.000-2.200) | 8.000 (8.000-8.000) | "
                           "1.50 (1.40-1.60) | 2.00 (2.00-2.00) | 600 |")
    assert line.count("|") == benchmark_ops.HEADER.splitlines()[0].count("|")


@pytest.mark.parametrize("levels", [[(6, 5), (3, 3)], [(30, 25), (15, 13)]])  # below / above the dense limit
def test_benchmark_ops_forced_method_impls_match_ours_on_cpu(levels):
    """The `ours-sparse` and `ours-dense` rows run the other method of the same op: same values,
    and the dense one's kept sampling matrix is taken by its own backward."""
    from ops import cpu as ops_cpu

    inputs = benchmark_ops.make_inputs("decoder", levels, 2, 2, 4, 3, torch.float64, "cpu", queries=7)
    value, spatial, starts, loc, attn, grad = inputs
    results = []
    for impl in (benchmark_ops.ours("cpu"), benchmark_ops.ours_sparse, benchmark_ops.ours_dense):
        leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        out = impl(leaves[0], spatial, starts, leaves[1], leaves[2])
        results.append([out, *torch.autograd.grad(out, leaves, grad)])
        assert ops_cpu.kept_count() == 0
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():  # the forward-only timing: dense, nothing kept
        out = benchmark_ops.ours_dense(value, spatial, starts, loc, attn)
    assert ops_cpu.kept_count() == 0
    torch.testing.assert_close(out, results[0][0], rtol=0, atol=1e-12)


def test_benchmark_matcher_runs_both_costs_and_rejects_bad_sizes(capsys):
    from tools import benchmark_matcher

    out_sets, targets = benchmark_matcher.make_batch(2, 12, 5, 3, 4, bins=6, device="cpu")
    assert len(out_sets) == 3 and out_sets[0]["pred_box_logits"].shape == (2, 12, 4, 7)
    assert [len(t["boxes"]) for t in targets] == [5, 5]
    assert all(((t["boxes"] > 0) & (t["boxes"] < 1)).all() for t in targets)
    for extra in ([], ["--bins"]):
        assert benchmark_matcher.main(["--images", "1", "2", "--targets", "4", "--queries", "10", "--sets", "3",
                                       "--repeats", "1", "--json", *extra]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 4 and '"cost": "bins"' in rows[-1]
    with pytest.raises(SystemExit):
        benchmark_matcher.main(["--targets", "-1"])


@pytest.mark.parametrize("name, category", [
    ("void ms_deformable_im2col_gpu_kernel<float>(int, float const*, ...)", "deformable attention"),
    ("void msda::detail::forward_kernel<float, float, 4, 1>(float const*, ...)", "deformable attention"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "matrix products"),
    ("sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32", "matrix products"),
    ("aten::addmm", "matrix products"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<float>", "convolutions"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>", "normalisation"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamW>", "optimizer and clipping"),
    ("Memcpy HtoD (Pageable -> Device)", "copies and fills"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float>>", "elementwise"),
    ("sm90_xmma_fprop_implicit_gemm_indexed_tf32f32_tf32f32_f32_nhwckrsc_nchw", "convolutions"),
    ("void at::native::multi_tensor_apply_kernel<at::native::LpNormFunctor<float, 1>>", "optimizer and clipping"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention (SDPA)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::clamp_min_scalar_kernel_impl>", "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MaxOps<float>>>",
     "softmax, reductions, top-k, sort"),
    ("aten::max", "softmax, reductions, top-k, sort"),
    ("some_kernel_nobody_names", "other"),
])
def test_kernel_names_group_into_kinds_of_work(name, category):
    from util.profiling import kernel_category

    assert kernel_category(name) == category


def test_profile_step_groups_cpu_ops_and_the_side_by_side_table():
    from util.profiling import profile_step, side_by_side

    x = torch.randn(64, 64)
    value = torch.randn(1, 4, 16, 16)
    grid = torch.rand(1, 8, 8, 2) * 2 - 1

    def step() -> None:
        (x @ x).relu().sum()
        torch.nn.functional.grid_sample(value, grid, align_corners=False).sum()

    step()
    prof = profile_step(step, torch.device("cpu"), top=3)
    assert prof["wall_ms"] > 0 and prof["device_busy_ms"] == 0 and prof["launches"] >= 4
    assert prof["runtime_calls"] == {}  # no CUDA runtime on a CPU
    assert prof["categories_ms"]["matrix products"] > 0 and prof["categories_ms"]["deformable attention"] > 0
    assert len(prof["top_ms"]) == 3 and all(v["calls"] >= 1 for v in prof["top_ms"].values())
    text = side_by_side({"official": prof, "ours": prof}, "fp32")
    assert text.startswith("### fp32") and "| | official | ours |" in text
    assert "| deformable attention, host self ms |" in text and "Largest items, ours" in text


def test_profile_markdown_names_a_precision_that_was_not_profiled():
    prof = {"wall_ms": 10.0, "device_busy_ms": 8.0, "launches": 100, "runtime_calls": {"cudaStreamSynchronize": 2},
            "categories_ms": {"matrix products": 5.0, "deformable attention": 3.0}, "top_ms": {"k": {"ms": 5.0, "calls": 9}}}
    meta = {"device": "GPU", "commit": "abc", "date": "today"}
    side = {"fp32": {"step_ms": [1.0], "profile": prof}, "best": {"step_ms": [1.0], "profile": {"error": "OOM"}}}
    text = official.profile_markdown(side, side, meta)
    assert "| device busy ms (share of wall) | 8.0 (0.80) | 8.0 (0.80) |" in text
    assert "| cudaStreamSynchronize | 2 | 2 |" in text and "| matrix products, device ms | 5.00 | 5.00 |" in text
    assert "### best: not profiled" in text
