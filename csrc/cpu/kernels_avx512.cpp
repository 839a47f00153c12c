// The CPU kernels built for avx512 (compile flags in CMakeLists.txt).
#define QWEN_KERNELS_NS isa_avx512
#define QWEN_KERNELS_ISA "avx512"
#include "cpu/kernels_impl.h"

namespace qwen {
const CpuKernels& cpu_kernels_avx512() { return isa_avx512::kKernels; }
}  // namespace qwen
