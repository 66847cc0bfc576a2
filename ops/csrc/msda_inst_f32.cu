// Explicit instantiations (one translation unit per group, compiled in parallel by ninja): the
// combinations msda_cuda.cu dispatches to (msda_launch.h, Tuning).
#include "msda_kernels.cuh"

namespace msda {
namespace detail {

MSDA_INSTANTIATE_FORWARD(float, float, 4, 1)
MSDA_INSTANTIATE_FORWARD(float, float, 2, 1)
MSDA_INSTANTIATE_FORWARD(float, float, 1, 1)
MSDA_INSTANTIATE_BACKWARD(float, float, 4)
MSDA_INSTANTIATE_BACKWARD(float, float, 2)
MSDA_INSTANTIATE_BACKWARD(float, float, 1)

}  // namespace detail
}  // namespace msda
