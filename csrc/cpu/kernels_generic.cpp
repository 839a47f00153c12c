// The CPU kernels built for generic (compile flags in CMakeLists.txt).
#define QWEN_KERNELS_NS isa_generic
#define QWEN_KERNELS_ISA "generic"
#include "cpu/kernels_impl.h"

namespace qwen {
const CpuKernels& cpu_kernels_generic() { return isa_generic::kKernels; }
}  // namespace qwen
