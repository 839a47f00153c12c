// CPU kernels, compiled once per instruction set (kernels_impl.h included by kernels_{generic,avx2,avx512}.cpp);
// cpu_kernels() picks the best one the running CPU supports. Each works on a range of rows so the backend can
// split work across its threads; none allocates.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "tensor.h"

namespace qwen {

struct CpuKernels {
  const char* isa;
  // Y[t, r] = dot(W[r, :k], X[t]) (+ bias[r]) (+ Y[t, r] when accumulate), for rows r in [r0, r1) and nx inputs t
  // (strides ldw, ldx, ldy). Each input's result is what a one-input call gives (the same arithmetic), and W is
  // read from memory once for all of them.
  void (*gemv_f32)(const float* W, int64_t ldw, const float* X, int64_t ldx, int64_t nx, int64_t k, float* Y,
                   int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1);
  // The same for bf16 W (the kernel sets without gemm_bf16_panels).
  void (*gemv_bf16)(const uint16_t* W, int64_t ldw, const float* X, int64_t ldx, int64_t nx, int64_t k, float* Y,
                    int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1);
  // dst[i] = float(src[i])
  void (*bf16_to_f32)(const uint16_t* src, float* dst, int64_t n);
  // out = x / sqrt(mean(x^2) + eps) * w
  void (*rmsnorm_row)(float* out, const float* x, const float* w, int64_t n, float eps);
  // out[i] = silu(gate[i]) * up[i]
  void (*silu_mul_row)(float* out, const float* gate, const float* up, int64_t n);
  // Attention of `rows` query rows (row stride ldq/ldo) of `heads` query heads sharing one kv head (head h at
  // column h * head_dim of q and out): query row i sees cache positions 0 .. first_len + i - 1. K, V: (positions,
  // head_dim). scores: scratch of heads rows of lds >= first_len + rows floats.
  void (*attend)(const float* q, int64_t ldq, int64_t heads, int64_t rows, const float* K, const float* V,
                 int64_t first_len, int64_t head_dim, float scale, float* scores, int64_t lds, float* out,
                 int64_t ldo);

  // Quantized weights (tensor.h's Q8 / Q4 / Q6 blocks of 4 rows; `groups` groups per row). Matmuls quantize each
  // input row once, symmetric int8 per group of 32 (sx[g] its step, xsum[g] = sx[g] * the sum of its levels), and
  // take integer dot products with the weights' levels; each group's sum is scaled in float32. A row's result is
  // the same whatever T is. qx, sx, xsum hold T rows (strides groups * 32, groups, groups); y is (T, ldy); r0 is a
  // multiple of 4 rows.
  // At load: row `lane` of the block at `block` from k floats (Q8 symmetric, d = max|x| / 127 coded upwards; Q4's
  // d and m and Q6's d per group minimise the squared error over a few candidate steps, each refined by least
  // squares, then the 8-bit codes on either side of them that minimise it). False when a value is not finite or
  // |x| >= 2^125.
  bool (*quantize_row)(Format f, const float* x, int64_t k, uint8_t* block, int lane);
  void (*quantize_x)(const float* x, int64_t k, int8_t* qx, float* sx, float* xsum);
  void (*gemm_q8)(const uint8_t* W, int64_t groups, const int8_t* qx, const float* sx, int64_t T, float* y,
                  int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1);
  void (*gemm_q4)(const uint8_t* W, int64_t groups, const int8_t* qx, const float* sx, const float* xsum, int64_t T,
                  float* y, int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1);
  void (*gemm_q6)(const uint8_t* W, int64_t groups, const int8_t* qx, const float* sx, const float* xsum, int64_t T,
                  float* y, int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1);
  // Row `lane` of the block at `block` as k floats (batched passes widen tiles of rows with these; the embedding
  // lookup too).
  void (*dequant_q8)(const uint8_t* block, int lane, int64_t k, float* out);
  void (*dequant_q4)(const uint8_t* block, int lane, int64_t k, float* out);
  void (*dequant_q6)(const uint8_t* block, int lane, int64_t k, float* out);
  // Quantized runs of up to this many rows take the integer matmuls above (Q8; Q4 and Q6); longer ones go as tiles
  // of dequantized rows where that is faster: float32 through sgemm without VNNI, bf16 through the VDPBF16PS GEMM.
  int64_t q8_dot_rows, coded_dot_rows;
  int64_t dot_rows(Format f) const { return f == Format::Q8 ? q8_dot_rows : coded_dot_rows; }

  // bf16 weights as panels (AVX-512; nullptr elsewhere): every bf16 matmul, any number of rows (bf16_panel_at below
  // is the layout). The sums are float32, each output one lane summed over k's pairs in order, so a row's result
  // does not depend on T.
  // panel_inputs: rows [r0, r1) of X into Xp (stride k2 = k rounded up to even, a zero pad): rounded to bf16 for
  // VDPBF16PS (avx512+bf16), float32 as they are where the weights are widened in registers (avx512).
  // pack_bf16_block: rows 0..valid-1 of W (stride ldw, k columns) into one 32-row block of panels, rows past valid
  // and the pad column zero.
  // gemm_bf16_panels: C[:, n0:n1] (=|+=) Xp · W[n0:n1]ᵀ (+ bias) for all T rows, W (n, k) as panels, n0 a multiple
  // of 32.
  void (*panel_inputs)(const float* X, int64_t ldx, int64_t r0, int64_t r1, int64_t k, void* Xp);
  void (*pack_bf16_block)(const uint16_t* W, int64_t ldw, int64_t valid, int64_t k, uint16_t* block);
  void (*gemm_bf16_panels)(const void* Xp, int64_t T, int64_t k, const uint16_t* P, int64_t n, float* C,
                           int64_t ldc, const float* bias, bool accumulate, int64_t n0, int64_t n1);
  // Quantized weights' long runs through VDPBF16PS (AVX512-BF16; nullptr elsewhere). round_rows_bf16: X16[r] =
  // bf16(X[r]) for rows [r0, r1), each padded to k2 with a zero. gemm_bf16_cols: as gemm_bf16_panels for W as plain
  // bf16 rows (stride ldw: tiles of dequantized rows), each panel packed as it is needed into `panel`,
  // kBf16PanelCols * kBf16PanelK bf16 of per-thread scratch.
  void (*round_rows_bf16)(const float* X, int64_t ldx, int64_t r0, int64_t r1, int64_t k, uint16_t* X16);
  void (*gemm_bf16_cols)(const uint16_t* X16, int64_t T, int64_t k, const uint16_t* W, int64_t ldw, float* C,
                         int64_t ldc, const float* bias, bool accumulate, int64_t n0, int64_t n1, uint16_t* panel);
};

// Several-input GEMVs take the weight rows in slices that stay in L2 while every input passes over them, and bring
// the next slice into L2 meanwhile (the bf16 panel kernels their next panel): `per_step` cache lines each time
// step() is called, from p up to end. Left to the blocks' own loads, the weights came from memory at a fraction of
// the bandwidth once each byte fed several inputs' FMAs (the hardware prefetchers do not run far enough ahead).
struct L2Prefetch {
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t per_step = 0;

  // The bytes [begin, end) spread over `steps` calls of step().
  static L2Prefetch spread(const void* begin, const void* end, int64_t steps) {
    L2Prefetch f{static_cast<const char*>(begin), static_cast<const char*>(end), 0};
    f.per_step = ((f.end - f.p) / 64 + steps - 1) / std::max<int64_t>(steps, 1);
    return f;
  }
  // Always inlined: a call kept inside a micro-kernel's loop would spill its accumulators around it.
  __attribute__((always_inline)) void step() {
    for (int64_t q = 0; q < per_step && p < end; ++q, p += 64) __builtin_prefetch(p, 0, 2);  // 2: into L2
  }
};
constexpr int64_t kSliceBytes = int64_t(64) << 10;  // weight rows per slice: about this many bytes

// bf16 weights for VDPBF16PS, as its micro-kernel reads them: blocks of kBf16PanelCols = 32 rows (the last padded
// with zero rows), each block k2 = k rounded up to even columns (a zero pad) cut into panels of kBf16PanelK = 512
// columns (32 KB; the last narrower), a panel pair by pair: pair p of rows 0..31 of the block, 32 bits each.
constexpr int64_t kBf16PanelCols = 32, kBf16PanelK = 512;
// Index of element (r, i) of an n x k matrix in that layout.
inline int64_t bf16_panel_at(int64_t k, int64_t r, int64_t i) {
  const int64_t k2 = k + (k & 1);
  return (r / kBf16PanelCols) * kBf16PanelCols * k2 + (i / kBf16PanelK) * kBf16PanelK * kBf16PanelCols +
         (i % kBf16PanelK) / 2 * (2 * kBf16PanelCols) + (r % kBf16PanelCols) * 2 + (i & 1);
}

// What CPUID reports (x86; all false elsewhere), and the CPU's name.
struct CpuFeatures {
  std::string model;
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_bf16 = false, avx512_vnni = false, avx_vnni = false, amx_tile = false, amx_bf16 = false,
       amx_int8 = false;
};
CpuFeatures detect_cpu_features();
// The kernel set for a CPU with these features: "generic", "avx2", "avx512" or "avx512+bf16". `force` (from
// QWEN_NATIVE_ISA, may be null) picks a slower set the CPU can run; anything else is ignored.
const char* select_isa(const CpuFeatures& f, const char* force);

const CpuKernels& cpu_kernels();          // best for this CPU (chosen once from CPUID)
const CpuKernels& cpu_kernels_generic();  // the portable reference path

}  // namespace qwen
