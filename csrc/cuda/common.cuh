// Shared by the CUDA backend's files: error checking that turns every CUDA / cuBLAS failure into a C++ exception
// carrying the library's own error string (bindings.cpp turns those into Python exceptions), bf16 helpers, and the
// per-pass state that kernels read from device memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace qwen {
namespace cuda {

using bf16 = __nv_bfloat16;

// A failure of the CUDA runtime or cuBLAS. Its own type so that a graph capture can tell a CUDA failure (fall back to
// eager steps) from an interruption passing through; bindings.cpp sees a std::runtime_error.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* what, const char* file, int line) {
  throw CudaError(std::string("CUDA error ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") in " + what +
                  " at " + file + ":" + std::to_string(line));
}

}  // namespace cuda
}  // namespace qwen

// Every runtime call goes through QWEN_CUDA_CHECK; every kernel launch is followed by QWEN_CUDA_LAUNCHED() so a bad
// launch configuration is reported where it happened, not at the next synchronisation.
#define QWEN_CUDA_CHECK(expr)                                                   \
  do {                                                                          \
    cudaError_t qwen_err_ = (expr);                                             \
    if (qwen_err_ != cudaSuccess) ::qwen::cuda::throw_cuda(qwen_err_, #expr, __FILE__, __LINE__); \
  } while (0)
#define QWEN_CUDA_LAUNCHED() QWEN_CUDA_CHECK(cudaGetLastError())

namespace qwen {
namespace cuda {

// The rows of the current forward pass in device memory, written by begin_forward with one host→device copy: this
// header, then one StepRow per row, then the prefill attention's tiles. Kernels read token ids, slots and positions
// from here, never from launch arguments, so a one-row step captured once in a CUDA graph stays correct when it is
// replayed for another slot or position.
struct StepParams {
  int32_t T;        // rows in the pass
  int32_t n_tiles;  // prefill attention tiles after the rows
  int32_t pad[2];   // 16 bytes: what follows stays 16-byte aligned
};
struct StepRow {
  int32_t id, slot, pos, pad;
};
// A tile of the causal prefill attention: `rows` (at most 16) consecutive rows of one run, the first being row `row`
// of the pass, in KV-cache slot `slot` at positions pos, pos + 1, ...
struct AttnTile {
  int32_t row, rows, slot, pos;
};
__host__ __device__ inline const StepRow* step_rows(const StepParams* p) {
  return reinterpret_cast<const StepRow*>(p + 1);
}
__host__ __device__ inline const AttnTile* step_tiles(const StepParams* p) {
  return reinterpret_cast<const AttnTile*>(step_rows(p) + p->T);
}

// bf16 widening is exact (bf16 is the top half of an f32); narrowing rounds to nearest even.
__device__ __forceinline__ float bf16_lo(uint32_t two) { return __uint_as_float(two << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t two) { return __uint_as_float(two & 0xffff0000u); }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ bf16 to_bf16(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace cuda
}  // namespace qwen
