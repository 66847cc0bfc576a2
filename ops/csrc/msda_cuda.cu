// Host side of the MSDA CUDA op: vector width and launch geometry, dtype dispatch, entry points.
// The kernels are in msda_kernels.cuh (design notes there), instantiated in msda_inst_*.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "msda_error.h"
#include "msda_launch.h"

namespace msda {
namespace detail {
namespace {

// Kernel switches, all read from the environment once at the entry of each call (before any
// allocation or launch), so a bad value fails early with a message naming the variable.
//   MSDA_CUDA_FWD_VECTOR / MSDA_CUDA_BWD_VECTOR (1, 2, 4 or 8): channels per thread in the forward /
//     backward; MSDA_CUDA_MAX_VECTOR (same values) caps both, for tests and benchmarks.
//   MSDA_CUDA_FWD_ORDER ("query", "head"): the forward's pair order; MSDA_CUDA_FWD_BATCH (1, 2, 4):
//     points whose corner loads a forward thread issues together (msda_forward_batched.cuh). Defaults
//     per dtype in read_options.
//   MSDA_CUDA_BWD ("v1" default, "v2"), MSDA_CUDA_BWD_TILE, MSDA_CUDA_BWD_SLAB_KB: backward v2.
int env_int(const char* name, int fallback, int lo, int hi) {
  const char* env = std::getenv(name);
  if (env == nullptr || env[0] == '\0') return fallback;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  MSDA_CHECK(end != env && *end == '\0' && v >= lo && v <= hi, name, " must be an integer in [", lo, ", ", hi,
              "], got '", env, "'");
  return static_cast<int>(v);
}

int env_vector(const char* name, int fallback) {
  const int v = env_int(name, fallback, 1, 8);
  MSDA_CHECK(v == 1 || v == 2 || v == 4 || v == 8, name, " must be 1, 2, 4 or 8, got ", v);
  return v;
}

// A two-valued switch: false when unset, empty or `fallback`, true when `alternative`, else an error.
bool env_choice(const char* name, const char* fallback, const char* alternative) {
  const char* env = std::getenv(name);
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, fallback) == 0) return false;
  MSDA_CHECK(std::strcmp(env, alternative) == 0, name, " must be '", fallback, "' (the default) or '", alternative,
             "', got '", env, "'");
  return true;
}

// A switch between two named settings: `fallback_second` when unset or empty, else true for `second`
// and false for `first`; anything else is an error.
bool env_either(const char* name, const char* first, const char* second, bool fallback_second) {
  const char* env = std::getenv(name);
  if (env == nullptr || env[0] == '\0') return fallback_second;
  if (std::strcmp(env, first) == 0) return false;
  MSDA_CHECK(std::strcmp(env, second) == 0, name, " must be '", first, "' or '", second, "', got '", env, "'");
  return true;
}

struct Options {
  bool forward_head_major = false;
  int forward_batch = 1;
  int forward_vector = 8;
  int backward_vector = 4;
  int backward_variant = 1;
  int tile = 0;  // 0: automatic
  int slab_kb = 48;
};

// Default widths, measured on an H200 at the DINO encoder shape (docs/benchmarks.md, 2026-11-26):
// the forward is fastest with one 16-byte load per corner (float32 4 channels, half types 8; float64
// 4, i.e. 32 bytes); the backward with at most 4 channels per thread for every dtype (one 16-byte
// float32 vector atomic per corner; 8 float32 channels per thread made the encoder backward ~1.7x
// slower: twice the registers per thread and half the threads in flight to hide atomic latency).
// For float16 / bfloat16 the forward walks head-major with 2 points' loads in flight per thread
// (encoder shape, H200, 2026-11-26 12:57 UTC: bfloat16 1.060 ms vs 1.424 ms in query order with
// one point at a time); for float32 / float64 both switches measured slower (1.51 / 1.48 / 1.59 ms
// vs 1.42 ms), so they keep query order and one point.
Options read_options(int64_t elem) {
  Options o;
  const int fwd_default = elem == 8 ? 4 : static_cast<int>(std::min<int64_t>(8, 16 / elem));
  const int cap = env_vector("MSDA_CUDA_MAX_VECTOR", 8);
  o.forward_vector = std::min(cap, env_vector("MSDA_CUDA_FWD_VECTOR", fwd_default));
  o.backward_vector = std::min(cap, env_vector("MSDA_CUDA_BWD_VECTOR", 4));
  const bool half = elem == 2;
  o.forward_head_major = env_either("MSDA_CUDA_FWD_ORDER", "query", "head", half);
  o.forward_batch = env_int("MSDA_CUDA_FWD_BATCH", half ? 2 : 1, 1, 4);
  MSDA_CHECK(o.forward_batch != 3, "MSDA_CUDA_FWD_BATCH must be 1, 2 or 4, got 3");
  o.backward_variant = env_choice("MSDA_CUDA_BWD", "v1", "v2") ? 2 : 1;
  o.tile = env_int("MSDA_CUDA_BWD_TILE", 0, 0, 1 << 30);
  o.slab_kb = env_int("MSDA_CUDA_BWD_SLAB_KB", 48, 0, 1 << 20);
  return o;
}

// Channels per thread: the largest power of two <= the cap that divides D and keeps the vectors
// aligned. Fewer threads per (query, head) means fewer redundant bilinear-coordinate computations,
// more channels per thread more registers.
int pick_vector(const at::Tensor& value, const at::Tensor* grad_out, int cap) {
  const int64_t elem = value.element_size();
  const int64_t d = value.size(3);
  int v = static_cast<int>(std::min<int64_t>(cap, 32 / elem));
  auto aligned = [&](const at::Tensor& t, int width) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % (elem * width) == 0;
  };
  while (v > 1 && (d % v != 0 || !aligned(value, v) || (grad_out && !aligned(*grad_out, v)))) v /= 2;
  return v;
}

// head_major (forward only): a block's pairs are M apart in memory, so nothing is staged.
Launch plan(const at::Tensor& value, const at::Tensor& loc, int v, bool head_major = false) {
  Launch lp;
  Geometry& g = lp.g;
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = loc.size(1), levels = loc.size(3), points = loc.size(4);
  MSDA_CHECK(s * m * d < (int64_t(1) << 31) && lq < (int64_t(1) << 31),
              "ms_deform_attn CUDA: value of shape ", value.sizes(), " is too large for one call");
  g.pairs = n * lq * m;
  g.value_batch = s * m * d;
  g.lq = static_cast<int>(lq);
  g.m = static_cast<int>(m);
  g.d = static_cast<int>(d);
  g.levels = static_cast<int>(levels);
  g.points = static_cast<int>(points);
  g.chunks = static_cast<int>(d / v);
  g.tile = 0;  // backward v2 only
  g.slab_capacity = 0;
  int group = 1;
  while (group < g.chunks && group < 32) group *= 2;
  g.group = group;

  const size_t acc_size = value.scalar_type() == at::kDouble ? 8 : 4;
  const size_t table = align16(sizeof(int) * 3 * levels);
  const size_t per_pair = 3 * acc_size * levels * points;
  int threads = kBlockThreads;
  while (!head_major && threads > 32 && table + per_pair * (threads / group) > kSmemBudget) threads /= 2;
  g.head_major = head_major ? 1 : 0;
  g.stage = !head_major && table + per_pair * (threads / group) <= kSmemBudget ? 1 : 0;
  MSDA_CHECK(table <= kSmemBudget, "ms_deform_attn CUDA: too many levels (", levels, ")");
  lp.threads = threads;
  lp.smem = g.stage ? table + per_pair * (threads / group) : table;
  return lp;
}

// Backward v2 geometry: blocks of one (batch, head) and g.tile queries; the tile is sized for about
// 4 blocks per SM (at most 16 passes of the block over its pairs), MSDA_CUDA_BWD_TILE overrides it.
// Dynamic shared memory: MSDA_CUDA_BWD_SLAB_KB (default 48, no opt-in needed; capped by the device's
// opt-in limit) for the level table plus the slab.
void plan_backward_v2(Launch& lp, const at::Tensor& value, const Options& opt) {
  Geometry& g = lp.g;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int ppb = lp.threads / g.group;
  const int64_t nh = g.pairs / g.lq;
  const int64_t target_blocks = 4 * static_cast<int64_t>(prop->multiProcessorCount);
  const int64_t tiles_wanted = std::max<int64_t>(1, (target_blocks + nh - 1) / nh);
  int64_t tile = (g.lq + tiles_wanted - 1) / tiles_wanted;
  tile = std::min<int64_t>(std::max<int64_t>(tile, ppb), 16 * static_cast<int64_t>(ppb));
  if (opt.tile > 0) tile = opt.tile;
  tile = std::min<int64_t>(tile, g.lq);  // keeps q_begin + tile in int range
  g.tile = static_cast<int>((tile + ppb - 1) / ppb * ppb);
  g.stage = 0;

  const size_t acc_size = value.scalar_type() == at::kDouble ? 8 : 4;
  const size_t table = v2_table_bytes(g.levels);
  const size_t optin = prop->sharedMemPerBlockOptin;
  const size_t slab_kb = static_cast<size_t>(opt.slab_kb);
  const size_t budget = std::min<size_t>(optin, slab_kb * 1024);
  MSDA_CHECK(table <= optin, "ms_deform_attn CUDA: too many levels (", g.levels, ")");
  const size_t slab_bytes = budget > table ? (budget - table) / acc_size * acc_size : 0;
  g.slab_capacity = static_cast<int64_t>(slab_bytes / acc_size);
  lp.smem = table + slab_bytes;
  lp.variant = 2;
}

template <typename T>
using AccOf = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

struct ForwardLaunch {
  const Launch& lp;
  const at::Tensor &value, &shapes, &starts, &loc, &attn;
  at::Tensor& out;

  template <typename T, typename TL, int V>
  void operator()() const {
    const cudaError_t status = launch_forward<T, TL, V>(
        lp, value.data_ptr<T>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<TL>(),
        attn.data_ptr<TL>(), out.data_ptr<T>(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_CHECK(status);
  }
};

struct BackwardLaunch {
  const Launch& lp;
  const at::Tensor &value, &shapes, &starts, &loc, &attn, &grad_out;
  at::Tensor &grad_value, &grad_loc, &grad_attn;

  template <typename T, typename TL, int V>
  void operator()() const {
    const cudaError_t status = launch_backward<T, TL, V, AccOf<T>>(
        lp, value.data_ptr<T>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<TL>(),
        attn.data_ptr<TL>(), grad_out.data_ptr<T>(), grad_value.data_ptr<AccOf<T>>(), grad_loc.data_ptr<TL>(),
        grad_attn.data_ptr<TL>(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_CHECK(status);
  }
};

// Calls f.template operator()<T, TL, V>() for the runtime vector width v and locations dtype.
// Only meaningful combinations are instantiated: 8 channels and 32 bytes at most, and float32 locations
// besides value's own dtype for the half types only.
template <typename T, typename TL, typename F>
void with_vector(int v, F&& f) {
  if constexpr (sizeof(T) <= 4) {
    if (v == 8) return f.template operator()<T, TL, 8>();
  }
  if (v == 4) return f.template operator()<T, TL, 4>();
  if (v == 2) return f.template operator()<T, TL, 2>();
  return f.template operator()<T, TL, 1>();
}

template <typename T, typename F>
void with_types(at::ScalarType loc_dtype, int v, F&& f) {
  if constexpr (sizeof(T) <= 2) {
    if (loc_dtype == at::kFloat) return with_vector<T, float>(v, f);
  }
  with_vector<T, T>(v, f);
}

template <typename F>
void dispatch(at::ScalarType value_dtype, at::ScalarType loc_dtype, int v, F&& f) {
  switch (value_dtype) {
    case at::kDouble:
      return with_types<double>(loc_dtype, v, f);
    case at::kFloat:
      return with_types<float>(loc_dtype, v, f);
    case at::kHalf:
      return with_types<at::Half>(loc_dtype, v, f);
    case at::kBFloat16:
      return with_types<at::BFloat16>(loc_dtype, v, f);
    default:
      MSDA_CHECK(false, "ms_deform_attn CUDA: unsupported value dtype ", value_dtype);
  }
}

}  // namespace
}  // namespace detail

using detail::BackwardLaunch;
using detail::ForwardLaunch;
using detail::Launch;
using detail::dispatch;
using detail::pick_vector;
using detail::plan;

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  const detail::Options opt = detail::read_options(value.element_size());
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t n = value.size(0), m = value.size(2), d = value.size(3), lq = sampling_locations.size(1);
  auto out = at::empty({n, lq, m * d}, value.options());
  if (out.numel() == 0) return out;
  if (value.size(1) == 0) return out.zero_();
  const int v = pick_vector(value, nullptr, opt.forward_vector);
  Launch lp = plan(value, sampling_locations, v, opt.forward_head_major);
  lp.g.forward_batch = opt.forward_batch;
  dispatch(value.scalar_type(), sampling_locations.scalar_type(), v,
           ForwardLaunch{lp, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                         out});
  return out;
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const detail::Options opt = detail::read_options(value.element_size());
  const c10::cuda::CUDAGuard guard(value.device());
  const bool wide = value.scalar_type() == at::kDouble || value.scalar_type() == at::kFloat;
  const auto acc_dtype = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_loc = at::empty_like(sampling_locations);
  auto grad_attn = at::empty_like(attention_weights);
  if (grad_output.numel() > 0 && value.numel() > 0) {
    const int v = pick_vector(value, &grad_output, opt.backward_vector);
    Launch lp = plan(value, sampling_locations, v);
    if (opt.backward_variant == 2) {
      lp.threads = detail::kBlockThreads;
      detail::plan_backward_v2(lp, value, opt);
    }
    dispatch(value.scalar_type(), sampling_locations.scalar_type(), v,
             BackwardLaunch{lp, value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, grad_output, grad_value, grad_loc, grad_attn});
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  if (!wide) grad_value = grad_value.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace msda
