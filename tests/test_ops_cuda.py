"""CUDA MSDA kernels (ops/csrc) against the float64 plain-PyTorch reference: values and all gradients.

Every case compares with ops.ms_deform_attn_reference evaluated in float64 on the *same* inputs
(half-precision inputs are rounded first, then upcast), so the tolerances measure the kernel's own
arithmetic:
  - float64: atol 1e-10 (values and gradients are O(1..100));
  - float32: |err| <= 1e-4 * max|ref| + 1e-4 * |ref| per tensor (float32 accumulation + atomics);
  - float16: 5e-3 (same form), bfloat16: 2e-2 (output / gradients are rounded to the half type,
    relative steps 2^-11 and 2^-8, after float32 accumulation).
Float32 locations are generated away from pixel-grid kinks (integer pixel coordinates), where the
bilinear derivative jumps and a one-ulp difference in x * W - 0.5 between implementations would
flip the floor; half-precision locations make x * W exact in float32, so they need no such care.
These tests skip on machines without CUDA.
"""
from __future__ import annotations

import pytest
import torch

import ops
from ops.reference import ms_deform_attn_reference

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def ext():
    from ops.build import load_extension

    return load_extension()


def level_index(shapes: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    spatial = torch.tensor(shapes, dtype=torch.long, device=device)
    areas = spatial[:, 0] * spatial[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial, starts


def away_from_kinks(loc: torch.Tensor, spatial: torch.Tensor, margin: float = 1e-3) -> torch.Tensor:
    """Shift (x, y) so that x * W - 0.5 is at least `margin` from an integer (float64 in, out)."""
    hw = spatial.to(loc.dtype)
    size = torch.stack([hw[:, 1], hw[:, 0]], dim=-1).view(1, 1, 1, -1, 1, 2)  # (W, H) per level
    pix = loc * size - 0.5
    frac = pix - pix.floor()
    near = (frac < margin) | (frac > 1 - margin)
    return torch.where(near, loc + 3 * margin / size, loc)


def make_case(shapes, n=2, lq=11, m=3, d=8, p=4, dtype=torch.float32, loc_dtype=None, attn_dtype=None,
              spread=0.25, seed=0, device="cuda"):
    """Inputs in their final dtypes; locations span [-spread, 1 + spread] (some outside the map)."""
    gen = torch.Generator().manual_seed(seed)
    spatial, starts = level_index(shapes, "cpu")
    s = int((spatial[:, 0] * spatial[:, 1]).sum())
    nl = len(shapes)
    value = torch.randn(n, s, m, d, generator=gen, dtype=torch.float64)
    loc = torch.rand(n, lq, m, nl, p, 2, generator=gen, dtype=torch.float64) * (1 + 2 * spread) - spread
    loc = away_from_kinks(loc, spatial)
    attn = torch.rand(n, lq, m, nl, p, generator=gen, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    grad = torch.randn(n, lq, m * d, generator=gen, dtype=torch.float64)
    loc_dtype = loc_dtype or dtype
    attn_dtype = attn_dtype or loc_dtype
    return dict(value=value.to(device, dtype), spatial=spatial.to(device), starts=starts.to(device),
                loc=loc.to(device, loc_dtype), attn=attn.to(device, attn_dtype), grad=grad.to(device, dtype))


def reference64(c):
    """Output and the three gradients in float64 from the (already rounded) inputs."""
    value = c["value"].double().requires_grad_()
    loc = c["loc"].double().requires_grad_()
    attn = c["attn"].double().requires_grad_()
    out = ms_deform_attn_reference(value, c["spatial"], c["starts"], loc, attn)
    grads = torch.autograd.grad(out, (value, loc, attn), c["grad"].double())
    return (out.detach(),) + grads


def assert_close(name, got, ref, tol):
    got = got.double()
    bound = tol * ref.abs().max().clamp_min(1.0) + tol * ref.abs()
    err = (got - ref).abs()
    worst = (err - bound).max()
    assert worst <= 0, (f"{name}: max |err| {err.max():.3e} exceeds tolerance {tol:g} "
                        f"(max |ref| {ref.abs().max():.3e})")


def check(ext, c, tol=None):
    tol = tol if tol is not None else TOL[c["value"].dtype]
    out = ext.forward(c["value"], c["spatial"], c["starts"], c["loc"], c["attn"])
    gv, gl, ga = ext.backward(c["value"], c["spatial"], c["starts"], c["loc"], c["attn"], c["grad"])
    torch.cuda.synchronize()
    assert out.dtype == c["value"].dtype and out.shape == c["grad"].shape
    assert gv.dtype == c["value"].dtype and gv.shape == c["value"].shape
    assert gl.dtype == c["loc"].dtype and gl.shape == c["loc"].shape
    assert ga.dtype == c["attn"].dtype and ga.shape == c["attn"].shape
    ref_out, ref_gv, ref_gl, ref_ga = reference64(c)
    assert_close("output", out, ref_out, tol)
    assert_close("grad_value", gv, ref_gv, tol)
    assert_close("grad_sampling_locations", gl, ref_gl, tol)
    assert_close("grad_attention_weights", ga, ref_ga, tol)
    # the checks mean something only if the sampled values are not all zero
    assert ref_out.abs().max() > 0.05 and ref_gl.abs().max() > 0.05


SHAPES_MIXED = [(6, 5), (3, 7), (1, 1), (2, 9)]  # non-square maps and a 1x1 level


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 40, 64, 65, 256])
def test_channels_and_dtypes(ext, dtype, d):
    """Every vector width (1/2/4/8 channels), odd D, idle lanes (D=40 float32: 5 vectors on 8 lanes)
    and several vectors per thread (D=65: 65 single channels on 32 lanes; D=256 float64: 64 on 32)."""
    check(ext, make_case(SHAPES_MIXED, n=2, lq=13, m=3, d=d, p=3, dtype=dtype, seed=d))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loc_dtype,attn_dtype", [(torch.float32, torch.float32),
                                                  (torch.float32, None), (None, torch.float32)])
def test_half_value_with_float32_locations(ext, dtype, loc_dtype, attn_dtype):
    """Mixed precision: locations and/or weights kept in float32 by autocast-aware callers."""
    c = make_case(SHAPES_MIXED, n=2, lq=9, m=2, d=16, p=4, dtype=dtype, loc_dtype=loc_dtype or dtype,
                  attn_dtype=attn_dtype or dtype, seed=7)
    check(ext, c)


def check_forward(ext, c, points, tol):
    out = ext.forward(c["value"], c["spatial"], c["starts"], c["loc"], c["attn"], points=points)
    torch.cuda.synchronize()
    ref = ms_deform_attn_reference(c["value"].double(), c["spatial"], c["starts"], c["loc"].double(),
                                   c["attn"].double())
    assert ref.abs().max() > 0.05
    assert_close("output", out, ref, tol)
    return out


@pytest.mark.parametrize("points", [1, 2])
def test_both_forward_variants_in_float64(ext, points):
    """The two forward variants (one point at a time in query order: float32 / float64; two points
    at a time in head-major order: float16 / bfloat16) both compiled for float64, checked there at
    float64 precision at 4 and 5 points (whole and partial pairs of points), D = 32 and 12."""
    for p, d in ((4, 32), (5, 12)):
        c = make_case(SHAPES_MIXED, n=2, lq=17, m=4, d=d, p=p, dtype=torch.float64, seed=30 + p)
        check_forward(ext, c, points, TOL[torch.float64])


@pytest.mark.parametrize("points", [1, 2])
def test_forward_ignores_non_finite_values_it_never_samples(ext, points):
    """The two-point forward loads a level's first element in place of off-map corners and must then
    select zero: NaN / Inf there may not reach the output unless a sampled corner is that pixel."""
    c = make_case(SHAPES_MIXED, n=2, lq=13, m=3, d=8, p=4, dtype=torch.float64, seed=5)
    hw = c["spatial"].double()
    # every level's pixel (0, 0) is poisoned; sample only where no corner is that pixel:
    # x * W - 0.5 >= 1 (columns >= 1) or entirely off the map
    c["value"][:, c["starts"][0]] = float("nan")
    c["value"][:, c["starts"][2]] = float("inf")  # the 1x1 level: its only pixel
    c["value"][:, c["starts"][1]] = float("-inf")
    c["value"][:, c["starts"][3]] = float("nan")
    w = hw[:, 1].view(1, 1, 1, -1, 1)
    x = c["loc"][..., 0]
    c["loc"][..., 0] = torch.where(x < 0.5, torch.full_like(x, -5.0), torch.maximum(x, (1.5 + 1e-3) / w))
    out = check_forward(ext, c, points, TOL[torch.float64])
    assert torch.isfinite(out).all()


BAD_CALL_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from ops.build import load_extension
ext = load_extension()
sp = torch.tensor([[2, 3]], device="cuda"); st = torch.zeros(1, dtype=torch.long, device="cuda")
v = torch.randn(1, 6, 2, 8, device="cuda"); loc = torch.rand(1, 3, 2, 1, 2, 2, device="cuda")
a = torch.rand(1, 3, 2, 1, 2, device="cuda"); g = torch.randn(1, 3, 16, device="cuda")
try:
    ext.{call}
except RuntimeError as e:
    print("RAISED:", e); sys.exit(3)
sys.exit(0)
"""


@pytest.mark.parametrize("call,expected", [
    ("forward(v, sp, st, loc, a, points=2)",
     "forward points per step must be 0 (the dtype's own, 1), or 1 or 2 for float64 values, got 2"),
    ("forward(v.double(), sp, st, loc.double(), a.double(), points=3)", "or 1 or 2 for float64 values, got 3"),
    ("forward(v[0], sp, st, loc, a)", "value must be (N, S, M, D), got [6, 2, 8]"),
    ("forward(v, sp, st, loc.double(), a)", "sampling_locations must be Float or float32, got Double"),
    ("backward(v, sp, st, loc, a, g[:, :2])", "grad_output must be (1, 3, 16), got [1, 2, 16]"),
])
def test_bad_input_raises_with_message(ext, call, expected):
    """Bad direct calls raise a RuntimeError with the numbers in the message. Each runs in its own
    process, so a crash instead of a raise fails one test, not the whole run (formatting numbers
    through TORCH_CHECK's iostreams once crashed the extension on an H200; messages are now built
    without them, ops/csrc/msda_error.h)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = BAD_CALL_SCRIPT.format(root=str(Path(__file__).resolve().parents[1]), call=call)
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 3, f"exit {proc.returncode}: {proc.stdout[-500:]} {proc.stderr[-2000:]}"
    assert expected in proc.stdout, proc.stdout


def test_float64_value_with_float32_locations(ext):
    """Policy allows float32 locations/weights with any value dtype; float64 values upcast them."""
    c = make_case(SHAPES_MIXED, n=2, lq=9, m=2, d=8, p=3, dtype=torch.float64, loc_dtype=torch.float32, seed=8)
    check(ext, c, tol=1e-6)  # the location/weight gradients come back rounded to float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [1, 2, 8])
@pytest.mark.parametrize("m", [1, 8])
def test_points_and_heads(ext, dtype, p, m):
    check(ext, make_case([(7, 9), (4, 5), (2, 3)], n=1, lq=20, m=m, d=8, p=p, dtype=dtype, seed=p * 10 + m))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_many_points_smaller_blocks(ext, dtype):
    """L*P = 128: the per-block staging buffer no longer fits 256 threads; blocks shrink."""
    check(ext, make_case([(9, 7), (3, 4)], n=2, lq=6, m=2, d=32, p=64, dtype=dtype, seed=3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_many_points_unstaged(ext, dtype):
    """L*P = 3*48: even one warp's staging exceeds shared memory; locations are read from global."""
    check(ext, make_case([(5, 6), (3, 3), (1, 2)], n=2, lq=5, m=2, d=2, p=48, dtype=dtype, seed=4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_far_outside_and_grid_points(ext, dtype):
    """Locations on exact pixel centres and edges (power-of-two maps: x * W - 0.5 is exact), at
    x * W - 0.5 == -1 and == W - 1, and far outside (1e6, -1e6); float64 and float32."""
    shapes = [(4, 8), (2, 4)]
    c = make_case(shapes, n=1, lq=16, m=2, d=4, p=4, dtype=torch.float64, spread=0.0, seed=5)
    grid = torch.arange(-4, 22, dtype=torch.float64) / 16  # multiples of 1/16 in [-0.25, 1.3125]
    gen = torch.Generator().manual_seed(11)
    idx = torch.randint(0, grid.numel(), c["loc"].shape, generator=gen)
    loc = grid[idx]
    loc[0, 0, 0, 0, :, 0] = torch.tensor([-0.0625, 0.9375, 1e6, -1e6])  # x*8-0.5: -1, 7, far, far
    loc[0, 1, 0, 1, :, 1] = torch.tensor([-0.25, 0.75, 1.25, 0.5])
    c["loc"] = loc.to(c["loc"].device)
    c = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in c.items()}
    check(ext, c)


def test_encoder_like_shape_float32(ext):
    """A scaled-down DINO encoder call (many blocks, 4 levels, 8 heads, D=32, P=4)."""
    shapes = [(50, 84), (25, 42), (13, 21), (7, 11)]
    check(ext, make_case(shapes, n=2, lq=3000, m=8, d=32, p=4, dtype=torch.float32, seed=12))


def test_misaligned_value_pointer(ext):
    """value starting 4 bytes past an allocation: the vector width must drop, results unchanged."""
    c = make_case(SHAPES_MIXED, n=2, lq=7, m=2, d=8, p=2, dtype=torch.float32, seed=13)
    flat = torch.empty(c["value"].numel() + 1, device="cuda", dtype=torch.float32)
    shifted = flat[1:].view(c["value"].shape)
    shifted.copy_(c["value"])
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous()
    c["value"] = shifted
    check(ext, c)


def test_empty_queries(ext):
    c = make_case(SHAPES_MIXED, n=2, lq=0, m=2, d=8, p=2, dtype=torch.float32)
    out = ext.forward(c["value"], c["spatial"], c["starts"], c["loc"], c["attn"])
    gv, gl, ga = ext.backward(c["value"], c["spatial"], c["starts"], c["loc"], c["attn"], c["grad"])
    assert out.shape == (2, 0, 16) and gl.shape == c["loc"].shape and ga.shape == c["attn"].shape
    assert gv.shape == c["value"].shape and float(gv.abs().sum()) == 0.0


def test_forward_is_deterministic(ext):
    c = make_case(SHAPES_MIXED, n=2, lq=64, m=4, d=32, p=4, dtype=torch.bfloat16, seed=14)
    a = ext.forward(c["value"], c["spatial"], c["starts"], c["loc"], c["attn"])
    b = ext.forward(c["value"], c["spatial"], c["starts"], c["loc"], c["attn"])
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,loc_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_public_op_non_contiguous(dtype, loc_dtype):
    """ops.ms_deform_attn on CUDA: non-contiguous views, autograd through the registered op,
    backend() reports the CUDA kernels."""
    c = make_case(SHAPES_MIXED, n=2, lq=10, m=4, d=8, p=3, dtype=dtype, loc_dtype=loc_dtype, seed=15)
    # value as a transposed view of an (N, S, D, M) buffer; locations/weights as strided slices
    value = c["value"].transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    n, lq = c["loc"].shape[:2]
    loc_buffer = torch.zeros((n, 2 * lq) + c["loc"].shape[2:], dtype=loc_dtype, device="cuda")
    loc_buffer[:, ::2] = c["loc"]
    loc = loc_buffer[:, ::2].requires_grad_()
    attn = c["attn"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not value.is_contiguous() and not loc.is_contiguous() and not attn.is_contiguous()
    previous = ops.get_backend()
    ops.set_backend("auto")
    try:
        out = ops.ms_deform_attn(value, c["spatial"], c["starts"], loc, attn)
        assert ops.backend() == "cuda"
        grads = torch.autograd.grad(out, (value, loc, attn), c["grad"])
    finally:
        ops.set_backend(previous)
    ref_out, ref_gv, ref_gl, ref_ga = reference64(c)
    tol = TOL[dtype]
    assert out.dtype == dtype
    assert_close("output", out.detach(), ref_out, tol)
    assert_close("grad_value", grads[0], ref_gv, tol)
    assert_close("grad_sampling_locations", grads[1], ref_gl, tol)
    assert_close("grad_attention_weights", grads[2], ref_ga, tol)
