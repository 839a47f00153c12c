// Quantized weights (tensor.h's Q8, Q4 and Q6: groups of 32 values of 4 rows, steps as 8-bit codes of each row's
// bfloat16 step) on the device, in the host's layout byte for byte.
//
//   one token    y = W · x with bf16 x: each lane takes whole groups of a block of 4 rows (all of the group's bytes,
//                read once, with 8-byte loads, 4-byte for Q8 and Q6), widens the levels in registers and keeps four f32
//                sums; per group, sum_j x_j q_j is scaled by d (Q4, Q6: plus m · sum_j x_j). Each block of rows
//                belongs to 1, 2, 4 or 8 warps of one CUDA block, as in the bf16 GEMV (gemv.cu).
//   dequantize   rows of W to bf16 (a tile that cuBLAS then multiplies) or f32 (the embedding lookup of token
//                ids from StepParams), 8 values a thread.
#include "cuda/kernels.cuh"
#include "tensor.h"

namespace qwen {
namespace cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kG = int(kQuantGroup);
static_assert(kQuantGroup == 32 && kQuantRows == 4, "the kernels below are written for groups of 32 and 4 rows");

// tensor.h's layout of a block of 4 rows: a header (D0..D3 as bfloat16), then groups of 4 rows: codes (Q8, Q6:
// a0..a3 as uint8; Q4: a0..a3, then c0..c3 as int8), then each row's levels.
template <Format F> struct Layout;
template <> struct Layout<Format::Q8> {
  static constexpr int kHeader = 8, kScales = 4, kLevels = 32, kBlock = kScales + 4 * kLevels;  // 132
};
template <> struct Layout<Format::Q4> {
  static constexpr int kHeader = 8, kScales = 8, kLevels = 16, kBlock = kScales + 4 * kLevels;  // 72
};
template <> struct Layout<Format::Q6> {  // the low 4 bits as Q4, then each row's 8 bytes of top 2 bits: 100
  static constexpr int kHeader = 8, kScales = 4, kLevels = 16, kHigh = kScales + 4 * kLevels, kBlock = kHigh + 4 * 8;
};
static_assert(Layout<Format::Q8>::kBlock == quant_group_bytes(Format::Q8) &&
              Layout<Format::Q8>::kScales == quant_scale_bytes(Format::Q8) &&
              Layout<Format::Q8>::kHeader == quant_header_bytes(Format::Q8) &&
              Layout<Format::Q4>::kBlock == quant_group_bytes(Format::Q4) &&
              Layout<Format::Q6>::kBlock == quant_group_bytes(Format::Q6) &&
              Layout<Format::Q4>::kScales == quant_scale_bytes(Format::Q4) &&
              Layout<Format::Q6>::kScales == quant_scale_bytes(Format::Q6) &&
              Layout<Format::Q4>::kHeader == quant_header_bytes(Format::Q4) &&
              Layout<Format::Q6>::kHeader == quant_header_bytes(Format::Q6), "tensor.h's layout");

// The start of block b (of 4 rows) and of its groups.
template <Format F>
__device__ __forceinline__ const uint8_t* block_at(const uint8_t* W, int64_t b, int groups) {
  return W + b * (Layout<F>::kHeader + int64_t(groups) * Layout<F>::kBlock);
}
// d = D * a of row r of a block, from its header and a group's codes (exact), and Q4's m = -d c / 8.
__device__ __forceinline__ float coded_step(const uint8_t* __restrict__ block, const uint8_t* __restrict__ p, int r) {
  const uint32_t D = uint32_t(__ldg(reinterpret_cast<const unsigned short*>(block) + r)) << 16;
  return __uint_as_float(D) * float(p[r]);
}
__device__ __forceinline__ float q4_offset(float d, const uint8_t* __restrict__ p, int r) {
  return -d * float(int8_t(p[4 + r])) * 0.125f;
}
// 8 bytes at a 4-byte aligned address (Q8's groups are 132 bytes long, Q6's 100).
__device__ __forceinline__ uint2 load8(const uint8_t* __restrict__ p) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(p);
  return uint2{__ldg(w), __ldg(w + 1)};
}

// Byte B of w as a float through the exponent of 2^23 (0x4B000000): a byte permute and a subtraction, both at
// full rate, where an int-to-float conversion runs at a quarter of it. `bias` is 2^23 plus the byte's offset.
template <int B>
__device__ __forceinline__ float byte_value(uint32_t w, float bias) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540u + B)) - bias;
}
// Four int8 levels (Q8): the sign bits flipped make them q + 128.
__device__ __forceinline__ void q8_levels(uint32_t w, float q[4]) {
  w ^= 0x80808080u;
  q[0] = byte_value<0>(w, 8388736.0f);
  q[1] = byte_value<1>(w, 8388736.0f);
  q[2] = byte_value<2>(w, 8388736.0f);
  q[3] = byte_value<3>(w, 8388736.0f);
}
// Four bytes of Q6 levels: lo[i] = value j + i (low nibbles of w, top 2 bits from the bottom of byte i of tl),
// hi[i] = value j + 16 + i (high nibbles, top bits from th). Q4's levels are these with no top bits.
__device__ __forceinline__ void q6_levels(uint32_t w, uint32_t tl, uint32_t th, float lo[4], float hi[4]) {
  const uint32_t l = (w & 0x0F0F0F0Fu) | ((tl & 0x03030303u) << 4);
  const uint32_t h = ((w >> 4) & 0x0F0F0F0Fu) | ((th & 0x03030303u) << 4);
  lo[0] = byte_value<0>(l, 8388608.0f);
  lo[1] = byte_value<1>(l, 8388608.0f);
  lo[2] = byte_value<2>(l, 8388608.0f);
  lo[3] = byte_value<3>(l, 8388608.0f);
  hi[0] = byte_value<0>(h, 8388608.0f);
  hi[1] = byte_value<1>(h, 8388608.0f);
  hi[2] = byte_value<2>(h, 8388608.0f);
  hi[3] = byte_value<3>(h, 8388608.0f);
}

// x[i0 .. i0 + 31] as floats, zero past k (the last group's padding). x is 16-byte aligned.
__device__ __forceinline__ void load_x32(const bf16* __restrict__ x, int i0, int k, float v[32]) {
  if (i0 + kG <= k) {
    const uint4* x4 = reinterpret_cast<const uint4*>(x + i0);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint4 u = __ldg(x4 + c);
      v[8 * c + 0] = bf16_lo(u.x);
      v[8 * c + 1] = bf16_hi(u.x);
      v[8 * c + 2] = bf16_lo(u.y);
      v[8 * c + 3] = bf16_hi(u.y);
      v[8 * c + 4] = bf16_lo(u.z);
      v[8 * c + 5] = bf16_hi(u.z);
      v[8 * c + 6] = bf16_lo(u.w);
      v[8 * c + 7] = bf16_hi(u.w);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kG; ++j) v[j] = i0 + j < k ? to_f32(x[i0 + j]) : 0.0f;
  }
}

// acc[r] += row r of the group at p · v, for the 4 rows of its block (which starts at `block`).
__device__ __forceinline__ void group_dot(const uint8_t* __restrict__ block, const uint8_t* __restrict__ p,
                                          const float v[32], float acc[4], Layout<Format::Q8>) {
  using L = Layout<Format::Q8>;
  uint2 w[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) w[r][c] = load8(p + L::kScales + L::kLevels * r + 8 * c);
  const float d[4] = {coded_step(block, p, 0), coded_step(block, p, 1), coded_step(block, p, 2),
                      coded_step(block, p, 3)};
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    float sum = 0.0f, q[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      q8_levels(w[r][c].x, q);
#pragma unroll
      for (int i = 0; i < 4; ++i) sum = fmaf(q[i], v[8 * c + i], sum);
      q8_levels(w[r][c].y, q);
#pragma unroll
      for (int i = 0; i < 4; ++i) sum = fmaf(q[i], v[8 * c + 4 + i], sum);
    }
    acc[r] = fmaf(d[r], sum, acc[r]);
  }
}

// Q4 and Q6: word c of a row's nibbles holds levels 4c..4c+3 and 16+4c..16+4c+3; Q6's top bits of level j + 8s are
// bits 2s of byte j (j < 8) of the row's 8 bytes t: byte 4(c & 1) + i of t, shifted right by 2(c >> 1) (low
// levels) or 4 + 2(c >> 1) (high ones). sum_j (d q_j + m) x_j = d sum_j q_j x_j + m sum_j x_j.
template <Format F>
__device__ __forceinline__ void coded_group_dot(const uint8_t* __restrict__ block, const uint8_t* __restrict__ p,
                                                const float v[32], float acc[4]) {
  using L = Layout<F>;
  uint2 w[4][2], t[4] = {};
#pragma unroll
  for (int r = 0; r < 4; ++r) {
#pragma unroll
    for (int c = 0; c < 2; ++c)  // Q4's groups are 72 bytes (8-byte aligned), Q6's 100 (4-byte aligned)
      w[r][c] = F == Format::Q4 ? __ldg(reinterpret_cast<const uint2*>(p + L::kScales + L::kLevels * r) + c)
                                : load8(p + L::kScales + L::kLevels * r + 8 * c);
    if constexpr (F == Format::Q6) t[r] = load8(p + L::kHigh + 8 * r);
  }
  float xs = 0.0f;
#pragma unroll
  for (int j = 0; j < kG; ++j) xs += v[j];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const uint32_t words[4] = {w[r][0].x, w[r][0].y, w[r][1].x, w[r][1].y};
    float sum = 0.0f, lo[4], hi[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint32_t top = (c & 1) ? t[r].y : t[r].x;  // (Q4: 0)
      q6_levels(words[c], top >> (2 * (c >> 1)), top >> (4 + 2 * (c >> 1)), lo, hi);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        sum = fmaf(lo[i], v[4 * c + i], sum);
        sum = fmaf(hi[i], v[16 + 4 * c + i], sum);
      }
    }
    const float d = coded_step(block, p, r), m = F == Format::Q4 ? q4_offset(d, p, r) : -32.0f * d;
    acc[r] = fmaf(d, sum, fmaf(m, xs, acc[r]));
  }
}
__device__ __forceinline__ void group_dot(const uint8_t* __restrict__ block, const uint8_t* __restrict__ p,
                                          const float v[32], float acc[4], Layout<Format::Q4>) {
  coded_group_dot<Format::Q4>(block, p, v, acc);
}
__device__ __forceinline__ void group_dot(const uint8_t* __restrict__ block, const uint8_t* __restrict__ p,
                                          const float v[32], float acc[4], Layout<Format::Q6>) {
  coded_group_dot<Format::Q6>(block, p, v, acc);
}

// The sums of acc[0..3] over the warp in 6 shuffles (20 one row at a time): halves of the warp swap the rows they
// do not keep at each of the first two steps. Lane l ends with row l >> 3's total.
__device__ __forceinline__ float warp_sum4(const float acc[4]) {
  const bool hi16 = threadIdx.x & 16, hi8 = threadIdx.x & 8;
  float a = hi16 ? acc[2] : acc[0], b = hi16 ? acc[3] : acc[1];
  a += __shfl_xor_sync(0xffffffffu, hi16 ? acc[0] : acc[2], 16);
  b += __shfl_xor_sync(0xffffffffu, hi16 ? acc[1] : acc[3], 16);
  float v = hi8 ? b : a;
  v += __shfl_xor_sync(0xffffffffu, hi8 ? a : b, 8);
#pragma unroll
  for (int o = 4; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <Format F, bool OUT_F32>
__global__ void __launch_bounds__(kThreads) qgemv_kernel(const uint8_t* __restrict__ W, int groups,
                                                         const bf16* __restrict__ x, int k, int n,
                                                         void* __restrict__ out, const float* __restrict__ bias,
                                                         bool accumulate, int wpb) {
  using L = Layout<F>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int block = blockIdx.x * (kWarps / wpb) + warp / wpb;  // of 4 rows
  const int part = warp % wpb;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (block * 4 < n) {  // uniform per warp
    const uint8_t* start = block_at<F>(W, block, groups);
    for (int g = part * 32 + lane; g < groups; g += wpb * 32) {
      float v[kG];
      load_x32(x, g * kG, k, v);
      group_dot(start, start + L::kHeader + int64_t(g) * L::kBlock, v, acc, L{});
    }
  }
  float y = warp_sum4(acc);
  const int r = lane >> 3;  // the row of the block whose sum this lane holds; lane 8r writes it
  if (wpb > 1) {  // uniform per launch
    __shared__ float partial[kWarps][4];
    if ((lane & 7) == 0) partial[warp][r] = y;
    __syncthreads();
    if (part == 0 && (lane & 7) == 0) {
      y = 0.0f;
      for (int j = 0; j < wpb; ++j) y += partial[warp + j][r];
    }
  }
  const int row = block * 4 + r;
  if (part == 0 && (lane & 7) == 0 && row < n) {
    y += bias ? bias[row] : 0.0f;
    if (OUT_F32) {
      float* o = static_cast<float*>(out) + row;
      *o = accumulate ? *o + y : y;
    } else {
      static_cast<bf16*>(out)[row] = to_bf16(y);
    }
  }
}

// Values 8c .. 8c + 7 of row r of the group at p (of the block at `block`).
__device__ __forceinline__ void values8(const uint8_t* __restrict__ block, const uint8_t* __restrict__ p, int r, int c,
                                        float v[8], Layout<Format::Q8>) {
  using L = Layout<Format::Q8>;
  const float d = coded_step(block, p, r);  // d and d * level exact, as on the CPU
  const uint2 w = load8(p + L::kScales + L::kLevels * r + 8 * c);
  q8_levels(w.x, v);
  q8_levels(w.y, v + 4);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] *= d;
}

// Q4 / Q6: values 8c .. 8c + 7 are the low nibbles of bytes 8c.. (c < 2) or the high ones of bytes 8(c - 2)..;
// Q6's top bits of value j + 8c are bits 2c of byte j of the row's 8 bytes. d * level and m are exact: one rounding
// of their sum (none for Q6), as on the CPU.
template <Format F>
__device__ __forceinline__ void coded_values8(const uint8_t* __restrict__ block, const uint8_t* __restrict__ p, int r,
                                              int c, float v[8]) {
  using L = Layout<F>;
  const float d = coded_step(block, p, r), m = F == Format::Q4 ? q4_offset(d, p, r) : -32.0f * d;
  const uint2 w = F == Format::Q4 ? __ldg(reinterpret_cast<const uint2*>(p + L::kScales + L::kLevels * r) + (c & 1))
                                  : load8(p + L::kScales + L::kLevels * r + 8 * (c & 1));
  uint2 t = {0u, 0u};
  if constexpr (F == Format::Q6) t = load8(p + L::kHigh + 8 * r);
  float lo[4], hi[4];
  q6_levels(w.x, t.x >> (2 * c), t.x >> (2 * c), lo, hi);  // (Q4: no top bits)
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = c < 2 ? lo[i] : hi[i];
  q6_levels(w.y, t.y >> (2 * c), t.y >> (2 * c), lo, hi);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[4 + i] = c < 2 ? lo[i] : hi[i];
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = fmaf(d, v[i], m);
}
__device__ __forceinline__ void values8(const uint8_t* __restrict__ block, const uint8_t* __restrict__ p, int r, int c,
                                        float v[8], Layout<Format::Q4>) {
  coded_values8<Format::Q4>(block, p, r, c, v);
}
__device__ __forceinline__ void values8(const uint8_t* __restrict__ block, const uint8_t* __restrict__ p, int r, int c,
                                        float v[8], Layout<Format::Q6>) {
  coded_values8<Format::Q6>(block, p, r, c, v);
}

// out row t (of `rows`) = row (ids ? the id of row t : row0 + t) of W, as f32 or bf16; one thread per 8 values.
template <Format F, bool OUT_F32>
__global__ void dequant_kernel(const uint8_t* __restrict__ W, int groups, int k, int64_t row0, int64_t rows,
                               void* __restrict__ out, int64_t ldo, const StepParams* __restrict__ ids) {
  using L = Layout<F>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_row = int64_t(groups) * 4;
  const int64_t t = idx / per_row;
  if (t >= rows) return;
  const int g = int((idx - t * per_row) >> 2), c = int(idx & 3);
  const int i0 = g * kG + 8 * c;
  if (i0 >= k) return;
  const int64_t src = ids ? int64_t(step_rows(ids)[t].id) : row0 + t;
  float v[8];
  const uint8_t* start = block_at<F>(W, src >> 2, groups);
  values8(start, start + L::kHeader + int64_t(g) * L::kBlock, int(src & 3), c, v, L{});
  const int n = min(8, k - i0);
  if (OUT_F32) {
    float* o = static_cast<float*>(out) + t * ldo + i0;
    for (int i = 0; i < n; ++i) o[i] = v[i];
  } else {
    bf16* o = static_cast<bf16*>(out) + t * ldo + i0;
    if (n == 8 && (reinterpret_cast<uintptr_t>(o) & 15) == 0) {
      uint32_t two[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        two[i] = uint32_t(__bfloat16_as_ushort(to_bf16(v[2 * i]))) |
                 (uint32_t(__bfloat16_as_ushort(to_bf16(v[2 * i + 1]))) << 16);
      *reinterpret_cast<uint4*>(o) = uint4{two[0], two[1], two[2], two[3]};
    } else {
      for (int i = 0; i < n; ++i) o[i] = to_bf16(v[i]);
    }
  }
}

template <Format F>
void launch_dequant_f(const uint8_t* W, int64_t groups, int64_t k, int64_t row0, int64_t rows, void* out,
                      bool out_f32, int64_t ldo, const StepParams* ids, cudaStream_t stream) {
  const int64_t threads = rows * groups * 4;
  const unsigned blocks = unsigned((threads + kThreads - 1) / kThreads);
  if (out_f32)
    dequant_kernel<F, true><<<blocks, kThreads, 0, stream>>>(W, int(groups), int(k), row0, rows, out, ldo, ids);
  else
    dequant_kernel<F, false><<<blocks, kThreads, 0, stream>>>(W, int(groups), int(k), row0, rows, out, ldo, ids);
  QWEN_CUDA_LAUNCHED();
}

template <Format F>
void launch_qgemv_f(const uint8_t* W, const bf16* x, int64_t k, int64_t n, void* out, bool out_f32, bool accumulate,
                    const float* bias, int wpb, cudaStream_t stream) {
  const int blocks_per_cta = kWarps / wpb;
  const unsigned ctas = unsigned((quant_blocks(n) + blocks_per_cta - 1) / blocks_per_cta);
  const int groups = int(quant_groups(k));
  if (out_f32)
    qgemv_kernel<F, true><<<ctas, kThreads, 0, stream>>>(W, groups, x, int(k), int(n), out, bias, accumulate, wpb);
  else
    qgemv_kernel<F, false><<<ctas, kThreads, 0, stream>>>(W, groups, x, int(k), int(n), out, bias, accumulate, wpb);
  QWEN_CUDA_LAUNCHED();
}

}  // namespace

bool qgemv_supported(const void* x, int64_t k) {
  return k > 0 && k < (int64_t(1) << 30) && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

void launch_qgemv(Format f, const uint8_t* W, const bf16* x, int64_t k, int64_t n, void* out, bool out_f32,
                  bool accumulate, const float* bias, int wpb, cudaStream_t stream) {
  if (wpb != 1 && wpb != 2 && wpb != 4 && wpb != 8)
    throw std::invalid_argument("qgemv: warps_per_block must be 1, 2, 4 or 8");
  if (!qgemv_supported(x, k) || reinterpret_cast<uintptr_t>(W) % 16 != 0 || n < 1 || n >= (int64_t(1) << 31))
    throw std::invalid_argument("qgemv: x and W must be 16-byte aligned, 0 < k < 2^30, 0 < n < 2^31");
  if (f == Format::Q8) launch_qgemv_f<Format::Q8>(W, x, k, n, out, out_f32, accumulate, bias, wpb, stream);
  else if (f == Format::Q4) launch_qgemv_f<Format::Q4>(W, x, k, n, out, out_f32, accumulate, bias, wpb, stream);
  else if (f == Format::Q6) launch_qgemv_f<Format::Q6>(W, x, k, n, out, out_f32, accumulate, bias, wpb, stream);
  else throw std::invalid_argument("qgemv: not a quantized format");
}

void launch_dequant(Format f, const uint8_t* W, int64_t k, int64_t row0, int64_t rows, void* out, bool out_f32,
                    int64_t ldo, const StepParams* ids, cudaStream_t stream) {
  const int64_t groups = quant_groups(k);
  if (f == Format::Q8) launch_dequant_f<Format::Q8>(W, groups, k, row0, rows, out, out_f32, ldo, ids, stream);
  else if (f == Format::Q4) launch_dequant_f<Format::Q4>(W, groups, k, row0, rows, out, out_f32, ldo, ids, stream);
  else if (f == Format::Q6) launch_dequant_f<Format::Q6>(W, groups, k, row0, rows, out, out_f32, ldo, ids, stream);
  else throw std::invalid_argument("dequant: not a quantized format");
}

}  // namespace cuda
}  // namespace qwen
