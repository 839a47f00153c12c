// The body of every CPU kernel. Included by one .cpp per instruction set with QWEN_KERNELS_NS naming the
// namespace; the intrinsic paths switch on what the compiler was told the target supports.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/kernels.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
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

static inline void finish_row(float* y, int64_t r, float s, const float* bias, bool accumulate) {
  if (bias) s += bias[r];
  y[r] = accumulate ? y[r] + s : s;
}

// Four rows at a time share each load of x; W streams through once. The row dot products are independent
// accumulator chains, enough to hide FMA latency while memory bandwidth is the limit.
static void gemv_f32(const float* W, int64_t ldw, const float* x, int64_t k, float* y, const float* bias,
                     bool accumulate, int64_t r0, int64_t r1) {
  int64_t r = r0;
#if defined(__AVX512F__)
  const int64_t kv = k & ~int64_t(15);
  const __mmask16 tail = __mmask16((1u << (k - kv)) - 1u);
  for (; r + 4 <= r1; r += 4) {
    const float *w0 = W + r * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < kv; i += 16) {
      const __m512 xv = _mm512_loadu_ps(x + i);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + i), xv, a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + i), xv, a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + i), xv, a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + i), xv, a3);
    }
    if (tail) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + kv);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + kv), xv, a0);
      a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w1 + kv), xv, a1);
      a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w2 + kv), xv, a2);
      a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w3 + kv), xv, a3);
    }
    finish_row(y, r, hsum(a0), bias, accumulate);
    finish_row(y, r + 1, hsum(a1), bias, accumulate);
    finish_row(y, r + 2, hsum(a2), bias, accumulate);
    finish_row(y, r + 3, hsum(a3), bias, accumulate);
  }
#elif defined(__AVX2__)
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
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (int64_t i = kv; i < k; ++i) {
      s0 += w0[i] * x[i]; s1 += w1[i] * x[i]; s2 += w2[i] * x[i]; s3 += w3[i] * x[i];
    }
    finish_row(y, r, s0, bias, accumulate);
    finish_row(y, r + 1, s1, bias, accumulate);
    finish_row(y, r + 2, s2, bias, accumulate);
    finish_row(y, r + 3, s3, bias, accumulate);
  }
#endif
  for (; r < r1; ++r) finish_row(y, r, dot(W + r * ldw, x, k), bias, accumulate);
}

// Width of the even/odd blocks prepare_x_bf16 makes: one vector register of bf16 pairs (AVX-512 only: the AVX2
// path widens with a zero-extension and reads x as it is).
#if defined(__AVX512F__)
constexpr int64_t kPairBlock = 32;
#else
constexpr int64_t kPairBlock = 1;
#endif

static void prepare_x_bf16(const float* x, int64_t k, float* xs) {
  const int64_t kb = kPairBlock > 1 ? k / kPairBlock * kPairBlock : 0, h = kPairBlock / 2;
  for (int64_t b = 0; b < kb; b += kPairBlock)
    for (int64_t i = 0; i < h; ++i) {
      xs[b + i] = x[b + 2 * i];
      xs[b + h + i] = x[b + 2 * i + 1];
    }
  for (int64_t i = kb; i < k; ++i) xs[i] = x[i];
}

// AVX-512: a 32-bit lane holding bf16 pair (w[2i], w[2i+1]) is w[2i+1] as f32 once its low half is masked off, and
// w[2i] once shifted left 16: two cheap in-lane ops per 32 weights, no lane-crossing widening; 8 rows share each x
// load, every row with its own even/odd accumulators. AVX2: see below.
static void gemv_bf16(const uint16_t* W, int64_t ldw, const float* x, const float* xs, int64_t k, float* y,
                      const float* bias, bool accumulate, int64_t r0, int64_t r1) {
  int64_t r = r0;
  [[maybe_unused]] const int64_t kb = kPairBlock > 1 ? k / kPairBlock * kPairBlock : 0;
#if defined(__AVX512F__)
  const __m512i hi_mask = _mm512_set1_epi32(int32_t(0xffff0000u));
  constexpr int R = 8;  // 8 rows: more memory streams in flight per x load; 16 accumulators fit in 32 zmm
  for (; r + R <= r1; r += R) {
    const uint16_t* w[R];
    for (int j = 0; j < R; ++j) w[j] = W + (r + j) * ldw;
    __m512 ae[R], ao[R];
    for (int j = 0; j < R; ++j) ae[j] = ao[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < kb; i += 32) {
      const __m512 xe = _mm512_loadu_ps(xs + i), xo = _mm512_loadu_ps(xs + i + 16);
      for (int j = 0; j < R; ++j) {
        const __m512i v = _mm512_loadu_si512((const void*)(w[j] + i));
        ae[j] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), xe, ae[j]);
        ao[j] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi_mask)), xo, ao[j]);
      }
    }
    for (int j = 0; j < R; ++j) {
      float s = hsum(_mm512_add_ps(ae[j], ao[j]));
      for (int64_t i = kb; i < k; ++i) s += bf16f(w[j][i]) * x[i];
      finish_row(y, r + j, s, bias, accumulate);
    }
  }
#elif defined(__AVX2__)
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
      for (int64_t i = k8; i < k; ++i) s += bf16f(w[j][i]) * x[i];
      finish_row(y, r + j, s, bias, accumulate);
    }
  }
#endif
  (void)xs;
  for (; r < r1; ++r) {
    const uint16_t* w = W + r * ldw;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < k; ++i) s += bf16f(w[i]) * x[i];
    finish_row(y, r, s, bias, accumulate);
  }
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

static void attend(const float* q, int64_t ldq, int64_t rows, const float* K, const float* V, int64_t first_len,
                   int64_t head_dim, float scale, float* scores, float* out, int64_t ldo) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* qi = q + i * ldq;
    float* oi = out + i * ldo;
    const int64_t n = first_len + i;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      const float s = dot(qi, K + j * head_dim, head_dim) * scale;
      scores[j] = s;
      mx = s > mx ? s : mx;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const float e = exp_nonpos(scores[j] - mx);
      scores[j] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < head_dim; ++d) oi[d] = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      const float p = scores[j] * inv;
      const float* vj = V + j * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) oi[d] += p * vj[d];
    }
  }
}

static const CpuKernels kKernels = {QWEN_KERNELS_ISA, gemv_f32, prepare_x_bf16, gemv_bf16, bf16_to_f32, rmsnorm_row, silu_mul_row, attend,
                                    nullptr, nullptr};

}  // namespace QWEN_KERNELS_NS
}  // namespace qwen
