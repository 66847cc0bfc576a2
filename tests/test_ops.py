"""ops.ms_deform_attn on CPU: the reference's gradients, the fused CPU path against the reference,
the dtype policy, every bad-input error, backend selection and the registered operator under
torch.compile / torch.export. (CUDA kernels are compared with the reference in tests/test_ops_cuda.py.)
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import ops
from ops import library, validate
from ops import cpu as ops_cpu
from ops.cpu import chosen_method, ms_deform_attn_cpu_backward
from ops.reference import ms_deform_attn_reference

F64_TOL = 1e-12  # float64 CPU path vs float64 reference: both are exact up to rounding


def _starts(shapes: torch.Tensor) -> torch.Tensor:
    sizes = shapes[:, 0] * shapes[:, 1]
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def make_inputs(shapes, n=2, lq=5, m=3, d=4, p=2, dtype=torch.float64, loc_dtype=None,
                low=0.0, high=1.0, seed=0):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    s = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    loc_dtype = loc_dtype or dtype
    num_levels = len(shapes)
    value = torch.randn(n, s, m, d, generator=gen, dtype=torch.float64).to(dtype)
    loc = (low + (high - low) * torch.rand(n, lq, m, num_levels, p, 2, generator=gen, dtype=torch.float64))
    weights = torch.rand(n, lq, m, num_levels, p, generator=gen, dtype=torch.float64)
    return value, spatial_shapes, _starts(spatial_shapes), loc.to(loc_dtype), weights.to(loc_dtype)


def output_and_grads(fn, value, shapes, starts, loc, weights, seed=1):
    leaves = [t.detach().requires_grad_(True) for t in (value, loc, weights)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out, grads


@pytest.fixture(autouse=True)
def _restore_backend(monkeypatch):
    yield
    monkeypatch.undo()
    ops.set_backend(None)
    torch._dynamo.reset()  # compiled test modules must not linger into other tests


def test_reference_gradcheck_float64():
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (1, 1), (2, 3)], n=2, lq=3, m=2, d=3, p=2,
                                                      low=-0.2, high=1.2)
    inputs = [t.requires_grad_(True) for t in (value, loc, weights)]
    assert torch.autograd.gradcheck(
        lambda v, lc, w: ms_deform_attn_reference(v, shapes, starts, lc, w), inputs, eps=1e-6, atol=1e-8)


def _border_inputs():
    """Locations exactly on map borders, pixel edges and pixel centres (all exact in binary)."""
    value, shapes, starts, _, weights = make_inputs([(4, 8), (2, 2), (1, 1)], n=1, lq=6, m=2, p=3)
    ticks = torch.tensor([0.0, 1.0, 0.5, 0.125, 0.0625, 0.9375, 0.25, 0.75, 1.0, 0.0, 0.375, 0.625],
                         dtype=torch.float64)
    loc = ticks[torch.randperm(ticks.numel(), generator=torch.Generator().manual_seed(3))]
    loc = loc.repeat(6 * 2 * 3 * 3 * 2 // ticks.numel() + 1)[: 6 * 2 * 3 * 3 * 2].view(1, 6, 2, 3, 3, 2)
    return value, shapes, starts, loc, weights


CASES = {
    "outside_unit_square": lambda: make_inputs([(5, 6), (3, 3)], low=-0.4, high=1.4),
    "exact_borders_and_centres": _border_inputs,
    "one_by_one_levels": lambda: make_inputs([(1, 1), (3, 2), (1, 1)], low=-0.2, high=1.2),
    "non_square": lambda: make_inputs([(3, 7), (6, 2)], low=-0.1, high=1.1),
    "one_point_one_query": lambda: make_inputs([(4, 5), (2, 3)], n=1, lq=1, m=1, p=1),
    "many_points": lambda: make_inputs([(4, 4), (2, 2)], p=7, low=-0.1, high=1.1),
    "batch_and_heads": lambda: make_inputs([(6, 5), (3, 3), (2, 2), (1, 1)], n=3, lq=9, m=4, d=8, p=4),
}


@pytest.fixture(params=["dense", "sparse"])
def backward_method(request, monkeypatch):
    """Runs a test with the CPU backward's "auto" choosing each method (dense for these small maps
    unless the size limit is set to 0)."""
    if request.param == "sparse":
        monkeypatch.setattr(ops_cpu, "DENSE_MAX_ELEMENTS", 0)
    return request.param


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_matches_reference_float64(case, backward_method):
    inputs = CASES[case]()
    assert chosen_method(inputs[0], inputs[3].shape[1]) == backward_method
    out_ref, grads_ref = output_and_grads(ms_deform_attn_reference, *inputs)
    out, grads = output_and_grads(ops.ms_deform_attn, *inputs)
    assert ops.backend() == "cpu-embedding_bag"
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, out_ref, rtol=0, atol=F64_TOL)
    for name, g, g_ref in zip(("value", "sampling_locations", "attention_weights"), grads, grads_ref):
        assert g.dtype == g_ref.dtype == torch.float64
        torch.testing.assert_close(g, g_ref, rtol=0, atol=F64_TOL,
                                   msg=lambda m, name=name: f"grad {name}: {m}")
    assert grads[1].abs().max() > 0  # the location gradient is exercised, not trivially zero


@pytest.mark.parametrize("low,high", [(1.6, 3.0), (-3.0, -0.6), (1e7, 1e9), (-1e12, -1e10)])
def test_cpu_zero_outside_every_map(low, high, backward_method):
    value, shapes, starts, loc, weights = make_inputs([(3, 3), (2, 2)], low=low, high=high)
    out, grads = output_and_grads(ops.ms_deform_attn, value, shapes, starts, loc, weights)
    assert out.abs().max() == 0 and all(g.abs().max() == 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_non_finite_values_never_sampled_do_not_leak(dtype, backward_method):
    """Off-map corners must contribute exactly nothing: a NaN / Inf at a pixel that no corner on
    the map reads (here every level's first pixel, which the CPU path reuses for clamped off-map
    corners) leaves the output and all three gradients finite and equal to the reference's. The
    dense backward would spread a non-finite value to every query, so it hands over to sparse."""
    shapes = [(4, 5), (3, 3), (1, 1)]
    value, spatial, starts, loc, weights = make_inputs(shapes, dtype=dtype, lq=7, seed=3, low=-0.3, high=1.3)
    widths = spatial[:, 1].to(torch.float64).view(1, 1, 1, -1, 1)
    x = loc[..., 0].double()
    # columns >= 1 only (x * W - 0.5 >= 1), or entirely off the map
    loc[..., 0] = torch.where(x < 0.5, torch.full_like(x, -4.0), torch.maximum(x, 1.5 / widths + 1e-3)).to(dtype)
    for start, bad in zip(starts.tolist(), (float("nan"), float("inf"), float("-inf"))):
        value[:, start] = bad
    assert chosen_method(value, loc.shape[1]) == chosen_method(value, loc.shape[1], "dense") == "sparse"
    out, grads = output_and_grads(ops.ms_deform_attn, value, spatial, starts, loc, weights)
    ref_out, ref_grads = output_and_grads(ms_deform_attn_reference, value.double(), spatial, starts,
                                          loc.double(), weights.double())
    assert torch.isfinite(ref_out).all() and ref_out.abs().max() > 0.05
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    for got, ref in zip(grads, ref_grads):
        assert torch.isfinite(ref).all()
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("value_dtype,loc_dtype,tol", [
    (torch.float32, torch.float32, 1e-5),
    (torch.bfloat16, torch.float32, 2e-2),   # output rounded to bf16 (8 bits): |err| <= 2^-8 |out|
    (torch.bfloat16, torch.bfloat16, 4e-2),  # locations rounded to bf16 too
    (torch.float16, torch.float32, 4e-3),
])
def test_cpu_low_precision(value_dtype, loc_dtype, tol):
    inputs = make_inputs([(6, 5), (3, 4), (1, 1)], n=2, lq=7, m=2, d=8, p=3, low=-0.1, high=1.1,
                         dtype=value_dtype, loc_dtype=loc_dtype)
    exact = [t.double() if t.is_floating_point() else t for t in inputs]
    out_ref, grads_ref = output_and_grads(ms_deform_attn_reference, *exact)
    out, grads = output_and_grads(ops.ms_deform_attn, *inputs)
    assert out.dtype == value_dtype
    assert [g.dtype for g in grads] == [value_dtype, loc_dtype, loc_dtype]
    scale = float(out_ref.detach().abs().max())
    torch.testing.assert_close(out.double(), out_ref, rtol=tol, atol=tol * scale)
    for g, g_ref in zip(grads, grads_ref):
        g_scale = float(g_ref.abs().max())
        torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol * g_scale)


def test_reference_accumulates_bf16_in_float32():
    inputs = make_inputs([(4, 4)], dtype=torch.bfloat16, loc_dtype=torch.float32)
    out = ms_deform_attn_reference(*inputs)
    exact = ms_deform_attn_reference(*[t.double() if t.is_floating_point() else t for t in inputs])
    assert out.dtype == torch.bfloat16
    # one bf16 rounding of the float32 result, nothing more
    torch.testing.assert_close(out, exact.to(torch.bfloat16), rtol=0, atol=0)


def test_non_contiguous_inputs():
    value, shapes, starts, loc, weights = make_inputs([(3, 5), (2, 2)], low=-0.1, high=1.1)
    value_nc = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    loc_nc = loc.transpose(1, 2).contiguous().transpose(1, 2)
    weights_nc = torch.stack([weights, weights], dim=-1).flatten(-2)[..., ::2]
    shapes_nc = torch.stack([shapes[:, 0], shapes[:, 1]], dim=1).t().contiguous().t()
    starts_nc = torch.stack([starts, starts], dim=1)[:, 0]
    assert not any(t.is_contiguous() for t in (value_nc, loc_nc, weights_nc, shapes_nc, starts_nc))
    out_ref, grads_ref = output_and_grads(ms_deform_attn_reference, value, shapes, starts, loc, weights)
    out, grads = output_and_grads(ops.ms_deform_attn, value_nc, shapes_nc, starts_nc, loc_nc, weights_nc)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=F64_TOL)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=F64_TOL)


# ---- bad input ------------------------------------------------------------------------------------
def _bad(change):
    def build():
        args = dict(zip(("value", "spatial_shapes", "level_start_index", "sampling_locations",
                         "attention_weights"), make_inputs([(3, 4), (2, 2)], n=2, lq=5, m=3, d=4, p=2)))
        change(args)
        return args
    return build


def _set(name, fn):
    def change(args):
        args[name] = fn(args)
    return change


BAD = {
    "value_rank": (_set("value", lambda a: a["value"].flatten(2)), "value must have 4 dims"),
    "shapes_rank": (_set("spatial_shapes", lambda a: a["spatial_shapes"].flatten()),
                    "spatial_shapes must have 2"),
    "shapes_cols": (_set("spatial_shapes", lambda a: torch.cat([a["spatial_shapes"]] * 2, 1)),
                    r"spatial_shapes must be \(L, 2\)"),
    "starts_rank": (_set("level_start_index", lambda a: a["level_start_index"][None]),
                    "level_start_index must have 1"),
    "locations_rank": (_set("sampling_locations", lambda a: a["sampling_locations"][0]),
                       "sampling_locations must have 6"),
    "weights_rank": (_set("attention_weights", lambda a: a["attention_weights"].flatten(3)),
                     "attention_weights must have 5"),
    "sum_hw_not_s": (_set("value", lambda a: a["value"][:, :-1]), r"sum of H\*W .* is 16 but value has S=15"),
    "starts_inconsistent": (_set("level_start_index", lambda a: torch.tensor([0, 11])),
                            "level_start_index .* inconsistent with spatial_shapes"),
    "starts_length": (_set("level_start_index", lambda a: torch.tensor([0, 12, 16])),
                      r"level_start_index must be \(L,\)"),
    "zero_height": (lambda a: (a.__setitem__("spatial_shapes", torch.tensor([[0, 4], [4, 4]])),
                               a.__setitem__("level_start_index", torch.tensor([0, 0]))),
                    r"spatial_shapes row 0 is \(H, W\) = \(0, 4\)"),
    "levels_mismatch": (_set("sampling_locations", lambda a: a["sampling_locations"][:, :, :, :1]),
                        "sampling_locations levels L=1 != spatial_shapes levels L=2"),
    "points_mismatch": (_set("attention_weights", lambda a: a["attention_weights"][..., :1]),
                        "attention_weights must be"),
    "weights_levels_mismatch": (_set("attention_weights", lambda a: a["attention_weights"][:, :, :, :1]),
                                "attention_weights must be"),
    "queries_mismatch": (_set("attention_weights", lambda a: a["attention_weights"][:, :2]),
                         "attention_weights must be"),
    "batch_mismatch": (_set("sampling_locations", lambda a: a["sampling_locations"][:1]),
                       "sampling_locations batch N=1 != value batch N=2"),
    "heads_mismatch": (_set("sampling_locations", lambda a: a["sampling_locations"][:, :, :2]),
                       "sampling_locations heads M=2 != value heads M=3"),
    "xy_dim": (_set("sampling_locations", lambda a: a["sampling_locations"][..., :1]),
               "sampling_locations last dim must be 2"),
    "value_int": (_set("value", lambda a: a["value"].long()), "value dtype must be one of"),
    "locations_bf16_with_f64_value": (_set("sampling_locations",
                                           lambda a: a["sampling_locations"].bfloat16()),
                                      "sampling_locations dtype must be value's dtype"),
    "weights_f16_with_f64_value": (_set("attention_weights", lambda a: a["attention_weights"].half()),
                                   "attention_weights dtype must be value's dtype"),
    "shapes_int32": (_set("spatial_shapes", lambda a: a["spatial_shapes"].int()),
                     "spatial_shapes must be int64"),
    "starts_int32": (_set("level_start_index", lambda a: a["level_start_index"].int()),
                     "level_start_index must be int64"),
    "locations_other_device": (_set("sampling_locations", lambda a: a["sampling_locations"].to("meta")),
                               "sampling_locations is on meta but value is on cpu"),
    "weights_other_device": (_set("attention_weights", lambda a: a["attention_weights"].to("meta")),
                             "attention_weights is on meta but value is on cpu"),
    "shapes_other_device": (_set("spatial_shapes", lambda a: a["spatial_shapes"].to("meta")),
                            "spatial_shapes is on meta but value is on cpu"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_tensor(case):
    change, message = BAD[case]
    args = _bad(change)()
    with pytest.raises(ValueError, match=message):
        ops.ms_deform_attn(**args)


def test_bad_input_not_a_tensor():
    value, shapes, starts, loc, weights = make_inputs([(2, 2)])
    with pytest.raises(TypeError, match="spatial_shapes must be a torch.Tensor"):
        ops.ms_deform_attn(value, [(2, 2)], starts, loc, weights)


def test_mixed_location_dtypes_are_allowed():
    value, shapes, starts, loc, weights = make_inputs([(3, 3)], dtype=torch.bfloat16, loc_dtype=torch.float32)
    out = ops.ms_deform_attn(value, shapes, starts, loc, weights.bfloat16())
    assert out.dtype == torch.bfloat16


def test_value_check_cache_rechecks_new_or_modified_tensors():
    """GPU calls validate spatial_shapes' values once per tensor (one host sync), then reuse it."""
    shapes = torch.tensor([[3, 4], [2, 2]])
    starts = _starts(shapes)
    assert validate.checked_total(shapes, starts, cache=True) == 16
    validate._value_cache[id(shapes)] = validate._value_cache[id(shapes)][:4] + (99,)
    assert validate.checked_total(shapes, starts, cache=True) == 99  # served from the cache
    shapes[0, 0] = 0  # in-place change bumps the version: checked again
    with pytest.raises(ValueError, match=r"spatial_shapes row 0 is \(H, W\) = \(0, 4\)"):
        validate.checked_total(shapes, starts, cache=True)
    other = torch.tensor([[3, 4], [2, 2]])
    assert validate.checked_total(other, _starts(other), cache=True) == 16


@pytest.mark.parametrize("method,chunk", [("sparse", 64), ("sparse", 1 << 18), ("dense", 0)])
def test_cpu_backward_methods_match_reference(method, chunk):
    """Each method asked for explicitly (the sparse one in several chunks and in one)."""
    value, shapes, starts, loc, weights = make_inputs([(5, 3), (1, 1), (2, 4)], n=2, lq=4, m=2, d=5, p=3,
                                                      low=-0.3, high=1.3)
    _, grads_autograd = output_and_grads(ms_deform_attn_reference, value, shapes, starts, loc, weights)
    grad_out = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    explicit = ms_deform_attn_cpu_backward(value, shapes, starts, loc, weights, grad_out,
                                           chunk_elements=chunk, method=method)
    for g, g_auto in zip(explicit, grads_autograd):
        torch.testing.assert_close(g, g_auto, rtol=0, atol=F64_TOL)


def test_cpu_backward_method_choice():
    """auto: dense while the (N*M, Lq, S) matrix and S are small, sparse beyond either limit."""
    value = torch.zeros(2, 100, 4, 8)
    assert chosen_method(value, 300) == "dense"
    assert chosen_method(value, ops_cpu.DENSE_MAX_ELEMENTS // (2 * 4 * 100) + 1) == "sparse"
    assert chosen_method(torch.zeros(1, ops_cpu.DENSE_MAX_SPATIAL + 1, 1, 8), 1) == "sparse"
    assert chosen_method(value, 300, "sparse") == "sparse"
    assert chosen_method(torch.zeros(1, 10_000, 8, 8), 10_000, "dense") == "dense"
    with pytest.raises(ValueError, match="method 'fast' is not one of"):
        chosen_method(value, 3, "fast")


# ---- backend selection ----------------------------------------------------------------------------
def test_backend_reports_what_ran():
    inputs = make_inputs([(2, 3)])
    ops.set_backend("pytorch")
    out_ref = ops.ms_deform_attn(*inputs)
    assert ops.backend() == "pytorch" and ops.get_backend() == "pytorch"
    ops.set_backend("cpu")
    out = ops.ms_deform_attn(*inputs)
    assert ops.backend() == "cpu-embedding_bag"
    torch.testing.assert_close(out, out_ref, rtol=0, atol=F64_TOL)
    ops.set_backend("pytorch")
    ops.ms_deform_attn(*inputs)
    ops.set_backend("auto")
    ops.ms_deform_attn(*inputs)
    assert ops.backend() == "cpu-embedding_bag"


def test_set_backend_rejects_unknown_and_wrong_device():
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        ops.set_backend("triton")
    ops.set_backend("cuda")
    with pytest.raises(ValueError, match="backend 'cuda' .* needs cuda tensors, but the inputs are on cpu"):
        ops.ms_deform_attn(*make_inputs([(2, 3)]))


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("MSDA_BACKEND", "pytorch")
    ops.set_backend(None)
    ops.ms_deform_attn(*make_inputs([(2, 3)]))
    assert ops.get_backend() == "pytorch" and ops.backend() == "pytorch"
    monkeypatch.setenv("MSDA_BACKEND", "fastest")
    ops.set_backend(None)
    with pytest.raises(ValueError, match="backend 'fastest' from MSDA_BACKEND"):
        ops.ms_deform_attn(*make_inputs([(2, 3)]))


# ---- the registered operator ----------------------------------------------------------------------
def test_operator_registration_opcheck():
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (1, 1)], n=2, lq=3, m=2, d=3, p=2,
                                                      low=-0.1, high=1.1)
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())
    results = torch.library.opcheck(torch.ops.msda.ms_deform_attn.default, args)
    assert all(v == "SUCCESS" for v in results.values()), results


def test_autocast_does_not_cast_inputs():
    value, shapes, starts, loc, weights = make_inputs([(3, 4)], dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.ms_deform_attn(value, shapes, starts, loc, weights)
        out_bf16 = ops.ms_deform_attn(value.bfloat16(), shapes, starts, loc, weights)
    assert out.dtype == torch.float32 and out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out, ms_deform_attn_reference(value, shapes, starts, loc, weights))


class TinyDeformableAttention(torch.nn.Module):
    """Minimal user of ops.ms_deform_attn: offsets and weights predicted from the query."""

    def __init__(self, shapes: list[tuple[int, int]], heads: int = 2, head_dim: int = 4, points: int = 2):
        super().__init__()
        self.heads, self.head_dim, self.points, self.levels = heads, head_dim, points, len(shapes)
        spatial_shapes = torch.tensor(shapes)
        self.register_buffer("spatial_shapes", spatial_shapes)
        self.register_buffer("level_start_index", _starts(spatial_shapes))
        width = heads * head_dim
        self.offsets = torch.nn.Linear(width, heads * self.levels * points * 2)
        self.weights = torch.nn.Linear(width, heads * self.levels * points)

    def forward(self, value: torch.Tensor, query: torch.Tensor, reference_xy: torch.Tensor) -> torch.Tensor:
        n, lq, _ = query.shape
        shape = (n, lq, self.heads, self.levels, self.points)
        loc = reference_xy[:, :, None, None, None, :] + 0.2 * self.offsets(query).view(*shape, 2)
        weights = self.weights(query).view(n, lq, self.heads, -1).softmax(-1).view(shape)
        value = value.view(n, value.shape[1], self.heads, self.head_dim)
        return ops.ms_deform_attn(value, self.spatial_shapes, self.level_start_index, loc, weights)


def _tiny_module_and_inputs():
    torch.manual_seed(0)
    module = TinyDeformableAttention([(3, 4), (2, 2), (1, 1)])
    value = torch.randn(2, 17, 8, requires_grad=True)
    query = torch.randn(2, 5, 8)
    reference_xy = torch.rand(2, 5, 2)
    return module, (value, query, reference_xy)


def _msda_nodes(graph: torch.fx.Graph) -> list[str]:
    return [str(node.target) for node in graph.nodes if "msda" in str(node.target)]


def test_compile_fullgraph_one_node_forward_and_backward():
    module, inputs = _tiny_module_and_inputs()
    graphs = {}

    def recorder(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm.graph
            return make_boxed_func(gm.forward)
        return compiler

    compiled = torch.compile(module, fullgraph=True,
                             backend=aot_autograd(fw_compiler=recorder("forward"),
                                                  bw_compiler=recorder("backward")))
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.square().sum(), [inputs[0], module.offsets.weight])
    assert _msda_nodes(graphs["forward"]) == ["msda.ms_deform_attn.default"]
    assert _msda_nodes(graphs["backward"]) == ["msda.ms_deform_attn_backward.default"]
    assert ops.backend() == "cpu-embedding_bag"

    out_eager = module(*inputs)
    grads_eager = torch.autograd.grad(out_eager.square().sum(), [inputs[0], module.offsets.weight])
    torch.testing.assert_close(out, out_eager)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager)


def test_dynamo_sees_no_graph_break():
    module, inputs = _tiny_module_and_inputs()
    explanation = torch._dynamo.explain(module)(*inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_export_has_the_operator_as_one_node():
    module, inputs = _tiny_module_and_inputs()
    exported = torch.export.export(module, tuple(t.detach() for t in inputs))
    assert _msda_nodes(exported.graph) == ["msda.ms_deform_attn.default"]
    torch.testing.assert_close(exported.module()(*inputs), module(*inputs))


def test_export_with_dynamic_batch_and_queries():
    module, inputs = _tiny_module_and_inputs()
    n, q = torch.export.Dim("n"), torch.export.Dim("q")
    exported = torch.export.export(module, tuple(t.detach() for t in inputs),
                                   dynamic_shapes=({0: n}, {0: n, 1: q}, {0: n, 1: q}))
    other = (torch.randn(3, 17, 8), torch.randn(3, 7, 8), torch.rand(3, 7, 2))
    torch.testing.assert_close(exported.module()(*other), module(*other))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_operator_under_compile():
    module, inputs = _tiny_module_and_inputs()
    module = module.cuda()
    inputs = tuple(t.detach().cuda().requires_grad_(t.requires_grad) for t in inputs)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    assert ops.backend() == "cuda"
    (grad,) = torch.autograd.grad(out.sum(), [inputs[0]])
    ops.set_backend("pytorch")
    out_ref = module(*inputs)
    (grad_ref,) = torch.autograd.grad(out_ref.sum(), [inputs[0]])
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)
    assert library.last_kernel == "pytorch"
