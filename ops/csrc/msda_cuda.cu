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

#include "msda_launch.h"

namespace msda {
namespace detail {
namespace {

// Channels per thread: up to 8 (at most 32 bytes: two 16-byte loads per corner for float32, one for
// the half types, four channels for float64), the largest power of two dividing D whose vectors are
// aligned. Fewer threads per (query, head) means fewer redundant bilinear-coordinate computations.
// MSDA_CUDA_MAX_VECTOR (1, 2, 4 or 8) lowers the cap, for benchmarking the alternatives.
int max_vector(int64_t elem) {
  int v = static_cast<int>(std::min<int64_t>(8, 32 / elem));
  if (const char* env = std::getenv("MSDA_CUDA_MAX_VECTOR")) {
    const int cap = std::atoi(env);
    TORCH_CHECK(cap == 1 || cap == 2 || cap == 4 || cap == 8,
                "MSDA_CUDA_MAX_VECTOR must be 1, 2, 4 or 8, got '", env, "'");
    v = std::min(v, cap);
  }
  return v;
}

int pick_vector(const at::Tensor& value, const at::Tensor* grad_out) {
  const int64_t elem = value.element_size();
  const int64_t d = value.size(3);
  int v = max_vector(elem);
  auto aligned = [&](const at::Tensor& t, int width) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % (elem * width) == 0;
  };
  while (v > 1 && (d % v != 0 || !aligned(value, v) || (grad_out && !aligned(*grad_out, v)))) v /= 2;
  return v;
}

Launch plan(const at::Tensor& value, const at::Tensor& loc, int v) {
  Launch lp;
  Geometry& g = lp.g;
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = loc.size(1), levels = loc.size(3), points = loc.size(4);
  TORCH_CHECK(s * m * d < (int64_t(1) << 31) && lq < (int64_t(1) << 31),
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
  while (threads > 32 && table + per_pair * (threads / group) > kSmemBudget) threads /= 2;
  g.stage = table + per_pair * (threads / group) <= kSmemBudget ? 1 : 0;
  TORCH_CHECK(table <= kSmemBudget, "ms_deform_attn CUDA: too many levels (", levels, ")");
  lp.threads = threads;
  lp.smem = g.stage ? table + per_pair * (threads / group) : table;
  return lp;
}

// Backward kernel choice, read at every call: MSDA_CUDA_BWD unset / "v1" (default) or "v2" (opt-in,
// msda_backward_v2.cuh).
int backward_variant() {
  const char* env = std::getenv("MSDA_CUDA_BWD");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "v1") == 0) return 1;
  TORCH_CHECK(std::strcmp(env, "v2") == 0, "MSDA_CUDA_BWD must be 'v1' (the default) or 'v2', got '", env, "'");
  return 2;
}

int env_int(const char* name, int fallback, int lo, int hi) {
  const char* env = std::getenv(name);
  if (env == nullptr || env[0] == '\0') return fallback;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && v >= lo && v <= hi, name, " must be an integer in [", lo, ", ", hi,
              "], got '", env, "'");
  return static_cast<int>(v);
}

// Backward v2 geometry: blocks of one (batch, head) and g.tile queries; the tile is sized for about
// 4 blocks per SM (at most 16 passes of the block over its pairs), MSDA_CUDA_BWD_TILE overrides it.
// Dynamic shared memory: MSDA_CUDA_BWD_SLAB_KB (default 48, no opt-in needed; capped by the device's
// opt-in limit) for the level table plus the slab.
void plan_backward_v2(Launch& lp, const at::Tensor& value) {
  Geometry& g = lp.g;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int ppb = lp.threads / g.group;
  const int64_t nh = g.pairs / g.lq;
  const int64_t target_blocks = 4 * static_cast<int64_t>(prop->multiProcessorCount);
  const int64_t tiles_wanted = std::max<int64_t>(1, (target_blocks + nh - 1) / nh);
  int64_t tile = (g.lq + tiles_wanted - 1) / tiles_wanted;
  tile = std::min<int64_t>(std::max<int64_t>(tile, ppb), 16 * static_cast<int64_t>(ppb));
  tile = env_int("MSDA_CUDA_BWD_TILE", static_cast<int>(tile), 1, 1 << 30);
  tile = std::min<int64_t>(tile, g.lq);  // keeps q_begin + tile in int range
  g.tile = static_cast<int>((tile + ppb - 1) / ppb * ppb);
  g.stage = 0;

  const size_t acc_size = value.scalar_type() == at::kDouble ? 8 : 4;
  const size_t table = v2_table_bytes(g.levels);
  const size_t optin = prop->sharedMemPerBlockOptin;
  const size_t slab_kb = static_cast<size_t>(env_int("MSDA_CUDA_BWD_SLAB_KB", 48, 0, 1 << 20));
  const size_t budget = std::min<size_t>(optin, slab_kb * 1024);
  TORCH_CHECK(table <= optin, "ms_deform_attn CUDA: too many levels (", g.levels, ")");
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
      TORCH_CHECK(false, "ms_deform_attn CUDA: unsupported value dtype ", value_dtype);
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
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t n = value.size(0), m = value.size(2), d = value.size(3), lq = sampling_locations.size(1);
  auto out = at::empty({n, lq, m * d}, value.options());
  if (out.numel() == 0) return out;
  if (value.size(1) == 0) return out.zero_();
  const int v = pick_vector(value, nullptr);
  const Launch lp = plan(value, sampling_locations, v);
  dispatch(value.scalar_type(), sampling_locations.scalar_type(), v,
           ForwardLaunch{lp, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                         out});
  return out;
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard guard(value.device());
  const bool wide = value.scalar_type() == at::kDouble || value.scalar_type() == at::kFloat;
  const auto acc_dtype = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_loc = at::empty_like(sampling_locations);
  auto grad_attn = at::empty_like(attention_weights);
  if (grad_output.numel() > 0 && value.numel() > 0) {
    const int v = pick_vector(value, &grad_output);
    Launch lp = plan(value, sampling_locations, v);
    if (detail::backward_variant() == 2) {
      lp.threads = detail::kBlockThreads;
      detail::plan_backward_v2(lp, value);
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
