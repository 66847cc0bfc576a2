// Explicit instantiations (one translation unit per group, compiled in parallel by ninja).
#include "msda_kernels.cuh"

namespace msda {
namespace detail {

MSDA_INSTANTIATE(c10::Half, c10::Half, 8)
MSDA_INSTANTIATE(c10::Half, c10::Half, 4)
MSDA_INSTANTIATE(c10::Half, c10::Half, 2)
MSDA_INSTANTIATE(c10::Half, c10::Half, 1)

}  // namespace detail
}  // namespace msda
