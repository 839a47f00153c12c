// The CPU kernels built for avx2 (compile flags in CMakeLists.txt).
#define QWEN_KERNELS_NS isa_avx2
#define QWEN_KERNELS_ISA "avx2"
#include "cpu/kernels_impl.h"

namespace qwen {
const CpuKernels& cpu_kernels_avx2() { return isa_avx2::kKernels; }
}  // namespace qwen
