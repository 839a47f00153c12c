// The small per-token kernels of the CUDA backend: embedding gather, RMSNorm, RoPE, KV store, SiLU·up, bias add,
// argmax. Each is memory-bound and tiny next to the matmuls; they exist so that nothing leaves the GPU.
#include <algorithm>
#include <cfloat>
#include <climits>

#include "cuda/kernels.cuh"

namespace qwen {
namespace cuda {

namespace {

constexpr int kThreads = 256;

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < warps ? partial[lane] : 0.0f;
    s = warp_sum(s);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

__global__ void embed_kernel(float* __restrict__ out, int64_t ldo, const bf16* __restrict__ table, int64_t ldt,
                             int H, const StepParams* __restrict__ params) {
  const int t = blockIdx.x;
  const int id = step_rows(params)[t].id;
  const bf16* row = table + int64_t(id) * ldt;
  float* o = out + int64_t(t) * ldo;
  for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = to_f32(row[i]);
}

template <bool OUT_F32>
__global__ void rmsnorm_kernel(void* __restrict__ out, int64_t ldo, const float* __restrict__ x, int64_t ldx,
                               const float* __restrict__ w, int n, float eps) {
  const float* xr = x + int64_t(blockIdx.x) * ldx;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(ss / float(n) + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float y = w[i] * (xr[i] * inv);
    if (OUT_F32) static_cast<float*>(out)[int64_t(blockIdx.x) * ldo + i] = y;
    else static_cast<bf16*>(out)[int64_t(blockIdx.x) * ldo + i] = to_bf16(y);
  }
}

__global__ void rope_kernel(bf16* __restrict__ q, int64_t ldq, int q_heads, bf16* __restrict__ k, int64_t ldk,
                            int k_heads, int hd, const float* __restrict__ cos, const float* __restrict__ sin,
                            int64_t ldcs, const StepParams* __restrict__ params) {
  const int t = blockIdx.x, half = hd / 2;
  const int64_t pos = step_rows(params)[t].pos;
  const float* c = cos + pos * ldcs;
  const float* s = sin + pos * ldcs;
  const int total = (q_heads + k_heads) * half;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int head = idx / half, i = idx - head * half;
    // One thread owns the pair (i, i + half) of one head: it reads both before writing either.
    bf16* v = head < q_heads ? q + int64_t(t) * ldq + int64_t(head) * hd
                             : k + int64_t(t) * ldk + int64_t(head - q_heads) * hd;
    const float x1 = to_f32(v[i]), x2 = to_f32(v[i + half]);
    v[i] = to_bf16(x1 * c[i] - x2 * s[i]);
    v[i + half] = to_bf16(x2 * c[i] + x1 * s[i]);
  }
}

__global__ void kv_store_kernel(bf16* __restrict__ kc, bf16* __restrict__ vc, int64_t ldc, const bf16* __restrict__ k,
                                int64_t ldk, const bf16* __restrict__ v, int64_t ldv, int kv_heads, int hd,
                                int64_t max_pos, const StepParams* __restrict__ params) {
  const int t = blockIdx.x;
  const StepRow r = step_rows(params)[t];
  const int total = kv_heads * hd;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int g = idx / hd, d = idx - g * hd;
    const int64_t row = (int64_t(r.slot) * kv_heads + g) * max_pos + r.pos;
    kc[row * ldc + d] = k[int64_t(t) * ldk + idx];
    vc[row * ldc + d] = v[int64_t(t) * ldv + idx];
  }
}

__global__ void silu_mul_kernel(bf16* __restrict__ out, int64_t ldo, const bf16* __restrict__ gu, int64_t ldg, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int t = blockIdx.y;
  if (i >= n) return;
  const float g = to_f32(gu[int64_t(t) * ldg + i]);
  const float u = to_f32(gu[int64_t(t) * ldg + n + i]);
  const float sig = 1.0f / (1.0f + expf(-g));  // expf(-g) = inf for very negative g: sig = 0, silu = -0
  out[int64_t(t) * ldo + i] = to_bf16(g * sig * u);
}

template <bool OUT_F32>
__global__ void add_bias_kernel(void* out, int64_t ldo, const float* src, int64_t lds, const float* __restrict__ bias,
                                int n) {
  // out may be src (F32 in place): each element is read, then written, by the same thread.
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int t = blockIdx.y;
  if (i >= n) return;
  const float y = src[int64_t(t) * lds + i] + bias[i];
  if (OUT_F32) {
    static_cast<float*>(out)[int64_t(t) * ldo + i] = y;
  } else {
    static_cast<bf16*>(out)[int64_t(t) * ldo + i] = to_bf16(y);
  }
}

// (v, i) beats (bv, bi) when larger, or equal at a lower index. NaN compares false, so it never wins.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

__device__ void block_argmax(float& v, int& i) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(ov, oi, v, i)) { v = ov; i = oi; }
  }
  if (lane == 0) { sv[warp] = v; si[warp] = i; }
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? sv[lane] : -INFINITY;
    i = lane < warps ? si[lane] : INT_MAX;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, o);
      const int oi = __shfl_xor_sync(0xffffffffu, i, o);
      if (better(ov, oi, v, i)) { v = ov; i = oi; }
    }
  }
  __syncthreads();  // sv/si may be reused by a second call
}

// Row blockIdx.y of x; its blocks' partials at part_v/part_i[blockIdx.y * gridDim.x + blockIdx.x].
__global__ void argmax_kernel(const float* __restrict__ x, int64_t ldx, int n, float* part_v, int* part_i,
                              unsigned* counters, int* result) {
  x += int64_t(blockIdx.y) * ldx;
  part_v += blockIdx.y * gridDim.x;
  part_i += blockIdx.y * gridDim.x;
  unsigned* counter = counters + blockIdx.y;
  float bv = -INFINITY;
  int bi = INT_MAX;
  // Each thread walks its indices upwards, so a strict '>' keeps the first of equal values.
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const float v = x[i];
    if (better(v, i, bv, bi)) { bv = v; bi = i; }
  }
  block_argmax(bv, bi);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    part_v[blockIdx.x] = bv;
    part_i[blockIdx.x] = bi;
    __threadfence();  // the partial is visible device-wide before the ticket is taken
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  bv = -INFINITY;
  bi = INT_MAX;
  for (int b = threadIdx.x; b < int(gridDim.x); b += blockDim.x) {
    const float v = __ldcg(part_v + b);  // L2, not a stale L1 line
    const int i = __ldcg(part_i + b);
    if (better(v, i, bv, bi)) { bv = v; bi = i; }
  }
  block_argmax(bv, bi);
  if (threadIdx.x == 0) {
    result[blockIdx.y] = bi == INT_MAX ? 0 : bi;  // all NaN: 0
    *counter = 0u;                     // ready for the next launch
  }
}

}  // namespace

void launch_embed(float* out, int64_t ldo, const bf16* table, int64_t ldt, int64_t H, int64_t T,
                  const StepParams* params, cudaStream_t stream) {
  embed_kernel<<<unsigned(T), kThreads, 0, stream>>>(out, ldo, table, ldt, int(H), params);
  QWEN_CUDA_LAUNCHED();
}

void launch_rmsnorm(void* out, bool out_f32, int64_t ldo, const float* x, int64_t ldx, const float* w, int64_t n,
                    int64_t rows, float eps, cudaStream_t stream) {
  const int threads = n >= 4096 ? 1024 : n >= 1024 ? 512 : 256;
  if (out_f32) rmsnorm_kernel<true><<<unsigned(rows), threads, 0, stream>>>(out, ldo, x, ldx, w, int(n), eps);
  else rmsnorm_kernel<false><<<unsigned(rows), threads, 0, stream>>>(out, ldo, x, ldx, w, int(n), eps);
  QWEN_CUDA_LAUNCHED();
}

void launch_rope(bf16* q, int64_t ldq, int64_t q_heads, bf16* k, int64_t ldk, int64_t k_heads, int64_t hd,
                 const float* cos, const float* sin, int64_t ldcs, int64_t T, const StepParams* params,
                 cudaStream_t stream) {
  rope_kernel<<<unsigned(T), kThreads, 0, stream>>>(q, ldq, int(q_heads), k, ldk, int(k_heads), int(hd), cos, sin,
                                                    ldcs, params);
  QWEN_CUDA_LAUNCHED();
}

void launch_kv_store(bf16* k_cache, bf16* v_cache, int64_t ldc, const bf16* k, int64_t ldk, const bf16* v,
                     int64_t ldv, int64_t kv_heads, int64_t hd, int64_t max_pos, int64_t T,
                     const StepParams* params, cudaStream_t stream) {
  kv_store_kernel<<<unsigned(T), kThreads, 0, stream>>>(k_cache, v_cache, ldc, k, ldk, v, ldv, int(kv_heads), int(hd),
                                                        max_pos, params);
  QWEN_CUDA_LAUNCHED();
}

void launch_silu_mul(bf16* out, int64_t ldo, const bf16* gate_up, int64_t ldg, int64_t n, int64_t T,
                     cudaStream_t stream) {
  const dim3 grid(unsigned((n + kThreads - 1) / kThreads), unsigned(T));
  silu_mul_kernel<<<grid, kThreads, 0, stream>>>(out, ldo, gate_up, ldg, int(n));
  QWEN_CUDA_LAUNCHED();
}

void launch_add_bias(void* out, bool out_f32, int64_t ldo, const float* src, int64_t lds, const float* bias,
                     int64_t n, int64_t T, cudaStream_t stream) {
  const dim3 grid(unsigned((n + kThreads - 1) / kThreads), unsigned(T));
  if (out_f32) add_bias_kernel<true><<<grid, kThreads, 0, stream>>>(out, ldo, src, lds, bias, int(n));
  else add_bias_kernel<false><<<grid, kThreads, 0, stream>>>(out, ldo, src, lds, bias, int(n));
  QWEN_CUDA_LAUNCHED();
}

void launch_argmax(const float* x, int64_t ldx, int64_t n, int64_t rows, float* part_v, int32_t* part_i,
                   unsigned* counters, int32_t* result, int blocks, cudaStream_t stream) {
  if (rows < 1 || rows > kArgmaxMaxBlocks) throw std::invalid_argument("argmax: 1 to kArgmaxMaxBlocks rows at a time");
  const int64_t useful = (n + kThreads - 1) / kThreads;
  blocks = int(std::max<int64_t>(1, std::min<int64_t>({int64_t(blocks), useful, kArgmaxMaxBlocks / rows})));
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(rows));
  argmax_kernel<<<grid, kThreads, 0, stream>>>(x, ldx, int(n), part_v, part_i, counters, result);
  QWEN_CUDA_LAUNCHED();
}

}  // namespace cuda
}  // namespace qwen
