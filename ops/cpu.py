"""CPU multi-scale deformable attention: one fused gather-and-weighted-sum over all levels.

The backward has two methods with the same geometry and the same results (to float rounding):
- "sparse" (any size): the embedding_bag formulation below, transposed;
- "dense" (small maps, finite values): the sampling weights are scattered into a dense matrix A of
  (N*M, Lq, S) and the gradients become batched matrix products (A^T @ dOut for value, dOut @ V^T
  read at the corners for the sampling weights). At the CPU demo's shapes (S = 265) that is
  1.4-1.6x faster: a GEMM over a 265-wide row beats gathering 64 scattered rows per query. Its
  work grows with S (sparse's does not), and at full DINO resolution A would not fit, so "auto"
  picks it only for small maps (DENSE_MAX_SPATIAL, DENSE_MAX_ELEMENTS).
The forward is sparse (one embedding_bag is cheaper than building A) unless a backward will follow
and will be dense: then it builds A, computes A @ V, and keeps the geometry and A for that backward
(`_Kept` below), which then skips rebuilding both (about a third of the op's training time at the
demo's shapes).

The plain path (ops/reference.py) loops over levels, copies every value map into grid_sample's
(N*M, D, H, W) layout, materialises all sampled vectors and then reduces them. Here each of the 4
bilinear corners of each sampling point becomes one row index into value's own (N*S*M, D) layout
(no copy) with weight attention * bilinear * in-bounds, and a single `F.embedding_bag(mode="sum")`
forms the weighted sum of those rows per (n, query, head) without materialising them. Every
quantity is computed with tensor ops (no host reads of spatial_shapes), so there is no host
synchronisation and no per-level Python loop. The backward is explicit (it runs inside the backward
custom op, below autograd): see ms_deform_attn_cpu_backward.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ops.validate import compute_dtype

# "auto" uses the dense method when the (N*M, Lq, S) sampling matrix has at most this many elements
# and S is at most DENSE_MAX_SPATIAL (docs/benchmarks.md, "MSDA on the CPU", has the crossover).
DENSE_MAX_ELEMENTS = 1 << 23
DENSE_MAX_SPATIAL = 600
METHODS = ("auto", "dense", "sparse")


class _Geometry(NamedTuple):
    """The 4 bilinear corners of every sampling point, for B = N*Lq*M bags of K = 4*L*P corners.

    rows, weights (B, K): row of value.view(N*S*M, D) and weight attention * bilinear * in-bounds of
    corner (y0 + i, x0 + j, level, point), ordered (i, j, L, P) within a bag; rows of corners outside
    the map are clamped onto it (their weight is 0).
    The per-point quantities are kept "points-major", shaped (L, P, B) with the long B dimension
    innermost, so every elementwise op runs over long contiguous rows (a layout with the 2-long
    corner/axis dims inside runs TensorIterator over 2- or 20-element inner loops, several times
    slower): wx, wy: (weight of column x0, of x0 + 1) and (row y0, y0 + 1), zero outside the map;
    vx, vy: the matching 0/1 in-map masks; attn: attention weights; widths, heights (L, 1, 1).
    """

    rows: torch.Tensor
    weights: torch.Tensor
    wx: tuple[torch.Tensor, torch.Tensor]
    wy: tuple[torch.Tensor, torch.Tensor]
    vx: tuple[torch.Tensor, torch.Tensor]
    vy: tuple[torch.Tensor, torch.Tensor]
    attn: torch.Tensor
    widths: torch.Tensor
    heights: torch.Tensor


def _geometry(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
              sampling_locations: torch.Tensor, attention_weights: torch.Tensor, dense: bool = False
              ) -> _Geometry:
    """Pixel (i, j) of level l (row i, column j) has its centre at ((j + 0.5) / W_l, (i + 0.5) / H_l)
    in normalised (x, y), so x_pix = x * W_l - 0.5 (the align_corners=False convention).
    With `dense`, `rows` index the flattened (N*M, Lq, S) sampling matrix instead of value's rows."""
    n, s, m, _ = value.shape
    lq, _, num_levels, num_points, _ = sampling_locations.shape[1:]
    bags = n * lq * m
    dtype = sampling_locations.dtype
    device = value.device
    largest = n * m * lq * s if dense else n * s * m
    index_dtype = torch.int32 if largest < 2**31 else torch.int64  # int32 index math is cheaper

    # points-major (axis (x, y), L, P, B); sizes (W, H) per level broadcast over (P, B)
    # contiguous copies: reshape would return views whose bag dimension is outermost in memory, and
    # every op below would inherit that layout (about 3x slower per geometry)
    loc = sampling_locations.permute(5, 3, 4, 0, 1, 2).reshape(2, num_levels, num_points, bags).contiguous()
    attn = attention_weights.reshape(bags, num_levels, num_points).permute(1, 2, 0).contiguous()  # (L, P, B)
    sizes = spatial_shapes.t().flip(0).to(index_dtype).reshape(2, num_levels, 1, 1)
    float_sizes = sizes.to(dtype)
    pixel = torch.addcmul(torch.tensor(-0.5, dtype=dtype, device=device), loc, float_sizes)
    # far-away points: keep the integer conversion in range (both corners stay outside, weight 0)
    pixel = pixel.clamp_(-2.0, 2.0**30)
    low = torch.floor(pixel)
    frac = pixel.sub_(low)  # weight of the upper neighbour
    low_i = low.to(index_dtype)
    last = sizes - 1
    zero = torch.zeros_like(sizes)
    inside0 = ((low_i >= 0) & (low_i <= last)).to(dtype)
    inside1 = ((low_i >= -1) & (low_i < last)).to(dtype)
    w0 = (1 - frac).mul_(inside0)
    w1 = frac.mul_(inside1)
    c0 = torch.clamp(low_i, zero, last)
    c1 = torch.clamp(low_i + 1, zero, last)

    def arange(k: int, shape: tuple[int, int, int], stride: int) -> torch.Tensor:
        return torch.arange(k, device=device, dtype=index_dtype).view(shape) * stride

    # bag (n, q, head) -> sparse: row of value.view(N*S*M, D) = (n * S + start_l + y * W_l + x) * M + head;
    # dense: entry of the (N, M, Lq, S) matrix = ((n * M + head) * Lq + q) * S + start_l + y * W_l + x
    stride = 1 if dense else m  # between neighbouring pixels
    if dense:
        per_bag = arange(n, (n, 1, 1), m * lq * s) + arange(lq, (1, lq, 1), s) + arange(m, (1, 1, m), lq * s)
    else:
        per_bag = (arange(n, (n, 1, 1), s * m) + arange(m, (1, 1, m), 1)).expand(n, lq, m)
    base = level_start_index.to(index_dtype).view(num_levels, 1, 1) * stride + per_bag.reshape(bags)  # (L, 1, B)
    row_stride = sizes[0] * stride  # W_l * stride per level, (L, 1, 1)
    row_y = (torch.addcmul(base, c0[1], row_stride), torch.addcmul(base, c1[1], row_stride))
    col_x = (c0[0] * stride, c1[0] * stride)
    wx, wy = (w0[0], w1[0]), (w0[1], w1[1])
    attn_wy = (wy[0] * attn, wy[1] * attn)

    # corner-level tensors, written straight into the bag-major layout (B, i, j, L, P)
    rows = torch.empty(bags, 2, 2, num_levels, num_points, dtype=index_dtype, device=device)
    weights = torch.empty(bags, 2, 2, num_levels, num_points, dtype=dtype, device=device)
    rows_t = rows.permute(1, 2, 3, 4, 0)
    weights_t = weights.permute(1, 2, 3, 4, 0)
    for i in range(2):
        for j in range(2):
            torch.add(row_y[i], col_x[j], out=rows_t[i, j])
            torch.mul(attn_wy[i], wx[j], out=weights_t[i, j])
    return _Geometry(rows.view(bags, -1), weights.view(bags, -1), wx, wy,
                     (inside0[0], inside1[0]), (inside0[1], inside1[1]), attn,
                     float_sizes[0], float_sizes[1])


def _table_and_rows(value_c: torch.Tensor, geo: _Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """The value rows as an embedding table and each corner's row in it.

    Off-map corners point at a clamped on-map row with weight 0; with a NaN or Inf in that row,
    0 * NaN would leak into outputs (and gradients) that never sample it. So when value holds any
    non-finite entry (one pass over value, about 1/80 of the gather's reads at DINO shapes) the
    table gets one extra zero row and off-map corners point there instead."""
    table = value_c.view(-1, value_c.shape[-1])
    if bool(torch.isfinite(value_c).all()):
        return table, geo.rows
    on_map = torch.stack([torch.stack([geo.vy[i] * geo.vx[j] for j in range(2)]) for i in range(2)])  # (2,2,L,P,B)
    on_map = on_map.permute(4, 0, 1, 2, 3).reshape(geo.rows.shape) > 0
    zero_row = table.shape[0]
    rows = torch.where(on_map, geo.rows, torch.full_like(geo.rows, zero_row))
    return torch.cat([table, table.new_zeros(1, table.shape[1])]), rows


def _compute_value(value: torch.Tensor) -> torch.Tensor:
    """value in the compute dtype (ops/validate.py), contiguous."""
    return value.to(compute_dtype(value.dtype)).contiguous()


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, method):
    """value in the compute dtype, contiguous; the method that will run; its geometry."""
    value_c = _compute_value(value)
    dense = chosen_method(value_c, sampling_locations.shape[1], method) == "dense"
    geo = _geometry(value_c, spatial_shapes, level_start_index, sampling_locations.to(value_c.dtype),
                    attention_weights.to(value_c.dtype), dense=dense)
    return value_c, ("dense" if dense else "sparse"), geo


def chosen_method(value: torch.Tensor, num_queries: int, method: str = "auto") -> str:
    """The method that runs for `value` (N, S, M, D) and `num_queries` queries: "dense" when asked
    for or ("auto") when the sampling matrix is small, but never with a non-finite value entry
    (the dense products would spread it to every query of its (n, head)); else "sparse"."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    n, s, m, _ = value.shape
    small = n * m * num_queries * s <= DENSE_MAX_ELEMENTS and s <= DENSE_MAX_SPATIAL
    if method == "sparse" or (method == "auto" and not small):
        return "sparse"
    return "dense" if bool(torch.isfinite(value).all()) else "sparse"


def _sampling_matrix(geo: _Geometry, n: int, m: int, lq: int, s: int) -> torch.Tensor:
    """(N*M, Lq, S): the summed corner weights of each query over each value position."""
    matrix = torch.zeros(n * m * lq * s, dtype=geo.weights.dtype, device=geo.weights.device)
    matrix.index_add_(0, geo.rows.reshape(-1), geo.weights.reshape(-1))
    return matrix.view(n * m, lq, s)


def _per_head(x: torch.Tensor, n: int, length: int, m: int, d: int) -> torch.Tensor:
    """(N, length, M*D) or (N, length, M, D) -> (N*M, length, D), contiguous."""
    return x.reshape(n, length, m, d).transpose(1, 2).reshape(n * m, length, d)


def ms_deform_attn_cpu(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                       sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                       keep_for_backward: bool = False, method: str = "auto") -> torch.Tensor:
    """Same contract as ops.ms_deform_attn_reference (shapes there).

    Computes in float64 for float64 value and in float32 otherwise; returns value's dtype. Only tensor
    ops, so it runs on any device, but it is tuned and tested for CPU. Not differentiable by autograd
    (in-place ops on intermediates); the gradients are ms_deform_attn_cpu_backward. With
    `keep_for_backward` (a backward of these very tensors will follow) and a dense-sized problem, the
    dense method runs and its geometry and sampling matrix are kept for that backward. `method`
    "dense" / "sparse" forces one (benchmarks; a non-finite value still falls back to sparse).
    """
    n, s, m, d = value.shape
    lq = sampling_locations.shape[1]
    if method == "auto" and not keep_for_backward:
        method = "sparse"
    value_c, method, geo = _prepare(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights, method)
    if method == "dense":
        matrix = _sampling_matrix(geo, n, m, lq, s)
        out = torch.bmm(matrix, _per_head(value_c, n, s, m, d))  # (N*M, Lq, D)
        if keep_for_backward:
            _keep(value, sampling_locations, attention_weights, geo, matrix)
        return out.view(n, m, lq, d).transpose(1, 2).reshape(n, lq, m * d).to(value.dtype)
    table, rows = _table_and_rows(value_c, geo)
    out = F.embedding_bag(rows, table, mode="sum", per_sample_weights=geo.weights)
    return out.view(n, lq, m * d).to(value.dtype)


class _Kept(NamedTuple):
    """What a dense forward leaves for its backward, with the inputs it was computed from: the
    backward uses it only for those very tensor objects at the same in-place versions (strong
    references, so an object cannot be freed and its identity reused while kept)."""

    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    versions: tuple[int, int, int]
    geo: _Geometry
    matrix: torch.Tensor


# Kept forwards by id(sampling_locations); a backward takes its entry out. Bounded, oldest out
# first, for forwards whose backward never runs (e.g. an evaluation that did not use no_grad).
MAX_KEPT = 32
_kept: OrderedDict[int, _Kept] = OrderedDict()
_kept_lock = threading.Lock()


def _keep(value, sampling_locations, attention_weights, geo, matrix) -> None:
    inputs = (value, sampling_locations, attention_weights)
    with _kept_lock:
        _kept[id(sampling_locations)] = _Kept(inputs, tuple(t._version for t in inputs), geo, matrix)
        _kept.move_to_end(id(sampling_locations))
        while len(_kept) > MAX_KEPT:
            _kept.popitem(last=False)


def _take_kept(value, sampling_locations, attention_weights) -> _Kept | None:
    inputs = (value, sampling_locations, attention_weights)
    with _kept_lock:
        entry = _kept.get(id(sampling_locations))
        if entry is None or any(a is not b for a, b in zip(entry.inputs, inputs)):
            return None
        del _kept[id(sampling_locations)]
    if entry.versions != tuple(t._version for t in inputs):
        return None  # modified in place since the forward
    return entry


def kept_count() -> int:
    """How many forwards are waiting for their backward (for tests)."""
    return len(_kept)


def ms_deform_attn_cpu_backward(value: torch.Tensor, spatial_shapes: torch.Tensor,
                                level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                                attention_weights: torch.Tensor, grad_output: torch.Tensor,
                                chunk_elements: int = 1 << 18, method: str = "auto"
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (value, sampling_locations, attention_weights), contiguous, each in its input's dtype.

    Corner (i, j) of a point has weight w_ij = a * wy_i * wx_j in out[bag] (a: attention weight):
      d value[r] = sum over corners with row r of w_ij * grad_out[bag]   (sparse: a transposed
                   embedding_bag, corners sorted by row; dense: A^T @ grad_out);
      g_ij       = <grad_out[bag], value[row_ij]>                         (sparse: gathered in chunks
                   of `chunk_elements`, sized for the cache; dense: grad_out @ V^T at the corners);
      d a        = sum_ij g_ij wy_i wx_j;
      d x        = a W_l sum_i wy_i (g_i1 vx_1 - g_i0 vx_0)  (d wx_0 / d x_pix = -vx_0, d wx_1 = +vx_1),
      d y        = a H_l sum_j wx_j (g_1j vy_1 - g_0j vy_0).
    """
    n, s, m, d = value.shape
    lq, _, num_levels, num_points, _ = sampling_locations.shape[1:]
    kept = _take_kept(value, sampling_locations, attention_weights) if method != "sparse" else None
    if kept is not None:
        value_c, method, geo, matrix = _compute_value(value), "dense", kept.geo, kept.matrix
    else:
        value_c, method, geo = _prepare(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, method)
        matrix = _sampling_matrix(geo, n, m, lq, s) if method == "dense" else None
    bags, per_bag = geo.rows.shape
    if method == "dense":
        grad_heads = _per_head(grad_output.to(value_c.dtype), n, lq, m, d)  # (N*M, Lq, D)
        grad_value = torch.bmm(matrix.transpose(1, 2), grad_heads)  # (N*M, S, D)
        grad_value = grad_value.view(n, m, s, d).transpose(1, 2)
        grad_matrix = torch.bmm(grad_heads, _per_head(value_c, n, s, m, d).transpose(1, 2))  # (N*M, Lq, S)
        g = grad_matrix.view(-1).index_select(0, geo.rows.reshape(-1)).view(bags, per_bag)
    else:
        grad_value, g = _sparse_value_and_corner_grads(value_c, geo, grad_output, chunk_elements)
    # points-major like the geometry: g_t[i, j] is (L, P, B)
    g_t = g.t().contiguous().view(2, 2, num_levels, num_points, bags)

    wx, wy, vx, vy = geo.wx, geo.wy, geo.vx, geo.vy
    g_y = [g_t[i, 0] * wx[0] + g_t[i, 1] * wx[1] for i in range(2)]  # per corner row, over columns
    g_x = [g_t[0, j] * wy[0] + g_t[1, j] * wy[1] for j in range(2)]  # per corner column, over rows
    grad_attn = g_y[0] * wy[0] + g_y[1] * wy[1]  # (L, P, B)
    grad_loc = torch.stack(((g_x[1] * vx[1] - g_x[0] * vx[0]) * geo.widths,
                            (g_y[1] * vy[1] - g_y[0] * vy[0]) * geo.heights)) * geo.attn  # (2, L, P, B)

    grad_loc = grad_loc.permute(3, 1, 2, 0).reshape(n, lq, m, num_levels, num_points, 2)
    grad_attn = grad_attn.permute(2, 0, 1).reshape(n, lq, m, num_levels, num_points)
    return (grad_value.reshape(n, s, m, d).to(value.dtype).contiguous(),
            grad_loc.to(sampling_locations.dtype).contiguous(),
            grad_attn.to(attention_weights.dtype).contiguous())


def _sparse_value_and_corner_grads(value_c: torch.Tensor, geo: _Geometry, grad_output: torch.Tensor,
                                   chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d value (N*S*M, D) and the corner dot products g (B, K) of the sparse method."""
    bags, per_bag = geo.rows.shape
    d = value_c.shape[-1]
    grad_rows = grad_output.to(value_c.dtype).reshape(bags, d)
    table, rows = _table_and_rows(value_c, geo)

    # value: sort the corner rows, then one embedding_bag per value row over grad_out rows
    rows_sorted, order = torch.sort(rows.reshape(-1), stable=True)
    counts = torch.bincount(rows_sorted, minlength=table.shape[0])
    offsets = torch.cumsum(counts, 0) - counts
    sorted_weights = geo.weights.reshape(-1).index_select(0, order)  # index_select: faster than [order]
    grad_value = F.embedding_bag(torch.div(order, per_bag, rounding_mode="floor"), grad_rows, offsets,
                                 mode="sum", per_sample_weights=sorted_weights)
    grad_value = grad_value[:value_c.numel() // d]  # without _table_and_rows' zero row, if any

    # per-corner dot products g_ij, gathered in chunks of bags to bound memory
    g = torch.empty(bags, per_bag, dtype=value_c.dtype, device=value_c.device)
    step = max(1, chunk_elements // (per_bag * d))
    for lo in range(0, bags, step):
        hi = min(bags, lo + step)
        gathered = table.index_select(0, rows[lo:hi].reshape(-1)).view(hi - lo, per_bag, d)
        g[lo:hi] = (gathered * grad_rows[lo:hi].unsqueeze(1)).sum(-1)
    return grad_value, g
