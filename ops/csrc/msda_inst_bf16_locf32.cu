// Explicit instantiations (one translation unit per group, compiled in parallel by ninja).
#include "msda_kernels.cuh"

namespace msda {
namespace detail {

MSDA_INSTANTIATE(c10::BFloat16, float, 8)
MSDA_INSTANTIATE(c10::BFloat16, float, 4)
MSDA_INSTANTIATE(c10::BFloat16, float, 2)
MSDA_INSTANTIATE(c10::BFloat16, float, 1)

}  // namespace detail
}  // namespace msda
