"""The CPU op's training path: a dense forward keeps its geometry and sampling matrix for the
backward of the same tensors. Results must equal the path that keeps nothing, nothing may be kept
when no backward can follow, and a kept entry must never serve other or modified tensors."""
from __future__ import annotations

import pytest
import torch

import ops
from ops import cpu as ops_cpu
from tests.test_ops import make_inputs

F64_TOL = 1e-12


@pytest.fixture(autouse=True)
def _empty_kept():
    ops_cpu._kept.clear()
    yield
    ops_cpu._kept.clear()


def _inputs():
    return make_inputs([(6, 5), (3, 3), (2, 2), (1, 1)], n=2, lq=7, m=3, d=4, p=3, low=-0.2, high=1.2)


def test_kept_forward_and_backward_match_the_plain_path_float64():
    value, shapes, starts, loc, weights = _inputs()
    assert ops_cpu.chosen_method(value, loc.shape[1]) == "dense"
    grad_out = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    plain_out = ops_cpu.ms_deform_attn_cpu(value, shapes, starts, loc, weights)
    plain = ops_cpu.ms_deform_attn_cpu_backward(value, shapes, starts, loc, weights, grad_out)
    assert ops_cpu.kept_count() == 0
    kept_out = ops_cpu.ms_deform_attn_cpu(value, shapes, starts, loc, weights, keep_for_backward=True)
    assert ops_cpu.kept_count() == 1
    kept = ops_cpu.ms_deform_attn_cpu_backward(value, shapes, starts, loc, weights, grad_out)
    assert ops_cpu.kept_count() == 0  # taken by the backward
    torch.testing.assert_close(kept_out, plain_out, rtol=0, atol=F64_TOL)
    for g, g_plain in zip(kept, plain):
        torch.testing.assert_close(g, g_plain, rtol=0, atol=F64_TOL)


def test_autograd_keeps_only_when_a_backward_can_follow():
    value, shapes, starts, loc, weights = (t.requires_grad_(t.is_floating_point()) for t in _inputs())
    with torch.no_grad():
        ops.ms_deform_attn(value, shapes, starts, loc, weights)
    assert ops_cpu.kept_count() == 0  # leaf inputs require grad, but grad mode is off
    out = ops.ms_deform_attn(value, shapes, starts, loc, weights)
    assert ops_cpu.kept_count() == 1
    out.sum().backward()
    assert ops_cpu.kept_count() == 0
    assert value.grad.abs().sum() > 0 and loc.grad.abs().sum() > 0


def test_other_or_modified_tensors_are_recomputed():
    value, shapes, starts, loc, weights = _inputs()
    grad_out = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ops_cpu.ms_deform_attn_cpu(value, shapes, starts, loc, weights, keep_for_backward=True)
    loc.mul_(0.5)  # in place after the forward: the kept geometry is stale
    after = ops_cpu.ms_deform_attn_cpu_backward(value, shapes, starts, loc, weights, grad_out)
    ops_cpu._kept.clear()
    fresh = ops_cpu.ms_deform_attn_cpu_backward(value, shapes, starts, loc, weights, grad_out)
    for g, g_fresh in zip(after, fresh):
        torch.testing.assert_close(g, g_fresh, rtol=0, atol=0)
    # an equal but different tensor object is not the kept one
    ops_cpu.ms_deform_attn_cpu(value, shapes, starts, loc, weights, keep_for_backward=True)
    copy = ops_cpu.ms_deform_attn_cpu_backward(value.clone(), shapes, starts, loc, weights, grad_out)
    assert ops_cpu.kept_count() == 1  # not taken
    for g, g_fresh in zip(copy, fresh):
        torch.testing.assert_close(g, g_fresh, rtol=0, atol=F64_TOL)


def test_forwards_without_a_backward_are_bounded():
    value, shapes, starts, loc, weights = _inputs()
    for _ in range(ops_cpu.MAX_KEPT + 5):
        ops_cpu.ms_deform_attn_cpu(value, shapes, starts, loc.clone(), weights, keep_for_backward=True)
    assert ops_cpu.kept_count() == ops_cpu.MAX_KEPT


def test_large_maps_keep_nothing(monkeypatch):
    monkeypatch.setattr(ops_cpu, "DENSE_MAX_ELEMENTS", 0)  # sparse regime: nothing to share
    value, shapes, starts, loc, weights = _inputs()
    ops_cpu.ms_deform_attn_cpu(value, shapes, starts, loc, weights, keep_for_backward=True)
    assert ops_cpu.kept_count() == 0
