// bf16 matmuls on CPUs with AVX512-BF16 (compiled with -mavx512bf16; chosen only when CPUID reports it).
// VDPBF16PS multiplies bf16 pairs and accumulates in float32 at twice the rate of float32 FMAs, so bfloat16 mode
// rounds its matmul inputs to bf16 (weights already are) and keeps every sum in float32, as llama.cpp and PyTorch do
// for bf16 weights. The weights are stored as the micro-kernel reads them (kernels.h: 32-row blocks of k-pair
// panels, packed once at load), so one kernel serves every number of rows: a decode row streams the panels from
// memory, a prompt reuses each panel from L1/L2 for 12 rows at a time, and no pass packs anything.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/kernels.h"
#include "tensor.h"

namespace qwen {
namespace {

constexpr int64_t kNB = kBf16PanelCols;  // output columns per panel: two registers of 16 lanes
constexpr int64_t kKC = kBf16PanelK;      // k per panel (256 pairs)
static_assert(kNB == 32, "the micro-kernel covers two 16-lane registers");
constexpr int kRows = 12;     // rows of x per micro-kernel call: 24 accumulators

// C[r, 0..31] (+)= sum over pairs p of x[r, 2p..2p+1] · panel[p, column, 0..1], for R rows.
// With kPrefetch, every 4 pairs it brings pf's next lines into L2 (written out here: a call the compiler kept would
// spill the 24 accumulators around it).
template <int R, bool kPrefetch>
void micro(const uint16_t* x, int64_t ldx, const uint16_t* panel, int64_t pairs, float* C, int64_t ldc,
           bool first, bool accumulate, const float* bias, __mmask16 m0, __mmask16 m1, L2Prefetch& pf) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    if (kPrefetch && (p & 3) == 0)
      for (int64_t q = 0; q < pf.per_step && pf.p < pf.end; ++q, pf.p += 64) __builtin_prefetch(pf.p, 0, 2);
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
  for (int r = 0; r < R; ++r) {
    float* c = C + r * ldc;
    __m512 b0, b1;
    if (first && !accumulate) {
      b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
      b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    } else {
      b0 = _mm512_maskz_loadu_ps(m0, c);
      b1 = _mm512_maskz_loadu_ps(m1, c + 16);
      if (first && bias) {
        b0 = _mm512_add_ps(b0, _mm512_maskz_loadu_ps(m0, bias));
        b1 = _mm512_add_ps(b1, _mm512_maskz_loadu_ps(m1, bias + 16));
      }
    }
    _mm512_mask_storeu_ps(c, m0, _mm512_add_ps(b0, acc[r][0]));
    _mm512_mask_storeu_ps(c + 16, m1, _mm512_add_ps(b1, acc[r][1]));
  }
}

// Rows j0..j0+15 of W, 16 bf16 pairs each (starting at `w`), into panel[p0 + c][j0 + i] as 32-bit pairs: a 16x16
// transpose of 32-bit elements (interleave 32-bit, then 64-bit, then 128-bit lanes twice).
inline void pack_16x16(const uint16_t* w, int64_t ldw, uint16_t* panel, int64_t p0, int64_t j0) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512((const void*)(w + i * ldw));
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + c]: columns {c, c+4, c+8, c+12} of rows i..i+3, one per 128-bit lane
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  uint32_t* out = reinterpret_cast<uint32_t*>(panel);
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i w0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd), w1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
    _mm512_storeu_si512((void*)(out + (p0 + c) * kNB + j0), _mm512_shuffle_i32x4(v0, v1, 0x88));
    _mm512_storeu_si512((void*)(out + (p0 + c + 8) * kNB + j0), _mm512_shuffle_i32x4(v0, v1, 0xdd));
    _mm512_storeu_si512((void*)(out + (p0 + c + 4) * kNB + j0), _mm512_shuffle_i32x4(w0, w1, 0x88));
    _mm512_storeu_si512((void*)(out + (p0 + c + 12) * kNB + j0), _mm512_shuffle_i32x4(w0, w1, 0xdd));
  }
}

template <int R, bool kPrefetch>
void micro_dispatch(int rows, const uint16_t* x, int64_t ldx, const uint16_t* panel, int64_t pairs, float* C,
                    int64_t ldc, bool first, bool accumulate, const float* bias, __mmask16 m0, __mmask16 m1,
                    L2Prefetch& pf) {
  if constexpr (R > 1) {
    if (rows < R) {
      micro_dispatch<R - 1, kPrefetch>(rows, x, ldx, panel, pairs, C, ldc, first, accumulate, bias, m0, m1, pf);
      return;
    }
  }
  micro<R, kPrefetch>(x, ldx, panel, pairs, C, ldc, first, accumulate, bias, m0, m1, pf);
}

// Rows 0..valid-1 of W (stride ldw), columns kc.. of the panel starting at kc, into `panel`: panel[p][j][0..1] =
// W[j][kc + 2p .. kc + 2p + 1], zero past the matrix. Each (p, j) is one 32-bit pair of row j, so packing is a
// transpose of 32-bit elements: 16x16 blocks in registers where the block is whole, element by element at the edges.
void pack_panel(const uint16_t* W, int64_t ldw, int64_t valid, int64_t k, int64_t kc, uint16_t* panel) {
  const int64_t pairs = std::min(kKC, k + (k & 1) - kc) / 2;
  int64_t p_fast = 0;
  if (valid >= kNB) {
    p_fast = std::max<int64_t>(0, std::min(pairs, (k - kc) / 2)) / 16 * 16;
    for (int64_t p0 = 0; p0 < p_fast; p0 += 16)
      for (int64_t j0 = 0; j0 < kNB; j0 += 16) pack_16x16(W + j0 * ldw + kc + 2 * p0, ldw, panel, p0, j0);
  }
  for (int64_t j = 0; j < kNB; ++j) {
    uint16_t* dst = panel + j * 2;
    if (j >= valid) {
      for (int64_t p = p_fast; p < pairs; ++p) dst[p * kNB * 2] = dst[p * kNB * 2 + 1] = 0;
      continue;
    }
    const uint16_t* w = W + j * ldw;
    for (int64_t p = p_fast; p < pairs; ++p) {
      const int64_t kk = kc + 2 * p;
      dst[p * kNB * 2] = w[kk];
      dst[p * kNB * 2 + 1] = kk + 1 < k ? w[kk + 1] : 0;
    }
  }
}

// One panel (k from kc, `pairs` pairs) against all T rows of X16 (stride k2), into C's first min(valid, 32) columns.
template <bool kPrefetch>
void panel_rows(const uint16_t* X16, int64_t T, int64_t k2, int64_t kc, const uint16_t* panel, int64_t pairs,
                float* C, int64_t ldc, bool accumulate, const float* bias, int64_t valid, L2Prefetch& pf) {
  const __mmask16 m0 = __mmask16(valid >= 16 ? 0xffff : (1u << valid) - 1u);
  const __mmask16 m1 = __mmask16(valid <= 16 ? 0 : valid >= 32 ? 0xffff : (1u << (valid - 16)) - 1u);
  for (int64_t t = 0; t < T; t += kRows)
    micro_dispatch<kRows, kPrefetch>(int(std::min<int64_t>(kRows, T - t)), X16 + t * k2 + kc, k2, panel, pairs,
                                     C + t * ldc, ldc, kc == 0, accumulate, bias, m0, m1, pf);
}

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

void pack_bf16_block(const uint16_t* W, int64_t ldw, int64_t valid, int64_t k, uint16_t* block) {
  const int64_t k2 = k + (k & 1);
  for (int64_t kc = 0; kc < k2; kc += kKC) pack_panel(W, ldw, valid, k, kc, block + kc * kNB);
}

void gemm_bf16_panels(const uint16_t* X16, int64_t T, int64_t k, const uint16_t* P, int64_t n, float* C,
                      int64_t ldc, const float* bias, bool accumulate, int64_t n0, int64_t n1) {
  const int64_t k2 = k + (k & 1), calls = (T + kRows - 1) / kRows;
  // The panels of [n0, n1) lie one after the other; the next one is brought into L2 while the rows pass over this
  // one (Zen 4, 2 threads, 8960 x 1536 from memory: T=16 240 -> 350 GFLOP/s).
  const uint16_t* range_end = P + (n1 + kNB - 1) / kNB * kNB * k2;
  for (int64_t nb = n0; nb < n1; nb += kNB)
    for (int64_t kc = 0; kc < k2; kc += kKC) {
      const int64_t pairs = std::min(kKC, k2 - kc) / 2;
      const uint16_t* panel = P + nb * k2 + kc * kNB;
      const uint16_t* next = panel + pairs * 2 * kNB;
      L2Prefetch pf = L2Prefetch::spread(next, std::min(next + kKC * kNB, range_end), calls * ((pairs + 3) / 4));
      panel_rows<true>(X16, T, k2, kc, panel, pairs, C + nb, ldc, accumulate, bias ? bias + nb : nullptr, n - nb, pf);
    }
}

void gemm_bf16_cols(const uint16_t* X16, int64_t T, int64_t k, const uint16_t* W, int64_t ldw, float* C,
                    int64_t ldc, const float* bias, bool accumulate, int64_t n0, int64_t n1, uint16_t* panel) {
  const int64_t k2 = k + (k & 1);
  L2Prefetch none;
  for (int64_t nb = n0; nb < n1; nb += kNB)
    for (int64_t kc = 0; kc < k2; kc += kKC) {
      const int64_t pairs = std::min(kKC, k2 - kc) / 2;
      pack_panel(W + nb * ldw, ldw, std::min(kNB, n1 - nb), k, kc, panel);
      panel_rows<false>(X16, T, k2, kc, panel, pairs, C + nb, ldc, accumulate, bias ? bias + nb : nullptr, n1 - nb,
                        none);
    }
}

}  // namespace qwen
