// Picks the kernel set once, from what the running CPU reports, so one build runs on any x86-64.
#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

namespace qwen {

const CpuKernels& cpu_kernels_generic();
#if defined(QWEN_X86)
const CpuKernels& cpu_kernels_avx2();
const CpuKernels& cpu_kernels_avx512();
void round_rows_bf16(const float* X, int64_t ldx, int64_t r0, int64_t r1, int64_t k, uint16_t* X16);
void gemm_bf16_cols(const uint16_t* X16, int64_t T, int64_t k, const uint16_t* W, int64_t ldw, float* C,
                    int64_t ldc, const float* bias, bool accumulate, int64_t n0, int64_t n1, uint16_t* panel);

// AVX-512 plus the bf16 dot-product GEMM for batched passes.
static const CpuKernels& cpu_kernels_avx512_bf16() {
  static const CpuKernels k = [] {
    CpuKernels t = cpu_kernels_avx512();
    t.isa = "avx512+bf16";
    t.round_rows_bf16 = round_rows_bf16;
    t.gemm_bf16_cols = gemm_bf16_cols;
    return t;
  }();
  return k;
}
#endif

const CpuKernels& cpu_kernels() {
  static const CpuKernels& chosen = [] () -> const CpuKernels& {
    // QWEN_NATIVE_ISA=generic|avx2|avx512 forces a path (tests compare them; avx512 without the bf16 GEMM);
    // unknown or unsupported values fall through to detection.
    const char* force = std::getenv("QWEN_NATIVE_ISA");
#if defined(QWEN_X86)
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
    if (force && std::strcmp(force, "generic") == 0) return cpu_kernels_generic();
    if (force && std::strcmp(force, "avx2") == 0 && avx2) return cpu_kernels_avx2();
    if (force && std::strcmp(force, "avx512") == 0 && avx512) return cpu_kernels_avx512();
    if (bf16) return cpu_kernels_avx512_bf16();
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
