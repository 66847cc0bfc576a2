"""CPU emulation of the opt-in CUDA backward v2 (ops/csrc/msda_backward_v2.cuh) against the float64 reference.

The kernel cannot run here, so this replays its index and loop structure in float64 Python: the
host's tile choice (plan_backward_v2), the block -> (batch, head, query tile) mapping, the walk over
the tile pairs_per_block queries at a time, the G lanes x chunks channel split, thread 0's slab
assignment (levels from the last backwards, skipping those that do not fit), slab rows D + 1 apart,
shared atomics into the slab vs global atomics for the other levels, and the flush of non-zero slab
elements. Every slab and global index is checked to stay inside its slab level / its (batch, head)
row before it is used. Sums are order-independent here, so this proves the indexing, not the
absence of races (that argument is in the header: zero -> sync -> shared atomics -> sync -> flush).
"""
from __future__ import annotations

import math

import pytest
import torch

from ops.reference import ms_deform_attn_reference


def plan_v2(n, lq, m, d, v, sms, threads=256, tile_env=None):
    """plan() + plan_backward_v2() of ops/csrc/msda_cuda.cu: (group, pairs_per_block, tile)."""
    chunks = d // v
    group = 1
    while group < chunks and group < 32:
        group *= 2
    ppb = threads // group
    nh = n * m
    tiles_wanted = max(1, (4 * sms + nh - 1) // nh)
    tile = (lq + tiles_wanted - 1) // tiles_wanted
    tile = min(max(tile, ppb), 16 * ppb)
    if tile_env is not None:
        tile = tile_env
    tile = min(tile, lq)
    return group, chunks, ppb, (tile + ppb - 1) // ppb * ppb


def emulate_backward_v2(value, shapes, starts, loc, attn, grad_out, v, capacity, sms=4, threads=256,
                        tile_env=None):
    """float64 emulation; returns (grad_value, grad_loc, grad_attn, slab levels used per block)."""
    n_b, s, m, d = value.shape
    lq, levels, points = loc.shape[1], loc.shape[3], loc.shape[4]
    group, chunks, ppb, tile = plan_v2(n_b, lq, m, d, v, sms, threads, tile_env)
    md = m * d
    sd = d + 1
    vflat = value.reshape(-1)
    gv = torch.zeros(n_b * s * m * d, dtype=torch.float64)
    loc_flat = loc.reshape(-1)
    attn_flat = attn.reshape(-1)
    go_flat = grad_out.reshape(-1)
    gl = torch.full_like(loc_flat, float("nan"))
    ga = torch.full_like(attn_flat, float("nan"))
    kk = levels * points
    tiles = (lq + tile - 1) // tile
    slab_levels = set()
    for block in range(n_b * m * tiles):
        nh = block // tiles
        n, head = nh // m, nh % m
        q_begin = (block % tiles) * tile
        q_end = min(lq, q_begin + tile)
        # thread 0: slab offsets, coarsest (last) level first
        soffs, used = [-1] * levels, 0
        for lvl in range(levels - 1, -1, -1):
            need = shapes[lvl][0] * shapes[lvl][1] * sd
            if used + need <= capacity:
                soffs[lvl], used = used, used + need
        slab = torch.zeros(used, dtype=torch.float64)  # zero-filled, then __syncthreads
        slab_levels.add(tuple(i for i in range(levels) if soffs[i] >= 0))
        vbase_off = n * s * md + head * d
        for q0 in range(q_begin, q_end, ppb):
            qs = torch.arange(q0, min(q0 + ppb, q_end))  # active pairs of this step
            pair = (n * lq + qs) * m + head
            for lvl in range(levels):
                h, w = shapes[lvl]
                level_off = starts[lvl] * md
                soff = soffs[lvl]
                for p in range(points):
                    k = lvl * points + p
                    si = pair * kk + k
                    x, y, aw = loc_flat[2 * si], loc_flat[2 * si + 1], attn_flat[si]
                    px, py = x * w - 0.5, y * h - 0.5
                    inside = (px >= -1) & (py >= -1) & (px < w) & (py < h)
                    fx0 = torch.where(inside, px.floor(), torch.zeros_like(px))
                    fy0 = torch.where(inside, py.floor(), torch.zeros_like(py))
                    x0, y0 = fx0.long(), fy0.long()
                    fx, fy = px - fx0, py - fy0
                    xl, xr, yt, yb = x0 >= 0, x0 + 1 < w, y0 >= 0, y0 + 1 < h
                    r00 = y0 * w + x0
                    o00 = level_off + r00 * md
                    offs = [o00, o00 + md, o00 + w * md, o00 + w * md + md]
                    s00 = soff + r00 * sd
                    soff4 = [s00, s00 + sd, s00 + w * sd, s00 + w * sd + sd]
                    cw = [(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy]
                    ok = [inside & yt & xl, inside & yt & xr, inside & yb & xl, inside & yb & xr]
                    gx = torch.zeros(len(qs), dtype=torch.float64)
                    gy, gw = gx.clone(), gx.clone()
                    for lane in range(group):
                        for c in range(lane, chunks, group):
                            co = c * v + torch.arange(v)
                            go = go_flat[pair[:, None] * d + co]
                            vals = []
                            for o, msk in zip(offs, ok):
                                idx = torch.where(msk[:, None], vbase_off + o[:, None] + co, 0)
                                vals.append(torch.where(msk[:, None], vflat[idx], 0.0))
                            v00, v01, v10, v11 = vals
                            gw += (go * (cw[0][:, None] * v00 + cw[1][:, None] * v01 + cw[2][:, None] * v10
                                         + cw[3][:, None] * v11)).sum(1)
                            gx += (go * ((1 - fy)[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10))).sum(1)
                            gy += (go * ((1 - fx)[:, None] * (v10 - v00) + fx[:, None] * (v11 - v01))).sum(1)
                            for o, so, wgt, msk in zip(offs, soff4, cw, ok):
                                add = (aw * wgt)[:, None] * go
                                if soff >= 0:  # shared atomics into this level's slab
                                    sidx = (so[:, None] + co)[msk].reshape(-1)
                                    if sidx.numel():
                                        assert sidx.min() >= soff and sidx.max() < soff + h * w * sd
                                        assert ((sidx - soff) % sd < d).all()
                                    slab.index_add_(0, sidx, add[msk].reshape(-1))
                                else:  # global atomics
                                    gidx = (vbase_off + o[:, None] + co)[msk].reshape(-1)
                                    if gidx.numel():
                                        row = gidx // md - n * s
                                        assert row.min() >= starts[lvl] and row.max() < starts[lvl] + h * w
                                        assert ((gidx % md) // d == head).all()
                                    gv.index_add_(0, gidx, add[msk].reshape(-1))
                    # group_sum, then lane 0 writes
                    gl[2 * si] = gx * aw * w
                    gl[2 * si + 1] = gy * aw * h
                    ga[si] = gw
        # __syncthreads, then flush every non-zero slab element once
        for lvl in range(levels):
            soff = soffs[lvl]
            if soff < 0:
                continue
            rows = shapes[lvl][0] * shapes[lvl][1]
            i = torch.arange(rows * d)
            r, c = i // d, i % d
            vals = slab[soff + r * sd + c]
            gidx = vbase_off + starts[lvl] * md + r * md + c
            nz = vals != 0
            gv.index_add_(0, gidx[nz], vals[nz])
    return gv.view_as(value), gl.view_as(loc), ga.view_as(attn), slab_levels


def make_inputs(shapes, n, lq, m, d, p, seed):
    gen = torch.Generator().manual_seed(seed)
    areas = [h * w for h, w in shapes]
    starts = [sum(areas[:i]) for i in range(len(shapes))]
    value = torch.randn(n, sum(areas), m, d, generator=gen, dtype=torch.float64)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=gen, dtype=torch.float64) * 1.5 - 0.25
    attn = torch.rand(n, lq, m, len(shapes), p, generator=gen, dtype=torch.float64)
    grad = torch.randn(n, lq, m * d, generator=gen, dtype=torch.float64)
    return value, starts, loc, attn, grad


def reference_grads(value, shapes, starts, loc, attn, grad):
    value, loc, attn = (t.clone().requires_grad_() for t in (value, loc, attn))
    out = ms_deform_attn_reference(value, torch.tensor(shapes), torch.tensor(starts), loc, attn)
    return torch.autograd.grad(out, (value, loc, attn), grad)


SHAPES = [(6, 5), (3, 7), (1, 1), (2, 9)]


@pytest.mark.parametrize("d,v,capacity,threads,tile_env,expect_slab", [
    (8, 8, 10**6, 256, None, (0, 1, 2, 3)),      # every level in the slab, one lane per pair
    (8, 2, 10**6, 16, None, (0, 1, 2, 3)),       # 4 lanes, 4 pairs per step, several tiles/steps
    (8, 4, 2 * 9 * 30, 32, 8, (1, 2, 3)),        # level 0 (6x5) does not fit: global atomics there
    (8, 4, 9 * 19, 32, 8, (2, 3)),               # exactly the two last levels (2x9 + 1x1 rows)
    (8, 4, 9 * 10, 32, 8, (2,)),                 # the last level does not fit, the 1x1 before it does
    (5, 1, 0, 64, 16, ()),                       # no slab at all (MSDA_CUDA_BWD_SLAB_KB=0)
    (20, 4, 10**6, 64, None, (0, 1, 2, 3)),      # 5 chunks on 8 lanes: idle lanes
    pytest.param(36, 1, 10**6, 256, None, (0, 1, 2, 3),  # 36 chunks on 32 lanes: two for some lanes
                 marks=pytest.mark.slow),
])
def test_backward_v2_emulation_matches_reference(d, v, capacity, threads, tile_env, expect_slab):
    n, lq, m, p = 2, 13, 3, 3
    value, starts, loc, attn, grad = make_inputs(SHAPES, n, lq, m, d, p, seed=d + v)
    gv, gl, ga, used = emulate_backward_v2(value, SHAPES, starts, loc, attn, grad, v, capacity,
                                           threads=threads, tile_env=tile_env)
    assert used == {expect_slab}
    rv, rl, ra = reference_grads(value, SHAPES, starts, loc, attn, grad)
    assert not gl.isnan().any() and not ga.isnan().any(), "some location/weight gradient never written"
    torch.testing.assert_close(gv, rv, rtol=0, atol=1e-10)
    torch.testing.assert_close(gl, rl, rtol=0, atol=1e-10)
    torch.testing.assert_close(ga, ra, rtol=0, atol=1e-10)
    assert rv.abs().max() > 0.05 and rl.abs().max() > 0.05


def test_plan_v2_tiles_cover_queries():
    """The tile is a multiple of the pairs per block, at least one step and at most 16 steps."""
    for lq in (1, 13, 900, 1100, 89000):
        group, chunks, ppb, tile = plan_v2(2, lq, 8, 32, 8, sms=132)
        assert group == 4 and ppb == 64 and tile % ppb == 0 and ppb <= tile <= 16 * ppb
    # encoder shape: ~1400 blocks; decoder (1100 queries): enough blocks for 132 SMs
    assert plan_v2(2, 89000, 8, 32, 8, sms=132)[3] == 1024
    tile = plan_v2(2, 1100, 8, 32, 8, sms=132)[3]
    assert 16 * ((1100 + tile - 1) // tile) >= 132


def memory_pair_of_head_major(s: int, lq: int, m: int) -> int:
    """ops/csrc/msda_kernels.cuh, same integer arithmetic."""
    per_batch = lq * m
    n = s // per_batch
    rem = s - n * per_batch
    head = rem // lq
    q = rem - head * lq
    return (n * lq + q) * m + head


@pytest.mark.parametrize("n,lq,m", [(1, 1, 1), (2, 7, 3), (3, 13, 8), (2, 1, 8), (1, 300, 1)])
def test_head_major_forward_order_is_a_permutation_grouping_one_head(n, lq, m):
    """MSDA_CUDA_FWD_ORDER=head: every (batch, query, head) pair is computed exactly once, and
    consecutive schedule slots are consecutive queries of one head (what the order is for)."""
    order = [memory_pair_of_head_major(s, lq, m) for s in range(n * lq * m)]
    assert sorted(order) == list(range(n * lq * m))
    for s in range(n * lq * m - 1):
        a, b = order[s], order[s + 1]
        if (s + 1) % lq:  # same (batch, head), next query
            assert b - a == m and a % m == b % m


def emulate_batched_forward(value, shapes, starts, loc, attn, k):
    """float64 replay of accumulate_level_batched (ops/csrc/msda_forward_batched.cuh) for one thread per
    (batch, query, head) pair: points of a level in batches of `k`, the last batch padded by repeating
    the last point with its corners forced off the map; off-map corners read element 0 of the level
    (which must exist) and are then zeroed by their flag; offsets stay inside the level."""
    n_b, s, m, d = value.shape
    lq, _, levels, points, _ = loc.shape[1:]
    out = torch.zeros(n_b, lq, m, d, dtype=torch.float64)
    flat = value.reshape(n_b, s * m * d)
    for b in range(n_b):
        for q in range(lq):
            for head in range(m):
                acc = torch.zeros(d, dtype=torch.float64)
                for lv in range(levels):
                    h, w = int(shapes[lv, 0]), int(shapes[lv, 1])
                    base = int(starts[lv]) * m * d + head * d
                    for p0 in range(0, points, k):
                        for j in range(k):
                            p = min(p0 + j, points - 1)
                            x, y = float(loc[b, q, head, lv, p, 0]), float(loc[b, q, head, lv, p, 1])
                            aw = float(attn[b, q, head, lv, p])
                            px, py = x * w - 0.5, y * h - 0.5
                            inside = p0 + j < points and px >= -1 and py >= -1 and px < w and py < h
                            if not inside:
                                px = py = -2.0
                            x0, y0 = int(math.floor(px)), int(math.floor(py))
                            fx, fy = px - x0, py - y0
                            xl, xr = x0 >= 0, 0 <= x0 + 1 < w
                            yt, yb = y0 >= 0, 0 <= y0 + 1 < h
                            r0 = y0 * w + x0
                            corners = ((yt and xl, r0, (1 - fx) * (1 - fy)), (yt and xr, r0 + 1, fx * (1 - fy)),
                                       (yb and xl, r0 + w, (1 - fx) * fy), (yb and xr, r0 + w + 1, fx * fy))
                            for on, row, bil in corners:
                                off = row * m * d if on else 0
                                assert 0 <= off < h * w * m * d, "corner offset leaves its level"
                                loaded = flat[b, base + off: base + off + d]
                                acc += aw * bil * loaded if on else torch.zeros(d, dtype=torch.float64)
                out[b, q, head] = acc
    return out.reshape(n_b, lq, m * d)


@pytest.mark.parametrize("k,p", [(2, 4), (2, 3), (4, 4), (4, 5)])
def test_batched_forward_emulation_matches_reference(k, p):
    """The batched forward's branch-free corner logic (clamped x0 = y0 = -2 for rejected points, the
    padded last batch, element-0 loads selected away) reproduces the reference, including points far
    outside the map and a 1x1 level; a NaN at every level's element 0 must not leak into the output."""
    shapes = [(6, 5), (3, 7), (1, 1), (2, 9)]
    value, starts, loc, attn, _ = make_inputs(shapes, n=2, lq=5, m=2, d=3, p=p, seed=k * 10 + p)
    spatial, starts = torch.tensor(shapes), torch.tensor(starts)
    loc[0, 0, 0, :, 0] = torch.tensor([-7.0, 0.5], dtype=torch.float64)  # far off the map
    loc[1, 2, 1, :, -1] = torch.tensor([1.3, 1.2], dtype=torch.float64)
    ref = ms_deform_attn_reference(value, spatial, starts, loc, attn)
    got = emulate_batched_forward(value, spatial, starts, loc, attn, k)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # poison element 0 of every level where no sampled corner reads it: the output stays finite
    poisoned = value.clone()
    read = ms_deform_attn_reference(torch.ones_like(value), spatial, starts, loc, attn)
    assert torch.isfinite(read).all()
    for start in starts.tolist():
        probe = torch.zeros_like(value)
        probe[:, start] = 1.0
        if ms_deform_attn_reference(probe, spatial, starts, loc, attn).abs().max() == 0:
            poisoned[:, start] = float("nan")
    got = emulate_batched_forward(poisoned, spatial, starts, loc, attn, k)
    assert torch.isfinite(got).all()
