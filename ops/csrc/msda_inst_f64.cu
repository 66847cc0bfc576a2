// Explicit instantiations (one translation unit per group, compiled in parallel by ninja).
#include "msda_kernels.cuh"

namespace msda {
namespace detail {

MSDA_INSTANTIATE(double, double, 4)
MSDA_INSTANTIATE(double, double, 2)
MSDA_INSTANTIATE(double, double, 1)

}  // namespace detail
}  // namespace msda
