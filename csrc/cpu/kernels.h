// CPU kernels, compiled once per instruction set (kernels_impl.h included by kernels_{generic,avx2,avx512}.cpp);
// cpu_kernels() picks the best one the running CPU supports. Each works on a range of rows so the backend can
// split work across its threads; none allocates.
#pragma once

#include <cstdint>

namespace qwen {

struct CpuKernels {
  const char* isa;
  // y[r] = dot(W[r, :k], x) (+ bias[r]) (+ y[r] when accumulate), for rows r in [r0, r1). W row stride ldw.
  void (*gemv_f32)(const float* W, int64_t ldw, const float* x, int64_t k, float* y, const float* bias,
                   bool accumulate, int64_t r0, int64_t r1);
  // The same for bf16 W. `xs` is x rearranged by prepare_x_bf16 (k floats): the vector paths widen bf16 pairs
  // in place (even elements by a shift, odd ones by a mask), so they want x's even and odd elements apart.
  void (*prepare_x_bf16)(const float* x, int64_t k, float* xs);
  void (*gemv_bf16)(const uint16_t* W, int64_t ldw, const float* x, const float* xs, int64_t k, float* y,
                    const float* bias, bool accumulate, int64_t r0, int64_t r1);
  // dst[i] = float(src[i])
  void (*bf16_to_f32)(const uint16_t* src, float* dst, int64_t n);
  // out = x / sqrt(mean(x^2) + eps) * w
  void (*rmsnorm_row)(float* out, const float* x, const float* w, int64_t n, float eps);
  // out[i] = silu(gate[i]) * up[i]
  void (*silu_mul_row)(float* out, const float* gate, const float* up, int64_t n);
  // Attention of `rows` query rows (row stride ldq/ldo) against one kv head: query row i sees cache positions
  // 0 .. first_len + i - 1. K, V: (positions, head_dim). scores: scratch of first_len + rows floats.
  void (*attend)(const float* q, int64_t ldq, int64_t rows, const float* K, const float* V, int64_t first_len,
                 int64_t head_dim, float scale, float* scores, float* out, int64_t ldo);
};

const CpuKernels& cpu_kernels();          // best for this CPU (chosen once from CPUID)
const CpuKernels& cpu_kernels_generic();  // the portable reference path

}  // namespace qwen
