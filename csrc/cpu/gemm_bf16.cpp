// bf16 matmuls on CPUs with AVX512-BF16 (compiled with -mavx512bf16; chosen only when CPUID reports it).
// VDPBF16PS multiplies bf16 pairs and accumulates in float32 at twice the rate of float32 FMAs, so bfloat16 mode
// rounds its matmul inputs to bf16 (weights already are) and keeps every sum in float32, as llama.cpp and PyTorch do
// for bf16 weights. The weights are stored as the micro-kernel reads them (kernels.h: 32-row blocks of k-pair
// panels, packed once at load), so one kernel serves every number of rows: a decode row streams the panels from
// memory, a prompt reuses each panel from L1/L2 for up to 12 rows at a time, and no pass packs anything.
#include <cstring>

#include "cpu/panels_impl.h"
#include "tensor.h"

namespace qwen {
namespace {

struct Bf16Inputs {
  using In = uint16_t;
  // acc[r] = sums over pairs p of x[r, 2p..2p+1] · panel[p, column, 0..1].
  template <int R, bool kPrefetch>
  __attribute__((always_inline)) static void run(const uint16_t* x, int64_t ldx, const uint16_t* panel,
                                                 int64_t pairs, __m512 (&acc)[R][2], L2Prefetch& pf) {
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      panels::prefetch_step<kPrefetch>(p, pf);
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void*)(panel + p * 64));
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void*)(panel + p * 64 + 32));
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, x + r * ldx + 2 * p, 4);
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xb);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xb);
      }
    }
  }
  // One row, two panels: acc[0..1] panel a's columns, acc[2..3] panel b's.
  __attribute__((always_inline)) static void run_two(const uint16_t* x, const uint16_t* pa, const uint16_t* pb,
                                                     int64_t pairs, __m512 (&acc)[4], L2Prefetch& pf_a,
                                                     L2Prefetch& pf_b) {
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      panels::prefetch_step<true>(p, pf_a);
      panels::prefetch_step<true>(p, pf_b);
      int32_t pair;
      std::memcpy(&pair, x + 2 * p, 4);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_loadu_si512((const void*)(pa + p * 64)), xb);
      acc[1] = _mm512_dpbf16_ps(acc[1], (__m512bh)_mm512_loadu_si512((const void*)(pa + p * 64 + 32)), xb);
      acc[2] = _mm512_dpbf16_ps(acc[2], (__m512bh)_mm512_loadu_si512((const void*)(pb + p * 64)), xb);
      acc[3] = _mm512_dpbf16_ps(acc[3], (__m512bh)_mm512_loadu_si512((const void*)(pb + p * 64 + 32)), xb);
    }
  }
};

}  // namespace

void round_rows_bf16(const float* X, int64_t ldx, int64_t r0, int64_t r1, int64_t k, uint16_t* X16) {
  const int64_t k2 = k + (k & 1);
  for (int64_t r = r0; r < r1; ++r) {
    uint16_t* d = X16 + r * k2;
    const float* s = X + r * ldx;
    for (int64_t i = 0; i < k; ++i) d[i] = f32_to_bf16(s[i]);
    if (k2 != k) d[k] = 0;
  }
}

void panel_inputs_bf16(const float* X, int64_t ldx, int64_t r0, int64_t r1, int64_t k, void* Xp) {
  round_rows_bf16(X, ldx, r0, r1, k, static_cast<uint16_t*>(Xp));
}

void gemm_bf16_panels(const void* Xp, int64_t T, int64_t k, const uint16_t* P, int64_t n, float* C, int64_t ldc,
                      const float* bias, bool accumulate, int64_t n0, int64_t n1) {
  panels::gemm<Bf16Inputs>(static_cast<const uint16_t*>(Xp), T, k, P, n, C, ldc, bias, accumulate, n0, n1);
}

void gemm_bf16_cols(const uint16_t* X16, int64_t T, int64_t k, const uint16_t* W, int64_t ldw, float* C,
                    int64_t ldc, const float* bias, bool accumulate, int64_t n0, int64_t n1, uint16_t* panel) {
  panels::gemm_rows<Bf16Inputs>(X16, T, k, W, ldw, C, ldc, bias, accumulate, n0, n1, panel);
}

}  // namespace qwen
