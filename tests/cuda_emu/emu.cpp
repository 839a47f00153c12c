// CPU emulation of the CUDA runtime and cuBLAS calls that csrc/cuda/ makes (tests only; see README.md).
//
// Execution: one block at a time, in order; each thread of the block is a ucontext fiber. __syncthreads waits
// until every live thread of the block has arrived, a warp shuffle until every live thread of the warp has; when
// no fiber can move the emulator aborts ("deadlock": a barrier some threads never reach). Blocks run in index order
// (x fastest), so "last block to finish" logic sees its real worst case: every other block already done.
//
// Memory: cudaMalloc maps each buffer between PROT_NONE guard pages (its end flush against the upper guard, the
// start 16-byte aligned), filled with 0xFF bytes (NaN as f32 and as bf16) so a read of anything never written
// shows up as NaN in the outputs; out-of-bounds accesses past either guard fault.
//
// Streams are synchronous. Between cudaStreamBeginCapture and cudaStreamEndCapture, kernel launches and cuBLAS
// calls are recorded (arguments by value, as a CUDA graph bakes them) and calls that real CUDA refuses during a
// capture (allocation, synchronous copies, synchronisation) fail with cudaErrorStreamCaptureUnsupported.
//
// Test hooks (C symbols of the built module, for ctypes): qwen_cuda_emu_graph_launches() counts graph replays;
// qwen_cuda_emu_fail_once(call) makes the next `call` fail once, as a GPU may: "cudaStreamBeginCapture",
// "cudaStreamEndCapture" (the capture ends, no graph), "cudaGraphInstantiate", or "launch" (the next kernel launch
// inside a capture fails and invalidates the capture).
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cublas_v2.h"
#include "cuda_bf16.h"
#include "cuda_runtime.h"

namespace emu {

uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;

namespace {

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

struct Fiber {
  ucontext_t ctx;
  uint3 idx;
  bool done = false;
  int waiting = 0;  // 0 running, 1 block barrier, 2 warp barrier
};

constexpr size_t kStack = 256 << 10;
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxSmem = 48 << 10;

ucontext_t scheduler;
std::vector<Fiber> fibers;
std::vector<std::unique_ptr<char[]>> stacks;
int current = -1;
const std::function<void()>* current_body = nullptr;
alignas(16) unsigned char smem_buf[kMaxSmem];
uint32_t shfl_slots[2][kMaxThreads];  // double-buffered: [phase][thread]
std::vector<int> shfl_phase;          // per warp

void fiber_entry() {
  (*current_body)();
  fibers[size_t(current)].done = true;
  swapcontext(&fibers[size_t(current)].ctx, &scheduler);
  die("a finished fiber was resumed");
}

void wait(int kind) {
  Fiber& f = fibers[size_t(current)];
  f.waiting = kind;
  swapcontext(&f.ctx, &scheduler);
}

bool capture_on = false;
bool capture_invalidated = false;  // a call failed during the capture: ending it fails
std::vector<std::function<void()>>* capture_ops = nullptr;
cudaError_t last_error = cudaSuccess;
std::string fail_next;  // qwen_cuda_emu_fail_once

}  // namespace

// True (once) when `call` is the one qwen_cuda_emu_fail_once named.
bool injected_failure(const char* call) {
  if (fail_next != call) return false;
  fail_next.clear();
  return true;
}

cudaError_t fail(cudaError_t e) {
  last_error = e;
  return e;
}
void set_capture(bool on) {
  capture_on = on;
  capture_invalidated = false;
  if (on) capture_ops = new std::vector<std::function<void()>>();
}
bool refuse_launch() {
  if (!capture_on || !injected_failure("launch")) return false;
  capture_invalidated = true;
  fail(cudaErrorStreamCaptureInvalidated);
  return true;
}
bool capture_failed() { return capture_invalidated; }
std::vector<std::function<void()>> take_capture() {
  std::vector<std::function<void()>> ops = std::move(*capture_ops);
  delete capture_ops;
  capture_ops = nullptr;
  capture_on = false;
  return ops;
}
cudaError_t take_error() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

void syncthreads() { wait(1); }
void warp_barrier() { wait(2); }

uint32_t shfl32(uint32_t v, int src_lane) {
  const int t = current, warp = t / 32;
  const int phase = shfl_phase[size_t(warp)];
  shfl_slots[phase][t] = v;
  warp_barrier();
  // Every live lane of the warp has passed the barrier and so has written its slot for this phase; the first lane
  // to resume flips the warp's phase for the next shuffle (the others read the phase they stored locally).
  if (shfl_phase[size_t(warp)] == phase) shfl_phase[size_t(warp)] = 1 - phase;
  const int src = warp * 32 + src_lane;
  // (a lane that has exited since wrote its slot before the barrier: its value stays valid for this phase)
  if (src >= int(fibers.size())) die("shuffle from a lane the block does not have");
  return shfl_slots[phase][src];
}

unsigned char* dynamic_smem() { return smem_buf; }

void launch(dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
  const size_t nthreads = size_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > kMaxThreads || block.z > 64 || grid.y > 65535 || grid.z > 65535 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > kMaxSmem) {  // above 48 KB real CUDA needs cudaFuncSetAttribute first
    last_error = cudaErrorInvalidValue;
    return;
  }
  while (stacks.size() < nthreads) stacks.emplace_back(new char[kStack]);
  grid_dim = grid;
  block_dim = block;
  current_body = &body;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = {bx, by, bz};
        std::memset(smem_buf, 0xFF, smem);  // shared memory starts as garbage, too
        fibers.assign(nthreads, Fiber{});
        shfl_phase.assign((nthreads + 31) / 32, 0);
        for (size_t t = 0; t < nthreads; ++t) {
          Fiber& f = fibers[t];
          f.idx = {unsigned(t % block.x), unsigned(t / block.x % block.y), unsigned(t / (size_t(block.x) * block.y))};
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = stacks[t].get();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        for (;;) {
          bool progress = false, all_done = true;
          for (size_t t = 0; t < nthreads; ++t) {
            Fiber& f = fibers[t];
            if (f.done) continue;
            all_done = false;
            if (f.waiting) continue;
            current = int(t);
            thread_idx = f.idx;
            swapcontext(&scheduler, &f.ctx);
            progress = true;
          }
          if (all_done) break;
          // Release barriers whose every live participant has arrived.
          bool block_ready = true;
          for (const Fiber& f : fibers)
            if (!f.done && f.waiting != 1) block_ready = false;
          if (block_ready) {
            for (Fiber& f : fibers) f.waiting = 0;
            continue;
          }
          for (size_t w0 = 0; w0 < nthreads; w0 += 32) {
            bool warp_ready = true, any = false;
            for (size_t t = w0; t < std::min(nthreads, w0 + 32); ++t) {
              if (fibers[t].done) continue;
              any = true;
              if (fibers[t].waiting != 2) warp_ready = false;
            }
            if (any && warp_ready) {
              for (size_t t = w0; t < std::min(nthreads, w0 + 32); ++t) fibers[t].waiting = 0;
              progress = true;
            }
          }
          if (!progress) die("deadlock: some threads wait at a barrier that others never reach");
        }
      }
  current = -1;
  current_body = nullptr;
}

bool capturing() { return capture_on; }
void record(std::function<void()> op) { capture_ops->push_back(std::move(op)); }

}  // namespace emu

// --- runtime API ---------------------------------------------------------------------------------------------------
struct CUstream_st { int unused; };
struct CUevent_st { std::chrono::steady_clock::time_point t; };
struct CUgraph_st { std::vector<std::function<void()>> ops; };
struct CUgraphExec_st { std::vector<std::function<void()>> ops; };

namespace {

struct Region {
  size_t bytes;       // what was asked for
  char* map_base;     // the whole mapping, guards included
  size_t map_bytes;
};
std::map<const char*, Region> device_mem;  // by user pointer
size_t device_bytes = 0;
long graph_launches = 0;
constexpr size_t kDeviceTotal = size_t(4) << 30;

cudaError_t refuse_in_capture() { return emu::capturing() ? emu::fail(cudaErrorStreamCaptureUnsupported) : cudaSuccess; }

// Whether [p, p + n) lies inside one live device buffer.
bool in_device(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  auto it = device_mem.upper_bound(c);
  if (it == device_mem.begin()) return false;
  --it;
  return c >= it->first && c + n <= it->first + it->second.bytes;
}
bool touches_device(const void* p) { return in_device(p, 1); }

cudaError_t copy_checked(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  if (n == 0) return cudaSuccess;
  bool ok = true;
  if (kind == cudaMemcpyHostToDevice) ok = in_device(dst, n) && !touches_device(src);
  else if (kind == cudaMemcpyDeviceToHost) ok = in_device(src, n) && !touches_device(dst);
  else if (kind == cudaMemcpyDeviceToDevice) ok = in_device(src, n) && in_device(dst, n);
  if (!ok) return emu::fail(cudaErrorInvalidValue);
  std::memcpy(dst, src, n);
  return cudaSuccess;
}

}  // namespace

#define QWEN_EMU_EXPORT extern "C" __attribute__((visibility("default")))
QWEN_EMU_EXPORT long qwen_cuda_emu_graph_launches() { return graph_launches; }
QWEN_EMU_EXPORT long qwen_cuda_emu_device_bytes() { return long(device_bytes); }
QWEN_EMU_EXPORT void qwen_cuda_emu_fail_once(const char* call) { emu::fail_next = call ? call : ""; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorNotPermitted: return "cudaErrorNotPermitted";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    default: return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorNotPermitted: return "emulator: legacy-stream cudaMemset/cudaMemcpy are unordered with the backend's stream";
    case cudaErrorNotSupported: return "operation not supported (injected by the emulator)";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    default: return "emulated error";
  }
}
cudaError_t cudaGetLastError() { return emu::take_error(); }
cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : emu::fail(cudaErrorInvalidValue); }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "CPU emulation of a CUDA device");
  p->major = 9;
  p->minor = 0;
  const char* sms = std::getenv("QWEN_CUDA_EMU_SMS");
  p->multiProcessorCount = sms ? std::atoi(sms) : 8;
  p->totalGlobalMem = kDeviceTotal;
  return cudaSuccess;
}
cudaError_t cudaMalloc(void** out, size_t bytes) {
  if (emu::capturing()) return emu::fail(cudaErrorStreamCaptureUnsupported);
  if (device_bytes + bytes > kDeviceTotal) return emu::fail(cudaErrorMemoryAllocation);
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t body = (bytes + 16 + page - 1) / page * page;
  const size_t total = body + 2 * page;
  void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return emu::fail(cudaErrorMemoryAllocation);
  char* b = static_cast<char*>(base);
  mprotect(b, page, PROT_NONE);
  mprotect(b + page + body, page, PROT_NONE);
  std::memset(b + page, 0xFF, body);
  char* p = b + page + body - bytes;
  p -= reinterpret_cast<uintptr_t>(p) % 16;
  device_mem[p] = {bytes, b, total};
  device_bytes += bytes;
  *out = p;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (emu::capturing()) return emu::fail(cudaErrorStreamCaptureUnsupported);
  if (!p) return cudaSuccess;
  auto it = device_mem.find(static_cast<const char*>(p));
  if (it == device_mem.end()) return emu::fail(cudaErrorInvalidValue);
  device_bytes -= it->second.bytes;
  munmap(it->second.map_base, it->second.map_bytes);  // a use after free faults (unless the range is reused)
  device_mem.erase(it);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** out, size_t bytes) {
  if (emu::capturing()) return emu::fail(cudaErrorStreamCaptureUnsupported);
  *out = std::malloc(bytes ? bytes : 1);
  return *out ? cudaSuccess : emu::fail(cudaErrorMemoryAllocation);
}
cudaError_t cudaFreeHost(void* p) { std::free(p); return cudaSuccess; }
cudaError_t cudaMemGetInfo(size_t* free_b, size_t* total_b) {
  *total_b = kDeviceTotal;
  *free_b = kDeviceTotal - device_bytes;
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
  // The legacy default stream: unordered with the backend's non-blocking stream on a GPU, so the backend must
  // not use it for anything its kernels depend on. Refused here so that such a use cannot pass unnoticed.
  (void)p, (void)v, (void)n;
  return emu::fail(cudaErrorNotPermitted);
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  if (!in_device(p, n)) return emu::fail(cudaErrorInvalidValue);
  if (emu::capturing()) emu::record([=] { std::memset(p, v, n); });
  else std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void*, const void*, size_t, cudaMemcpyKind) {
  // Likewise: a pageable host-to-device cudaMemcpy may return before its DMA lands, and the legacy stream it
  // runs on is unordered with the backend's non-blocking stream. The backend copies on its own stream.
  return emu::fail(cudaErrorNotPermitted);
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t) {
  if (emu::capturing()) {
    emu::record([=] { copy_checked(dst, src, n, kind); });
    return cudaSuccess;
  }
  return copy_checked(dst, src, n, kind);
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t) {
  if (cudaError_t e = refuse_in_capture()) return e;  // the backend never copies inside a capture
  for (size_t r = 0; r < height; ++r) {
    const cudaError_t e = copy_checked(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                                       width, kind);
    if (e) return e;
  }
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { *s = new CUstream_st{}; return cudaSuccess; }
cudaError_t cudaStreamDestroy(cudaStream_t s) { delete s; return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return refuse_in_capture(); }
cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = new CUevent_st{}; return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { return cudaEventCreate(e); }
cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
  if (emu::capturing()) return emu::fail(cudaErrorStreamCaptureUnsupported);  // the backend never records in a capture
  e->t = std::chrono::steady_clock::now();
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return refuse_in_capture(); }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  *ms = std::chrono::duration<float, std::milli>(b->t - a->t).count();
  return cudaSuccess;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t, cudaStreamCaptureMode) {
  if (emu::capturing()) return emu::fail(cudaErrorInvalidValue);
  if (emu::injected_failure("cudaStreamBeginCapture")) return emu::fail(cudaErrorNotSupported);
  emu::set_capture(true);
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t* g) {
  *g = nullptr;
  if (!emu::capturing()) return emu::fail(cudaErrorInvalidValue);
  const bool failed = emu::capture_failed() || emu::injected_failure("cudaStreamEndCapture");
  auto ops = emu::take_capture();  // the capture ends either way
  if (failed) return emu::fail(cudaErrorStreamCaptureInvalidated);
  *g = new CUgraph_st{std::move(ops)};
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long) {
  *e = nullptr;
  if (emu::injected_failure("cudaGraphInstantiate")) return emu::fail(cudaErrorNotSupported);
  *e = new CUgraphExec_st{g->ops};
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t g) { delete g; return cudaSuccess; }
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) { delete e; return cudaSuccess; }
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t) {
  if (emu::capturing()) return emu::fail(cudaErrorInvalidValue);
  ++graph_launches;
  for (auto& op : e->ops) op();
  return cudaSuccess;
}

// --- cuBLAS ----------------------------------------------------------------------------------------------------------
struct cublasContext { int unused; };

namespace {
float load(const void* p, cudaDataType_t t, size_t i) {
  return t == CUDA_R_32F ? static_cast<const float*>(p)[i] : __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
void gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const void* A,
          cudaDataType_t at, int lda, const void* B, cudaDataType_t bt, int ldb, float beta, void* C,
          cudaDataType_t ct, int ldc) {
  // Column-major: C (m × n) = alpha op(A) op(B) + beta C. A read where op(A)[i][l] = A[i + l lda] or A[l + i lda].
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      float s = 0.0f;
      for (int l = 0; l < k; ++l) {
        const float a = load(A, at, ta == CUBLAS_OP_N ? size_t(i) + size_t(l) * lda : size_t(l) + size_t(i) * lda);
        const float b = load(B, bt, tb == CUBLAS_OP_N ? size_t(l) + size_t(j) * ldb : size_t(j) + size_t(l) * ldb);
        s += a * b;
      }
      const size_t ci = size_t(i) + size_t(j) * ldc;
      const float prev = beta != 0.0f ? load(C, ct, ci) : 0.0f;  // beta = 0: C is not read (may be NaN garbage)
      const float y = alpha * s + beta * prev;
      if (ct == CUDA_R_32F) static_cast<float*>(C)[ci] = y;
      else static_cast<__nv_bfloat16*>(C)[ci] = __float2bfloat16_rn(y);
    }
}
}  // namespace

const char* cublasGetStatusName(cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_INVALID_VALUE"; }
const char* cublasGetStatusString(cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS ? "success" : "an invalid value was used as an argument"; }
cublasStatus_t cublasCreate(cublasHandle_t* h) { *h = new cublasContext{}; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasDestroy(cublasHandle_t h) { delete h; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetWorkspace(cublasHandle_t, void* p, size_t n) {
  return in_device(p, n) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType_t at, int lda, const void* B,
                            cudaDataType_t bt, int ldb, const void* beta, void* C, cudaDataType_t ct, int ldc,
                            cublasComputeType_t, cublasGemmAlgo_t) {
  if (m <= 0 || n <= 0 || k <= 0 || at != CUDA_R_16BF || bt != CUDA_R_16BF || (ct != CUDA_R_32F && ct != CUDA_R_16BF))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (ldc < m || lda < (ta == CUBLAS_OP_N ? m : k) || ldb < (tb == CUBLAS_OP_N ? k : n)) return CUBLAS_STATUS_INVALID_VALUE;
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);  // host pointer mode
  auto op = [=] { gemm(ta, tb, m, n, k, al, A, at, lda, B, bt, ldb, be, C, ct, ldc); };
  if (emu::capturing()) emu::record(op); else op();
  return CUBLAS_STATUS_SUCCESS;
}
