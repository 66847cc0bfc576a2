// Explicit instantiations (one translation unit per group, compiled in parallel by ninja): the
// combinations msda_cuda.cu dispatches to (msda_launch.h, Tuning).
#include "msda_kernels.cuh"

namespace msda {
namespace detail {

MSDA_INSTANTIATE_FORWARD(c10::Half, float, 8, 2)
MSDA_INSTANTIATE_FORWARD(c10::Half, float, 4, 2)
MSDA_INSTANTIATE_FORWARD(c10::Half, float, 2, 2)
MSDA_INSTANTIATE_FORWARD(c10::Half, float, 1, 2)
MSDA_INSTANTIATE_BACKWARD(c10::Half, float, 4)
MSDA_INSTANTIATE_BACKWARD(c10::Half, float, 2)
MSDA_INSTANTIATE_BACKWARD(c10::Half, float, 1)

}  // namespace detail
}  // namespace msda
