// Multi-scale deformable attention: CUDA forward and backward kernels (instantiated in msda_inst_*.cu,
// dispatched from msda_cuda.cu).
//
// Semantics are those of ops/reference.py: bilinear sampling with zeros outside each map,
// pixel centres at (i + 0.5) / W (grid_sample, align_corners=False), so a normalised x maps to
// the pixel coordinate x * W - 0.5.
//
// Work split. One "pair" is one (batch n, query q, head m); pairs are numbered in the memory order
// of the (N, Lq, M) prefix shared by sampling_locations, attention_weights and the output. Each pair
// is served by a group of G threads (G a power of two <= 32, so a group never straddles a warp);
// every thread owns D / V / G "chunks" of V consecutive channels (usually exactly one), V up to 8
// (32 bytes: two 16-byte loads per corner for float32, one for the half types). The group's threads
// compute the same bilinear coordinates, so fewer, wider threads per pair waste fewer instructions:
// for D = 32 a float32 or bfloat16 group is 4 threads reading one 128- or 64-byte line per corner.
// (The host picks V per direction, at compile time per dtype (msda_launch.h, Tuning): 16 bytes per
// thread in the forward (32 for float64), at most 4 channels in the backward; narrower only when D or
// the pointers' alignment require it.)
//
// Staging. Before the loop over levels and points, a block copies the locations and weights of all
// its pairs (a contiguous range of memory) into shared memory with coalesced loads, converted to
// the accumulation type, so the per-sample chain is shared-memory read -> value gather rather than
// global read -> global gather. The level table (H, W, start) is in shared memory too.
//
// Forward. forward_kernel<T, TL, V, K> has two variants: K = 1 walks each level's points one at a
// time (branchy corner loads) in query-major pair order (float32, float64); K = 2 takes two points at
// a time with branch-free addressing (msda_forward_batched.cuh) in head-major pair order (float16,
// bfloat16). Which dtype uses which is fixed in msda_launch.h (Tuning); float64 compiles both, so
// tests can check each variant against the float64 reference.
//
// Backward. Each thread recomputes its corners, accumulates (a) the gradient of the attention
// weight (grad_out . sampled) and (b) the gradients of the pixel coordinate over its channels, then
// the group reduces (a) and (b) with warp shuffles; lane 0 of the group writes the location and
// weight gradients (each is owned by exactly one group: no atomics, no zero-fill). The value
// gradient is scattered with atomicAdd into a float32 (float64 for float64) buffer, one 16-byte
// vector atomic per 4 channels and corner on sm_90 (float4 / float2 atomicAdd), scalar atomics elsewhere; for
// half types that buffer is cast to the value dtype at the end.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "msda_launch.h"

namespace msda {
namespace detail {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Shared memory: [H, W, start] per level (int), then staged x, y, weight per sample (acc_t).
template <typename TL, typename acc_t>
__device__ inline void load_level_table_and_stage(const int64_t* __restrict__ shapes,
                                                  const int64_t* __restrict__ starts,
                                                  const TL* __restrict__ loc, const TL* __restrict__ attn,
                                                  int* lvl, acc_t* sx, acc_t* sy, acc_t* sw,
                                                  const Geometry& g, int64_t first_pair, int pairs_here) {
  for (int i = threadIdx.x; i < g.levels; i += blockDim.x) {
    lvl[3 * i] = static_cast<int>(shapes[2 * i]);
    lvl[3 * i + 1] = static_cast<int>(shapes[2 * i + 1]);
    lvl[3 * i + 2] = static_cast<int>(starts[i]);
  }
  if (g.stage) {
    const int k = g.levels * g.points;
    const int count = pairs_here * k;
    const int64_t base = first_pair * k;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      sw[i] = static_cast<acc_t>(attn[base + i]);
    }
    // x and y interleave in memory: read them as consecutive scalars (coalesced over the block)
    for (int i = threadIdx.x; i < 2 * count; i += blockDim.x) {
      const acc_t v = static_cast<acc_t>(loc[2 * base + i]);
      if (i & 1) {
        sy[i >> 1] = v;
      } else {
        sx[i >> 1] = v;
      }
    }
  }
  __syncthreads();
}

// Head-major forward order (the K = 2 forward): the s-th pair of the schedule is
// (batch n, head m, query q) with q fastest, so the blocks resident at a time read one head's slice
// of each value row; returns its index in the memory order (n, q, m) of locations and output.
__device__ __forceinline__ int64_t memory_pair_of_head_major(int64_t s, const Geometry& g) {
  const int64_t per_batch = static_cast<int64_t>(g.lq) * g.m;
  const int64_t n = s / per_batch;
  const int64_t rem = s - n * per_batch;
  const int64_t head = rem / g.lq;
  const int64_t q = rem - head * g.lq;
  return (n * g.lq + q) * g.m + head;
}

template <typename TL, typename acc_t>
__device__ inline void fetch_sample(const TL* __restrict__ loc, const TL* __restrict__ attn,
                                    const acc_t* sx, const acc_t* sy, const acc_t* sw, const Geometry& g,
                                    int64_t pair, int local_pair, int k, acc_t& x, acc_t& y, acc_t& w) {
  const int kk = g.levels * g.points;
  if (g.stage) {
    const int i = local_pair * kk + k;
    x = sx[i];
    y = sy[i];
    w = sw[i];
  } else {
    const int64_t i = pair * kk + k;
    x = static_cast<acc_t>(loc[2 * i]);
    y = static_cast<acc_t>(loc[2 * i + 1]);
    w = static_cast<acc_t>(attn[i]);
  }
}

template <typename T, int V, typename acc_t>
__device__ inline void load_pack(const T* __restrict__ p, acc_t (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = static_cast<acc_t>(pk.v[j]);
}

template <typename T, int V, typename acc_t>
__device__ inline void add_pack(const T* __restrict__ p, acc_t weight, acc_t (&acc)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] += weight * static_cast<acc_t>(pk.v[j]);
}

template <int V, typename acc_t>
__device__ inline void atomic_add_pack(acc_t* dst, acc_t weight, const acc_t (&go)[V]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same<acc_t, float>::value && V % 4 == 0) {
#pragma unroll
    for (int j = 0; j < V; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + j),
                make_float4(weight * go[j], weight * go[j + 1], weight * go[j + 2], weight * go[j + 3]));
    }
  } else if constexpr (std::is_same<acc_t, float>::value && V % 2 == 0) {
#pragma unroll
    for (int j = 0; j < V; j += 2) {
      atomicAdd(reinterpret_cast<float2*>(dst + j), make_float2(weight * go[j], weight * go[j + 1]));
    }
  } else
#endif
  {
#pragma unroll
    for (int j = 0; j < V; ++j) atomicAdd(dst + j, weight * go[j]);
  }
}

template <typename acc_t>
__device__ inline acc_t group_sum(acc_t v, int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// One sampling point's bilinear footprint inside a level: corner offsets into value (relative to the
// head's base pointer), which corners lie on the map, the fractions and the corner weights; the
// caller has already rejected points entirely off the map.
template <typename acc_t>
struct Corners {
  int64_t o00, o01, o10, o11;
  acc_t fx, fy, w00, w01, w10, w11;
  bool tl, tr, bl, br;
};

template <typename acc_t>
__device__ __forceinline__ Corners<acc_t> bilinear_corners(acc_t px, acc_t py, int h, int w,
                                                           int64_t level_off, int md) {
  Corners<acc_t> q;
  const acc_t fx0 = floor(px), fy0 = floor(py);
  const int x0 = static_cast<int>(fx0), y0 = static_cast<int>(fy0);
  q.fx = px - fx0;
  q.fy = py - fy0;
  const bool xl = x0 >= 0, xr = x0 + 1 < w, yt = y0 >= 0, yb = y0 + 1 < h;
  q.tl = yt && xl;
  q.tr = yt && xr;
  q.bl = yb && xl;
  q.br = yb && xr;
  q.o00 = level_off + static_cast<int64_t>(y0 * w + x0) * md;
  q.o01 = q.o00 + md;
  q.o10 = q.o00 + static_cast<int64_t>(w) * md;
  q.o11 = q.o10 + md;
  q.w00 = (1 - q.fx) * (1 - q.fy);
  q.w01 = q.fx * (1 - q.fy);
  q.w10 = (1 - q.fx) * q.fy;
  q.w11 = q.fx * q.fy;
  return q;
}

// Gathers the four corners of one V-channel chunk and accumulates, over those channels, the
// attention-weight gradient (gw) and the pixel-coordinate gradients (gx, gy) of one point.
template <typename T, int V, typename acc_t>
__device__ __forceinline__ void accumulate_point_grads(const T* __restrict__ vbase, int co,
                                                       const Corners<acc_t>& q, const acc_t (&go)[V],
                                                       acc_t& gw, acc_t& gx, acc_t& gy) {
  acc_t v00[V], v01[V], v10[V], v11[V];
#pragma unroll
  for (int j = 0; j < V; ++j) v00[j] = v01[j] = v10[j] = v11[j] = acc_t(0);
  if (q.tl) load_pack<T, V, acc_t>(vbase + q.o00 + co, v00);
  if (q.tr) load_pack<T, V, acc_t>(vbase + q.o01 + co, v01);
  if (q.bl) load_pack<T, V, acc_t>(vbase + q.o10 + co, v10);
  if (q.br) load_pack<T, V, acc_t>(vbase + q.o11 + co, v11);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    gw += go[j] * (q.w00 * v00[j] + q.w01 * v01[j] + q.w10 * v10[j] + q.w11 * v11[j]);
    gx += go[j] * ((1 - q.fy) * (v01[j] - v00[j]) + q.fy * (v11[j] - v10[j]));
    gy += go[j] * ((1 - q.fx) * (v10[j] - v00[j]) + q.fx * (v11[j] - v01[j]));
  }
}

// The common start of both forward kernels: stage the level table (and the block's locations and
// weights), then locate this thread's pair. `active` is false for the threads of a partial last
// block, which may return at once (the forward has no group-wide collectives after staging).
template <typename T, typename acc_t>
struct ForwardThread {
  const int* lvl;
  const acc_t *sx, *sy, *sw;
  int64_t pair;    // in memory order (n, q, m)
  int local_pair;  // within the block (staging index)
  int lane;        // within the pair's group
  const T* vbase;  // value of this pair's batch element and head
  bool active;
};

template <typename T, typename TL>
__device__ inline ForwardThread<T, typename Acc<T>::type> forward_thread(
    const T* __restrict__ value, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
    const TL* __restrict__ loc, const TL* __restrict__ attn, const Geometry& g) {
  using acc_t = typename Acc<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  ForwardThread<T, acc_t> t;
  const int pairs_per_block = blockDim.x / g.group;
  const int kk = g.levels * g.points;
  int* lvl = reinterpret_cast<int*>(smem);
  acc_t* sx = reinterpret_cast<acc_t*>(smem + align16(sizeof(int) * 3 * g.levels));
  acc_t* sy = sx + pairs_per_block * kk;
  acc_t* sw = sy + pairs_per_block * kk;
  const int64_t first_pair = static_cast<int64_t>(blockIdx.x) * pairs_per_block;
  const int64_t left = g.pairs - first_pair;
  const int pairs_here = left < pairs_per_block ? static_cast<int>(left) : pairs_per_block;
  load_level_table_and_stage<TL, acc_t>(shapes, starts, loc, attn, lvl, sx, sy, sw, g, first_pair,
                                        pairs_here);
  t.lvl = lvl;
  t.sx = sx;
  t.sy = sy;
  t.sw = sw;
  t.local_pair = threadIdx.x / g.group;
  t.lane = threadIdx.x % g.group;
  t.active = t.local_pair < pairs_here;
  t.pair = g.head_major ? memory_pair_of_head_major(first_pair + t.local_pair, g) : first_pair + t.local_pair;
  const int64_t n = t.pair / (static_cast<int64_t>(g.lq) * g.m);
  const int head = static_cast<int>(t.pair % g.m);
  t.vbase = value + n * g.value_batch + static_cast<int64_t>(head) * g.d;
  return t;
}

// One level's points, one at a time (the default forward for float32 / float64): each corner load
// behind its own bounds branch, off-map points skipped.
template <typename T, typename TL, int V, typename acc_t>
__device__ __forceinline__ void accumulate_level(const T* __restrict__ vl, int h, int w, int md, int l,
                                                 const TL* __restrict__ loc, const TL* __restrict__ attn,
                                                 const ForwardThread<T, acc_t>& t, const Geometry& g,
                                                 acc_t (&acc)[V]) {
#pragma unroll 4
  for (int p = 0; p < g.points; ++p) {
    acc_t x, y, aw;
    fetch_sample<TL, acc_t>(loc, attn, t.sx, t.sy, t.sw, g, t.pair, t.local_pair, l * g.points + p, x, y, aw);
    const acc_t px = x * w - acc_t(0.5);
    const acc_t py = y * h - acc_t(0.5);
    // also rejects NaN and keeps the int conversion below in range
    if (!(px >= acc_t(-1) && py >= acc_t(-1) && px < acc_t(w) && py < acc_t(h))) continue;
    const acc_t fx0 = floor(px), fy0 = floor(py);
    const int x0 = static_cast<int>(fx0), y0 = static_cast<int>(fy0);
    const acc_t fx = px - fx0, fy = py - fy0;
    const bool xl = x0 >= 0, xr = x0 + 1 < w, yt = y0 >= 0, yb = y0 + 1 < h;
    const int row0 = y0 * w, row1 = row0 + w;
    if (yt && xl) add_pack<T, V, acc_t>(vl + static_cast<int64_t>(row0 + x0) * md, aw * (1 - fx) * (1 - fy), acc);
    if (yt && xr) add_pack<T, V, acc_t>(vl + static_cast<int64_t>(row0 + x0 + 1) * md, aw * fx * (1 - fy), acc);
    if (yb && xl) add_pack<T, V, acc_t>(vl + static_cast<int64_t>(row1 + x0) * md, aw * (1 - fx) * fy, acc);
    if (yb && xr) add_pack<T, V, acc_t>(vl + static_cast<int64_t>(row1 + x0 + 1) * md, aw * fx * fy, acc);
  }
}

}  // namespace detail
}  // namespace msda

#include "msda_forward_batched.cuh"  // accumulate_level_batched: K points at a time

namespace msda {
namespace detail {

// K = 1: accumulate_level; K = 2: accumulate_level_batched (msda_forward_batched.cuh).
template <typename T, typename TL, int V, int K>
__global__ void __launch_bounds__(kBlockThreads)
    forward_kernel(const T* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const TL* __restrict__ loc,
                   const TL* __restrict__ attn, T* __restrict__ out, const Geometry g) {
  using acc_t = typename Acc<T>::type;
  const ForwardThread<T, acc_t> t = forward_thread<T, TL>(value, shapes, starts, loc, attn, g);
  if (!t.active) return;
  const int md = g.m * g.d;
  for (int c = t.lane; c < g.chunks; c += g.group) {
    acc_t acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = acc_t(0);
    const T* vchunk = t.vbase + c * V;
    for (int l = 0; l < g.levels; ++l) {
      const int h = t.lvl[3 * l], w = t.lvl[3 * l + 1];
      const T* vl = vchunk + static_cast<int64_t>(t.lvl[3 * l + 2]) * md;
      if constexpr (K == 1) {
        accumulate_level<T, TL, V, acc_t>(vl, h, w, md, l, loc, attn, t, g, acc);
      } else {
        accumulate_level_batched<T, TL, V, K, acc_t>(vl, h, w, md, l, loc, attn, t, g, acc);
      }
    }
    Pack<T, V> pk;
#pragma unroll
    for (int j = 0; j < V; ++j) pk.v[j] = static_cast<T>(acc[j]);
    *reinterpret_cast<Pack<T, V>*>(out + t.pair * g.d + c * V) = pk;
  }
}

template <typename T, typename TL, int V>
__global__ void __launch_bounds__(kBlockThreads)
    backward_kernel(const T* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, const TL* __restrict__ loc,
                    const TL* __restrict__ attn, const T* __restrict__ grad_out,
                    typename Acc<T>::type* __restrict__ grad_value, TL* __restrict__ grad_loc,
                    TL* __restrict__ grad_attn, const Geometry g) {
  using acc_t = typename Acc<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  const int pairs_per_block = blockDim.x / g.group;
  const int kk = g.levels * g.points;
  int* lvl = reinterpret_cast<int*>(smem);
  acc_t* sx = reinterpret_cast<acc_t*>(smem + align16(sizeof(int) * 3 * g.levels));
  acc_t* sy = sx + pairs_per_block * kk;
  acc_t* sw = sy + pairs_per_block * kk;

  const int64_t first_pair = static_cast<int64_t>(blockIdx.x) * pairs_per_block;
  const int64_t left = g.pairs - first_pair;
  const int pairs_here = left < pairs_per_block ? static_cast<int>(left) : pairs_per_block;
  load_level_table_and_stage<TL, acc_t>(shapes, starts, loc, attn, lvl, sx, sy, sw, g, first_pair,
                                        pairs_here);

  const int local_pair = threadIdx.x / g.group;
  const int lane = threadIdx.x % g.group;
  const int64_t pair = first_pair + local_pair;
  // Threads of absent pairs stay in the loops (with no memory traffic) because every lane of a
  // warp takes part in the group shuffles.
  const bool active = local_pair < pairs_here;

  const int md = g.m * g.d;
  const int64_t n = active ? pair / (static_cast<int64_t>(g.lq) * g.m) : 0;
  const int head = active ? static_cast<int>(pair % g.m) : 0;
  const int64_t vbase_off = n * g.value_batch + static_cast<int64_t>(head) * g.d;
  const T* vbase = value + vbase_off;
  acc_t* gvbase = grad_value + vbase_off;
  const T* gobase = grad_out + (active ? pair : 0) * g.d;
  // the usual case: at most one channel vector per thread, so its grad_out stays in registers
  const bool one_chunk = g.chunks <= g.group;
  acc_t go_own[V];
#pragma unroll
  for (int j = 0; j < V; ++j) go_own[j] = acc_t(0);
  if (active && one_chunk && lane < g.chunks) load_pack<T, V, acc_t>(gobase + lane * V, go_own);

  for (int l = 0; l < g.levels; ++l) {
    const int h = lvl[3 * l], w = lvl[3 * l + 1];
    const int64_t level_off = static_cast<int64_t>(lvl[3 * l + 2]) * md;
    for (int p = 0; p < g.points; ++p) {
      const int k = l * g.points + p;
      acc_t gx = 0, gy = 0, gw = 0, aw = 0;
      if (active) {
        acc_t x, y;
        fetch_sample<TL, acc_t>(loc, attn, sx, sy, sw, g, pair, local_pair, k, x, y, aw);
        const acc_t px = x * w - acc_t(0.5);
        const acc_t py = y * h - acc_t(0.5);
        if (px >= acc_t(-1) && py >= acc_t(-1) && px < acc_t(w) && py < acc_t(h)) {
          const Corners<acc_t> q = bilinear_corners<acc_t>(px, py, h, w, level_off, md);
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
            if (q.tl) atomic_add_pack<V, acc_t>(gvbase + q.o00 + co, aw * q.w00, go);
            if (q.tr) atomic_add_pack<V, acc_t>(gvbase + q.o01 + co, aw * q.w01, go);
            if (q.bl) atomic_add_pack<V, acc_t>(gvbase + q.o10 + co, aw * q.w10, go);
            if (q.br) atomic_add_pack<V, acc_t>(gvbase + q.o11 + co, aw * q.w11, go);
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

}  // namespace detail
}  // namespace msda

namespace msda {
namespace detail {

template <typename T, typename TL, int V, int K>
cudaError_t launch_forward(const Launch& lp, const T* value, const int64_t* shapes, const int64_t* starts,
                           const TL* loc, const TL* attn, T* out, cudaStream_t stream) {
  static_assert(K == 1 || K == 2, "the forward takes one or two points at a time");
  const int pairs_per_block = lp.threads / lp.g.group;
  const int64_t blocks = (lp.g.pairs + pairs_per_block - 1) / pairs_per_block;
  forward_kernel<T, TL, V, K><<<blocks, lp.threads, lp.smem, stream>>>(value, shapes, starts, loc, attn, out, lp.g);
  return cudaGetLastError();
}

template <typename T, typename TL, int V, typename AccT>
cudaError_t launch_backward(const Launch& lp, const T* value, const int64_t* shapes, const int64_t* starts,
                            const TL* loc, const TL* attn, const T* grad_out, AccT* grad_value, TL* grad_loc,
                            TL* grad_attn, cudaStream_t stream) {
  static_assert(std::is_same<AccT, typename Acc<T>::type>::value, "grad_value must be the accumulation type");
  const int pairs_per_block = lp.threads / lp.g.group;
  const int64_t blocks = (lp.g.pairs + pairs_per_block - 1) / pairs_per_block;
  backward_kernel<T, TL, V><<<blocks, lp.threads, lp.smem, stream>>>(value, shapes, starts, loc, attn, grad_out,
                                                                    grad_value, grad_loc, grad_attn, lp.g);
  return cudaGetLastError();
}

// Explicit instantiations of the launchers: the forward for one (T, TL, V, K), the backward for one
// (T, TL, V). The msda_inst_*.cu files list exactly the combinations msda_cuda.cu can dispatch to.
#define MSDA_INSTANTIATE_FORWARD(T, TL, V, K)                                                             \
  template cudaError_t launch_forward<T, TL, V, K>(const Launch&, const T*, const int64_t*, const int64_t*, \
                                                   const TL*, const TL*, T*, cudaStream_t);

#define MSDA_INSTANTIATE_BACKWARD(T, TL, V)                                                               \
  template cudaError_t launch_backward<T, TL, V, typename Acc<T>::type>(                                   \
      const Launch&, const T*, const int64_t*, const int64_t*, const TL*, const TL*, const T*,             \
      typename Acc<T>::type*, TL*, TL*, cudaStream_t);

}  // namespace detail
}  // namespace msda
