// The panel kernels' shared parts (cpu/kernels.h has the layout): packing, and the loops around a micro-kernel that
// keeps up to kRows input rows x 32 output columns in registers. A micro-kernel is a struct M with the input type M::In
// and M::run<R, kPrefetch>(x, ldx, panel, pairs, acc, pf), which sets acc[r][0..1] (columns 0-15, 16-31) to row r's
// sums over the panel's pairs, each column one float32 lane summed in order, so a row's result does not depend on R;
// and M::run_two(x, pa, pb, pairs, acc, pf_a, pf_b), one row against the same panel of two blocks (acc[0..1] block a,
// acc[2..3] block b). Included by gemm_bf16.cpp (VDPBF16PS on bf16 inputs) and by the AVX-512 kernel set (bf16 widened
// in registers, float32 FMAs on float32 inputs); everything here is local to the including file.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu/kernels.h"

namespace qwen {
namespace {
namespace panels {

constexpr int64_t kNB = kBf16PanelCols;  // output columns per panel: two registers of 16 lanes
constexpr int64_t kKC = kBf16PanelK;      // k per panel (256 pairs)
static_assert(kNB == 32, "the micro-kernels cover two 16-lane registers");
constexpr int kRows = 12;  // input rows per micro-kernel call: 24 accumulators

// With kPrefetch, pf's next lines into L2 every 4 pairs.
template <bool kPrefetch>
__attribute__((always_inline)) inline void prefetch_step(int64_t p, L2Prefetch& pf) {
  if (kPrefetch && (p & 3) == 0) pf.step();
}

// The store masks of a block's two 16-column halves when only its first `valid` columns exist.
inline void column_masks(int64_t valid, __mmask16& m0, __mmask16& m1) {
  m0 = __mmask16(valid >= 16 ? 0xffff : (1u << valid) - 1u);
  m1 = __mmask16(valid <= 16 ? 0 : valid >= 32 ? 0xffff : (1u << (valid - 16)) - 1u);
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

// Rows 0..valid-1 of W (stride ldw), columns kc.. of the panel starting at kc, into `panel`: panel[p][j][0..1] =
// W[j][kc + 2p .. kc + 2p + 1], zero past the matrix. Each (p, j) is one 32-bit pair of row j, so packing is a
// transpose of 32-bit elements: 16x16 blocks in registers where the block is whole, element by element at the edges.
inline void pack_panel(const uint16_t* W, int64_t ldw, int64_t valid, int64_t k, int64_t kc, uint16_t* panel) {
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

// C[r, columns of m0 / m1] (=|+=) acc[r] (+ bias on the first panel), for R rows.
template <int R>
__attribute__((always_inline)) inline void store(const __m512 (&acc)[R][2], float* C, int64_t ldc, bool first,
                                                 bool accumulate, const float* bias, __mmask16 m0, __mmask16 m1) {
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

// One function per R (kept out of line: inlined into one body, the decode-sized variants ran 1.3-1.5x slower).
template <class M, int R, bool kPrefetch>
__attribute__((noinline)) void micro(const typename M::In* x, int64_t ldx, const uint16_t* panel, int64_t pairs,
                                     float* C, int64_t ldc, bool first, bool accumulate, const float* bias,
                                     __mmask16 m0, __mmask16 m1, L2Prefetch& pf) {
  __m512 acc[R][2];
  M::template run<R, kPrefetch>(x, ldx, panel, pairs, acc, pf);
  store<R>(acc, C, ldc, first, accumulate, bias, m0, m1);
}

template <class M, int R, bool kPrefetch>
void dispatch(int rows, const typename M::In* x, int64_t ldx, const uint16_t* panel, int64_t pairs, float* C,
              int64_t ldc, bool first, bool accumulate, const float* bias, __mmask16 m0, __mmask16 m1,
              L2Prefetch& pf) {
  if constexpr (R > 1) {
    if (rows < R) return dispatch<M, R - 1, kPrefetch>(rows, x, ldx, panel, pairs, C, ldc, first, accumulate, bias,
                                                       m0, m1, pf);
  }
  micro<M, R, kPrefetch>(x, ldx, panel, pairs, C, ldc, first, accumulate, bias, m0, m1, pf);
}

// One panel (k from kc, `pairs` pairs) against all T rows of X (stride k2), into C's first min(valid, 32) columns.
template <class M, bool kPrefetch>
void panel_rows(const typename M::In* X, int64_t T, int64_t k2, int64_t kc, const uint16_t* panel, int64_t pairs,
                float* C, int64_t ldc, bool accumulate, const float* bias, int64_t valid, L2Prefetch& pf) {
  __mmask16 m0, m1;
  column_masks(valid, m0, m1);
  // Calls of equal size (16 rows: 8 + 8, not 12 + 4): a call of 4 rows ran at ~70% of one of 8-12.
  const int64_t calls = (T + kRows - 1) / kRows, rows = (T + calls - 1) / calls;
  for (int64_t t = 0; t < T; t += rows)
    dispatch<M, kRows, kPrefetch>(int(std::min<int64_t>(rows, T - t)), X + t * k2 + kc, k2, panel, pairs,
                                  C + t * ldc, ldc, kc == 0, accumulate, bias, m0, m1, pf);
}

// One input row against the same panel of two neighbouring blocks (a, b = a + 32 rows): four accumulation chains
// instead of two, each lane's sum in the same order as panel_rows computes it.
template <class M>
__attribute__((noinline)) void micro_two(const typename M::In* x, const uint16_t* pa, const uint16_t* pb,
                                         int64_t pairs, float* C, bool first, bool accumulate, const float* bias,
                                         int64_t valid_b, L2Prefetch& pf_a, L2Prefetch& pf_b) {
  __m512 acc[4];
  M::run_two(x, pa, pb, pairs, acc, pf_a, pf_b);
  __mmask16 m0, m1;
  column_masks(valid_b, m0, m1);
  const __m512 a[1][2] = {{acc[0], acc[1]}}, b[1][2] = {{acc[2], acc[3]}};
  store<1>(a, C, 0, first, accumulate, bias, 0xffff, 0xffff);
  store<1>(b, C + kNB, 0, first, accumulate, bias ? bias + kNB : nullptr, m0, m1);
}

// kernels.h's gemm_bf16_panels for micro-kernel M: X (T, k2) prepared by its panel_inputs.
template <class M>
void gemm(const typename M::In* X, int64_t T, int64_t k, const uint16_t* P, int64_t n, float* C, int64_t ldc,
          const float* bias, bool accumulate, int64_t n0, int64_t n1) {
  const int64_t k2 = k + (k & 1), calls = (T + kRows - 1) / kRows;
  // The panels of [n0, n1) lie one after the other; the next one is brought into L2 while the rows pass over this
  // one (Zen 4, 2 threads, VDPBF16PS, 8960 x 1536 from memory: 16 rows 240 -> 350 GFLOP/s).
  const uint16_t* range_end = P + (n1 + kNB - 1) / kNB * kNB * k2;
  int64_t start = n0;
  if (T == 1)  // one row: blocks two at a time
    for (; start + kNB < n1; start += 2 * kNB)
      for (int64_t kc = 0; kc < k2; kc += kKC) {
        const int64_t pairs = std::min(kKC, k2 - kc) / 2;
        const uint16_t* pa = P + start * k2 + kc * kNB;
        const uint16_t* pb = pa + kNB * k2;
        const uint16_t *na = pa + pairs * 2 * kNB, *nb = pb + pairs * 2 * kNB;
        L2Prefetch pf_a = L2Prefetch::spread(na, std::min(na + kKC * kNB, range_end), (pairs + 3) / 4);
        L2Prefetch pf_b = L2Prefetch::spread(nb, std::min(nb + kKC * kNB, range_end), (pairs + 3) / 4);
        micro_two<M>(X + kc, pa, pb, pairs, C + start, kc == 0, accumulate, bias ? bias + start : nullptr,
                     n - start - kNB, pf_a, pf_b);
      }
  for (int64_t nb = start; nb < n1; nb += kNB)
    for (int64_t kc = 0; kc < k2; kc += kKC) {
      const int64_t pairs = std::min(kKC, k2 - kc) / 2;
      const uint16_t* panel = P + nb * k2 + kc * kNB;
      const uint16_t* next = panel + pairs * 2 * kNB;
      L2Prefetch pf = L2Prefetch::spread(next, std::min(next + kKC * kNB, range_end), calls * ((pairs + 3) / 4));
      panel_rows<M, true>(X, T, k2, kc, panel, pairs, C + nb, ldc, accumulate, bias ? bias + nb : nullptr, n - nb,
                          pf);
    }
}

// The same for W as plain bf16 rows (stride ldw), each panel packed as it is needed into `panel`.
template <class M>
void gemm_rows(const typename M::In* X, int64_t T, int64_t k, const uint16_t* W, int64_t ldw, float* C, int64_t ldc,
               const float* bias, bool accumulate, int64_t n0, int64_t n1, uint16_t* panel) {
  const int64_t k2 = k + (k & 1);
  L2Prefetch none;
  for (int64_t nb = n0; nb < n1; nb += kNB)
    for (int64_t kc = 0; kc < k2; kc += kKC) {
      const int64_t pairs = std::min(kKC, k2 - kc) / 2;
      pack_panel(W + nb * ldw, ldw, std::min(kNB, n1 - nb), k, kc, panel);
      panel_rows<M, false>(X, T, k2, kc, panel, pairs, C + nb, ldc, accumulate, bias ? bias + nb : nullptr, n1 - nb,
                           none);
    }
}

// kernels.h's pack_bf16_block.
inline void pack_block(const uint16_t* W, int64_t ldw, int64_t valid, int64_t k, uint16_t* block) {
  const int64_t k2 = k + (k & 1);
  for (int64_t kc = 0; kc < k2; kc += kKC) pack_panel(W, ldw, valid, k, kc, block + kc * kNB);
}

}  // namespace panels
}  // namespace
}  // namespace qwen
