// Python bindings and input checks for the MSDA CUDA kernels (msda_cuda.cu, msda_kernels.cuh).
//
// The Python-level op (ops/__init__.py) validates shapes against each other and the values of
// spatial_shapes / level_start_index; here we check what the kernels rely on (device, dtype, rank,
// sizes) and make everything contiguous, so a direct caller cannot crash the kernels.
#include <torch/extension.h>

#include <vector>

#include "msda_error.h"

namespace msda {
at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights, int64_t points);
std::vector<at::Tensor> backward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, const at::Tensor& grad_output);
}  // namespace msda

namespace {

struct Prepared {
  at::Tensor value, shapes, starts, loc, attn;
  at::ScalarType loc_dtype, attn_dtype;  // the caller's dtypes, for the returned gradients
};

Prepared prepare(const at::Tensor& value, const at::Tensor& spatial_shapes,
                 const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                 const at::Tensor& attention_weights) {
  MSDA_CHECK(value.is_cuda(), "ms_deform_attn CUDA: value must be a CUDA tensor, got ", value.device());
  MSDA_CHECK(value.dim() == 4, "ms_deform_attn CUDA: value must be (N, S, M, D), got ", value.sizes());
  MSDA_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn CUDA: sampling_locations must be (N, Lq, M, L, P, 2), got ",
              sampling_locations.sizes());
  MSDA_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn CUDA: attention_weights must be (N, Lq, M, L, P), got ", attention_weights.sizes());
  MSDA_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn CUDA: spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  MSDA_CHECK(level_start_index.dim() == 1, "ms_deform_attn CUDA: level_start_index must be (L,), got ",
              level_start_index.sizes());
  const int64_t n = value.size(0), m = value.size(2), levels = spatial_shapes.size(0);
  const auto& sl = sampling_locations.sizes();
  const auto& aw = attention_weights.sizes();
  MSDA_CHECK(sl[0] == n && sl[2] == m && sl[3] == levels,
              "ms_deform_attn CUDA: sampling_locations ", sl, " does not match value ", value.sizes(),
              " and ", levels, " levels");
  MSDA_CHECK(aw[0] == sl[0] && aw[1] == sl[1] && aw[2] == sl[2] && aw[3] == sl[3] && aw[4] == sl[4],
              "ms_deform_attn CUDA: attention_weights ", aw, " does not match sampling_locations ", sl);
  MSDA_CHECK(level_start_index.size(0) == levels, "ms_deform_attn CUDA: level_start_index has ",
              level_start_index.size(0), " entries for ", levels, " levels");
  MSDA_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn CUDA: spatial_shapes and level_start_index must be int64");

  const auto vt = value.scalar_type();
  MSDA_CHECK(vt == at::kDouble || vt == at::kFloat || vt == at::kHalf || vt == at::kBFloat16,
              "ms_deform_attn CUDA: value must be float64, float32, float16 or bfloat16, got ", vt);
  const auto lt = sampling_locations.scalar_type(), at_ = attention_weights.scalar_type();
  MSDA_CHECK(lt == vt || lt == at::kFloat,
              "ms_deform_attn CUDA: sampling_locations must be ", vt, " or float32, got ", lt);
  MSDA_CHECK(at_ == vt || at_ == at::kFloat,
              "ms_deform_attn CUDA: attention_weights must be ", vt, " or float32, got ", at_);
  for (const at::Tensor* t : {&sampling_locations, &attention_weights}) {
    MSDA_CHECK(t->device() == value.device(), "ms_deform_attn CUDA: all tensors must be on ",
                value.device(), ", got ", t->device());
  }

  Prepared p;
  p.loc_dtype = lt;
  p.attn_dtype = at_;
  // The kernels take one dtype for locations and weights: value's own for float64 / float32 values
  // (float32 locations are upcast exactly), and for half values the shared dtype, or float32 when the
  // caller mixes them.
  const bool wide = vt == at::kDouble || vt == at::kFloat;
  const auto pair_dtype = wide ? vt : ((lt == at_) ? lt : at::kFloat);
  p.value = value.contiguous();
  p.loc = sampling_locations.to(pair_dtype).contiguous();
  p.attn = attention_weights.to(pair_dtype).contiguous();
  p.shapes = spatial_shapes.to(value.device()).contiguous();
  p.starts = level_start_index.to(value.device()).contiguous();
  return p;
}

// points: 0 (every caller but the tests) runs the forward variant compiled for value's dtype
// (msda_launch.h, Tuning); float64 also takes 1 or 2, so tests can check both variants in float64.
at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights, int64_t points) {
  const Prepared p = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  return msda::forward_cuda(p.value, p.shapes, p.starts, p.loc, p.attn, points);
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const Prepared p = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const int64_t n = value.size(0), m = value.size(2), d = value.size(3), lq = sampling_locations.size(1);
  MSDA_CHECK(grad_output.dim() == 3 && grad_output.size(0) == n && grad_output.size(1) == lq &&
                  grad_output.size(2) == m * d,
              "ms_deform_attn CUDA: grad_output must be (", n, ", ", lq, ", ", m * d, "), got ",
              grad_output.sizes());
  MSDA_CHECK(grad_output.device() == value.device(), "ms_deform_attn CUDA: grad_output must be on ",
              value.device(), ", got ", grad_output.device());
  const at::Tensor go = grad_output.to(value.scalar_type()).contiguous();
  auto grads = msda::backward_cuda(p.value, p.shapes, p.starts, p.loc, p.attn, go);
  grads[1] = grads[1].to(p.loc_dtype);
  grads[2] = grads[2].to(p.attn_dtype);
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention CUDA kernels (see ops/csrc/msda_cuda.cu).";
  m.def("forward", &forward,
        "forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points=0) -> "
        "output (N, Lq, M*D); points (tests only): 0 the dtype's own forward, 1 or 2 points per step for "
        "float64",
        pybind11::arg("value"), pybind11::arg("spatial_shapes"), pybind11::arg("level_start_index"),
        pybind11::arg("sampling_locations"), pybind11::arg("attention_weights"), pybind11::arg("points") = 0);
  m.def("backward", &backward,
        "backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, "
        "grad_output) -> [grad_value, grad_sampling_locations, grad_attention_weights]");
}
