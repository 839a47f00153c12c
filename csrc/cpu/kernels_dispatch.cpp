// Picks the kernel set once, from what the running CPU reports, so one build runs on any x86-64.
#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

namespace qwen {

const CpuKernels& cpu_kernels_generic();
#if defined(QWEN_X86)
const CpuKernels& cpu_kernels_avx2();
const CpuKernels& cpu_kernels_avx512();
#endif

const CpuKernels& cpu_kernels() {
  static const CpuKernels& chosen = [] () -> const CpuKernels& {
    // QWEN_NATIVE_ISA=generic|avx2|avx512 forces a path (tests compare them); unknown or unsupported values fall
    // through to detection.
    const char* force = std::getenv("QWEN_NATIVE_ISA");
#if defined(QWEN_X86)
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (force && std::strcmp(force, "generic") == 0) return cpu_kernels_generic();
    if (force && std::strcmp(force, "avx2") == 0 && avx2) return cpu_kernels_avx2();
    if (avx512) return cpu_kernels_avx512();
    if (avx2) return cpu_kernels_avx2();
#else
    (void)force;
#endif
    return cpu_kernels_generic();
  }();
  return chosen;
}

}  // namespace qwen
