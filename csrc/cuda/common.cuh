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

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                           ") in " + what + " at " + file + ":" + std::to_string(line));
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

// State of the current forward pass in device memory, written by begin_forward with one small host→device copy.
// Kernels read the position (and the token ids) from here, never from launch arguments, so a decode step
// captured once in a CUDA graph stays correct when it is replayed at later positions.
struct StepParams {
  int32_t pos0;  // cache position of the pass's first token
  int32_t T;     // tokens in the pass
  int32_t pad[2];
  // int32_t ids[T] follows (StepParams is 16 bytes, so the ids stay 16-byte aligned)
};
__host__ __device__ inline const int32_t* step_ids(const StepParams* p) {
  return reinterpret_cast<const int32_t*>(p + 1);
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
