// Picks the kernel set once, from what the running CPU reports, so one build runs on any x86-64. The choice itself
// (select_isa) is a plain function of the features, so tests check it for every kind of CPU on any machine.
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(QWEN_X86)
#include <cpuid.h>
#endif

#include "cpu/kernels.h"

namespace qwen {

const CpuKernels& cpu_kernels_generic();
#if defined(QWEN_X86)
const CpuKernels& cpu_kernels_avx2();
const CpuKernels& cpu_kernels_avx512();
void round_rows_bf16(const float* X, int64_t ldx, int64_t r0, int64_t r1, int64_t k, uint16_t* X16);
void panel_inputs_bf16(const float* X, int64_t ldx, int64_t r0, int64_t r1, int64_t k, void* Xp);
void gemm_bf16_panels(const void* Xp, int64_t T, int64_t k, const uint16_t* P, int64_t n, float* C, int64_t ldc,
                      const float* bias, bool accumulate, int64_t n0, int64_t n1);
void gemm_bf16_cols(const uint16_t* X16, int64_t T, int64_t k, const uint16_t* W, int64_t ldw, float* C,
                    int64_t ldc, const float* bias, bool accumulate, int64_t n0, int64_t n1, uint16_t* panel);

// AVX-512 plus bf16 dot products (VDPBF16PS) on bf16-rounded inputs: the AVX-512 set's panels (the same layout and
// packing) through VDPBF16PS instead of widened FMAs, and quantized weights' long runs through it too.
static const CpuKernels& cpu_kernels_avx512_bf16() {
  static const CpuKernels k = [] {
    CpuKernels t = cpu_kernels_avx512();
    t.isa = "avx512+bf16";
    t.panel_inputs = panel_inputs_bf16;
    t.gemm_bf16_panels = gemm_bf16_panels;
    t.round_rows_bf16 = round_rows_bf16;
    t.gemm_bf16_cols = gemm_bf16_cols;
    // int8 runs beyond 64 rows: bf16 tiles through the GEMM (Zen 4, 1.5B, 2 threads, one pass of T prompt rows,
    // tiles against integers: int8 T=96 96 vs 80 tok/s, T=512 110-124 vs 73). int4 stays on integers at any length
    // since its 16-row tiles (kernels_impl.h's coded_tiles; integers against bf16 tiles: T=96 155 vs 102 tok/s,
    // T=256 177 vs 121, T=512 161 vs 123).
    t.q8_dot_rows = 64;
    return t;
  }();
  return k;
}
#endif

CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if defined(QWEN_X86)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512_bf16 = __builtin_cpu_supports("avx512bf16");
  f.avx512_vnni = __builtin_cpu_supports("avx512vnni");
  f.avx_vnni = __builtin_cpu_supports("avxvnni");
  f.amx_tile = __builtin_cpu_supports("amx-tile");
  f.amx_bf16 = __builtin_cpu_supports("amx-bf16");
  f.amx_int8 = __builtin_cpu_supports("amx-int8");
  unsigned regs[12] = {};
  if (__get_cpuid_max(0x80000000u, nullptr) >= 0x80000004u) {
    for (unsigned i = 0; i < 3; ++i) __get_cpuid(0x80000002u + i, &regs[4 * i], &regs[4 * i + 1], &regs[4 * i + 2], &regs[4 * i + 3]);
    std::string brand(reinterpret_cast<const char*>(regs), sizeof(regs));
    brand = brand.substr(0, brand.find('\0'));
    const size_t a = brand.find_first_not_of(' '), b = brand.find_last_not_of(' ');
    f.model = a == std::string::npos ? "" : brand.substr(a, b - a + 1);
  }
#endif
  return f;
}

const char* select_isa(const CpuFeatures& f, const char* force) {
  // The AVX-512 set takes integer dot products with VNNI (every AVX-512 CPU since Cascade Lake and Zen 4 has it;
  // Skylake-SP without it gets the AVX2 set).
  const bool avx512 = f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512_vnni;
  const bool avx2 = f.avx2 && f.fma;
  const bool bf16 = avx512 && f.avx512_bf16;
  // A forced set the CPU cannot run is ignored: the best one it can run is used instead.
  if (force && std::strcmp(force, "generic") == 0) return "generic";
  if (force && std::strcmp(force, "avx2") == 0 && avx2) return "avx2";
  if (force && std::strcmp(force, "avx512") == 0 && avx512) return "avx512";
  if (bf16) return "avx512+bf16";
  if (avx512) return "avx512";
  if (avx2) return "avx2";
  return "generic";
}

const CpuKernels& cpu_kernels() {
  static const CpuKernels& chosen = []() -> const CpuKernels& {
    // QWEN_NATIVE_ISA=generic|avx2|avx512 forces a path (tests compare them; avx512 without the bf16 GEMM).
    const std::string isa = select_isa(detect_cpu_features(), std::getenv("QWEN_NATIVE_ISA"));
#if defined(QWEN_X86)
    if (isa == "avx512+bf16") return cpu_kernels_avx512_bf16();
    if (isa == "avx512") return cpu_kernels_avx512();
    if (isa == "avx2") return cpu_kernels_avx2();
#endif
    return cpu_kernels_generic();
  }();
  return chosen;
}

}  // namespace qwen
