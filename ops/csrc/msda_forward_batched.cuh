// Batched forward body (K = 2, the float16 / bfloat16 forward): one level's points, K at a time, for
// forward_kernel<T, TL, V, K> in msda_kernels.cuh (included from there).
//
// The one-point body (accumulate_level) guards each corner load with its own branch and skips
// off-map points with a `continue`, so a thread has at most one point's loads in flight: the next
// point's addresses are behind a branch. Here a thread first computes all 4K corner offsets, weights
// and on-map flags without branches (off-map corners read the level's first element, which always
// exists, and the flag then selects zero: exact, and no NaN/Inf from a pixel the reference never
// reads can leak in), then issues the 4K vector loads back to back, then accumulates. More loads in
// flight per thread, at the price of 4K vectors of registers (fewer threads per SM). Same work split,
// pair order, staging and accumulation type as K = 1; results agree with it to rounding order.
#pragma once

namespace msda {
namespace detail {

template <typename T, typename TL, int V, int K, typename acc_t>
__device__ __forceinline__ void accumulate_level_batched(const T* __restrict__ vl, int h, int w, int md, int l,
                                                         const TL* __restrict__ loc, const TL* __restrict__ attn,
                                                         const ForwardThread<T, acc_t>& t, const Geometry& g,
                                                         acc_t (&acc)[V]) {
  if (h <= 0 || w <= 0) return;  // the unconditional loads below need one element in the level
  for (int p0 = 0; p0 < g.points; p0 += K) {
    int off[K][4];  // element offsets from vl (S * M * D < 2^31, checked on the host)
    acc_t cw[K][4];
    bool on[K][4];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int p = p0 + j < g.points ? p0 + j : g.points - 1;
      acc_t x, y, aw;
      fetch_sample<TL, acc_t>(loc, attn, t.sx, t.sy, t.sw, g, t.pair, t.local_pair, l * g.points + p, x, y, aw);
      acc_t px = x * w - acc_t(0.5);
      acc_t py = y * h - acc_t(0.5);
      // off the map, NaN, or past the last point: all four corners off (x0 = y0 = -2)
      const bool inside = p0 + j < g.points && px >= acc_t(-1) && py >= acc_t(-1) && px < acc_t(w) &&
                          py < acc_t(h);
      px = inside ? px : acc_t(-2);
      py = inside ? py : acc_t(-2);
      const acc_t fx0 = floor(px), fy0 = floor(py);
      const int x0 = static_cast<int>(fx0), y0 = static_cast<int>(fy0);
      const acc_t fx = px - fx0, fy = py - fy0;
      const bool xl = x0 >= 0, xr = x0 + 1 < w && x0 + 1 >= 0, yt = y0 >= 0, yb = y0 + 1 < h && y0 + 1 >= 0;
      on[j][0] = yt && xl;
      on[j][1] = yt && xr;
      on[j][2] = yb && xl;
      on[j][3] = yb && xr;
      const int r0 = y0 * w + x0, r1 = r0 + w;
      off[j][0] = on[j][0] ? r0 * md : 0;
      off[j][1] = on[j][1] ? (r0 + 1) * md : 0;
      off[j][2] = on[j][2] ? r1 * md : 0;
      off[j][3] = on[j][3] ? (r1 + 1) * md : 0;
      cw[j][0] = aw * (1 - fx) * (1 - fy);
      cw[j][1] = aw * fx * (1 - fy);
      cw[j][2] = aw * (1 - fx) * fy;
      cw[j][3] = aw * fx * fy;
    }
    Pack<T, V> pk[K][4];
#pragma unroll
    for (int j = 0; j < K; ++j) {
#pragma unroll
      for (int k = 0; k < 4; ++k) pk[j][k] = *reinterpret_cast<const Pack<T, V>*>(vl + off[j][k]);
    }
#pragma unroll
    for (int j = 0; j < K; ++j) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          acc[e] += on[j][k] ? cw[j][k] * static_cast<acc_t>(pk[j][k].v[e]) : acc_t(0);
        }
      }
    }
  }
}

}  // namespace detail
}  // namespace msda
