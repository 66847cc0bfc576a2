// Shared between the dispatcher (msda_cuda.cu) and the kernel instantiation units (msda_inst_*.cu):
// the launch geometry, the per-dtype kernel choices, and the declarations of the launchers, which
// are explicitly instantiated in separate files so that ninja compiles them in parallel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace msda {
namespace detail {

constexpr int kBlockThreads = 256;
constexpr int kSmemBudget = 48 * 1024;

// Kernel choices per value dtype T, fixed at compile time. Measured on an H200 at the DINO encoder
// shape (docs/benchmarks.md):
//   - forward vector: one 16-byte load per corner (float32 4 channels, half types 8), float64 4
//     channels (32 bytes);
//   - backward vector: at most 4 channels per thread for every dtype (one 16-byte float32 vector
//     atomic per corner; 8 channels per thread made the encoder backward ~1.7x slower: twice the
//     registers, half the threads in flight to hide atomic latency);
//   - forward points per step (K): float16 / bfloat16 walk head-major with 2 points' loads in flight
//     per thread (bfloat16 encoder forward 1.06 ms vs 1.42 ms in query order one point at a time);
//     float32 / float64 keep query order and one point (head-major or batched measured 1.48-1.59 ms
//     vs 1.42 ms in float32).
// Narrower vectors are still compiled: the host drops the width when D or the pointers' alignment
// require it.
template <typename T>
struct Tuning {
  static constexpr int forward_vector = sizeof(T) >= 4 ? 4 : 8;
  static constexpr int backward_vector = 4;
  static constexpr int forward_points = sizeof(T) == 2 ? 2 : 1;
};

struct Geometry {
  int64_t pairs;       // N * Lq * M
  int64_t value_batch;  // S * M * D: stride of one batch element of value
  int lq, m, d;        // queries, heads, channels per head
  int levels, points;  // L, P
  int group;           // G threads per pair (power of two <= 32)
  int chunks;          // D / V
  int stage;           // 1: locations/weights staged in shared memory
  int head_major = 0;  // forward with K = 2: blocks walk (batch, head, query), query fastest (no staging)
};

__host__ __device__ inline size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

struct Launch {
  Geometry g;
  int threads;
  size_t smem;
};

// The launchers take raw pointers (no ATen headers in the kernel translation units: they compile
// much faster) and return the launch status for the caller to check.
// value (N, S, M, D) of dtype T; locations / weights of dtype TL; V channels per vector; the forward
// takes K points at a time (1: query order, 2: head-major, msda_kernels.cuh).
template <typename T, typename TL, int V, int K>
cudaError_t launch_forward(const Launch& lp, const T* value, const int64_t* shapes, const int64_t* starts,
                           const TL* loc, const TL* attn, T* out, cudaStream_t stream);

// grad_value (float32, float64 for double) must be zero-filled; grad_loc / grad_attn have dtype TL.
template <typename T, typename TL, int V, typename Acc>
cudaError_t launch_backward(const Launch& lp, const T* value, const int64_t* shapes, const int64_t* starts,
                            const TL* loc, const TL* attn, const T* grad_out, Acc* grad_value, TL* grad_loc,
                            TL* grad_attn, cudaStream_t stream);

}  // namespace detail
}  // namespace msda
