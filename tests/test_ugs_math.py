"""Mathematics of the ugs package (docs/ugs.md, "The method"), in float64 unless stated."""
from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ugs

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def grid_in(r: float = 4.0, alpha: float = 1.0, n: int = 16) -> torch.Tensor:
    return ugs.make_grid(r, alpha, n, "in", dtype=F64)


# ---------------------------------------------------------------- grid (section 3)

@pytest.mark.parametrize("kind", ["in", "uniform"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0, 8.0])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 16])
def test_grid_endpoints_and_monotonic(kind, alpha, n):
    g = ugs.make_grid(3.0, alpha, n, kind, dtype=F64)
    assert g.shape == (n + 1,) and g.dtype == F64
    assert g[0].item() == pytest.approx(-3.0, abs=1e-15) and g[-1].item() == pytest.approx(3.0, abs=1e-15)
    assert bool((g[1:] > g[:-1]).all())


@pytest.mark.parametrize("n", [2, 7, 8, 16])
def test_in_grid_odd_symmetric_exactly(n):
    g = grid_in(4.0, 1.3, n)
    assert torch.equal(g, -g.flip(0))
    if n % 2 == 0:
        assert g[n // 2].item() == 0.0


def test_spec_example_values():
    g = ugs.make_grid(4.0, 1.0, 8, "in", dtype=F64)
    # the example values printed in docs/ugs.md, to their 2 decimals
    spec = torch.tensor([-4, -2.60, -1.51, -0.66, 0, 0.66, 1.51, 2.60, 4], dtype=F64)
    assert torch.allclose(g, spec, atol=0.005 + 1e-12)
    # and the formula written out independently
    for i in range(9):
        u = -1 + 2 * i / 8
        want = 4 * math.copysign(1.0, u) * (math.exp(abs(u)) - 1) / (math.e - 1) if u != 0 else 0.0
        assert g[i].item() == pytest.approx(want, rel=1e-14, abs=1e-15)


def test_in_denser_near_zero_and_alpha_direction():
    g1, g2 = grid_in(4.0, 1.0, 8), grid_in(4.0, 2.0, 8)
    steps = g1[1:] - g1[:-1]
    assert bool((steps[4:-1] < steps[5:]).all())  # widening away from 0
    assert g2[5] < g1[5]  # larger alpha: denser near 0 (the form of docs/ugs.md)


@pytest.mark.parametrize("alpha", [0.0, 1e-300, 1e-12, 1e-9, 1e-7])
def test_small_alpha_tends_to_uniform(alpha):
    uni = ugs.make_grid(4.0, 0.0, 16, "uniform", dtype=F64)
    g = grid_in(4.0, alpha, 16)
    assert torch.isfinite(g).all()
    assert torch.allclose(g, uni, atol=4.0 * alpha + 1e-15, rtol=0)
    # on both sides of the series branch (alpha < 1e-8) the grid follows the exact formula
    for a in (0.99e-8, 2e-8, 1e-6):
        want = [4.0 * math.copysign(math.expm1(a * abs(u)) / math.expm1(a), u) if u else 0.0
                for u in ((2 * i - 16) / 16 for i in range(17))]
        assert torch.allclose(grid_in(4.0, a, 16), torch.tensor(want, dtype=F64), atol=1e-14, rtol=0)


def test_large_alpha_stays_finite():
    big = grid_in(4.0, 300.0, 4)  # expm1(300) would overflow float32; stable form stays finite
    assert torch.isfinite(big).all() and big[-1].item() == 4.0


def test_grid_dtype_device_and_errors():
    assert ugs.make_grid(1.0, 1.0, 4).dtype == torch.get_default_dtype()
    assert ugs.make_grid(1.0, 1.0, 4, dtype=torch.float16, device="cpu").dtype == torch.float16
    for kwargs, match in [(dict(range=0.0), "range"), (dict(range=float("nan")), "range"),
                          (dict(intervals=0), "intervals"), (dict(intervals=2.0), "intervals"),
                          (dict(alpha=-0.1), "alpha"), (dict(kind="in_positive"), "uniform"),
                          (dict(alpha=400.0, intervals=64), "strictly increasing")]:
        args = dict(range=4.0, alpha=1.0, intervals=8, kind="in") | kwargs
        with pytest.raises(ValueError, match=match):
            ugs.make_grid(args["range"], args["alpha"], args["intervals"], args["kind"])


# ---------------------------------------------------------------- two-hot (section 4)

def _check_two_hot(y, g):
    q = ugs.two_hot(y, g)
    assert q.shape == y.shape + (g.numel(),) and q.dtype == F64
    assert bool((q >= 0).all())
    assert torch.allclose(q.sum(-1), torch.ones_like(y), atol=1e-14, rtol=0)
    assert torch.allclose(q @ g, y, atol=1e-13, rtol=0)
    assert bool(((q > 0).sum(-1) <= 2).all())
    return q


@pytest.mark.parametrize("kind", ["in", "uniform"])
def test_two_hot_invariants_random(kind):
    gen = torch.Generator().manual_seed(0)
    g = ugs.make_grid(4.0, 1.0, 16, kind, dtype=F64)
    y = g[0] + (g[-1] - g[0]) * torch.rand(7, 5, 4, generator=gen, dtype=F64)
    _check_two_hot(y, g)


def test_two_hot_grid_points_and_edges():
    g = grid_in(3.0, 1.0, 10)
    q = _check_two_hot(g.clone(), g)
    assert torch.allclose(q, torch.eye(11, dtype=F64), atol=1e-14)  # a grid point is one-hot
    q_edges = _check_two_hot(torch.stack([g[0], g[-1], g[0].nextafter(g[1]), g[-1].nextafter(g[0])]), g)
    assert q_edges[0, 0].item() == 1.0 and q_edges[1, -1].item() == 1.0


def test_two_hot_clamps_outside_range_and_keeps_nan():
    g = grid_in(2.0, 1.0, 4)
    q = ugs.two_hot(torch.tensor([-50.0, 2.0001, float("inf"), -float("inf")], dtype=F64), g)
    assert torch.equal(q[:, [0, -1]], torch.tensor([[1.0, 0], [0, 1.0], [0, 1.0], [1.0, 0]], dtype=F64))
    # a NaN target stays visible (NaN weights) instead of becoming a plausible distribution
    assert torch.isnan(ugs.two_hot(torch.tensor([float("nan")], dtype=F64), g)).any()


def test_two_hot_half_input_is_float32():
    q = ugs.two_hot(torch.tensor([0.3, -1.0], dtype=torch.float16), ugs.make_grid(2.0, 1.0, 4))
    assert q.dtype == torch.float32 and torch.allclose(q.sum(-1), torch.ones(2))


# ---------------------------------------------------------------- decoding and losses (5-7)

def test_expectation_zero_logits_decode_to_zero_and_matches_manual():
    g = grid_in(4.0, 1.0, 16)
    assert ugs.expectation(torch.zeros(3, 4, 17, dtype=F64), g).abs().max().item() < 1e-15
    z = torch.randn(5, 17, dtype=F64, generator=torch.Generator().manual_seed(1))
    p = torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)
    assert torch.allclose(ugs.expectation(z, g), (p * g).sum(-1), atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="expectation: .* grid size 17"):
        ugs.expectation(torch.zeros(2, 5), g)
    with pytest.raises(ValueError, match="uncertainty: .* grid size 17"):
        ugs.uncertainty(torch.zeros(2, 5), g)


def test_ce_gradient_is_p_minus_q_and_bounded():
    gen = torch.Generator().manual_seed(2)
    g = grid_in(4.0, 1.0, 16)
    z = (8 * torch.randn(64, 4, 17, generator=gen, dtype=F64)).requires_grad_()
    y = 10 * torch.randn(64, 4, generator=gen, dtype=F64)  # many outside [-R, R]: clamped
    loss = ugs.ce_loss(z, y, g)
    assert loss.shape == (64, 4) and bool((loss >= 0).all())
    (grad,) = torch.autograd.grad(loss.sum(), z)
    p, q = torch.softmax(z.detach(), -1), ugs.two_hot(y, g)
    assert torch.allclose(grad, p - q, atol=1e-14, rtol=0)
    assert grad.min().item() >= -1.0 and grad.max().item() <= 1.0
    # reference value: -sum q log p
    assert torch.allclose(loss, -(q * torch.log(p)).sum(-1), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="ce_loss"):
        ugs.ce_loss(z, y[:, :3], g)


def test_um_gradient_and_values():
    gen = torch.Generator().manual_seed(3)
    z = (3 * torch.randn(32, 9, generator=gen, dtype=F64)).requires_grad_()
    h = ugs.um_loss(z)
    (grad,) = torch.autograd.grad(h.sum(), z)
    p = torch.softmax(z.detach(), -1)
    logp = torch.log(p)
    assert torch.allclose(h, -(p * logp).sum(-1), atol=1e-13, rtol=0)
    assert torch.allclose(grad, -p * (logp + h.detach().unsqueeze(-1)), atol=1e-13, rtol=0)
    assert grad.abs().max().item() <= math.log(9) + 1
    assert ugs.um_loss(torch.zeros(2, 9, dtype=F64)).sub(math.log(9)).abs().max().item() < 1e-14
    # a -inf logit is a zero-probability bin, not a nan
    assert torch.isfinite(ugs.um_loss(torch.tensor([0.0, 0.0, -float("inf")], dtype=F64))).all()


def test_um_pushes_confidently_wrong_less_than_ce():
    g = grid_in(4.0, 1.0, 8)
    z = torch.full((9,), -4.0, dtype=F64)
    z[0] = 6.0  # confident on g_0 = -4
    z.requires_grad_()
    y = torch.tensor(3.0, dtype=F64)  # true value near the other end
    (g_ce,) = torch.autograd.grad(ugs.ce_loss(z, y, g), z)
    (g_um,) = torch.autograd.grad(ugs.um_loss(z), z)
    assert g_um.abs().max() < g_ce.abs().max()
    assert g_um.norm() < 0.1 * g_ce.norm()


def test_half_precision_inputs_stay_finite():
    g = ugs.make_grid(4.0, 1.0, 16)
    z = (20 * torch.randn(8, 4, 17)).half().requires_grad_()
    y = torch.randn(8, 4).half()
    for out in (ugs.expectation(z, g), ugs.ce_loss(z, y, g), ugs.um_loss(z), *ugs.uncertainty(z, g)):
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(ugs.ce_loss(z, y, g).sum() + ugs.um_loss(z).sum(), z)
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all()


# ---------------------------------------------------------------- UR (section 8)

def test_ur_perturbation_norms_per_image_and_level():
    gen = torch.Generator().manual_seed(4)
    sizes, b, c, rho = [12, 6, 3], 3, 5, 0.5
    feats = [torch.randn(b, s, c, generator=gen, dtype=F64).requires_grad_() for s in sizes]
    grads = [torch.randn(b, s, c, generator=gen, dtype=F64) for s in sizes]
    masks = [torch.zeros(b, s, dtype=torch.bool) for s in sizes]
    masks[0][1, 8:] = True
    masks[1][2, 4:] = True
    grads[2][2] = 0.0  # an image without matched queries: no perturbation
    out = ugs.ur_perturbation(feats, grads, rho, masks)
    for lvl, (f, o, m) in enumerate(zip(feats, out, masks)):
        assert o.shape == f.shape and o.dtype == f.dtype
        delta = (o - f).detach()
        assert delta[m].abs().max().item() == 0.0 if m.any() else True
        norms = torch.linalg.vector_norm(delta.flatten(1), dim=1)
        want = torch.full((b,), rho, dtype=F64)
        if lvl == 2:
            want[2] = 0.0
        assert torch.allclose(norms, want, atol=1e-12, rtol=0), (lvl, norms)
        # direction: along the masked gradient
        gm = grads[lvl].masked_fill(m.unsqueeze(-1), 0).flatten(1)
        cos = torch.nn.functional.cosine_similarity(delta.flatten(1), gm, dim=1)
        assert torch.allclose(cos[norms > 0], torch.ones_like(cos[norms > 0]), atol=1e-12)
    # differentiable in F with an identity Jacobian (delta is a constant)
    (gf,) = torch.autograd.grad(out[0].sum(), feats[0])
    assert torch.equal(gf, torch.ones_like(gf))


def test_ur_perturbation_none_levels_zero_rho_and_errors():
    f = [torch.randn(2, 4, 3), torch.randn(2, 2, 3)]
    out = ugs.ur_perturbation(f, [None, torch.randn(2, 2, 3)], 0.5)
    assert out[0] is f[0] and not torch.equal(out[1], f[1])
    assert all(torch.equal(a, b) for a, b in zip(ugs.ur_perturbation(f, [torch.ones(2, 4, 3)] * 1 +
                                                                     [torch.ones(2, 2, 3)], 0.0), f))
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        ugs.ur_perturbation(f, [torch.ones(2, 4, 3), torch.ones(2, 3, 3)], 0.5)
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        ugs.ur_perturbation(f, [torch.ones(2, 4, 3), None], 0.5, [torch.zeros(2, 4), None])
    with pytest.raises(ValueError, match="rho"):
        ugs.ur_perturbation(f, [None, None], -1.0)


def test_ur_half_features():
    f = [torch.randn(2, 4, 3).half()]
    out = ugs.ur_perturbation(f, [torch.randn(2, 4, 3).half() * 1e-4], 0.5)
    assert out[0].dtype == torch.float16 and torch.isfinite(out[0]).all()
    assert torch.allclose(torch.linalg.vector_norm((out[0] - f[0]).float().flatten(1), dim=1),
                          torch.full((2,), 0.5), atol=2e-3)


# ---------------------------------------------------------------- uncertainty (section 12)

def test_uncertainty_hand_computed():
    g = torch.tensor([-1.0, 0.0, 1.0], dtype=F64)
    one_hot = torch.tensor([0.0, 50.0, 0.0], dtype=F64)  # p ~ (0, 1, 0)
    std, ent = ugs.uncertainty(one_hot, g)
    assert std.item() < 1e-10 and ent.item() < 1e-19
    half = torch.tensor([0.0, -float("inf"), 0.0], dtype=F64)  # p = (1/2, 0, 1/2)
    std, ent = ugs.uncertainty(half, g)
    assert std.item() == pytest.approx(1.0, abs=1e-15) and ent.item() == pytest.approx(math.log(2), abs=1e-15)
    std, ent = ugs.uncertainty(torch.zeros(2, 3, dtype=F64), g)  # uniform: var = 2/3
    assert torch.allclose(std, torch.full((2,), math.sqrt(2 / 3), dtype=F64), atol=1e-15)
    assert torch.allclose(ent, torch.full((2,), math.log(3), dtype=F64), atol=1e-15)


def test_box_std_pixels_delta_method():
    boxes = torch.tensor([[0.5, 0.25, 0.2, 0.1]], dtype=F64)
    std_logit = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=F64)
    sizes = torch.tensor([[100.0, 200.0]], dtype=F64)  # (h, w)
    out = ugs.box_std_pixels(boxes, std_logit, sizes)
    s = boxes * (1 - boxes) * std_logit * torch.tensor([200.0, 100.0, 200.0, 100.0], dtype=F64)
    sx = math.sqrt(s[0, 0] ** 2 + s[0, 2] ** 2 / 4)
    sy = math.sqrt(s[0, 1] ** 2 + s[0, 3] ** 2 / 4)
    assert torch.allclose(out, torch.tensor([[sx, sy, sx, sy]], dtype=F64), atol=1e-12)
    # first-order agreement with Monte Carlo for a small std
    gen = torch.Generator().manual_seed(5)
    x = torch.logit(boxes) + 0.01 * torch.randn(200000, 4, generator=gen, dtype=F64)
    b = torch.sigmoid(x)
    x0 = (b[:, 0] - b[:, 2] / 2) * 200
    mc = ugs.box_std_pixels(boxes, torch.full_like(boxes, 0.01), sizes)[0, 0]
    assert x0.std().item() == pytest.approx(mc.item(), rel=0.02)
    with pytest.raises(ValueError, match="sizes_hw"):
        ugs.box_std_pixels(boxes, std_logit, torch.ones(1, 3))


# ---------------------------------------------------------------- package boundaries (style 14)

def _imported_top_levels(package: str) -> dict[str, set[str]]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                names.add(package)  # relative import stays inside the package
        found[str(path.relative_to(ROOT))] = names
    return found


_STDLIB = set(sys.stdlib_module_names)


@pytest.mark.parametrize("package", ["ugs", "ops"])
def test_leaf_packages_import_only_torch(package):
    allowed = _STDLIB | {"torch", package}
    files = _imported_top_levels(package)
    assert files, f"no python files found in {package}/"
    bad = {f: sorted(names - allowed) for f, names in files.items() if names - allowed}
    assert not bad, f"{package}/ must import only torch (and the standard library): {bad}"


def test_ugs_import_loads_no_project_packages():
    code = ("import sys, ugs; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('models', 'datasets', 'configs', 'util', 'tools')]; print(bad); sys.exit(bool(bad))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- config: ablation rows are one override

def test_ablation_rows_are_single_overrides():
    from configs.overrides import ConfigError, apply_overrides, from_dict, to_dict
    from configs.schema import Config

    full = Config()
    full.ugs.enabled = True
    want = {  # row: (enabled, box_loss, kind, um on, ur on)
        "l1": (False, None, None, None, None), "ce_uniform": (True, "ce", "uniform", False, False),
        "ce_in": (True, "ce", "in", False, False), "ce_in_um": (True, "ce", "in", True, False),
        "full": (True, "ce", "in", True, True)}
    for base in (full, Config()):  # from the UGS config and from the DINO baseline
        for row, (enabled, box_loss, kind, um, ur) in want.items():
            u = apply_overrides(base, [f"ugs.ablation={row}"]).ugs
            assert u.enabled == enabled, row
            if enabled:
                assert (u.loss.box_loss, u.grid.kind) == (box_loss, kind), row
                assert (u.loss.um_weight == 0.5 if um else u.loss.um_weight == 0.0), row
                assert (u.ur.weight == 0.5 if ur else u.ur.weight == 0.0), row
            again = from_dict(Config, to_dict(apply_overrides(base, [f"ugs.ablation={row}"])))
            assert again.ugs == u  # a dumped config reloads to the same values
    with pytest.raises(ConfigError, match="ur.weight must be 0"):
        apply_overrides(full, ["ugs.ablation=ce_in", "ugs.ur.weight=0.5"])
    with pytest.raises(ConfigError, match="custom"):
        apply_overrides(full, ["ugs.ablation=ce_in_um_ur"])
    for bad in ("ugs.grid.range=0", "ugs.grid.alpha=-1", "ugs.grid.intervals=0", "ugs.ur.rho=-0.1",
                "ugs.ur.levels=[0,0]", "ugs.loss.um_weight=nan", "ugs.grid.kind=log"):
        with pytest.raises(ConfigError):
            apply_overrides(full, [bad])
    ok = apply_overrides(full, ["ugs.ur.levels=[1,2]", "ugs.grid.interm_range=6"]).ugs
    assert ok.ur.levels == [1, 2] and ok.grid_range(interm=True) == 6.0 and ok.grid_range() == 4.0
