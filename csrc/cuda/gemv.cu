// The one-token matmul: y (n) = W (n, k) · x (k) with bf16 W and x, f32 accumulation. At batch 1 every weight is
// read once per token and used once, so this is a pure streaming problem: 16-byte loads, four of them in flight
// per lane, weights loaded with the streaming cache hint (they will not be reused before eviction), x through the
// read-only path (every warp reads the same x).
//
// Work split: a block is 8 warps; each row of W belongs to `wpr` consecutive warps of one block (wpr = 1, 2, 4, 8),
// which stride over the row's 16-byte chunks and combine their sums in shared memory. Small wpr for tall matrices
// (lm_head: 151936 rows), large for short wide ones (down_proj: 1536 × 8960) so that enough bytes are in flight.
#include "cuda/kernels.cuh"

namespace qwen {
namespace cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
  float s = bf16_lo(a.x) * bf16_lo(b.x);
  s = fmaf(bf16_hi(a.x), bf16_hi(b.x), s);
  s = fmaf(bf16_lo(a.y), bf16_lo(b.y), s);
  s = fmaf(bf16_hi(a.y), bf16_hi(b.y), s);
  s = fmaf(bf16_lo(a.z), bf16_lo(b.z), s);
  s = fmaf(bf16_hi(a.z), bf16_hi(b.z), s);
  s = fmaf(bf16_lo(a.w), bf16_lo(b.w), s);
  s = fmaf(bf16_hi(a.w), bf16_hi(b.w), s);
  return s;
}

template <bool OUT_F32>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const bf16* __restrict__ W, int64_t ldw,
                                                        const bf16* __restrict__ x, int k, int n,
                                                        void* __restrict__ out, const float* __restrict__ bias,
                                                        bool accumulate, int wpr) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rows_per_block = kWarps / wpr;
  const int row = blockIdx.x * rows_per_block + warp / wpr;
  const int part = warp % wpr;
  float acc = 0.0f;
  if (row < n) {  // uniform per warp: the warp's lanes share one row
    const uint4* w4 = reinterpret_cast<const uint4*>(W + int64_t(row) * ldw);
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    const int nvec = k >> 3;  // 8 bf16 per 16-byte chunk
    const int step = wpr * 32;
    int i = part * 32 + lane;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    for (; i + 3 * step < nvec; i += 4 * step) {
      const uint4 w0 = __ldcs(w4 + i), w1 = __ldcs(w4 + i + step), w2 = __ldcs(w4 + i + 2 * step),
                  w3 = __ldcs(w4 + i + 3 * step);
      const uint4 x0 = __ldg(x4 + i), x1 = __ldg(x4 + i + step), x2 = __ldg(x4 + i + 2 * step),
                  x3 = __ldg(x4 + i + 3 * step);
      a0 += dot8(w0, x0);
      a1 += dot8(w1, x1);
      a2 += dot8(w2, x2);
      a3 += dot8(w3, x3);
    }
    for (; i < nvec; i += step) a0 += dot8(__ldcs(w4 + i), __ldg(x4 + i));
    acc = (a0 + a1) + (a2 + a3);
  }
  acc = warp_sum(acc);
  if (wpr > 1) {  // uniform per launch
    __shared__ float partial[kWarps];
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (part == 0 && lane == 0) {
      acc = 0.0f;
      for (int j = 0; j < wpr; ++j) acc += partial[warp + j];
    }
  }
  if (part == 0 && lane == 0 && row < n) {
    const float y = acc + (bias ? bias[row] : 0.0f);
    if (OUT_F32) {
      float* o = static_cast<float*>(out) + row;
      *o = accumulate ? *o + y : y;
    } else {
      static_cast<bf16*>(out)[row] = to_bf16(y);
    }
  }
}

}  // namespace

bool gemv_supported(const void* W, int64_t ldw, const void* x, int64_t k) {
  return k > 0 && k % 8 == 0 && ldw % 8 == 0 && reinterpret_cast<uintptr_t>(W) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && k < (int64_t(1) << 30);
}

int gemv_default_warps(int64_t units, int64_t chunks, int sms) {
  // Aim for ~32 resident warps per multiprocessor streaming at once; never split a unit finer than 2 chunks a lane.
  const int64_t want = int64_t(sms) * 32;
  int wpr = 1;
  while (wpr < kWarps && units * wpr < want && chunks >= int64_t(wpr) * 2 * 32 * 2) wpr *= 2;
  return wpr;
}

void launch_gemv(const bf16* W, int64_t ldw, const bf16* x, int64_t k, int64_t n, void* out, bool out_f32,
                 bool accumulate, const float* bias, int warps_per_row, cudaStream_t stream) {
  if (warps_per_row != 1 && warps_per_row != 2 && warps_per_row != 4 && warps_per_row != 8)
    throw std::invalid_argument("gemv: warps_per_row must be 1, 2, 4 or 8");
  if (!gemv_supported(W, ldw, x, k)) throw std::invalid_argument("gemv: k, ldw must be multiples of 8 and W, x 16-byte aligned");
  const int rows_per_block = kWarps / warps_per_row;
  const unsigned blocks = unsigned((n + rows_per_block - 1) / rows_per_block);
  if (out_f32)
    gemv_kernel<true><<<blocks, kThreads, 0, stream>>>(W, ldw, x, int(k), int(n), out, bias, accumulate, warps_per_row);
  else
    gemv_kernel<false><<<blocks, kThreads, 0, stream>>>(W, ldw, x, int(k), int(n), out, bias, accumulate, warps_per_row);
  QWEN_CUDA_LAUNCHED();
}

}  // namespace cuda
}  // namespace qwen
