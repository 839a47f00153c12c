// The body of every CPU kernel. Included by one .cpp per instruction set with QWEN_KERNELS_NS naming the
// namespace; the intrinsic paths switch on what the compiler was told the target supports.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "tensor.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#include "cpu/panels_impl.h"
#endif

namespace qwen {
namespace QWEN_KERNELS_NS {

// exp(x) for x <= 0 (softmax and silu arguments after max subtraction / sign folding), written branch-free so the
// compiler vectorises the loops around it: x = n ln2 + r, e^r by a degree-6 polynomial, 2^n from the exponent bits.
static inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

static inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

#if defined(__AVX512F__)
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif


static inline float bf16f(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// The scalar tail of a vector row (k not a multiple of 8), one explicit FMA per element: the one-input and the
// several-input kernels share it, so the compiler's choices cannot make their sums differ.
static inline float tail(float s, const float* w, const float* x, int64_t from, int64_t k) {
  for (int64_t i = from; i < k; ++i) s = std::fma(w[i], x[i], s);
  return s;
}
static inline float tail(float s, const uint16_t* w, const float* x, int64_t from, int64_t k) {
  for (int64_t i = from; i < k; ++i) s = std::fma(bf16f(w[i]), x[i], s);
  return s;
}
#endif

static inline void finish_row(float* y, int64_t r, float s, const float* bias, bool accumulate) {
  if (bias) s += bias[r];
  y[r] = accumulate ? y[r] + s : s;
}

// Four rows at a time share each load of x; W streams through once. The row dot products are independent
// accumulator chains, enough to hide FMA latency while memory bandwidth is the limit. (AVX-512: gemv_f32_many below
// for any number of inputs, and this for its last rows.)
static void gemv_f32_one(const float* W, int64_t ldw, const float* x, int64_t k, float* y, const float* bias,
                         bool accumulate, int64_t r0, int64_t r1) {
  int64_t r = r0;
#if defined(__AVX2__) && !defined(__AVX512F__)
  const int64_t kv = k & ~int64_t(7);
  for (; r + 4 <= r1; r += 4) {
    const float *w0 = W + r * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < kv; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, a3);
    }
    const float s0 = tail(hsum(a0), w0, x, kv, k), s1 = tail(hsum(a1), w1, x, kv, k);
    const float s2 = tail(hsum(a2), w2, x, kv, k), s3 = tail(hsum(a3), w3, x, kv, k);
    finish_row(y, r, s0, bias, accumulate);
    finish_row(y, r + 1, s1, bias, accumulate);
    finish_row(y, r + 2, s2, bias, accumulate);
    finish_row(y, r + 3, s3, bias, accumulate);
  }
#endif
  for (; r < r1; ++r) finish_row(y, r, dot(W + r * ldw, x, k), bias, accumulate);
}

// bf16 rows for the kernel sets without panels (AVX-512 keeps bf16 weights as panels: F32Inputs below).
static void gemv_bf16_one(const uint16_t* W, int64_t ldw, const float* x, int64_t k, float* y, const float* bias,
                          bool accumulate, int64_t r0, int64_t r1) {
  int64_t r = r0;
#if defined(__AVX2__) && !defined(__AVX512F__)
  // Eight bf16 zero-extended to 32-bit lanes and shifted up are eight floats in x's own order. Eight rows share each
  // x load: on Zen 3 that streams 3 KB rows about a quarter faster than four rows of shift/mask pairs did (bf16
  // rows are half as long as float32 ones, and more streams in flight make up for it).
  constexpr int R = 8;
  const int64_t k8 = k & ~int64_t(7);
  for (; r + R <= r1; r += R) {
    const uint16_t* w[R];
    __m256 acc[R];
    for (int j = 0; j < R; ++j) {
      w[j] = W + (r + j) * ldw;
      acc[j] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < k8; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i);
      for (int j = 0; j < R; ++j) {
        const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[j] + i)));
        acc[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xv, acc[j]);
      }
    }
    for (int j = 0; j < R; ++j) {
      float s = hsum(acc[j]);
      s = tail(s, w[j], x, k8, k);  // as in rows_by_inputs
      finish_row(y, r + j, s, bias, accumulate);
    }
  }
#endif
  for (; r < r1; ++r) {
    const uint16_t* w = W + r * ldw;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < k; ++i) s += bf16f(w[i]) * x[i];
    finish_row(y, r, s, bias, accumulate);
  }
}

// Several input rows (decode steps of several sequences): each row exactly as the one-row kernel computes it alone,
// the weight rows taken in slices that stay in cache while every input passes over them, so the weights are read
// from memory once for all inputs. Slices are multiples of 16 rows from r0, so every weight row falls in the same
// group of rows (vector body or scalar tail) as in a one-row call.
static int64_t cached_slice(int64_t row_bytes) {
  return std::max<int64_t>(16, (int64_t(64) << 10) / std::max<int64_t>(row_bytes, 1) / 16 * 16);
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2, several inputs: 4 weight rows x 3 inputs in registers (12 accumulators), so each weight vector is loaded
// (and widened) once for 3 inputs and each input vector once for 4 rows: the one-input kernel's loop is bound by
// those loads and widenings, this one by its FMAs. Rows go in groups of kGroupRows, k in chunks of kChunk: a chunk
// of 4 rows (2-4 KB, read from memory once) stays in L1 while every input passes over it, and the inputs' chunks
// (up to kMaxInputs x 1 KB) while the group's rows do; the accumulators wait in memory between chunks (exactly: a
// store and a load). Every (row, input) pair keeps its own accumulator, summed in the one-input kernel's order and
// reduced by the same hsum and tail, so each result is bit for bit what gemv_*_one gives.
constexpr int kRB = 4, kNT = 3;
constexpr int64_t kChunk = 256, kGroupRows = 16, kMaxInputs = 24;

static inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
static inline __m256 load8(const uint16_t* w) {  // bf16 zero-extended and shifted up: floats in x's order
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))), 16));
}

// acc[j * lda + t] += W[r + j, i0:i1] · X[t, i0:i1] for j < 4, t < NT
template <int NT, class T>
static inline void block_chunk(const T* W, int64_t ldw, const float* X, int64_t ldx, int64_t i0, int64_t i1,
                               int64_t r, __m256* acc_mem, int64_t lda) {
  const T* w[kRB];
  __m256 acc[kRB][NT];
  for (int j = 0; j < kRB; ++j) {
    w[j] = W + (r + j) * ldw;
    for (int t = 0; t < NT; ++t) acc[j][t] = acc_mem[j * lda + t];
  }
  for (int64_t i = i0; i < i1; i += 8) {
    __m256 xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = _mm256_loadu_ps(X + t * ldx + i);
    for (int j = 0; j < kRB; ++j) {
      const __m256 wv = load8(w[j] + i);
      for (int t = 0; t < NT; ++t) acc[j][t] = _mm256_fmadd_ps(wv, xv[t], acc[j][t]);
    }
  }
  for (int j = 0; j < kRB; ++j)
    for (int t = 0; t < NT; ++t) acc_mem[j * lda + t] = acc[j][t];
}

// Rows [r0, r1) (in the one-input kernel's vector blocks: a multiple of 4 of them) for nx <= kMaxInputs inputs.
template <class T>
static void rows_by_inputs(const T* W, int64_t ldw, const float* X, int64_t ldx, int64_t nx, int64_t k, float* Y,
                           int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1) {
  __m256 acc[kGroupRows * kMaxInputs];
  const int64_t k8 = k & ~int64_t(7);
  for (int64_t a = r0; a < r1; a += kGroupRows) {
    const int64_t b = std::min(r1, a + kGroupRows);
    for (int64_t q = 0; q < (b - a) * nx; ++q) acc[q] = _mm256_setzero_ps();
    // The next group's rows come into L2 while this one computes: its chunks hop from row to row, which the
    // hardware prefetchers do not follow.
    constexpr int64_t kLine = 64 / int64_t(sizeof(T));  // elements per cache line
    const int64_t next_end = std::min(r1, b + kGroupRows), row_lines = (k + kLine - 1) / kLine;
    const int64_t steps = std::max<int64_t>(1, (k8 + kChunk - 1) / kChunk * ((b - a) / kRB));
    const int64_t per_step = ((next_end - b) * row_lines + steps - 1) / steps;
    int64_t pf_row = b, pf_line = 0;
    for (int64_t i0 = 0; i0 < k8; i0 += kChunk) {
      const int64_t i1 = std::min(k8, i0 + kChunk);
      for (int64_t r = a; r < b; r += kRB) {
        for (int64_t n = 0; n < per_step && pf_row < next_end; ++n) {
          _mm_prefetch(reinterpret_cast<const char*>(W + pf_row * ldw + pf_line * kLine), _MM_HINT_T1);
          if (++pf_line == row_lines) pf_line = 0, ++pf_row;
        }
        for (int64_t t = 0; t < nx; t += kNT) {
          __m256* am = acc + (r - a) * nx + t;
          const float* x = X + t * ldx;
          const int64_t nt = std::min<int64_t>(kNT, nx - t);
          if (nt == 3) block_chunk<3>(W, ldw, x, ldx, i0, i1, r, am, nx);
          else if (nt == 2) block_chunk<2>(W, ldw, x, ldx, i0, i1, r, am, nx);
          else block_chunk<1>(W, ldw, x, ldx, i0, i1, r, am, nx);
        }
      }
    }
    for (int64_t r = a; r < b; ++r)
      for (int64_t t = 0; t < nx; ++t)
        finish_row(Y + t * ldy, r, tail(hsum(acc[(r - a) * nx + t]), W + r * ldw, X + t * ldx, k8, k), bias,
                   accumulate);
  }
}

// Rows [r0, r1) for nx inputs: the rows the one-input kernel takes in vector blocks of `block` rows here, the rest
// (its scalar rows) through `one(t, from)`.
template <class T, class One>
static void gemv_many(const T* W, int64_t ldw, const float* X, int64_t ldx, int64_t nx, int64_t k, float* Y,
                      int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1, int64_t block,
                      One one) {
  const int64_t eb = r0 + (r1 - r0) / block * block;
  for (int64_t t = 0; t < nx; t += kMaxInputs)
    rows_by_inputs(W, ldw, X + t * ldx, ldx, std::min(kMaxInputs, nx - t), k, Y + t * ldy, ldy, bias, accumulate,
                   r0, eb);
  if (eb < r1)
    for (int64_t t = 0; t < nx; ++t) one(t, eb);
}
#endif

#if defined(__AVX512F__)
// AVX-512, several float32 inputs: rows r..r+3 against NT inputs, each weight load shared by the NT inputs and each
// input load by the 4 rows; every (row, input) pair is gemv_f32_one's arithmetic (one accumulator over k, the same
// masked tail and hsum), so its result is bit for bit what one input gives.
template <int NT>
static inline void f32_block(const float* W, int64_t ldw, const float* X, int64_t ldx, int64_t k, float* Y,
                             int64_t ldy, const float* bias, bool accumulate, int64_t r, L2Prefetch& pf) {
  const int64_t kv = k & ~int64_t(15);
  const __mmask16 tail = __mmask16((1u << (k - kv)) - 1u);
  __m512 acc[4][NT];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t i = 0; i < kv; i += 16) {
    pf.step();
    __m512 xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(X + t * ldx + i);
    for (int j = 0; j < 4; ++j) {
      const __m512 wv = _mm512_loadu_ps(W + (r + j) * ldw + i);
      for (int t = 0; t < NT; ++t) acc[j][t] = _mm512_fmadd_ps(wv, xv[t], acc[j][t]);
    }
  }
  if (tail)
    for (int j = 0; j < 4; ++j) {
      const __m512 wv = _mm512_maskz_loadu_ps(tail, W + (r + j) * ldw + kv);
      for (int t = 0; t < NT; ++t)
        acc[j][t] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, X + t * ldx + kv), acc[j][t]);
    }
  for (int t = 0; t < NT; ++t)
    for (int j = 0; j < 4; ++j) finish_row(Y + t * ldy, r + j, hsum(acc[j][t]), bias, accumulate);
}

// Rows [r0, r1) for nx inputs (one included): gemv_f32_one's blocks of 4 rows, 4 rows x up to 6 inputs at a time
// (the inputs in groups as even as possible), in slices of about kSliceBytes with the next one prefetched into L2;
// its remaining rows through it, input by input. Zen 4, 1.5B, 2 threads, a float32 decode step of B sequences,
// against gemv_f32_one input by input over cached slices: B=8 406 -> 283 ms, B=16 880 -> 372 ms; B=1 195 -> 189 ms
// (medians of 3 alternating runs).
static void gemv_f32_many(const float* W, int64_t ldw, const float* X, int64_t ldx, int64_t nx, int64_t k, float* Y,
                          int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1) {
  constexpr int64_t kInputs = 6;
  const int64_t eb = r0 + (r1 - r0) / 4 * 4, groups = (nx + kInputs - 1) / kInputs;
  const int64_t slice = std::max<int64_t>(4, kSliceBytes / std::max<int64_t>(4 * ldw, 1) / 4 * 4);
  for (int64_t s = r0; s < eb; s += slice) {
    const int64_t e = std::min(eb, s + slice);
    L2Prefetch pf = L2Prefetch::spread(W + e * ldw, W + std::min(eb, e + slice) * ldw,
                                       (e - s) / 4 * groups * std::max<int64_t>(1, k / 16));
    for (int64_t t = 0, g = 0; t < nx; ++g) {
      const int64_t m = (nx - t) / (groups - g);
      const float* x = X + t * ldx;
      float* y = Y + t * ldy;
      t += m;
      for (int64_t r = s; r < e; r += 4) switch (m) {
          case 1: f32_block<1>(W, ldw, x, ldx, k, y, ldy, bias, accumulate, r, pf); break;
          case 2: f32_block<2>(W, ldw, x, ldx, k, y, ldy, bias, accumulate, r, pf); break;
          case 3: f32_block<3>(W, ldw, x, ldx, k, y, ldy, bias, accumulate, r, pf); break;
          case 4: f32_block<4>(W, ldw, x, ldx, k, y, ldy, bias, accumulate, r, pf); break;
          case 5: f32_block<5>(W, ldw, x, ldx, k, y, ldy, bias, accumulate, r, pf); break;
          default: f32_block<6>(W, ldw, x, ldx, k, y, ldy, bias, accumulate, r, pf); break;
        }
    }
  }
  if (eb < r1)
    for (int64_t t = 0; t < nx; ++t) gemv_f32_one(W, ldw, X + t * ldx, k, Y + t * ldy, bias, accumulate, eb, r1);
}
#endif

static void gemv_f32(const float* W, int64_t ldw, const float* X, int64_t ldx, int64_t nx, int64_t k, float* Y,
                     int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1) {
#if defined(__AVX512F__)
  gemv_f32_many(W, ldw, X, ldx, nx, k, Y, ldy, bias, accumulate, r0, r1);
#else
#if defined(__AVX2__)
  if (nx > 1)
    return gemv_many(W, ldw, X, ldx, nx, k, Y, ldy, bias, accumulate, r0, r1, 4, [&](int64_t t, int64_t from) {
      gemv_f32_one(W, ldw, X + t * ldx, k, Y + t * ldy, bias, accumulate, from, r1);
    });
#endif
  const int64_t step = nx == 1 ? r1 - r0 : cached_slice(k * 4);
  for (int64_t s = r0; s < r1; s += step)
    for (int64_t t = 0; t < nx; ++t)
      gemv_f32_one(W, ldw, X + t * ldx, k, Y + t * ldy, bias, accumulate, s, std::min(r1, s + step));
#endif
}

static void gemv_bf16(const uint16_t* W, int64_t ldw, const float* X, int64_t ldx, int64_t nx, int64_t k, float* Y,
                      int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  if (nx > 1)
    return gemv_many(W, ldw, X, ldx, nx, k, Y, ldy, bias, accumulate, r0, r1, 8, [&](int64_t t, int64_t from) {
      gemv_bf16_one(W, ldw, X + t * ldx, k, Y + t * ldy, bias, accumulate, from, r1);
    });
#endif
  const int64_t step = nx == 1 ? r1 - r0 : cached_slice(k * 2);
  for (int64_t s = r0; s < r1; s += step)
    for (int64_t t = 0; t < nx; ++t)
      gemv_bf16_one(W, ldw, X + t * ldx, k, Y + t * ldy, bias, accumulate, s, std::min(r1, s + step));
}

static void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16f(src[i]);
}

static void rmsnorm_row(float* out, const float* x, const float* w, int64_t n, float eps) {
  const float inv = 1.0f / std::sqrt(dot(x, x, n) / float(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

static void silu_mul_row(float* out, const float* gate, const float* up, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    // silu(g) = g * sigmoid(g); e^{-|g|} keeps the exponent non-positive
    const float e = exp_nonpos(g < 0 ? g : -g);
    const float sig = g < 0 ? e / (1.0f + e) : 1.0f / (1.0f + e);
    out[i] = g * sig * up[i];
  }
}

// A head's scores q . K[j] * scale (attend_scores) and its output o += p[j] V[j] (attend_values) over positions
// j0 .. j1-1. With AVX-512 and head_dim 16, 32, 64 or 128 (Qwen2.5: 64, 128): each dot on two accumulators reduced
// as a tree, and o in registers across the positions (the portable loops summed each dot's 16 lanes one after
// another and kept o in memory: Zen 4, 1.5B int4 decode at 600-1200 positions, 13% of the time in attention).
#if defined(__AVX512F__)
template <class F>
static bool with_head_chunks(int64_t hd, F&& f) {  // f(std::integral_constant<int, hd / 16>) for the sizes above
  switch (hd) {
    case 16: return f(std::integral_constant<int, 1>{}), true;
    case 32: return f(std::integral_constant<int, 2>{}), true;
    case 64: return f(std::integral_constant<int, 4>{}), true;
    case 128: return f(std::integral_constant<int, 8>{}), true;
    default: return false;
  }
}
#endif

static void attend_scores(const float* qh, const float* K, int64_t j0, int64_t j1, int64_t hd, float scale,
                          float* s) {
#if defined(__AVX512F__)
  if (with_head_chunks(hd, [&](auto chunks) {
        constexpr int kChunks = decltype(chunks)::value;
        __m512 qv[kChunks];
        for (int c = 0; c < kChunks; ++c) qv[c] = _mm512_loadu_ps(qh + 16 * c);
        for (int64_t j = j0; j < j1; ++j) {
          const float* kj = K + j * hd;
          __m512 a0 = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kj)), a1 = _mm512_setzero_ps();
          for (int c = 1; c < kChunks; ++c)
            (c & 1 ? a1 : a0) = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kj + 16 * c), c & 1 ? a1 : a0);
          s[j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * scale;
        }
      }))
    return;
#endif
  for (int64_t j = j0; j < j1; ++j) s[j] = dot(qh, K + j * hd, hd) * scale;
}

static void attend_values(const float* p, const float* V, int64_t j0, int64_t j1, int64_t hd, float* o) {
#if defined(__AVX512F__)
  if (with_head_chunks(hd, [&](auto chunks) {
        constexpr int kChunks = decltype(chunks)::value;
        __m512 acc[kChunks];
        for (int c = 0; c < kChunks; ++c) acc[c] = _mm512_loadu_ps(o + 16 * c);
        for (int64_t j = j0; j < j1; ++j) {
          const __m512 pj = _mm512_set1_ps(p[j]);
          for (int c = 0; c < kChunks; ++c) acc[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(V + j * hd + 16 * c), acc[c]);
        }
        for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(o + 16 * c, acc[c]);
      }))
    return;
#endif
  for (int64_t j = j0; j < j1; ++j) {
    const float pj = p[j];
    const float* vj = V + j * hd;
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) o[d] += pj * vj[d];
  }
}

// Each head's scores, softmax and weighted sum are what it would get alone, position by position in order; the heads
// only share the passes over K and V, a block of positions at a time, so that each position's K and V come from
// memory once for all the heads of a group.
static void attend(const float* q, int64_t ldq, int64_t heads, int64_t rows, const float* K, const float* V,
                   int64_t first_len, int64_t head_dim, float scale, float* scores, int64_t lds, float* out,
                   int64_t ldo) {
  constexpr int64_t kBlock = 32;  // positions per shared pass: 16 KB of K or V at head_dim 128, kept in L1
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t n = first_len + i;
    for (int64_t j0 = 0; j0 < n; j0 += kBlock)
      for (int64_t h = 0; h < heads; ++h)
        attend_scores(q + i * ldq + h * head_dim, K, j0, std::min(n, j0 + kBlock), head_dim, scale, scores + h * lds);
    for (int64_t h = 0; h < heads; ++h) {
      float* s = scores + h * lds;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        const float e = exp_nonpos(s[j] - mx);
        s[j] = e;
        sum += e;
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < n; ++j) s[j] *= inv;
      float* oh = out + i * ldo + h * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) oh[d] = 0.0f;
    }
    for (int64_t j0 = 0; j0 < n; j0 += kBlock)
      for (int64_t h = 0; h < heads; ++h)
        attend_values(scores + h * lds, V, j0, std::min(n, j0 + kBlock), head_dim, out + i * ldo + h * head_dim);
  }
}

// --- quantized weights (tensor.h: Q8, Q4) -----------------------------------------------------------------------

constexpr int kG = int(kQuantGroup);

static inline int load_u32(const uint8_t* p) {
  int v;
  std::memcpy(&v, p, 4);
  return v;
}
static inline long long load_u64(const uint8_t* p) {
  long long v;
  std::memcpy(&v, p, 8);
  return v;
}

#if defined(__AVX2__)
static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

static void quantize_x(const float* x, int64_t k, int8_t* qx, float* sx, float* xsum) {
  const int64_t groups = quant_groups(k);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t i0 = g * kG, n = std::min<int64_t>(kG, k - i0);
    float amax = 0.0f;
    for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i0 + i]));
    const float step = amax / 127.0f, inv = step > 0.0f ? 1.0f / step : 0.0f;
    int32_t sum = 0;
    for (int64_t i = 0; i < kG; ++i) {
      const int8_t q = i < n ? int8_t(std::nearbyint(x[i0 + i] * inv)) : int8_t(0);
      qx[i0 + i] = q;
      sum += q;
    }
    sx[g] = step;
    xsum[g] = step * float(sum);
  }
}

// --- quantizing weights (at load) ---------------------------------------------------------------------------------

static inline float round_even(float v) {  // to nearest even for |v| < 2^22, without a libm call
  const float magic = 12582912.0f;         // 1.5 * 2^23
  return (v + magic) - magic;
}
static inline float sum8(const float* s) { return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])); }

// A group of n <= 32 values, zero-padded to 32.
static inline void fill_group(const float* x, int64_t n, float* v) {
  if (n == kG) {
    std::memcpy(v, x, kG * sizeof(float));
    return;
  }
  for (int i = 0; i < kG; ++i) v[i] = i < n ? x[i] : 0.0f;
}

// The smallest float32 of bfloat16 precision (8 significant bits) at or above v >= 0.
static inline float bf16_ceil(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0xffffu) & 0xffff0000u;
  std::memcpy(&v, &u, 4);
  return v;
}

// A row's levels of one group into its bytes (tensor.h): the low 4 bits two per byte (value i and i + 16 in byte i),
// Q6's top 2 bits four per byte (value i + 8s in bits 2s, 2s + 1 of byte i, i < 8).
static void pack_levels(Format f, const float* l, uint8_t* nibbles, uint8_t* high) {
#if defined(__AVX512F__)
  // levels 0..15 and 16..31 as bytes; 16-bit shifts keep every byte's bits in their byte (levels < 64)
  const __m128i b0 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_loadu_ps(l)));
  const __m128i b1 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_loadu_ps(l + 16)));
  const __m128i low = _mm_set1_epi8(15), three = _mm_set1_epi8(3);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(nibbles),
                   _mm_or_si128(_mm_and_si128(b0, low), _mm_slli_epi16(_mm_and_si128(b1, low), 4)));
  if (f == Format::Q6) {
    const __m128i t0 = _mm_and_si128(_mm_srli_epi16(b0, 4), three), t1 = _mm_and_si128(_mm_srli_epi16(b1, 4), three);
    const __m128i h = _mm_or_si128(_mm_or_si128(t0, _mm_slli_epi16(_mm_srli_si128(t0, 8), 2)),
                                   _mm_or_si128(_mm_slli_epi16(t1, 4), _mm_slli_epi16(_mm_srli_si128(t1, 8), 6)));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(high), h);
  }
#else
  int q[kG];
  for (int i = 0; i < kG; ++i) q[i] = int(l[i]);
  for (int i = 0; i < kG / 2; ++i) nibbles[i] = uint8_t((q[i] & 15) | ((q[i + kG / 2] & 15) << 4));
  if (f == Format::Q6)
    for (int i = 0; i < 8; ++i)
      high[i] = uint8_t((q[i] >> 4) | ((q[i + 8] >> 4) << 2) | ((q[i + 16] >> 4) << 4) | ((q[i + 24] >> 4) << 6));
#endif
}

#if !defined(__AVX512F__)  // (the AVX-512 set runs the same search 16 groups at a time, below)
// The step d and offset m of a group of 32 values for Q4's levels 0..15: levels for step candidates around
// range / 15, each refined by least squares (the best d and m for its levels); the candidate with the smallest
// squared error wins (the first of equals). The error comes from the sums alone:
// sum (d l + m - v)^2 = d^2 Sll + 2 d m Sl + n m^2 - 2 d Slv - 2 m Sv + Svv.
static void fit_q4_group(const float* v, float* d_out, float* m_out) {
  constexpr float kLevels[4] = {15.0f, 14.5f, 15.5f, 14.0f}, n = float(kG);
#if defined(__AVX2__)
  // All in registers: the group (4 vectors), the 4 candidates' 12 sums reduced together, their fits side by side.
  __m256 x[4];
  for (int b = 0; b < 4; ++b) x[b] = _mm256_loadu_ps(v + 8 * b);
  __m256 lo = _mm256_min_ps(_mm256_min_ps(x[0], x[1]), _mm256_min_ps(x[2], x[3]));
  __m256 hi = _mm256_max_ps(_mm256_max_ps(x[0], x[1]), _mm256_max_ps(x[2], x[3]));
  lo = _mm256_min_ps(lo, _mm256_permute2f128_ps(lo, lo, 1));
  hi = _mm256_max_ps(hi, _mm256_permute2f128_ps(hi, hi, 1));
  lo = _mm256_min_ps(lo, _mm256_shuffle_ps(lo, lo, 0x4e));
  hi = _mm256_max_ps(hi, _mm256_shuffle_ps(hi, hi, 0x4e));
  lo = _mm256_min_ps(lo, _mm256_shuffle_ps(lo, lo, 0xb1));
  hi = _mm256_max_ps(hi, _mm256_shuffle_ps(hi, hi, 0xb1));
  const float mn = _mm256_cvtss_f32(lo), mx = _mm256_cvtss_f32(hi);
  if (!(mx > mn)) {
    *d_out = 0.0f;
    *m_out = mn;
    return;
  }
  const __m256 sv = _mm256_add_ps(_mm256_add_ps(x[0], x[1]), _mm256_add_ps(x[2], x[3]));
  __m256 svv = _mm256_mul_ps(x[0], x[0]);
  for (int b = 1; b < 4; ++b) svv = _mm256_fmadd_ps(x[b], x[b], svv);
  __m256 sums[16];  // Sl of the 4 candidates, Sll, Slv, then Sv, Svv (and 2 zeros)
  const float inv_range = 1.0f / (mx - mn);
  for (int c = 0; c < 4; ++c) {
    const __m256 is = _mm256_set1_ps(kLevels[c] * inv_range), lo_v = _mm256_set1_ps(mn);
    __m256 al = _mm256_setzero_ps(), all = al, alv = al;
    for (int b = 0; b < 4; ++b) {
      __m256 q = _mm256_round_ps(_mm256_mul_ps(is, _mm256_sub_ps(x[b], lo_v)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm256_min_ps(_mm256_max_ps(q, _mm256_setzero_ps()), _mm256_set1_ps(15.0f));
      al = _mm256_add_ps(al, q);
      all = _mm256_fmadd_ps(q, q, all);
      alv = _mm256_fmadd_ps(q, x[b], alv);
    }
    sums[c] = al;
    sums[4 + c] = all;
    sums[8 + c] = alv;
  }
  sums[12] = sv;
  sums[13] = svv;
  sums[14] = sums[15] = _mm256_setzero_ps();
  // Eight vectors' totals into one vector's lanes: pairwise horizontal adds, then the two 128-bit halves.
  auto totals = [](const __m256* a) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  };
  const __m256 t0 = totals(sums), t1 = totals(sums + 8);
  const __m128 Sl = _mm256_castps256_ps128(t0), Sll = _mm256_extractf128_ps(t0, 1), Slv = _mm256_castps256_ps128(t1);
  alignas(16) float rest[4];
  _mm_store_ps(rest, _mm256_extractf128_ps(t1, 1));
  const __m128 Sv = _mm_set1_ps(rest[0]), Svv = _mm_set1_ps(rest[1]), N = _mm_set1_ps(n), two = _mm_set1_ps(2.0f);
  const __m128 det = _mm_sub_ps(_mm_mul_ps(N, Sll), _mm_mul_ps(Sl, Sl));
  const __m128 d = _mm_div_ps(_mm_sub_ps(_mm_mul_ps(N, Slv), _mm_mul_ps(Sl, Sv)), det);
  const __m128 m = _mm_div_ps(_mm_sub_ps(_mm_mul_ps(Sll, Sv), _mm_mul_ps(Sl, Slv)), det);
  __m128 err = _mm_add_ps(_mm_mul_ps(_mm_mul_ps(d, d), Sll), _mm_mul_ps(_mm_mul_ps(two, _mm_mul_ps(d, m)), Sl));
  err = _mm_add_ps(err, _mm_mul_ps(N, _mm_mul_ps(m, m)));
  err = _mm_sub_ps(err, _mm_mul_ps(two, _mm_add_ps(_mm_mul_ps(d, Slv), _mm_mul_ps(m, Sv))));
  err = _mm_add_ps(err, Svv);
  alignas(16) float e[4], dd[4], mm[4], dt[4];
  _mm_store_ps(e, err);
  _mm_store_ps(dd, d);
  _mm_store_ps(mm, m);
  _mm_store_ps(dt, det);
  float best_d = 0.0f, best_m = mn, best_err = 3.4e38f;
  for (int c = 0; c < 4; ++c)
    if (dt[c] > 0.0f && e[c] < best_err) {
      best_err = e[c];
      best_d = dd[c];
      best_m = mm[c];
    }
  *d_out = best_d;
  *m_out = best_m;
#else
  float lo = v[0], hi = v[0], Sv = 0.0f, Svv = 0.0f;
  for (int i = 0; i < kG; ++i) {
    lo = v[i] < lo ? v[i] : lo;
    hi = v[i] > hi ? v[i] : hi;
    Sv += v[i];
    Svv += v[i] * v[i];
  }
  float best_d = 0.0f, best_m = lo, best_err = 3.4e38f;
  if (hi > lo) {
    const float inv_range = 1.0f / (hi - lo);
    for (float levels : kLevels) {
      const float iscale = levels * inv_range;
      float Sl = 0.0f, Sll = 0.0f, Slv = 0.0f;
      for (int i = 0; i < kG; ++i) {
        float q = round_even(iscale * (v[i] - lo));
        q = q < 0.0f ? 0.0f : (q > 15.0f ? 15.0f : q);
        Sl += q;
        Sll += q * q;
        Slv += q * v[i];
      }
      const float det = n * Sll - Sl * Sl;
      if (det <= 0.0f) continue;
      const float d = (n * Slv - Sl * Sv) / det, m = (Sll * Sv - Sl * Slv) / det;
      const float err = d * d * Sll + 2 * d * m * Sl + n * m * m - 2 * d * Slv - 2 * m * Sv + Svv;
      if (err < best_err) {
        best_err = err;
        best_d = d;
        best_m = m;
      }
    }
  }
  *d_out = best_d;
  *m_out = best_m;
#endif
}

// The levels 0..kTop of v nearest to each value under step d and offset m (d = 0: all 0) into l (unless null), and
// their squared error.
template <int kTop>
static float group_levels(const float* v, float d, float m, float* l) {
  const float inv = d != 0.0f ? 1.0f / d : 0.0f;
  float err = 0.0f;
#if defined(__AVX2__)
  __m256 e8 = _mm256_setzero_ps();
  for (int b = 0; b < kG; b += 8) {
    const __m256 x = _mm256_loadu_ps(v + b);
    __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(x, _mm256_set1_ps(m)), _mm256_set1_ps(inv)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(q, _mm256_setzero_ps()), _mm256_set1_ps(float(kTop)));
    if (l) _mm256_storeu_ps(l + b, q);
    const __m256 e = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(q, _mm256_set1_ps(d)), _mm256_set1_ps(m)), x);
    e8 = _mm256_fmadd_ps(e, e, e8);
  }
  alignas(32) float es[8];
  _mm256_store_ps(es, e8);
  err = sum8(es);
#else
  for (int i = 0; i < kG; ++i) {
    float q = round_even((v[i] - m) * inv);
    q = q < 0.0f ? 0.0f : q;
    q = q > float(kTop) ? float(kTop) : q;
    if (l) l[i] = q;
    const float e = (q * d + m) - v[i];
    err += e * e;
  }
#endif
  return err;
}

// Q6's step d >= 0 of a group (levels q - 32 in -32..31): candidates from the extremes and a little below (clipping
// a rare extreme can pay), each refined by least squares for its levels (d = Sqv / Sqq, leaving the squared error
// Svv - Sqv^2 / Sqq); the smallest error wins.
static float fit_q6_group(const float* v) {
  float mx = 0.0f, mn = 0.0f;
  for (int i = 0; i < kG; ++i) {
    mx = v[i] > mx ? v[i] : mx;
    mn = v[i] < mn ? v[i] : mn;
  }
  const float d0 = std::max(mx / 31.0f, -mn / 32.0f);
  if (d0 == 0.0f) return 0.0f;
  float best_d = d0, best_gain = 0.0f;  // the largest Sqv^2 / Sqq is the smallest error
  for (float shrink : {1.0f, 0.96f, 0.92f}) {
    const float inv = 1.0f / (d0 * shrink);
    float sqv = 0.0f, sqq = 0.0f;
#if defined(__AVX2__)
    __m256 qv8 = _mm256_setzero_ps(), qq8 = qv8;
    for (int b = 0; b < kG; b += 8) {
      const __m256 x = _mm256_loadu_ps(v + b);
      __m256 q = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(inv)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm256_min_ps(_mm256_max_ps(q, _mm256_set1_ps(-32.0f)), _mm256_set1_ps(31.0f));
      qv8 = _mm256_fmadd_ps(q, x, qv8);
      qq8 = _mm256_fmadd_ps(q, q, qq8);
    }
    alignas(32) float a[8], c[8];
    _mm256_store_ps(a, qv8);
    _mm256_store_ps(c, qq8);
    sqv = sum8(a);
    sqq = sum8(c);
#else
    for (int i = 0; i < kG; ++i) {
      float q = round_even(v[i] * inv);
      q = q < -32.0f ? -32.0f : (q > 31.0f ? 31.0f : q);
      sqv += q * v[i];
      sqq += q * q;
    }
#endif
    if (!(sqq > 0.0f && sqv > 0.0f)) continue;
    const float gain = sqv * sqv / sqq;
    if (gain > best_gain) {
      best_gain = gain;
      best_d = sqv / sqq;
    }
  }
  return best_d;
}

#else
// The AVX-512 set runs the same search on 16 groups at once, one group a lane: t[i] holds value i of each (a
// transposed copy of the row), so every sum is a plain vector sum and every division serves 16 groups.
static inline __m512 nearest_levels(__m512 x, __m512 inv, float lo, float hi) {  // ties to even
  const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(x, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
}

// Pass 1 (fit_q4_group / fit_q6_group, one group a lane): d and (Q4) m of 16 groups.
template <int kTop>
static void fit_lanes(const __m512* t, __m512* d_out, __m512* m_out) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 mn = t[0], mx = t[0];
  for (int i = 1; i < kG; ++i) mn = _mm512_min_ps(mn, t[i]), mx = _mm512_max_ps(mx, t[i]);
  if constexpr (kTop == 15) {
    __m512 sv = zero, svv = zero;
    for (int i = 0; i < kG; ++i) sv = _mm512_add_ps(sv, t[i]), svv = _mm512_fmadd_ps(t[i], t[i], svv);
    const __mmask16 spread = _mm512_cmp_ps_mask(mx, mn, _CMP_GT_OQ);
    const __m512 inv_range = _mm512_maskz_div_ps(spread, _mm512_set1_ps(1.0f), _mm512_sub_ps(mx, mn));
    const __m512 n = _mm512_set1_ps(float(kG)), two = _mm512_set1_ps(2.0f);
    constexpr float kLevels[4] = {15.0f, 14.5f, 15.5f, 14.0f};
    __m512 best_d = zero, best_m = mn, best_err = _mm512_set1_ps(3.4e38f);
    for (float levels : kLevels) {
      const __m512 is = _mm512_mul_ps(_mm512_set1_ps(levels), inv_range);
      __m512 sl = zero, sll = zero, slv = zero;
      for (int i = 0; i < kG; ++i) {
        const __m512 q = nearest_levels(_mm512_sub_ps(t[i], mn), is, 0.0f, 15.0f);
        sl = _mm512_add_ps(sl, q);
        sll = _mm512_fmadd_ps(q, q, sll);
        slv = _mm512_fmadd_ps(q, t[i], slv);
      }
      const __m512 det = _mm512_sub_ps(_mm512_mul_ps(n, sll), _mm512_mul_ps(sl, sl));
      const __mmask16 ok = _mm512_mask_cmp_ps_mask(spread, det, zero, _CMP_GT_OQ);
      const __m512 d = _mm512_maskz_div_ps(ok, _mm512_sub_ps(_mm512_mul_ps(n, slv), _mm512_mul_ps(sl, sv)), det);
      const __m512 m = _mm512_maskz_div_ps(ok, _mm512_sub_ps(_mm512_mul_ps(sll, sv), _mm512_mul_ps(sl, slv)), det);
      // sum (d l + m - v)^2 = d^2 Sll + 2 d m Sl + n m^2 - 2 d Slv - 2 m Sv + Svv
      __m512 err = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(d, d), sll),
                                 _mm512_mul_ps(_mm512_mul_ps(two, _mm512_mul_ps(d, m)), sl));
      err = _mm512_add_ps(err, _mm512_mul_ps(n, _mm512_mul_ps(m, m)));
      err = _mm512_sub_ps(err, _mm512_mul_ps(two, _mm512_add_ps(_mm512_mul_ps(d, slv), _mm512_mul_ps(m, sv))));
      err = _mm512_add_ps(err, svv);
      const __mmask16 take = _mm512_mask_cmp_ps_mask(ok, err, best_err, _CMP_LT_OQ);
      best_err = _mm512_mask_mov_ps(best_err, take, err);
      best_d = _mm512_mask_mov_ps(best_d, take, d);
      best_m = _mm512_mask_mov_ps(best_m, take, m);
    }
    *d_out = best_d;
    *m_out = best_m;
  } else {
    mx = _mm512_max_ps(mx, zero);
    mn = _mm512_min_ps(mn, zero);
    const __m512 d0 = _mm512_max_ps(_mm512_div_ps(mx, _mm512_set1_ps(31.0f)),
                                    _mm512_div_ps(_mm512_sub_ps(zero, mn), _mm512_set1_ps(32.0f)));
    const __mmask16 nonzero = _mm512_cmp_ps_mask(d0, zero, _CMP_NEQ_OQ);
    __m512 best_d = d0, best_gain = zero;  // the largest Sqv^2 / Sqq is the smallest error
    for (float shrink : {1.0f, 0.96f, 0.92f}) {
      const __m512 inv = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(1.0f), _mm512_mul_ps(d0, _mm512_set1_ps(shrink)));
      __m512 sqv = zero, sqq = zero;
      for (int i = 0; i < kG; ++i) {
        const __m512 q = nearest_levels(t[i], inv, -32.0f, 31.0f);
        sqv = _mm512_fmadd_ps(q, t[i], sqv);
        sqq = _mm512_fmadd_ps(q, q, sqq);
      }
      const __mmask16 ok = _mm512_cmp_ps_mask(sqq, zero, _CMP_GT_OQ) & _mm512_cmp_ps_mask(sqv, zero, _CMP_GT_OQ);
      const __m512 gain = _mm512_maskz_div_ps(ok, _mm512_mul_ps(sqv, sqv), sqq);
      const __mmask16 take = _mm512_mask_cmp_ps_mask(ok, gain, best_gain, _CMP_GT_OQ);
      best_gain = _mm512_mask_mov_ps(best_gain, take, gain);
      best_d = _mm512_mask_mov_ps(best_d, take, _mm512_maskz_div_ps(take, sqv, sqq));
    }
    *d_out = _mm512_maskz_mov_ps(nonzero, best_d);
    *m_out = zero;
  }
}

// Pass 2 (one group a lane): the candidate codes a (and Q4's c) around d / D and the zero point -8 m / d, the ones
// whose levels have the smallest error (the first of equals): out = {a, c, their step d, offset m}.
template <int kTop>
static void codes_lanes(const __m512* t, float D, __m512 fd, __m512 fm, __m512* out) {
  const __m512 zero = _mm512_setzero_ps(), vD = _mm512_set1_ps(D);
  const __m512 a0 = D > 0.0f ? _mm512_roundscale_ps(_mm512_div_ps(fd, vD), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
                             : zero;
  __m512 best_err = _mm512_set1_ps(3.4e38f), best_a = zero, best_c = zero, best_d = zero, best_m = zero;
  for (float step : {0.0f, 1.0f}) {
    const __m512 a = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(a0, _mm512_set1_ps(step)), zero),
                                   _mm512_set1_ps(255.0f));
    const __m512 d = _mm512_mul_ps(vD, a);
    const __mmask16 nonzero = _mm512_cmp_ps_mask(d, zero, _CMP_GT_OQ);
    const __m512 inv = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(1.0f), d);
    const __m512 zp = _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(-8.0f), fm), d);  // (Q4 only: Q6 has none)
    const __m512 c0 = kTop == 63 ? zero
                                 : _mm512_maskz_roundscale_ps(nonzero, zp, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    for (float cstep : {0.0f, 1.0f}) {
      if (kTop == 63 && cstep > 0.0f) break;
      const __m512 c = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(c0, _mm512_set1_ps(cstep)), _mm512_set1_ps(-128.0f)),
                                     _mm512_set1_ps(127.0f));
      const __m512 m = kTop == 63 ? _mm512_mul_ps(_mm512_set1_ps(-32.0f), d)
                                  : _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(zero, d), c), _mm512_set1_ps(0.125f));
      __m512 err = zero;
      for (int i = 0; i < kG; ++i) {
        const __m512 q = nearest_levels(_mm512_sub_ps(t[i], m), inv, 0.0f, float(kTop));
        const __m512 r = _mm512_sub_ps(_mm512_fmadd_ps(q, d, m), t[i]);
        err = _mm512_fmadd_ps(r, r, err);
      }
      const __mmask16 take = _mm512_cmp_ps_mask(err, best_err, _CMP_LT_OQ);
      best_err = _mm512_mask_mov_ps(best_err, take, err);
      best_a = _mm512_mask_mov_ps(best_a, take, a);
      best_c = _mm512_mask_mov_ps(best_c, take, c);
      best_d = _mm512_mask_mov_ps(best_d, take, d);
      best_m = _mm512_mask_mov_ps(best_m, take, m);
    }
  }
  out[0] = best_a, out[1] = best_c, out[2] = best_d, out[3] = best_m;
}

// Columns of a 16 x 16 matrix of floats into rows, in place.
static inline void transpose16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i)  // each 128-bit lane L: rows 2i, 2i+1 of columns 4L..4L+1, then 4L+2..4L+3
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]), t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  for (int i = 0; i < 4; ++i) {  // u[4i + c], lane L: rows 4i..4i+3 of column 4L + c
    u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c: lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
    const __m512 a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), b = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    const __m512 e = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 f = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(a, e, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(b, f, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(a, e, 0xdd);
    r[12 + c] = _mm512_shuffle_f32x4(b, f, 0xdd);
  }
}
#endif

// The exponent e of a row's largest |value| (in [2^(e-1), 2^e)); at least -120, so that a row of subnormals is
// scaled by at most 2^120.
static int row_exponent(const float* x, int64_t k) {
  uint32_t top = 0;
  for (int64_t i = 0; i < k; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    top = std::max(top, u & 0x7fffffffu);
  }
  float amax;
  std::memcpy(&amax, &top, 4);
  int e = 0;
  std::frexp(amax, &e);
  return std::max(e, -120);
}

// Q8, one whole row: each group's step from its largest |value| (max / 127), coded against the row's D = the
// largest step / 255 rounded up to bfloat16 precision. Rounding the code up (a = ceil(step / D)) keeps every level
// within 127; the step grows by less than 1/a, under 0.8% for groups whose largest |value| is half the row's.
static void quantize_q8_row(const float* x, int64_t k, uint8_t* block, int lane) {
  const int64_t groups = quant_groups(k), gb = quant_group_bytes(Format::Q8);
  const int e = row_exponent(x, k);  // scaled as the coded formats' rows: the codes do not depend on the scale
  const float scale = std::ldexp(1.0f, -e);
  std::vector<float> v(size_t(groups * kG), 0.0f), step(static_cast<size_t>(groups));
  for (int64_t i = 0; i < k; ++i) v[size_t(i)] = x[i] * scale;
  float smax = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    float am[8] = {};
    for (int b = 0; b < kG; b += 8)
      for (int j = 0; j < 8; ++j) {
        const float a = std::fabs(v[size_t(g * kG + b + j)]);
        am[j] = a > am[j] ? a : am[j];
      }
    float amax = am[0];
    for (int j = 1; j < 8; ++j) amax = am[j] > amax ? am[j] : amax;
    step[size_t(g)] = amax / 127.0f;
    smax = std::max(smax, step[size_t(g)]);
  }
  const float D = bf16_ceil(smax / 255.0f);
  const uint16_t D16 = f32_to_bf16(std::ldexp(D, e));  // exact unless beyond bf16's normal range
  std::memcpy(block + 2 * lane, &D16, 2);
  for (int64_t g = 0; g < groups; ++g) {
    uint8_t* p = block + quant_header_bytes(Format::Q8) + g * gb;
    const float a = D > 0.0f ? std::min(std::ceil(step[size_t(g)] / D), 255.0f) : 0.0f;
    p[lane] = uint8_t(int(a));
    const float d = D * a, inv = d > 0.0f ? 1.0f / d : 0.0f;
    int8_t* q = reinterpret_cast<int8_t*>(p + quant_scale_bytes(Format::Q8) + kG * lane);
    for (int i = 0; i < kG; ++i) {
      float l = round_even(v[size_t(g * kG + i)] * inv);
      l = l < -127.0f ? -127.0f : l;
      l = l > 127.0f ? 127.0f : l;
      q[i] = int8_t(int(l));
    }
  }
}

// Q4 / Q6, one whole row (its codes are relative to the row's D): every group's best d (and Q4's m), D from the
// largest d, then per group the codes on either side of d / D (and of Q4's zero point -8 m / d), keeping those whose
// levels have the smallest error.
template <Format f>
static void quantize_coded_row(const float* x, int64_t k, uint8_t* block, int lane) {
  constexpr int kTop = f == Format::Q4 ? 15 : 63;
  const int64_t groups = quant_groups(k), gb = quant_group_bytes(f);
  // The search runs on the row scaled by a power of two to a largest |value| in [0.5, 1): exact, so the codes are
  // those of any scale of the row, and the sums of squares can neither overflow nor underflow.
  const int e = row_exponent(x, k);
  const float scale = std::ldexp(1.0f, -e);
#if defined(__AVX512F__)
  // The row scaled and zero-padded to whole sets of 16 groups, each set transposed (t: value i of its 16 groups
  // at t[i]); pass 1 on each set, D, pass 2, then each group's levels from its chosen d and m.
  const int64_t sets = (groups + 15) / 16;
  std::vector<float> v(size_t(sets * 16 * kG), 0.0f);
  for (int64_t i = 0; i < k; ++i) v[size_t(i)] = x[i] * scale;
  std::vector<__m512> t(size_t(sets * kG)), fit(size_t(2 * sets));
  __m512 dmax16 = _mm512_setzero_ps();
  for (int64_t s = 0; s < sets; ++s) {
    __m512* ts = &t[size_t(s * kG)];
    for (int half = 0; half < 2; ++half) {
      for (int j = 0; j < 16; ++j) ts[16 * half + j] = _mm512_loadu_ps(&v[size_t((s * 16 + j) * kG + 16 * half)]);
      transpose16(ts + 16 * half);
    }
    fit_lanes<kTop>(ts, &fit[size_t(2 * s)], &fit[size_t(2 * s + 1)]);
    dmax16 = _mm512_max_ps(dmax16, fit[size_t(2 * s)]);
  }
  const float D = bf16_ceil(_mm512_reduce_max_ps(dmax16) / 255.0f);  // of the scaled row: d is at most about 1
  const uint16_t D16 = f32_to_bf16(std::ldexp(D, e));                 // exact unless beyond bf16's normal range
  std::memcpy(block + 2 * lane, &D16, 2);
  constexpr int64_t scales = quant_scale_bytes(f);
  for (int64_t s = 0; s < sets; ++s) {
    __m512 best[4];
    codes_lanes<kTop>(&t[size_t(s * kG)], D, fit[size_t(2 * s)], fit[size_t(2 * s + 1)], best);
    alignas(64) float a[16], c[16], d[16], m[16];
    _mm512_store_ps(a, best[0]);
    _mm512_store_ps(c, best[1]);
    _mm512_store_ps(d, best[2]);
    _mm512_store_ps(m, best[3]);
    for (int j = 0; j < 16 && s * 16 + j < groups; ++j) {
      const int64_t g = s * 16 + j;
      uint8_t* p = block + quant_header_bytes(f) + g * gb;
      p[lane] = uint8_t(int(a[j]));
      if (kTop == 15) p[kQuantRows + lane] = uint8_t(int8_t(int(c[j])));
      const __m512 inv = _mm512_set1_ps(d[j] > 0.0f ? 1.0f / d[j] : 0.0f), vm = _mm512_set1_ps(m[j]);
      float l[kG];
      for (int h = 0; h < 2; ++h)
        _mm512_storeu_ps(l + 16 * h, nearest_levels(_mm512_sub_ps(_mm512_loadu_ps(&v[size_t(g * kG + 16 * h)]), vm),
                                                    inv, 0.0f, float(kTop)));
      pack_levels(f, l, p + scales + (kG / 2) * lane,
                  f == Format::Q6 ? p + scales + kQuantRows * (kG / 2) + 8 * lane : nullptr);
    }
  }
#else
  auto fill = [&](int64_t g, float* v) {
    const int64_t i0 = g * kG, n = std::min<int64_t>(kG, k - i0);
    fill_group(x + i0, n, v);
    for (int i = 0; i < kG; ++i) v[i] *= scale;
  };
  std::vector<float> dm(size_t(2 * groups));
  float v[kG], dmax = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    fill(g, v);
    if (kTop == 15) fit_q4_group(v, &dm[size_t(2 * g)], &dm[size_t(2 * g + 1)]);
    else dm[size_t(2 * g)] = fit_q6_group(v);
    dmax = std::max(dmax, dm[size_t(2 * g)]);
  }
  const float D = bf16_ceil(dmax / 255.0f);                  // of the scaled row: d is at most about 1
  const uint16_t D16 = f32_to_bf16(std::ldexp(D, e));        // exact unless beyond bf16's normal range
  std::memcpy(block + 2 * lane, &D16, 2);
  constexpr int64_t scales = quant_scale_bytes(f);
  for (int64_t g = 0; g < groups; ++g) {
    fill(g, v);
    const float a0 = D > 0.0f ? std::floor(dm[size_t(2 * g)] / D) : 0.0f;
    uint8_t* p = block + quant_header_bytes(f) + g * gb;
    float best = 3.4e38f, best_d = 0.0f, best_m = 0.0f;
    for (float a : {a0, a0 + 1.0f}) {
      a = std::min(std::max(a, 0.0f), 255.0f);
      const float d = D * a;
      if (kTop == 63) {
        const float err = group_levels<63>(v, d, -32.0f * d, nullptr);
        if (err < best) {
          best = err, best_d = d, best_m = -32.0f * d;
          p[lane] = uint8_t(int(a));
        }
        continue;
      }
      const float c0 = d > 0.0f ? std::floor(-8.0f * dm[size_t(2 * g + 1)] / d) : 0.0f;
      for (float c : {c0, c0 + 1.0f}) {
        c = std::min(std::max(c, -128.0f), 127.0f);
        const float m = -d * c * 0.125f, err = group_levels<15>(v, d, m, nullptr);
        if (err < best) {
          best = err, best_d = d, best_m = m;
          p[lane] = uint8_t(int(a));
          p[kQuantRows + lane] = uint8_t(int8_t(int(c)));
        }
      }
    }
    float best_levels[kG];
    group_levels<kTop>(v, best_d, best_m, best_levels);
    pack_levels(f, best_levels, p + scales + (kG / 2) * lane,
                f == Format::Q6 ? p + scales + kQuantRows * (kG / 2) + 8 * lane : nullptr);
  }
#endif
}

// Row `lane` of the block at `block` (tensor.h's layout) from k floats; false when a value does not fit the format
// (not finite, or |x| >= 2^125).
static bool quantize_row(Format f, const float* x, int64_t k, uint8_t* block, int lane) {
  // Refused: inf and NaN (a NaN would pass every comparison of the scale searches unseen), and |x| >= 2^125, whose
  // ranges and least-squares sums could overflow float32. One test of the exponent bits; the loop runs to the end
  // so that it vectorises.
  uint32_t bad = 0;
  for (int64_t i = 0; i < k; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    bad |= uint32_t((u & 0x7f800000u) >= 0x7e000000u);
  }
  if (bad) return false;
  if (f == Format::Q4) return quantize_coded_row<Format::Q4>(x, k, block, lane), true;
  if (f == Format::Q6) return quantize_coded_row<Format::Q6>(x, k, block, lane), true;
  quantize_q8_row(x, k, block, lane);
  return true;
}

// The step D of row `lane` of a block (its header, tensor.h).
static inline float row_step(const uint8_t* block, int lane) {
  uint16_t h;
  std::memcpy(&h, block + 2 * lane, 2);
  return qwen::bf16_to_f32(h);
}

// One row of a Q8 matrix as floats: row `lane` of the block starting at `block` (tensor.h's layout).
static void dequant_q8(const uint8_t* block, int lane, int64_t k, float* out) {
  constexpr int64_t bb = quant_group_bytes(Format::Q8);
  const float D = row_step(block, lane);
  for (int64_t g = 0; g < quant_groups(k); ++g) {
    const uint8_t* p = block + quant_header_bytes(Format::Q8) + g * bb;
    const float d = D * float(p[lane]);  // d and d * level exact
    const int8_t* q = reinterpret_cast<const int8_t*>(p + quant_scale_bytes(Format::Q8) + kG * lane);
    const int64_t i0 = g * kG, n = std::min<int64_t>(kG, k - i0);
    for (int64_t i = 0; i < n; ++i) out[i0 + i] = d * float(q[i]);
  }
}

// Q4 / Q6 (kBits): level e of a row's group from its nibbles and (Q6) its top bits.
template <int kBits>
static inline int coded_level(const uint8_t* nibbles, const uint8_t* high, int e) {
  const int low = e < kG / 2 ? (nibbles[e] & 15) : (nibbles[e - kG / 2] >> 4);
  if constexpr (kBits == 4) return low;
  return low | (((high[e & 7] >> (2 * (e >> 3))) & 3) << 4);
}

template <int kBits>
static void dequant_coded(const uint8_t* block, int lane, int64_t k, float* out) {
  constexpr Format f = kBits == 4 ? Format::Q4 : Format::Q6;
  constexpr int64_t bb = quant_group_bytes(f), scales = quant_scale_bytes(f);
  const float D = row_step(block, lane);
  for (int64_t g = 0; g < quant_groups(k); ++g) {
    const uint8_t* p = block + quant_header_bytes(f) + g * bb;
    const float d = D * float(p[lane]);  // d, d * level and m all exact
    const float m = kBits == 4 ? -d * float(int8_t(p[kQuantRows + lane])) * 0.125f : -32.0f * d;
    const uint8_t* nib = p + scales + (kG / 2) * lane;
    const uint8_t* high = kBits == 6 ? p + scales + kQuantRows * (kG / 2) + 8 * lane : nullptr;
    const int64_t i0 = g * kG, n = std::min<int64_t>(kG, k - i0);
#if defined(__AVX2__)  // long prompts dequantize every row: levels widened 16 (8) at a time, d * level + m by FMA
    const __m128i mask = _mm_set1_epi8(15), nb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(nib));
    __m128i lo = _mm_and_si128(nb, mask), hi = _mm_and_si128(_mm_srli_epi16(nb, 4), mask);
    if constexpr (kBits == 6) {  // top bits of value j + 8s: bits 2s of byte j
      long long h;
      std::memcpy(&h, high, 8);
      const __m128i three = _mm_set1_epi8(3);
      lo = _mm_or_si128(lo, _mm_slli_epi16(_mm_and_si128(_mm_set_epi64x(h >> 2, h), three), 4));
      hi = _mm_or_si128(hi, _mm_slli_epi16(_mm_and_si128(_mm_set_epi64x(h >> 6, h >> 4), three), 4));
    }
    alignas(64) float v[kG];
#if defined(__AVX512F__)
    const __m512 d16 = _mm512_set1_ps(d), m16 = _mm512_set1_ps(m);
    _mm512_store_ps(v, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d16, m16));
    _mm512_store_ps(v + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d16, m16));
#else
    for (int h = 0; h < 4; ++h) {
      const __m128i b = h < 2 ? (h ? _mm_srli_si128(lo, 8) : lo) : (h == 3 ? _mm_srli_si128(hi, 8) : hi);
      _mm256_store_ps(v + 8 * h, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_set1_ps(d),
                                                 _mm256_set1_ps(m)));
    }
#endif
    if (n == kG) std::memcpy(out + i0, v, sizeof v);
    else std::memcpy(out + i0, v, size_t(n) * 4);
#else
    for (int64_t i = 0; i < n; ++i) out[i0 + i] = d * float(coded_level<kBits>(nib, high, int(i))) + m;
#endif
  }
}

#if defined(__AVX2__)
// Prefetches of a quantized matmul's stream: kNear lines from `near` into L1, kFar lines from `far` into L2.
template <int kNear, int kFar>
static inline void prefetch_ahead(const uint8_t* near, const uint8_t* far) {
  for (int l = 0; l < kNear; ++l) _mm_prefetch(reinterpret_cast<const char*>(near + 64 * l), _MM_HINT_T0);
  for (int l = 0; l < kFar; ++l) _mm_prefetch(reinterpret_cast<const char*>(far + 64 * l), _MM_HINT_T1);
}

#endif

// Quantized matmuls: T input rows (each quantized to int8 levels qx with steps sx and level sums xsum, row
// strides groups*32 and groups) times weight rows r0 .. r1-1 (r0 a multiple of kQuantRows), a block of 4 weight
// rows at a time, kQuantInputs inputs at a time (block_dot gets their number as a compile-time constant, so its
// accumulators stay in registers). Every (input, weight row) sum is accumulated group by group in the same order
// whatever T is, so a row's result does not depend on how many rows are in the pass: a prompt, a decode step and a
// verified proposal compute the same numbers for the same row.
// Inputs per pass over a block's weights: VNNI's dot products leave the per-group work on the weights (loading,
// unpacking, scales) the larger share, so it is shared by more inputs there.
#if defined(__AVX512VNNI__)
constexpr int kQuantInputs = 8;
#else
constexpr int kQuantInputs = 2;
#endif

template <int N, class F>
static inline void with_inputs(int nt, F&& f) {  // f(std::integral_constant<int, nt>) for nt in 1..N
  if constexpr (N > 1)
    if (nt < N) return with_inputs<N - 1>(nt, f);
  f(std::integral_constant<int, N>{});
}

template <class Acc>
static void quant_matmul(int64_t T, float* y, int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1,
                         Acc&& block_dot) {
  for (int64_t r = r0; r < r1; r += kQuantRows) {
    for (int64_t t = 0; t < T; t += kQuantInputs) {
      const int nt = int(std::min<int64_t>(kQuantInputs, T - t));
      float sums[kQuantInputs][kQuantRows];  // block_dot sets rows 0..nt-1 (zeroing it was a REP STOS a block)
      with_inputs<kQuantInputs>(nt, [&](auto n) { block_dot(r / kQuantRows, t, n, sums); });
      for (int i = 0; i < nt; ++i)
        for (int64_t j = 0; j < kQuantRows && r + j < r1; ++j)
          finish_row(y + (t + i) * ldy, r + j, sums[i][j], bias, accumulate);
    }
  }
}

// Q8: y[t, r] = D_r * sum over groups of a_r,g * sx_t,g * <levels of row r, levels of input t> (+ bias, += y):
// the sums run over the codes, and the row's D multiplies them once at the end.
static void gemm_q8(const uint8_t* W, int64_t groups, const int8_t* qx, const float* sx, int64_t T, float* y,
                    int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1) {
  constexpr int64_t bb = quant_group_bytes(Format::Q8), head = quant_header_bytes(Format::Q8);
  constexpr int64_t scales = quant_scale_bytes(Format::Q8);
  quant_matmul(T, y, ldy, bias, accumulate, r0, r1, [&](int64_t b, int64_t t, auto n, float (*sums)[kQuantRows]) {
    constexpr int nt = decltype(n)::value;
    const uint8_t* base = W + b * (head + groups * bb);
    float D[kQuantRows];
    for (int j = 0; j < kQuantRows; ++j) D[j] = row_step(base, j);
    base += head;
#if defined(__AVX512VNNI__)
    // VPDPBUSD multiplies unsigned by signed bytes: the inputs' levels go in offset by 128 (x ^ 0x80), and each lane
    // starts from -128 x (its 4 weights' sum), so it ends at the exact dot product. One register holds a group of
    // two rows (rows 0-1, then 2-3: adjacent in the block), lanes 0-7 the first row, 8-15 the second.
    const __m512i flip = _mm512_set1_epi8(char(0x80)), zero = _mm512_setzero_si512();
    const __m512i two_rows = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[kQuantInputs][2];
    for (auto& in : acc) in[0] = in[1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* p = base + g * bb;
      const __m512 a = _mm512_castps128_ps512(_mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(load_u32(p)))));
      // The group 8 ahead into L1 and every line of the group 64 ahead (~8.5 KB) into L2: one-row passes waited on
      // memory at each group with the near prefetch alone (Zen 4, int8 decode 5-14% faster with the far one).
      prefetch_ahead<2, 3>(p + 8 * bb, p + 64 * bb);
      const __m512 a01 = _mm512_permutexvar_ps(two_rows, a);
      const __m512 a23 = _mm512_permutexvar_ps(_mm512_add_epi32(two_rows, _mm512_set1_epi32(2)), a);
      const __m512i w01 = _mm512_loadu_si512(p + scales);
      const __m512i w23 = _mm512_loadu_si512(p + scales + 2 * kG);
      const __m512i c01 = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, flip, w01));
      const __m512i c23 = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, flip, w23));
      for (int i = 0; i < nt; ++i) {
        const auto* x = reinterpret_cast<const __m256i*>(qx + (t + i) * groups * kG + g * kG);
        const __m512i xv = _mm512_xor_si512(_mm512_broadcast_i64x4(_mm256_loadu_si256(x)), flip);
        const __m512 s = _mm512_set1_ps(sx[(t + i) * groups + g]);
        const __m512 p01 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c01, xv, w01));
        const __m512 p23 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c23, xv, w23));
        acc[i][0] = _mm512_fmadd_ps(p01, _mm512_mul_ps(a01, s), acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(p23, _mm512_mul_ps(a23, s), acc[i][1]);
      }
    }
    for (int i = 0; i < nt; ++i)
      for (int h = 0; h < 2; ++h) {
        sums[i][2 * h] = D[2 * h] * hsum256(_mm512_castps512_ps256(acc[i][h]));
        sums[i][2 * h + 1] = D[2 * h + 1] * hsum256(_mm512_extractf32x8_ps(acc[i][h], 1));
      }
#elif defined(__AVX2__)
    // |w| (unsigned) times x with w's sign (signed): VPMADDUBSW's operand types; pairs of products fit int16.
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[kQuantInputs][kQuantRows];
    for (auto& row : acc)
      for (auto& a : row) a = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* p = base + g * bb;
      prefetch_ahead<3, 3>(p + 8 * bb, p + 64 * bb);  // as the AVX-512 path's, with every line of the near group too
      const __m128 a = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(load_u32(p))));
      __m256i wv[kQuantRows];
      for (int j = 0; j < kQuantRows; ++j)
        wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + scales + kG * j));
      for (int i = 0; i < nt; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + (t + i) * groups * kG + g * kG));
        alignas(16) float sc[kQuantRows];
        _mm_store_ps(sc, _mm_mul_ps(a, _mm_set1_ps(sx[(t + i) * groups + g])));
        for (int j = 0; j < kQuantRows; ++j) {
          const __m256i prod = _mm256_maddubs_epi16(_mm256_sign_epi8(wv[j], wv[j]), _mm256_sign_epi8(xv, wv[j]));
          const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, ones));
          acc[i][j] = _mm256_fmadd_ps(dot, _mm256_set1_ps(sc[j]), acc[i][j]);
        }
      }
    }
    for (int i = 0; i < nt; ++i)
      for (int j = 0; j < kQuantRows; ++j) sums[i][j] = D[j] * hsum256(acc[i][j]);
#else
    for (int i = 0; i < nt; ++i) {
      float sd[kQuantRows] = {};
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* p = base + g * bb;
        const int8_t* x = qx + (t + i) * groups * kG + g * kG;
        for (int j = 0; j < kQuantRows; ++j) {
          const int8_t* q = reinterpret_cast<const int8_t*>(p + scales + kG * j);
          int32_t dot = 0;
          for (int e = 0; e < kG; ++e) dot += int32_t(q[e]) * int32_t(x[e]);
          sd[j] += float(dot) * (float(p[j]) * sx[(t + i) * groups + g]);
        }
      }
      for (int j = 0; j < kQuantRows; ++j) sums[i][j] = D[j] * sd[j];
    }
#endif
  });
}

// Q4 / Q6: m / (d c) or m / d, the offset's factor (tensor.h).
template <int kBits>
constexpr float kCodedOffset = kBits == 4 ? -0.125f : -32.0f;

#if defined(__AVX512VNNI__)
// The codes of 4 rows (a0..a3) in 4 places, from each place's first 8 bytes h0..h3 (Q4: a0..a3 c0..c3; Q6: a0..a3
// and levels), as 16 lanes, lane 4j + k: row j's code a in place k (A), and the offset's weight on xsum (C: -a c / 8
// or -32 a), as gemm_coded's one-row kernel and coded_tiles both scale their sums.
template <int kBits>
__attribute__((always_inline)) inline void coded_scales(long long h0, long long h1, long long h2, long long h3,
                                                        __m512& A, __m512& C) {
  const __m128i by_row = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);  // byte 4k+j -> 4j+k
  const __m128i h01 = _mm_set_epi64x(h1, h0), h23 = _mm_set_epi64x(h3, h2);
  const __m128i h02 = _mm_unpacklo_epi32(h01, h23), h13 = _mm_unpackhi_epi32(h01, h23);
  A = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(_mm_unpacklo_epi32(h02, h13), by_row)));
  C = _mm512_mul_ps(A, _mm512_set1_ps(kCodedOffset<kBits>));
  if constexpr (kBits == 4) {
    const __m128i zero_points = _mm_shuffle_epi8(_mm_unpackhi_epi32(h02, h13), by_row);
    C = _mm512_mul_ps(C, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(zero_points)));
  }
}

// Q4 / Q6 against several inputs (gemm_coded below: T >= kCodedTileInputs), 16 weight rows (4 blocks) at a time with
// one output row per 32-bit lane, so that VPDPBUSD sums 4 levels of one row per lane and a group's dot products
// need no horizontal sums: each block's 4 rows x 4 dwords of levels are transposed in registers into 4 registers,
// dword m of all 16 rows (lane 4j + b: row j of block b), unpacked once and shared by every input, and each input
// takes 8 VPDPBUSDs (x's dwords broadcast) a group. The float arithmetic is gemm_coded's one-row arithmetic, operation
// for operation (four chains by group mod 4, each group's int32 sum scaled by (a s) and its offset added by FMA,
// then D ((S0 + S1) + (S2 + S3))), so a row's result does not depend on T; the chains live in L1, a load and a store
// an input and group. An input's group is then 11 operations on the multiply pipes (Zen 4: 3.6 ns measured against
// 3.4 for them alone); the one-row kernel run 8 inputs at a time spent 6.5 ns (16 inputs, one thread, weights in L2).
constexpr int64_t kCodedTileInputs = 2;  // already at 2 inputs: 7.0 against 7.3 ns an input and group (4: 5.4 / 6.5)
template <int kBits>
static void coded_tiles(const uint8_t* W, int64_t groups, const int8_t* qx, const float* sx, const float* xsum,
                        int64_t T, float* y, int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1) {
  constexpr Format f = kBits == 4 ? Format::Q4 : Format::Q6;
  constexpr int64_t bb = quant_group_bytes(f), head = quant_header_bytes(f), scales = quant_scale_bytes(f);
  constexpr int64_t high_at = scales + kQuantRows * (kG / 2);
  constexpr int kChunk = 16;  // inputs per pass over a tile's weights: their chains take 4 KB
  const int64_t block_bytes = head + groups * bb;
  const __m512i low = _mm512_set1_epi8(15), three = _mm512_set1_epi8(3), zero = _mm512_setzero_si512();
  // Lane 4j + b of the top bits' dword d: row j's dword d of block b, blocks 0-1 in the first source, 2-3 the second.
  const __m512i top_from[2] = {
      _mm512_setr_epi32(0, 8, 16, 24, 2, 10, 18, 26, 4, 12, 20, 28, 6, 14, 22, 30),
      _mm512_setr_epi32(1, 9, 17, 25, 3, 11, 19, 27, 5, 13, 21, 29, 7, 15, 23, 31)};
  const __m512i to_rows = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);  // lane 4j+b -> 4b+j
  alignas(64) float chains[kChunk][4][16];
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  const uint8_t* range_end = W + (r1 / kQuantRows) * block_bytes;
  for (int64_t r = r0; r < r1; r += 4 * kQuantRows) {
    // The next tile (4 blocks, contiguous) into L2 while this one is computed: few inputs are bandwidth-bound
    const uint8_t* next = W + (r / kQuantRows + 4) * block_bytes;
    L2Prefetch pf = L2Prefetch::spread(next, std::min(next + 4 * block_bytes, range_end), chunks * groups);
    const uint8_t* base[4];
    alignas(64) float D[16];
    for (int b = 0; b < 4; ++b) {
      base[b] = W + (r / kQuantRows + b) * block_bytes;
      for (int j = 0; j < kQuantRows; ++j) D[4 * b + j] = row_step(base[b], j);
      base[b] += head;
    }
    for (int64_t t = 0; t < T; t += kChunk) {
      const int nt = int(std::min<int64_t>(kChunk, T - t));
      for (int i = 0; i < nt; ++i)
        for (auto& c : chains[i]) _mm512_store_ps(c, _mm512_setzero_ps());
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* p[4] = {base[0] + g * bb, base[1] + g * bb, base[2] + g * bb, base[3] + g * bb};
        pf.step();
        __m512 A, C;  // lane 4j + b: row j of block b
        coded_scales<kBits>(load_u64(p[0]), load_u64(p[1]), load_u64(p[2]), load_u64(p[3]), A, C);
        __m512i lo[4], hi[4];  // dword m of every row: levels 4m..4m+3 (lo) and 16+4m.. (hi)
        {
          __m512i L[4];  // block b: 128-bit lane j, row j's 16 bytes
          for (int b = 0; b < 4; ++b) L[b] = _mm512_loadu_si512(p[b] + scales);
          const __m512i t0 = _mm512_unpacklo_epi32(L[0], L[1]), t1 = _mm512_unpackhi_epi32(L[0], L[1]);
          const __m512i t2 = _mm512_unpacklo_epi32(L[2], L[3]), t3 = _mm512_unpackhi_epi32(L[2], L[3]);
          const __m512i S[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                                _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
          __m512i top[2];
          if constexpr (kBits == 6) {  // a row's 8 bytes: byte e & 7 holds value e's top bits at bit 2 (e >> 3)
            auto pair = [&](int b) {
              return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(p[b] + high_at))),
                                        _mm256_loadu_si256((const __m256i*)(p[b + 1] + high_at)), 1);
            };
            const __m512i z01 = pair(0), z23 = pair(2);
            for (int d = 0; d < 2; ++d) top[d] = _mm512_permutex2var_epi32(z01, top_from[d], z23);
          }
          for (int m = 0; m < 4; ++m) {
            lo[m] = _mm512_and_si512(S[m], low);
            hi[m] = _mm512_and_si512(_mm512_srli_epi16(S[m], 4), low);
            if constexpr (kBits == 6) {  // values 4m.. take bits 2 (m >> 1) of top dword m & 1; 16 + 4m.. 4 more
              const int shift = 2 * (m >> 1);
              const __m512i tl = _mm512_and_si512(_mm512_srli_epi32(top[m & 1], shift), three);
              const __m512i th = _mm512_and_si512(_mm512_srli_epi32(top[m & 1], shift + 4), three);
              lo[m] = _mm512_or_si512(lo[m], _mm512_slli_epi32(tl, 4));
              hi[m] = _mm512_or_si512(hi[m], _mm512_slli_epi32(th, 4));
            }
          }
        }
        float* const chain0 = &chains[0][g & 3][0];
        for (int i = 0; i < nt; ++i) {
          const uint8_t* xb = reinterpret_cast<const uint8_t*>(qx + (t + i) * groups * kG + g * kG);
          __m512i sl = zero, sh = zero;  // two chains of dependent VPDPBUSDs, not one of 8
          for (int m = 0; m < 4; ++m) {
            sl = _mm512_dpbusd_epi32(sl, lo[m], _mm512_set1_epi32(load_u32(xb + 4 * m)));
            sh = _mm512_dpbusd_epi32(sh, hi[m], _mm512_set1_epi32(load_u32(xb + 16 + 4 * m)));
          }
          const __m512i s = _mm512_add_epi32(sl, sh);
          const int64_t at = (t + i) * groups + g;
          float* c = chain0 + i * 64;
          __m512 acc = _mm512_load_ps(c);
          acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(A, _mm512_set1_ps(sx[at])), acc);
          acc = _mm512_fmadd_ps(C, _mm512_set1_ps(xsum[at]), acc);
          _mm512_store_ps(c, acc);
        }
      }
      const __m512 d = _mm512_load_ps(D);
      for (int i = 0; i < nt; ++i) {
        const __m512 rows = _mm512_add_ps(_mm512_add_ps(_mm512_load_ps(chains[i][0]), _mm512_load_ps(chains[i][1])),
                                          _mm512_add_ps(_mm512_load_ps(chains[i][2]), _mm512_load_ps(chains[i][3])));
        alignas(64) float sums[16];
        _mm512_store_ps(sums, _mm512_mul_ps(d, _mm512_permutexvar_ps(to_rows, rows)));
        for (int j = 0; j < 16; ++j) finish_row(y + (t + i) * ldy, r + j, sums[j], bias, accumulate);
      }
    }
  }
}
#endif

// Q4 / Q6 (kBits): the same with levels 0..15 / 0..63, plus the offsets: m_r,g * (sum of input t over the group),
// m = -d c / 8 (Q4) or -32 d (Q6). d = D a: the sums run over the codes, and the row's D multiplies them once at the
// end (AVX2 and the portable path: with an explicit fma, since left to contraction the rounding could differ between
// the instantiations for 1..4 inputs).
template <int kBits>
static void gemm_coded(const uint8_t* W, int64_t groups, const int8_t* qx, const float* sx, const float* xsum,
                       int64_t T, float* y, int64_t ldy, const float* bias, bool accumulate, int64_t r0, int64_t r1) {
  constexpr Format f = kBits == 4 ? Format::Q4 : Format::Q6;
  constexpr int64_t bb = quant_group_bytes(f), head = quant_header_bytes(f);
  constexpr int64_t scales = quant_scale_bytes(f);             // the codes' bytes, then the levels'
  constexpr int64_t high_at = scales + kQuantRows * (kG / 2);  // Q6: the rows' top bits, 8 bytes each
  // (Inlined into quant_matmul's loop: called once a block of 4 rows, the call cost one-row passes ~8% at k = 1536.)
  auto block_dot = [&](int64_t b, int64_t t, auto n, float (*sums)[kQuantRows]) __attribute__((always_inline)) {
    constexpr int nt = decltype(n)::value;
    const uint8_t* base = W + b * (head + groups * bb);
    float D[kQuantRows];
    for (int j = 0; j < kQuantRows; ++j) D[j] = row_step(base, j);
    base += head;
#if defined(__AVX512VNNI__)
    // Four groups at a time. A group's dot products by VPDPBUSD (levels unsigned, x's signed) in one register, 128-bit
    // lane j row j: low nibbles against x's first 16 levels, high nibbles against the next 16 (Q6 puts each level's
    // top 2 bits above its nibble: a row's 8 bytes of them in both halves of its lane, shifted so that each 64-bit
    // half brings the bits of its 8 levels to the bottom of each byte). The four groups' registers are then summed
    // within each row's lane into one, lane 4j + k for row j, group k (exact, in int32), so one conversion and two
    // FMAs scale four groups, with the codes (and zero points) of the four gathered into lanes the same way (Zen 4,
    // one-row int4 from L3: 37 -> 46 GB/s of weights; group by group it took ~27 instructions a 72-byte group).
    constexpr int kQuadLines = int((4 * bb + 63) / 64);
    const __m512i low = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    __m512 acc[nt];
    for (auto& a : acc) a = _mm512_setzero_ps();
    // Groups g..g+3; with kTail only the first groups - g exist, the others read as zeros (masked loads).
    auto quad = [&](int64_t g, auto tail) {
      constexpr bool kTail = decltype(tail)::value;
      const int valid = kTail ? int(groups - g) : 4;
      const uint8_t* p = base + g * bb;
      const __mmask16 four = __mmask16((1u << valid) - 1u);
      auto bytes16 = [&](const void* q, int k) {
        return kTail ? _mm_maskz_loadu_epi8(k < valid ? 0xffff : 0, q) : _mm_loadu_si128((const __m128i*)q);
      };
      __m512 A, C;  // lane 4j + k: row j in group k (absent groups: zeros)
      auto first8 = [&](int k) { return !kTail || k < valid ? load_u64(p + k * bb) : 0; };
      coded_scales<kBits>(first8(0), first8(1), first8(2), first8(3), A, C);
      // As gemm_q8's: the lines of the groups 16 ahead into L1, of those 128 ahead (~9-13 KB) into L2 (the near one
      // alone left one-row int4 passes waiting on memory).
      if (!kTail) prefetch_ahead<kQuadLines, kQuadLines>(p + 16 * bb, p + 128 * bb);
      __m512i lo[4], hi[4];
      for (int k = 0; k < 4; ++k) {
        const uint8_t* pk = p + k * bb;
        const __m512i q = kTail ? _mm512_maskz_loadu_epi8(k < valid ? ~__mmask64(0) : 0, pk + scales)
                                : _mm512_loadu_si512(pk + scales);
        lo[k] = _mm512_and_si512(q, low), hi[k] = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
        if constexpr (kBits == 6) {
          const __m256i top = kTail ? _mm256_maskz_loadu_epi8(k < valid ? ~0u : 0, pk + high_at)
                                    : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pk + high_at));
          const __m512i h = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0),
                                                     _mm512_castsi256_si512(top));
          const __m512i three = _mm512_set1_epi8(3);
          const __m512i hl = _mm512_srlv_epi64(h, _mm512_set_epi64(2, 0, 2, 0, 2, 0, 2, 0));
          const __m512i hh = _mm512_srlv_epi64(h, _mm512_set_epi64(6, 4, 6, 4, 6, 4, 6, 4));
          lo[k] = _mm512_or_si512(lo[k], _mm512_slli_epi16(_mm512_and_si512(hl, three), 4));
          hi[k] = _mm512_or_si512(hi[k], _mm512_slli_epi16(_mm512_and_si512(hh, three), 4));
        }
      }
      for (int i = 0; i < nt; ++i) {
        const int8_t* x = qx + (t + i) * groups * kG + g * kG;
        __m512i s[4];
        for (int k = 0; k < 4; ++k) {
          const __m512i xl = _mm512_broadcast_i32x4(bytes16(x + k * kG, k));
          const __m512i xh = _mm512_broadcast_i32x4(bytes16(x + k * kG + 16, k));
          s[k] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[k], xl), hi[k], xh);
        }
        const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[0], s[1]), _mm512_unpackhi_epi32(s[0], s[1]));
        const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[2], s[3]), _mm512_unpackhi_epi32(s[2], s[3]));
        const __m512i sum = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
        const float* steps = sx + (t + i) * groups + g;
        const float* level_sums = xsum + (t + i) * groups + g;
        const __m512 s4 = _mm512_broadcast_f32x4(kTail ? _mm_maskz_loadu_ps(four, steps) : _mm_loadu_ps(steps));
        const __m512 m4 = _mm512_broadcast_f32x4(kTail ? _mm_maskz_loadu_ps(four, level_sums)
                                                       : _mm_loadu_ps(level_sums));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(A, s4), acc[i]);
        acc[i] = _mm512_fmadd_ps(C, m4, acc[i]);
      }
    };
    int64_t g = 0;
    for (; g + 4 <= groups; g += 4) quad(g, std::false_type{});
    if (g < groups) quad(g, std::true_type{});
    const __m128 d = _mm_loadu_ps(D);
    for (int i = 0; i < nt; ++i) {  // row j: D_j ((lane 4j + lane 4j+1) + (lane 4j+2 + lane 4j+3))
      const __m512 pairs = _mm512_add_ps(acc[i], _mm512_permute_ps(acc[i], 0xb1));
      const __m512 rows = _mm512_add_ps(pairs, _mm512_permute_ps(pairs, 0x4e));
      const __m128 row_sums = _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0,
                                                                                           0, 0, 0, 0, 0, 0, 0, 0),
                                                                        rows));
      _mm_storeu_ps(sums[i], _mm_mul_ps(d, row_sums));
    }
#elif defined(__AVX2__)
    // Two groups at a time. A register holds two adjacent rows' levels (rows 0-1, then 2-3; 128-bit lane r the row
    // 2h + r), once as low nibbles and once as high ones; VPMADDUBSW (levels unsigned, x's signed) against x's first
    // and second 16 levels in both lanes, the two added in int16 (|sum| <= 4 x 63 x 127 < 2^15), widened by
    // VPMADDWD; two VPHADDDs then leave the eight sums of (row, group) in one register, exact, so one conversion and
    // two FMAs scale two groups (group by group it took ~45 instructions a 72-byte int4 group for one input).
    // Lane order: 128-bit half r, then lanes (row r g, row r+2 g, row r g', row r+2 g'), rows 0-1 | 2-3 taken apart.
    constexpr int kPairLines = int((2 * bb + 63) / 64);
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
    const __m128i lane_order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i pair_order = _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1);  // (g, g, g', g') in both halves
    __m256 acc[nt];
    for (auto& a : acc) a = _mm256_setzero_ps();
    // Levels of one group as two registers per pair of rows: lo[h] and hi[h] hold rows 2h, 2h + 1.
    auto levels = [&](const uint8_t* p, __m256i (&lo)[2], __m256i (&hi)[2]) __attribute__((always_inline)) {
      for (int h = 0; h < 2; ++h) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + scales + 32 * h));
        lo[h] = _mm256_and_si256(q, low), hi[h] = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
        if constexpr (kBits == 6) {  // 64-bit part s of a row's 16 levels: 8s..8s+7 (lo) or 16+8s.. (hi)
          const __m256i top = _mm256_permute4x64_epi64(
              _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + high_at + 16 * h))), 0x50);
          const __m256i three = _mm256_set1_epi8(3);
          const __m256i tl = _mm256_srlv_epi64(top, _mm256_set_epi64x(2, 0, 2, 0));
          const __m256i th = _mm256_srlv_epi64(top, _mm256_set_epi64x(6, 4, 6, 4));
          lo[h] = _mm256_or_si256(lo[h], _mm256_slli_epi16(_mm256_and_si256(tl, three), 4));
          hi[h] = _mm256_or_si256(hi[h], _mm256_slli_epi16(_mm256_and_si256(th, three), 4));
        }
      }
    };
    // A group's four sums with input x, as VPHADDD leaves them: (row 0, row 0, row 2, row 2 | row 1, 1, 3, 3) halves.
    auto partial = [&](const __m256i (&lo)[2], const __m256i (&hi)[2], const int8_t* x) __attribute__((always_inline)) {
      const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
      const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 16)));
      __m256i m[2];
      for (int h = 0; h < 2; ++h)
        m[h] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[h], xl), _mm256_maddubs_epi16(hi[h], xh)),
                                 ones);
      return _mm256_hadd_epi32(m[0], m[1]);
    };
    // Groups g and g + 1 (with kOne, g alone: the second reads as zeros).
    auto pair = [&](int64_t g, auto one) __attribute__((always_inline)) {
      constexpr bool kOne = decltype(one)::value;
      const uint8_t* p = base + g * bb;
      prefetch_ahead<kPairLines, kPairLines>(p + 16 * bb, p + 128 * bb);  // as the AVX-512 path's
      // the codes (and zero points) of both groups in the sums' lane order
      const uint32_t a1 = kOne ? 0 : uint32_t(load_u32(p + bb)), c1 = kOne ? 0 : uint32_t(load_u32(p + bb + 4));
      auto in_order = [&](uint32_t g0, uint32_t g1) {
        return _mm_shuffle_epi8(_mm_cvtsi64_si128((long long)(uint64_t(g1) << 32 | g0)), lane_order);
      };
      const __m256 A = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(in_order(uint32_t(load_u32(p)), a1)));
      __m256 C = _mm256_mul_ps(A, _mm256_set1_ps(kCodedOffset<kBits>));
      if constexpr (kBits == 4)
        C = _mm256_mul_ps(C, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(in_order(uint32_t(load_u32(p + 4)), c1))));
      __m256i lo0[2], hi0[2], lo1[2], hi1[2];
      levels(p, lo0, hi0);
      if (!kOne) levels(p + bb, lo1, hi1);
      for (int i = 0; i < nt; ++i) {
        const int8_t* x = qx + (t + i) * groups * kG + g * kG;
        const __m256i s0 = partial(lo0, hi0, x);
        const __m256i s = _mm256_hadd_epi32(s0, kOne ? _mm256_setzero_si256() : partial(lo1, hi1, x + kG));
        const float* steps = sx + (t + i) * groups + g;
        const float* level_sums = xsum + (t + i) * groups + g;
        auto two = [&](const float* v) {  // (v[0], v[0], v[1], v[1]) in both halves; v[1] zero with kOne
          const __m128 pr = kOne ? _mm_set_ss(v[0]) : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(v)));
          return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(pr), pair_order);
        };
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(A, two(steps)), acc[i]);
        acc[i] = _mm256_fmadd_ps(C, two(level_sums), acc[i]);
      }
    };
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) pair(g, std::false_type{});
    if (g < groups) pair(g, std::true_type{});
    for (int i = 0; i < nt; ++i) {  // row 2h + r from half r: lanes (0 + 2) for row r, (1 + 3) for row r + 2
      alignas(32) float v[8];
      _mm256_store_ps(v, acc[i]);
      for (int r = 0; r < 2; ++r) {
        sums[i][r] = D[r] * (v[4 * r] + v[4 * r + 2]);
        sums[i][r + 2] = D[r + 2] * (v[4 * r + 1] + v[4 * r + 3]);
      }
    }
#else
    for (int i = 0; i < nt; ++i) {
      float sd[kQuantRows] = {}, sm[kQuantRows] = {};
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* p = base + g * bb;
        const int8_t* x = qx + (t + i) * groups * kG + g * kG;
        for (int j = 0; j < kQuantRows; ++j) {
          const uint8_t* q = p + scales + (kG / 2) * j;
          const uint8_t* high = kBits == 6 ? p + high_at + 8 * j : nullptr;
          int32_t dot = 0;
          for (int e = 0; e < kG; ++e) dot += int32_t(coded_level<kBits>(q, high, e)) * x[e];
          const float a = float(p[j]), c = kBits == 4 ? a * float(int8_t(p[kQuantRows + j])) : a;
          sd[j] += float(dot) * (a * sx[(t + i) * groups + g]);
          sm[j] += c * xsum[(t + i) * groups + g];
        }
      }
      for (int j = 0; j < kQuantRows; ++j) sums[i][j] = D[j] * std::fma(sm[j], kCodedOffset<kBits>, sd[j]);
    }
#endif
  };
#if defined(__AVX512VNNI__)
  if (T >= kCodedTileInputs) {  // whole tiles of 16 rows (thread ranges are multiples of 16), the rest as for one
    const int64_t tiled = r0 + (r1 - r0) / (4 * kQuantRows) * (4 * kQuantRows);
    coded_tiles<kBits>(W, groups, qx, sx, xsum, T, y, ldy, bias, accumulate, r0, tiled);
    r0 = tiled;
    if (r0 == r1) return;
  }
#endif
  quant_matmul(T, y, ldy, bias, accumulate, r0, r1, block_dot);
}

#if defined(__AVX512F__)
// bf16 weights as panels (kernels.h), float32 inputs: a 32-bit lane holding bf16 pair (w[2i], w[2i+1]) is w[2i]
// as a float once shifted left 16 and w[2i+1] once its low half is masked off, so each pair of 16 columns becomes
// two float vectors by two in-lane ops, shared by up to 12 input rows, and the sums are float32 FMAs in k's order.
struct F32Inputs {
  using In = float;
  template <int R, bool kPrefetch>
  __attribute__((always_inline)) static void run(const float* x, int64_t ldx, const uint16_t* panel, int64_t pairs,
                                                 __m512 (&acc)[R][2], L2Prefetch& pf) {
    const __m512i hi_mask = _mm512_set1_epi32(int32_t(0xffff0000u));
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      panels::prefetch_step<kPrefetch>(p, pf);
      const __m512i w0 = _mm512_loadu_si512((const void*)(panel + p * 64));
      const __m512i w1 = _mm512_loadu_si512((const void*)(panel + p * 64 + 32));
      const __m512 e0 = _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16));
      const __m512 o0 = _mm512_castsi512_ps(_mm512_and_si512(w0, hi_mask));
      const __m512 e1 = _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16));
      const __m512 o1 = _mm512_castsi512_ps(_mm512_and_si512(w1, hi_mask));
      for (int r = 0; r < R; ++r) {
        const __m512 xe = _mm512_set1_ps(x[r * ldx + 2 * p]), xo = _mm512_set1_ps(x[r * ldx + 2 * p + 1]);
        acc[r][0] = _mm512_fmadd_ps(o0, xo, _mm512_fmadd_ps(e0, xe, acc[r][0]));
        acc[r][1] = _mm512_fmadd_ps(o1, xo, _mm512_fmadd_ps(e1, xe, acc[r][1]));
      }
    }
  }
  // One row, two panels: acc[0..1] panel a's columns, acc[2..3] panel b's.
  __attribute__((always_inline)) static void run_two(const float* x, const uint16_t* pa, const uint16_t* pb,
                                                     int64_t pairs, __m512 (&acc)[4], L2Prefetch& pf_a,
                                                     L2Prefetch& pf_b) {
    const __m512i hi_mask = _mm512_set1_epi32(int32_t(0xffff0000u));
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      panels::prefetch_step<true>(p, pf_a);
      panels::prefetch_step<true>(p, pf_b);
      const __m512 xe = _mm512_set1_ps(x[2 * p]), xo = _mm512_set1_ps(x[2 * p + 1]);
      const uint16_t* src[4] = {pa + p * 64, pa + p * 64 + 32, pb + p * 64, pb + p * 64 + 32};
      for (int c = 0; c < 4; ++c) {
        const __m512i w = _mm512_loadu_si512((const void*)src[c]);
        acc[c] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w, hi_mask)), xo,
                                 _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), xe, acc[c]));
      }
    }
  }
};

static void panel_inputs_f32(const float* X, int64_t ldx, int64_t r0, int64_t r1, int64_t k, void* Xp) {
  const int64_t k2 = k + (k & 1);
  for (int64_t r = r0; r < r1; ++r) {
    float* d = static_cast<float*>(Xp) + r * k2;
    std::memcpy(d, X + r * ldx, size_t(k) * 4);
    if (k2 != k) d[k] = 0.0f;
  }
}

static void pack_bf16_block(const uint16_t* W, int64_t ldw, int64_t valid, int64_t k, uint16_t* block) {
  panels::pack_block(W, ldw, valid, k, block);
}

static void gemm_bf16_panels(const void* Xp, int64_t T, int64_t k, const uint16_t* P, int64_t n, float* C,
                             int64_t ldc, const float* bias, bool accumulate, int64_t n0, int64_t n1) {
  panels::gemm<F32Inputs>(static_cast<const float*>(Xp), T, k, P, n, C, ldc, bias, accumulate, n0, n1);
}
#define QWEN_PANEL_KERNELS panel_inputs_f32, pack_bf16_block, gemm_bf16_panels
#else
#define QWEN_PANEL_KERNELS nullptr, nullptr, nullptr
#endif

// Integer dot products against float32 tiles through sgemm for long quantized runs: without VNNI the integers are
// faster up to about 96 rows (Zen 3, int4 1.5B: 29-31 tok/s at any length; widened tiles 24 tok/s at 64 rows, 32 at
// 128, 37 at 256); with VNNI at every length (Zen 4, 1.5B, 512-token prompt: int4 98 tok/s
// against 60 on tiles, int8 66 against 57), unless the CPU also has AVX512-BF16 (kernels_dispatch.cpp: int8 on bf16
// tiles beyond 64 rows).
#if defined(__AVX512VNNI__)
constexpr int64_t kQuantDotRows = std::numeric_limits<int64_t>::max();
#else
constexpr int64_t kQuantDotRows = 96;
#endif

static const CpuKernels kKernels = {QWEN_KERNELS_ISA, gemv_f32, gemv_bf16, bf16_to_f32, rmsnorm_row,
                                    silu_mul_row, attend, quantize_row, quantize_x, gemm_q8, gemm_coded<4>,
                                    gemm_coded<6>, dequant_q8, dequant_coded<4>, dequant_coded<6>, kQuantDotRows,
                                    kQuantDotRows, QWEN_PANEL_KERNELS, nullptr, nullptr};
#undef QWEN_PANEL_KERNELS

}  // namespace QWEN_KERNELS_NS
}  // namespace qwen
