// Batched matmul for bf16 weights on CPUs with AVX512-BF16 (compiled with -mavx512bf16; chosen only when CPUID
// reports it). VDPBF16PS multiplies bf16 pairs and accumulates in float32 at twice the rate of float32 FMAs, so
// bfloat16 mode rounds its matmul inputs to bf16 (weights already are) and keeps every sum in float32, as llama.cpp
// and PyTorch do for bf16 weights: prefill on the GEMM below, decode rows on the GEMV (no widening of the weights,
// so decode steps of many sequences are bound by memory longer than the float32-FMA GEMV).
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
template <int R>
void micro(const uint16_t* x, int64_t ldx, const uint16_t* panel, int64_t pairs, float* C, int64_t ldc,
           bool first, bool accumulate, const float* bias, __mmask16 m0, __mmask16 m1) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
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

template <int R>
void micro_dispatch(int rows, const uint16_t* x, int64_t ldx, const uint16_t* panel, int64_t pairs, float* C,
                    int64_t ldc, bool first, bool accumulate, const float* bias, __mmask16 m0, __mmask16 m1) {
  if constexpr (R > 1) {
    if (rows < R) {
      micro_dispatch<R - 1>(rows, x, ldx, panel, pairs, C, ldc, first, accumulate, bias, m0, m1);
      return;
    }
  }
  micro<R>(x, ldx, panel, pairs, C, ldc, first, accumulate, bias, m0, m1);
}

// Rows r .. r+R-1 of W against NT bf16 input rows (stride ldx), every weight load shared by the NT inputs and every
// input load by the R rows. Each (row, input) pair has its own 16 lanes, accumulated over k in order and reduced
// the same way whatever R and NT are, so a row's result does not depend on the rows or inputs computed beside it.
template <int R, int NT>
inline void dot_block(const uint16_t* W, int64_t ldw, const uint16_t* X, int64_t ldx, int64_t k, float* Y,
                      int64_t ldy, const float* bias, bool accumulate, int64_t r, L2Prefetch& pf) {
  const int64_t kv = k & ~int64_t(31);
  const __mmask32 tail = __mmask32((uint64_t(1) << (k - kv)) - 1u);
  __m512 acc[R][NT];
  for (int j = 0; j < R; ++j)
    for (int t = 0; t < NT; ++t) acc[j][t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < kv; i += 32) {
    pf.step();
    __m512bh xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = (__m512bh)_mm512_loadu_si512((const void*)(X + t * ldx + i));
    for (int j = 0; j < R; ++j) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void*)(W + (r + j) * ldw + i));
      for (int t = 0; t < NT; ++t) acc[j][t] = _mm512_dpbf16_ps(acc[j][t], wv, xv[t]);
    }
  }
  if (tail) {
    __m512bh xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = (__m512bh)_mm512_maskz_loadu_epi16(tail, X + t * ldx + kv);
    for (int j = 0; j < R; ++j) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, W + (r + j) * ldw + kv);
      for (int t = 0; t < NT; ++t) acc[j][t] = _mm512_dpbf16_ps(acc[j][t], wv, xv[t]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int j = 0; j < R; ++j) {
      float* y = Y + t * ldy;
      float s = _mm512_reduce_add_ps(acc[j][t]);
      if (bias) s += bias[r + j];
      y[r + j] = accumulate ? y[r + j] + s : s;
    }
}

// Rows [r0, r1) for NT inputs: R rows at a time, then one at a time.
template <int R, int NT>
void dot_rows(const uint16_t* W, int64_t ldw, const uint16_t* X, int64_t ldx, int64_t k, float* Y, int64_t ldy,
              const float* bias, bool accumulate, int64_t r0, int64_t r1, L2Prefetch& pf) {
  int64_t r = r0;
  for (; r + R <= r1; r += R) dot_block<R, NT>(W, ldw, X, ldx, k, Y, ldy, bias, accumulate, r, pf);
  for (; r < r1; ++r) dot_block<1, NT>(W, ldw, X, ldx, k, Y, ldy, bias, accumulate, r, pf);
}

}  // namespace

void prepare_x_bf16_dot(const float* x, int64_t k, float* xs) {
  uint16_t* d = reinterpret_cast<uint16_t*>(xs);  // k bf16 in the first half of the input's k floats
  for (int64_t i = 0; i < k; ++i) d[i] = f32_to_bf16(x[i]);
}

void gemv_bf16_dot(const uint16_t* W, int64_t ldw, const float* X, const float* XS, int64_t ldx, int64_t nx,
                   int64_t k, float* Y, int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1) {
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(XS);
  const int64_t ldx16 = 2 * ldx;  // each input's bf16 values start its row of ldx floats
  // 4 rows x up to 6 inputs in registers (each weight vector loaded once for up to 6 inputs), the inputs in groups
  // as even as possible. Rows go in slices of about 64 KB that stay in L2 while every group passes over them, and
  // the next slice is prefetched into L2 meanwhile: streamed by the blocks' own loads instead, W came from memory at
  // a fraction of the bandwidth, more so the more FMAs per byte (Zen 4, 1.5B, 2 threads, a decode step of B
  // sequences, medians of runs alternating with the same slices unprefetched: B=8 166 -> 122 ms; against the
  // earlier kernel, 8 rows streamed per input group: B=1 110 -> 103 ms, B=16 268 -> 180-205 ms).
  constexpr int64_t kInputs = 6;
  const int64_t slice = std::max<int64_t>(4, kSliceBytes / std::max<int64_t>(2 * ldw, 1) / 4 * 4);
  const int64_t groups = (nx + kInputs - 1) / kInputs;
  for (int64_t s = r0; s < r1; s += slice) {
    const int64_t e = std::min(r1, s + slice);
    L2Prefetch pf = L2Prefetch::spread(W + e * ldw, W + std::min(r1, e + slice) * ldw,
                                       (e - s + 3) / 4 * groups * std::max<int64_t>(1, k / 32));
    for (int64_t t = 0, g = 0; t < nx; ++g) {
      const int64_t m = (nx - t) / (groups - g);
      const uint16_t* x = xs + t * ldx16;
      float* y = Y + t * ldy;
      t += m;
      switch (m) {
        case 1: dot_rows<4, 1>(W, ldw, x, ldx16, k, y, ldy, bias, accumulate, s, e, pf); break;
        case 2: dot_rows<4, 2>(W, ldw, x, ldx16, k, y, ldy, bias, accumulate, s, e, pf); break;
        case 3: dot_rows<4, 3>(W, ldw, x, ldx16, k, y, ldy, bias, accumulate, s, e, pf); break;
        case 4: dot_rows<4, 4>(W, ldw, x, ldx16, k, y, ldy, bias, accumulate, s, e, pf); break;
        case 5: dot_rows<4, 5>(W, ldw, x, ldx16, k, y, ldy, bias, accumulate, s, e, pf); break;
        default: dot_rows<4, 6>(W, ldw, x, ldx16, k, y, ldy, bias, accumulate, s, e, pf); break;
      }
    }
  }
}

void round_rows_bf16(const float* X, int64_t ldx, int64_t r0, int64_t r1, int64_t k, uint16_t* X16) {
  const int64_t k2 = k + (k & 1);
  for (int64_t r = r0; r < r1; ++r) {
    uint16_t* d = X16 + r * k2;
    const float* s = X + r * ldx;
    for (int64_t i = 0; i < k; ++i) d[i] = f32_to_bf16(s[i]);
    if (k2 != k) d[k] = 0;
  }
}

void gemm_bf16_cols(const uint16_t* X16, int64_t T, int64_t k, const uint16_t* W, int64_t ldw, float* C,
                    int64_t ldc, const float* bias, bool accumulate, int64_t n0, int64_t n1, uint16_t* panel) {
  const int64_t k2 = k + (k & 1);
  for (int64_t nb = n0; nb < n1; nb += kNB) {
    const int64_t valid = std::min(kNB, n1 - nb);
    const __mmask16 m0 = __mmask16(valid >= 16 ? 0xffff : (1u << valid) - 1u);
    const __mmask16 m1 = __mmask16(valid <= 16 ? 0 : valid >= 32 ? 0xffff : (1u << (valid - 16)) - 1u);
    for (int64_t kc = 0; kc < k2; kc += kKC) {
      const int64_t len = std::min(kKC, k2 - kc), pairs = len / 2;
      // panel[p][j][0..1] = W[nb + j][kc + 2p .. kc + 2p + 1], zero past the matrix. Each (p, j) is one 32-bit
      // pair of row j, so packing is a transpose of 32-bit elements: 16x16 blocks in registers where the block is
      // whole, element by element at the edges.
      int64_t p_fast = 0;
      if (valid == kNB) {
        p_fast = std::max<int64_t>(0, std::min(pairs, (k - kc) / 2)) / 16 * 16;
        for (int64_t p0 = 0; p0 < p_fast; p0 += 16)
          for (int64_t j0 = 0; j0 < kNB; j0 += 16) pack_16x16(W + (nb + j0) * ldw + kc + 2 * p0, ldw, panel, p0, j0);
      }
      for (int64_t j = 0; j < kNB; ++j) {
        uint16_t* dst = panel + j * 2;
        if (j >= valid) {
          for (int64_t p = p_fast; p < pairs; ++p) dst[p * kNB * 2] = dst[p * kNB * 2 + 1] = 0;
          continue;
        }
        const uint16_t* w = W + (nb + j) * ldw;
        for (int64_t p = p_fast; p < pairs; ++p) {
          const int64_t kk = kc + 2 * p;
          dst[p * kNB * 2] = w[kk];
          dst[p * kNB * 2 + 1] = kk + 1 < k ? w[kk + 1] : 0;
        }
      }
      for (int64_t t = 0; t < T; t += kRows)
        micro_dispatch<kRows>(int(std::min<int64_t>(kRows, T - t)), X16 + t * k2 + kc, k2, panel, pairs,
                              C + t * ldc + nb, ldc, kc == 0, accumulate, bias ? bias + nb : nullptr, m0, m1);
    }
  }
}

}  // namespace qwen
