// Shared between the dispatcher (msda_cuda.cu) and the kernel instantiation units (msda_inst_*.cu):
// the launch geometry and the declarations of the per-(dtype, locations dtype, vector width)
// launchers, which are explicitly instantiated in separate files so that ninja compiles them in
// parallel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace msda {
namespace detail {

constexpr int kBlockThreads = 256;
constexpr int kSmemBudget = 48 * 1024;

struct Geometry {
  int64_t pairs;       // N * Lq * M
  int64_t value_batch;  // S * M * D: stride of one batch element of value
  int lq, m, d;        // queries, heads, channels per head
  int levels, points;  // L, P
  int group;           // G threads per pair (power of two <= 32)
  int chunks;          // D / V
  int stage;           // 1: locations/weights staged in shared memory
  int head_major = 0;  // forward only: blocks walk (batch, head, query), query fastest (no staging)
  int forward_batch = 1;  // forward only: points per thread whose loads are issued together (1, 2, 4)
  // backward v2 only (msda_backward_v2.cuh)
  int tile;                // queries per block
  int64_t slab_capacity;   // shared-memory slab size in accumulation-type elements
};

__host__ __device__ inline size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// Backward v2 shared memory: a level table of 4 ints per level plus one int, then the slab.
__host__ __device__ inline size_t v2_table_bytes(int levels) { return align16(sizeof(int) * (4 * levels + 1)); }

struct Launch {
  Geometry g;
  int threads;
  size_t smem;
  int variant = 1;  // backward kernel: 1 (default) or 2 (MSDA_CUDA_BWD=v2)
};

// The launchers take raw pointers (no ATen headers in the kernel translation units: they compile
// much faster) and return the launch status for the caller to check.
// value (N, S, M, D) of dtype T; locations / weights of dtype TL; V channels per vector.
template <typename T, typename TL, int V>
cudaError_t launch_forward(const Launch& lp, const T* value, const int64_t* shapes, const int64_t* starts,
                           const TL* loc, const TL* attn, T* out, cudaStream_t stream);

// grad_value (float32, float64 for double) must be zero-filled; grad_loc / grad_attn have dtype TL.
template <typename T, typename TL, int V, typename Acc>
cudaError_t launch_backward(const Launch& lp, const T* value, const int64_t* shapes, const int64_t* starts,
                            const TL* loc, const TL* attn, const T* grad_out, Acc* grad_value, TL* grad_loc,
                            TL* grad_attn, cudaStream_t stream);

}  // namespace detail
}  // namespace msda
