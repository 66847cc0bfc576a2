// Explicit instantiations (one translation unit per group, compiled in parallel by ninja).
#include "msda_kernels.cuh"

namespace msda {
namespace detail {

MSDA_INSTANTIATE(c10::Half, float, 8)
MSDA_INSTANTIATE(c10::Half, float, 4)
MSDA_INSTANTIATE(c10::Half, float, 2)
MSDA_INSTANTIATE(c10::Half, float, 1)

}  // namespace detail
}  // namespace msda
