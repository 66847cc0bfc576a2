// Opt-in backward "v2" (MSDA_CUDA_BWD=v2): value gradients of the coarse levels are reduced in shared
// memory before they reach global memory. NOT YET MEASURED ON A GPU; the default stays backward_kernel.
//
// Why. backward_kernel scatters every (query, head, level, point, corner) contribution with a global
// float32 atomicAdd. On the coarse levels of the DINO encoder (13x21 and 25x42 maps, ~89k queries)
// thousands of samples land on the same value row of a head, so those atomics serialise in L2.
//
// Work split. A block serves one (batch n, head m) and a tile of consecutive queries (g.tile, a
// multiple of the pairs per block); it walks the tile pairs_per_block queries at a time, with the
// same group-of-G-threads-per-pair structure (and the same arithmetic) as backward_kernel. Because
// every pair of the block shares (n, m), one (H_l * W_l, D) slab per level holds all of the block's
// value gradients for that level. Levels are given a slab from the last (coarsest in DINO's order)
// backwards while they fit in g.slab_capacity elements (a level that does not fit is skipped and
// the next one is tried); the others keep direct global atomics (their rows are hit rarely).
//
// Order of events in a block (every thread reaches every __syncthreads: inactive threads stay in
// the loops, as in backward_kernel, because the group shuffles need all lanes):
//   1. level table -> shared; thread 0 assigns slab offsets; sync; zero the used slab; sync.
//   2. per sample: location / weight gradients as in backward_kernel (no atomics); value gradient
//      -> shared atomicAdd into the slab (slab levels) or global atomicAdd (other levels).
//   3. sync; flush: each slab element that is non-zero is added once to global memory with atomicAdd
//      (coalesced: consecutive threads take consecutive channels of a row).
// Slab rows are D + 1 elements apart so that groups writing different rows spread over the banks.
#pragma once

#include "msda_launch.h"

namespace msda {
namespace detail {

template <typename T, typename TL, int V>
__global__ void __launch_bounds__(kBlockThreads)
    backward_v2_kernel(const T* __restrict__ value, const int64_t* __restrict__ shapes,
                       const int64_t* __restrict__ starts, const TL* __restrict__ loc,
                       const TL* __restrict__ attn, const T* __restrict__ grad_out,
                       typename Acc<T>::type* __restrict__ grad_value, TL* __restrict__ grad_loc,
                       TL* __restrict__ grad_attn, const Geometry g) {
  using acc_t = typename Acc<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  // [H, W, start, slab offset or -1] per level, then the used-slab count, then the slab
  int* lvl = reinterpret_cast<int*>(smem);
  int* slab_used = lvl + 4 * g.levels;
  acc_t* slab = reinterpret_cast<acc_t*>(smem + v2_table_bytes(g.levels));
  const int sd = g.d + 1;  // slab row stride

  const int pairs_per_block = blockDim.x / g.group;
  const int kk = g.levels * g.points;
  const int tiles = (g.lq + g.tile - 1) / g.tile;
  const int64_t nh = blockIdx.x / tiles;  // n * M + head
  const int n = static_cast<int>(nh / g.m);
  const int head = static_cast<int>(nh % g.m);
  const int q_begin = static_cast<int>(blockIdx.x % tiles) * g.tile;
  const int q_end = min(g.lq, q_begin + g.tile);

  for (int i = threadIdx.x; i < g.levels; i += blockDim.x) {
    lvl[4 * i] = static_cast<int>(shapes[2 * i]);
    lvl[4 * i + 1] = static_cast<int>(shapes[2 * i + 1]);
    lvl[4 * i + 2] = static_cast<int>(starts[i]);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t used = 0;
    for (int l = g.levels - 1; l >= 0; --l) {
      const int64_t need = static_cast<int64_t>(lvl[4 * l]) * lvl[4 * l + 1] * sd;
      if (used + need <= g.slab_capacity) {
        lvl[4 * l + 3] = static_cast<int>(used);
        used += need;
      } else {
        lvl[4 * l + 3] = -1;
      }
    }
    *slab_used = static_cast<int>(used);
  }
  __syncthreads();
  const int used = *slab_used;
  for (int i = threadIdx.x; i < used; i += blockDim.x) slab[i] = acc_t(0);
  __syncthreads();

  const int local_pair = threadIdx.x / g.group;
  const int lane = threadIdx.x % g.group;
  const int md = g.m * g.d;
  const int64_t vbase_off = static_cast<int64_t>(n) * g.value_batch + static_cast<int64_t>(head) * g.d;
  const T* vbase = value + vbase_off;
  acc_t* gvbase = grad_value + vbase_off;
  const bool one_chunk = g.chunks <= g.group;

  for (int q0 = q_begin; q0 < q_end; q0 += pairs_per_block) {
    const int q = q0 + local_pair;
    const bool active = q < q_end;
    const int64_t pair = active ? (static_cast<int64_t>(n) * g.lq + q) * g.m + head : 0;
    const T* gobase = grad_out + pair * g.d;
    acc_t go_own[V];
#pragma unroll
    for (int j = 0; j < V; ++j) go_own[j] = acc_t(0);
    if (active && one_chunk && lane < g.chunks) load_pack<T, V, acc_t>(gobase + lane * V, go_own);

    for (int l = 0; l < g.levels; ++l) {
      const int h = lvl[4 * l], w = lvl[4 * l + 1];
      const int64_t level_off = static_cast<int64_t>(lvl[4 * l + 2]) * md;
      const int soff = lvl[4 * l + 3];
      for (int p = 0; p < g.points; ++p) {
        const int k = l * g.points + p;
        acc_t gx = 0, gy = 0, gw = 0, aw = 0;
        if (active) {
          const int64_t si = pair * kk + k;
          const acc_t x = static_cast<acc_t>(loc[2 * si]);
          const acc_t y = static_cast<acc_t>(loc[2 * si + 1]);
          aw = static_cast<acc_t>(attn[si]);
          const acc_t px = x * w - acc_t(0.5);
          const acc_t py = y * h - acc_t(0.5);
          if (px >= acc_t(-1) && py >= acc_t(-1) && px < acc_t(w) && py < acc_t(h)) {
            const Corners<acc_t> q = bilinear_corners<acc_t>(px, py, h, w, level_off, md);
            const int s00 = soff >= 0 ? soff + q.row * sd : 0, s01 = s00 + sd, s10 = s00 + w * sd, s11 = s10 + sd;
            for (int c = lane; c < g.chunks; c += g.group) {
              const int co = c * V;
              acc_t go[V];
              if (one_chunk) {
#pragma unroll
                for (int j = 0; j < V; ++j) go[j] = go_own[j];
              } else {
                load_pack<T, V, acc_t>(gobase + co, go);
              }
              accumulate_point_grads<T, V, acc_t>(vbase, co, q, go, gw, gx, gy);
              if (soff >= 0) {
                if (q.tl) shared_add_pack<V, acc_t>(slab + s00 + co, aw * q.w00, go);
                if (q.tr) shared_add_pack<V, acc_t>(slab + s01 + co, aw * q.w01, go);
                if (q.bl) shared_add_pack<V, acc_t>(slab + s10 + co, aw * q.w10, go);
                if (q.br) shared_add_pack<V, acc_t>(slab + s11 + co, aw * q.w11, go);
              } else {
                if (q.tl) atomic_add_pack<V, acc_t>(gvbase + q.o00 + co, aw * q.w00, go);
                if (q.tr) atomic_add_pack<V, acc_t>(gvbase + q.o01 + co, aw * q.w01, go);
                if (q.bl) atomic_add_pack<V, acc_t>(gvbase + q.o10 + co, aw * q.w10, go);
                if (q.br) atomic_add_pack<V, acc_t>(gvbase + q.o11 + co, aw * q.w11, go);
              }
            }
          }
        }
        gx = group_sum(gx, g.group);
        gy = group_sum(gy, g.group);
        gw = group_sum(gw, g.group);
        if (active && lane == 0) {
          const int64_t i = pair * kk + k;
          grad_loc[2 * i] = static_cast<TL>(gx * aw * acc_t(w));
          grad_loc[2 * i + 1] = static_cast<TL>(gy * aw * acc_t(h));
          grad_attn[i] = static_cast<TL>(gw);
        }
      }
    }
  }

  __syncthreads();
  for (int l = 0; l < g.levels; ++l) {
    const int soff = lvl[4 * l + 3];
    if (soff < 0) continue;
    const int rows = lvl[4 * l] * lvl[4 * l + 1];
    acc_t* gl = gvbase + static_cast<int64_t>(lvl[4 * l + 2]) * md;
    for (int i = threadIdx.x; i < rows * g.d; i += blockDim.x) {
      const int r = i / g.d, c = i - r * g.d;
      const acc_t v = slab[soff + r * sd + c];
      if (v != acc_t(0)) atomicAdd(gl + static_cast<int64_t>(r) * md + c, v);
    }
  }
}

template <typename T, typename TL, int V>
cudaError_t launch_backward_v2(const Launch& lp, const T* value, const int64_t* shapes, const int64_t* starts,
                               const TL* loc, const TL* attn, const T* grad_out, typename Acc<T>::type* grad_value,
                               TL* grad_loc, TL* grad_attn, cudaStream_t stream) {
  const int64_t tiles = (lp.g.lq + lp.g.tile - 1) / lp.g.tile;
  const int64_t blocks = static_cast<int64_t>(lp.g.pairs / lp.g.lq) * tiles;  // N * M * tiles
  if (lp.smem > 48 * 1024) {
    const cudaError_t status = cudaFuncSetAttribute(backward_v2_kernel<T, TL, V>,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    static_cast<int>(lp.smem));
    if (status != cudaSuccess) return status;
  }
  backward_v2_kernel<T, TL, V><<<blocks, lp.threads, lp.smem, stream>>>(value, shapes, starts, loc, attn, grad_out,
                                                                       grad_value, grad_loc, grad_attn, lp.g);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace msda
