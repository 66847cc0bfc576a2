// Explicit instantiations (one translation unit per group, compiled in parallel by ninja).
#include "msda_kernels.cuh"

namespace msda {
namespace detail {

MSDA_INSTANTIATE(c10::BFloat16, c10::BFloat16, 8)
MSDA_INSTANTIATE(c10::BFloat16, c10::BFloat16, 4)
MSDA_INSTANTIATE(c10::BFloat16, c10::BFloat16, 2)
MSDA_INSTANTIATE(c10::BFloat16, c10::BFloat16, 1)

}  // namespace detail
}  // namespace msda
