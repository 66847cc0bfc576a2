// Explicit instantiations (one translation unit per group, compiled in parallel by ninja).
#include "msda_kernels.cuh"

namespace msda {
namespace detail {

MSDA_INSTANTIATE(float, float, 8)
MSDA_INSTANTIATE(float, float, 4)
MSDA_INSTANTIATE(float, float, 2)
MSDA_INSTANTIATE(float, float, 1)

}  // namespace detail
}  // namespace msda
