// Host side of the MSDA CUDA op: vector width and launch geometry, dtype dispatch, entry points.
// The kernels are in msda_kernels.cuh (design notes there), instantiated in msda_inst_*.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "msda_error.h"
#include "msda_launch.h"

namespace msda {
namespace detail {
namespace {

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

template <typename T>
using AccOf = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

struct ForwardLaunch {
  const Launch& lp;
  const at::Tensor &value, &shapes, &starts, &loc, &attn;
  at::Tensor& out;
  int points;  // K: Tuning<T>::forward_points, or the other variant for float64 (tests)

  template <typename T, typename TL, int V>
  void operator()() const {
    if constexpr (std::is_same<T, double>::value) {
      if (points == 2) return launch<T, TL, V, 2>();
    }
    launch<T, TL, V, Tuning<T>::forward_points>();
  }

  template <typename T, typename TL, int V, int K>
  void launch() const {
    const cudaError_t status = launch_forward<T, TL, V, K>(
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

// Calls f.template operator()<T, TL, V>() for the runtime vector width v (v <= the direction's
// Tuning width, which pick_vector guarantees) and locations dtype. Only these combinations are
// instantiated (msda_inst_*.cu): V up to the Tuning width, and float32 locations besides value's own
// dtype for the half types only.
template <bool Forward, typename T, typename TL, typename F>
void with_vector(int v, F&& f) {
  constexpr int widest = Forward ? Tuning<T>::forward_vector : Tuning<T>::backward_vector;
  if constexpr (widest >= 8) {
    if (v == 8) return f.template operator()<T, TL, 8>();
  }
  if (v == 4) return f.template operator()<T, TL, 4>();
  if (v == 2) return f.template operator()<T, TL, 2>();
  return f.template operator()<T, TL, 1>();
}

template <bool Forward, typename T, typename F>
void with_types(at::ScalarType loc_dtype, int v, F&& f) {
  if constexpr (sizeof(T) <= 2) {
    if (loc_dtype == at::kFloat) return with_vector<Forward, T, float>(v, f);
  }
  with_vector<Forward, T, T>(v, f);
}

template <bool Forward, typename F>
void dispatch(at::ScalarType value_dtype, at::ScalarType loc_dtype, int v, F&& f) {
  switch (value_dtype) {
    case at::kDouble:
      return with_types<Forward, double>(loc_dtype, v, f);
    case at::kFloat:
      return with_types<Forward, float>(loc_dtype, v, f);
    case at::kHalf:
      return with_types<Forward, at::Half>(loc_dtype, v, f);
    case at::kBFloat16:
      return with_types<Forward, at::BFloat16>(loc_dtype, v, f);
    default:
      MSDA_CHECK(false, "ms_deform_attn CUDA: unsupported value dtype ", value_dtype);
  }
}

// The Tuning of value's dtype, read at run time.
struct Widths {
  int forward_vector, backward_vector, forward_points;
};

Widths widths_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return {Tuning<double>::forward_vector, Tuning<double>::backward_vector, Tuning<double>::forward_points};
    case at::kFloat:
      return {Tuning<float>::forward_vector, Tuning<float>::backward_vector, Tuning<float>::forward_points};
    case at::kHalf:
      return {Tuning<at::Half>::forward_vector, Tuning<at::Half>::backward_vector,
              Tuning<at::Half>::forward_points};
    case at::kBFloat16:
      return {Tuning<at::BFloat16>::forward_vector, Tuning<at::BFloat16>::backward_vector,
              Tuning<at::BFloat16>::forward_points};
    default:
      MSDA_CHECK(false, "ms_deform_attn CUDA: unsupported value dtype ", dtype);
  }
  return {1, 1, 1};
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
                        const at::Tensor& attention_weights, int64_t points) {
  const detail::Widths widths = detail::widths_of(value.scalar_type());
  if (points == 0) points = widths.forward_points;
  MSDA_CHECK(points == widths.forward_points || (value.scalar_type() == at::kDouble && points == 2),
             "ms_deform_attn CUDA: forward points per step must be 0 (the dtype's own, ", widths.forward_points,
             "), or 1 or 2 for float64 values, got ", points);
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t n = value.size(0), m = value.size(2), d = value.size(3), lq = sampling_locations.size(1);
  auto out = at::empty({n, lq, m * d}, value.options());
  if (out.numel() == 0) return out;
  if (value.size(1) == 0) return out.zero_();
  const int v = pick_vector(value, nullptr, widths.forward_vector);
  const Launch lp = plan(value, sampling_locations, v, /*head_major=*/points == 2);
  dispatch</*Forward=*/true>(value.scalar_type(), sampling_locations.scalar_type(), v,
                             ForwardLaunch{lp, value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights, out, static_cast<int>(points)});
  return out;
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const detail::Widths widths = detail::widths_of(value.scalar_type());
  const c10::cuda::CUDAGuard guard(value.device());
  const bool wide = value.scalar_type() == at::kDouble || value.scalar_type() == at::kFloat;
  const auto acc_dtype = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_loc = at::empty_like(sampling_locations);
  auto grad_attn = at::empty_like(attention_weights);
  if (grad_output.numel() > 0 && value.numel() > 0) {
    const int v = pick_vector(value, &grad_output, widths.backward_vector);
    const Launch lp = plan(value, sampling_locations, v);
    dispatch</*Forward=*/false>(value.scalar_type(), sampling_locations.scalar_type(), v,
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
