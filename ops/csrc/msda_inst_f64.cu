// Explicit instantiations (one translation unit per group, compiled in parallel by ninja): the
// combinations msda_cuda.cu dispatches to (msda_launch.h, Tuning).
// float64 has both forward variants (K = 1 its own, K = 2 the half types'), so that tests can check
// each against the float64 reference at float64 precision.
#include "msda_kernels.cuh"

namespace msda {
namespace detail {

MSDA_INSTANTIATE_FORWARD(double, double, 4, 1)
MSDA_INSTANTIATE_FORWARD(double, double, 2, 1)
MSDA_INSTANTIATE_FORWARD(double, double, 1, 1)
MSDA_INSTANTIATE_FORWARD(double, double, 4, 2)
MSDA_INSTANTIATE_FORWARD(double, double, 2, 2)
MSDA_INSTANTIATE_FORWARD(double, double, 1, 2)
MSDA_INSTANTIATE_BACKWARD(double, double, 4)
MSDA_INSTANTIATE_BACKWARD(double, double, 2)
MSDA_INSTANTIATE_BACKWARD(double, double, 1)

}  // namespace detail
}  // namespace msda
