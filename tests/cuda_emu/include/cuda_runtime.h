// CPU emulation of the slice of the CUDA runtime that csrc/cuda/ uses (tests only; see tests/cuda_emu/README.md).
// Kernels run on the host: every CUDA thread is a fiber, __syncthreads and warp shuffles are fiber barriers,
// device memory is host memory fenced by guard pages and filled with NaN bytes, a captured stream records
// closures that a graph launch replays.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __attribute__((aligned(8))) uint2 { unsigned x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };

namespace emu {
extern uint3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;
void syncthreads();
void warp_barrier();
uint32_t shfl32(uint32_t v, int src_lane);
unsigned char* dynamic_smem();
void launch(dim3 grid, dim3 block, size_t smem, std::function<void()> body);
bool capturing();
void record(std::function<void()> op);
bool refuse_launch();  // a failure injected by qwen_cuda_emu_fail_once("launch")
}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::syncthreads(); }
inline void __threadfence() {}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __shfl_xor_sync(unsigned, float v, int mask) {
  return __uint_as_float(emu::shfl32(__float_as_uint(v), int(threadIdx.x & 31) ^ mask));
}
inline int __shfl_xor_sync(unsigned, int v, int mask) { return int(emu::shfl32(uint32_t(v), int(threadIdx.x & 31) ^ mask)); }
inline float __shfl_sync(unsigned, float v, int src) { return __uint_as_float(emu::shfl32(__float_as_uint(v), src & 31)); }
// Byte i of the result is byte (s >> 4i) & 7 of the eight bytes y:x, or with bit 3 of that nibble set, that byte's
// sign replicated.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t b = uint64_t(y) << 32 | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned sel = (s >> (4 * i)) & 15u, v = unsigned(b >> (8 * (sel & 7u))) & 0xffu;
    r |= (sel & 8u ? (v & 0x80u ? 0xffu : 0u) : v) << (8 * i);
  }
  return r;
}
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { const unsigned old = *p; *p = old + v; return old; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// `kernel<<<grid, block, smem, stream>>>(args...)` is rewritten by build.py into this call.
template <class... P, class... A>
void emu_launch(dim3 grid, dim3 block, size_t smem, void* /*stream*/, void (*kernel)(P...), A&&... args) {
  std::function<void()> body = [=] { kernel(args...); };
  std::function<void()> op = [=] { emu::launch(grid, block, smem, body); };
  if (emu::refuse_launch()) return;
  if (emu::capturing()) emu::record(op); else op();
}

// --- runtime API ---------------------------------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2, cudaErrorNoDevice = 100,
  cudaErrorInvalidConfiguration = 9, cudaErrorStreamCaptureUnsupported = 900, cudaErrorStreamCaptureInvalidated = 901,
  cudaErrorLaunchOutOfResources = 701, cudaErrorIllegalAddress = 700, cudaErrorNotPermitted = 800,
  cudaErrorNotSupported = 801,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4 };
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal = 0, cudaStreamCaptureModeThreadLocal = 1, cudaStreamCaptureModeRelaxed = 2 };
constexpr unsigned cudaStreamNonBlocking = 1, cudaEventDisableTiming = 2;
struct CUstream_st;
struct CUevent_st;
struct CUgraph_st;
struct CUgraphExec_st;
typedef CUstream_st* cudaStream_t;
typedef CUevent_st* cudaEvent_t;
typedef CUgraph_st* cudaGraph_t;
typedef CUgraphExec_st* cudaGraphExec_t;
struct cudaDeviceProp {
  char name[256];
  int major, minor, multiProcessorCount;
  size_t totalGlobalMem;
};

const char* cudaGetErrorName(cudaError_t);
const char* cudaGetErrorString(cudaError_t);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDeviceCount(int*);
cudaError_t cudaSetDevice(int);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp*, int);
cudaError_t cudaMalloc(void**, size_t);
cudaError_t cudaFree(void*);
cudaError_t cudaMallocHost(void**, size_t);
cudaError_t cudaFreeHost(void*);
cudaError_t cudaMemGetInfo(size_t*, size_t*);
cudaError_t cudaMemset(void*, int, size_t);
cudaError_t cudaMemcpy(void*, const void*, size_t, cudaMemcpyKind);
cudaError_t cudaMemcpyAsync(void*, const void*, size_t, cudaMemcpyKind, cudaStream_t);
cudaError_t cudaMemcpy2DAsync(void*, size_t, const void*, size_t, size_t, size_t, cudaMemcpyKind, cudaStream_t);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t*, unsigned);
cudaError_t cudaStreamDestroy(cudaStream_t);
cudaError_t cudaStreamSynchronize(cudaStream_t);
cudaError_t cudaEventCreate(cudaEvent_t*);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t*, unsigned);
cudaError_t cudaEventDestroy(cudaEvent_t);
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t);
cudaError_t cudaEventSynchronize(cudaEvent_t);
cudaError_t cudaEventElapsedTime(float*, cudaEvent_t, cudaEvent_t);
cudaError_t cudaStreamBeginCapture(cudaStream_t, cudaStreamCaptureMode);
cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t*);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t*, cudaGraph_t, unsigned long long);
cudaError_t cudaGraphDestroy(cudaGraph_t);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t);
cudaError_t cudaGraphLaunch(cudaGraphExec_t, cudaStream_t);
// As cuda_runtime.h: typed overloads.
template <class T> cudaError_t cudaMalloc(T** p, size_t n) { return cudaMalloc(reinterpret_cast<void**>(p), n); }
template <class T> cudaError_t cudaMallocHost(T** p, size_t n) { return cudaMallocHost(reinterpret_cast<void**>(p), n); }
cudaError_t cudaMemsetAsync(void*, int, size_t, cudaStream_t);
