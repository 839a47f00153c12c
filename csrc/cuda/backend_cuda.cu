// The CUDA backend: bf16 weights and activations on one NVIDIA GPU (compute capability 8.0+), f32 residual stream
// and logits, every op on one stream.
//
//   matmuls      T > 1: cuBLAS (cublasGemmEx, bf16 in, f32 compute, f32 or bf16 out; the residual add is the
//                GEMM's beta = 1). T = 1: our bf16 GEMV (gemv.cu) or cuBLAS, chosen per shape by timing both once,
//                in CUDA graphs, during the first decode step (QWEN_NATIVE_GEMV=gemv|cublas forces one).
//   other ops    our kernels (kernels.cu, attention.cu); positions and token ids are read from device memory
//                (StepParams), written once per pass by begin_forward.
//   decode step  recorded once into a CUDA graph and replayed for every later token (QWEN_NATIVE_CUDA_GRAPH=0
//                turns that off); greedy decoding brings back 4 bytes per token.
//
// Every CUDA and cuBLAS call is checked; failures throw std::runtime_error with the library's error string.
#include <cublas_v2.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "backend.h"
#include "cuda/kernels.cuh"

#define QWEN_CUBLAS_CHECK(expr)                                                                               \
  do {                                                                                                        \
    cublasStatus_t qwen_st_ = (expr);                                                                         \
    if (qwen_st_ != CUBLAS_STATUS_SUCCESS)                                                                    \
      throw std::runtime_error(std::string("cuBLAS error ") + cublasGetStatusName(qwen_st_) + " (" +          \
                               cublasGetStatusString(qwen_st_) + ") in " #expr " at " __FILE__ ":" +          \
                               std::to_string(__LINE__));                                                     \
  } while (0)

namespace qwen {

namespace {

using cuda::bf16;
using cuda::StepParams;

constexpr size_t kCublasWorkspace = size_t(32) << 20;  // what cuBLAS recommends for Hopper; set so graphs capture
constexpr int64_t kReserveMargin = int64_t(256) << 20;   // cuBLAS, scratch buffers, the graph, fragmentation
// Timing of one-token matmul shapes: graphs of up to kTuneMaxReps launches, each timed kTuneLaunches times after a
// warm-up (the CPU emulation in tests/cuda_emu sets both to 1).
#ifndef QWEN_CUDA_TUNE_MAX_REPS
#define QWEN_CUDA_TUNE_MAX_REPS 50
#endif
#ifndef QWEN_CUDA_TUNE_LAUNCHES
#define QWEN_CUDA_TUNE_LAUNCHES 3
#endif

std::string mib(int64_t bytes) { return std::to_string((bytes + (int64_t(1) << 20) - 1) >> 20) + " MiB"; }

bool env_flag(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  std::string s(v);
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  if (s == "0" || s == "false" || s == "off" || s == "no") return false;
  if (s == "1" || s == "true" || s == "on" || s == "yes") return true;
  throw std::invalid_argument(std::string(name) + "=" + v + ": expected 0 or 1");
}

enum class GemvMode { Auto, Gemv, Cublas };

GemvMode gemv_mode_from_env() {
  const char* v = std::getenv("QWEN_NATIVE_GEMV");
  if (!v || !*v || std::string(v) == "auto") return GemvMode::Auto;
  if (std::string(v) == "gemv") return GemvMode::Gemv;
  if (std::string(v) == "cublas") return GemvMode::Cublas;
  throw std::invalid_argument(std::string("QWEN_NATIVE_GEMV=") + v + ": expected auto, gemv or cublas");
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("cuda backend: " + what);
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : dev_(device) {
    use_graph_ = env_flag("QWEN_NATIVE_CUDA_GRAPH", true);
    gemv_mode_ = gemv_mode_from_env();
    QWEN_CUDA_CHECK(cudaSetDevice(dev_));
    QWEN_CUDA_CHECK(cudaGetDeviceProperties(&prop_, dev_));
    if (prop_.major < 8)
      throw std::runtime_error("cuda:" + std::to_string(dev_) + " (" + prop_.name + ", compute capability " +
                               std::to_string(prop_.major) + "." + std::to_string(prop_.minor) +
                               ") is too old: the CUDA backend needs bfloat16 tensor cores, compute capability 8.0 "
                               "(Ampere) or newer");
    QWEN_CUDA_CHECK(cudaFree(nullptr));  // create the context now, so reserve() sees what is really free
    try {
      QWEN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      QWEN_CUDA_CHECK(cudaEventCreateWithFlags(&params_copied_, cudaEventDisableTiming));
      QWEN_CUDA_CHECK(cudaEventCreate(&t0_));
      QWEN_CUDA_CHECK(cudaEventCreate(&t1_));
      QWEN_CUBLAS_CHECK(cublasCreate(&blas_));
      QWEN_CUBLAS_CHECK(cublasSetStream(blas_, stream_));
      blas_ws_ = device_alloc(kCublasWorkspace, "the cuBLAS workspace");
      QWEN_CUBLAS_CHECK(cublasSetWorkspace(blas_, blas_ws_, kCublasWorkspace));
      QWEN_CUBLAS_CHECK(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH));  // no TF32 anywhere
      grow_params(4096);
      am_v_ = static_cast<float*>(device_alloc(sizeof(float) * cuda::kArgmaxMaxBlocks, "argmax scratch"));
      am_i_ = static_cast<int32_t*>(device_alloc(sizeof(int32_t) * cuda::kArgmaxMaxBlocks, "argmax scratch"));
      am_counter_ = static_cast<unsigned*>(device_alloc(sizeof(unsigned), "argmax scratch"));
      am_result_ = static_cast<int32_t*>(device_alloc(sizeof(int32_t), "argmax scratch"));
      QWEN_CUDA_CHECK(cudaMemsetAsync(am_counter_, 0, sizeof(unsigned), stream_));
      QWEN_CUDA_CHECK(cudaMallocHost(&h_result_, sizeof(int32_t)));
    } catch (...) {
      release();
      throw;
    }
  }

  ~CudaBackend() override { release(); }

  std::string name() const override {
    std::ostringstream s;
    s << "cuda:" << dev_ << " (" << prop_.name << ", sm_" << prop_.major << prop_.minor << ", "
      << prop_.multiProcessorCount << " SMs, " << mib(int64_t(allocated_)) << " allocated; CUDA graph "
      << (use_graph_ ? "on" : "off") << "; one-token matmuls: "
      << (gemv_mode_ == GemvMode::Gemv ? "gemv (forced)" : gemv_mode_ == GemvMode::Cublas ? "cublas (forced)" : "timed");
    bool first = true;
    for (const auto& [shape, c] : choices_) {
      s << (first ? " " : ", ") << shape.first << "x" << shape.second << "="
        << (c.cublas ? std::string("cublas") : "gemv/" + std::to_string(c.wpr));
      if (c.gemv_us > 0 && c.cublas_us > 0) {
        char buf[64];
        std::snprintf(buf, sizeof buf, " (gemv %.1f us, cublas %.1f us)", c.gemv_us, c.cublas_us);
        s << buf;
      }
      first = false;
    }
    s << ")";
    return s.str();
  }

  DType weight_dtype() const override { return DType::BF16; }
  DType activation_dtype() const override { return DType::BF16; }

  // --- memory ------------------------------------------------------------------------------------------------
  void reserve(int64_t bytes) override {
    QWEN_CUDA_CHECK(cudaSetDevice(dev_));
    size_t free_b = 0, total_b = 0;
    QWEN_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    const int64_t need = bytes + kReserveMargin;
    if (need > int64_t(free_b))
      throw std::runtime_error("loading this model on cuda:" + std::to_string(dev_) + " (" + prop_.name +
                               ") needs " + mib(need) + " of GPU memory (" + mib(bytes) +
                               " for weights, KV cache and activations, plus " + mib(kReserveMargin) +
                               " working space) but only " + mib(int64_t(free_b)) + " of " + mib(int64_t(total_b)) +
                               " is free; use a smaller max_context or a smaller model, or free the GPU");
  }

  Tensor alloc(DType dtype, int64_t rows, int64_t cols) override {
    check(rows >= 0 && cols >= 0, "alloc of a negative shape");
    void* p = device_alloc(size_t(rows * cols) * dtype_size(dtype), "a tensor");
    return Tensor{p, dtype, rows, cols, cols};
  }

  void upload(const Tensor& dst, int64_t at, const void* src, DType src_dtype, int64_t n) override {
    if (at < 0 || n < 0 || at + n > dst.numel()) throw std::out_of_range("upload outside its tensor");
    check(dst.contiguous(), "upload into a strided tensor");
    if (n == 0) return;
    QWEN_CUDA_CHECK(cudaSetDevice(dev_));  // loader threads are new threads
    char* d = static_cast<char*>(dst.data) + at * int64_t(dtype_size(dst.dtype));
    const size_t bytes = size_t(n) * dtype_size(dst.dtype);
    // Copies go on our stream and are waited for: the caller reuses `src` at once, and a plain cudaMemcpy (legacy
    // stream, may return before a pageable copy lands) would not be ordered with the kernels on our stream.
    auto copy = [&](const void* from) {
      QWEN_CUDA_CHECK(cudaMemcpyAsync(d, from, bytes, cudaMemcpyHostToDevice, stream_));
      QWEN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    };
    if (dst.dtype == src_dtype) {
      copy(src);
      return;
    }
    // Convert on the host into this thread's buffer (2 loader threads run at once), then copy. Only f32 / f16
    // checkpoints take this path; bf16 ones go straight through.
    thread_local std::vector<uint16_t> buf16;
    thread_local std::vector<float> buf32;
    const uint16_t* s16 = static_cast<const uint16_t*>(src);
    const float* s32 = static_cast<const float*>(src);
    if (dst.dtype == DType::BF16) {
      buf16.resize(size_t(n));
      if (src_dtype == DType::F32) for (int64_t i = 0; i < n; ++i) buf16[size_t(i)] = f32_to_bf16(s32[i]);
      else for (int64_t i = 0; i < n; ++i) buf16[size_t(i)] = f32_to_bf16(f16_to_f32(s16[i]));
      copy(buf16.data());
    } else if (dst.dtype == DType::F32) {
      buf32.resize(size_t(n));
      if (src_dtype == DType::BF16) for (int64_t i = 0; i < n; ++i) buf32[size_t(i)] = bf16_to_f32(s16[i]);
      else for (int64_t i = 0; i < n; ++i) buf32[size_t(i)] = f16_to_f32(s16[i]);
      copy(buf32.data());
    } else {
      throw std::invalid_argument("the CUDA backend does not store F16 tensors");
    }
  }

  void download(float* dst, const Tensor& src) override {
    check(src.dtype == DType::F32, "download of a non-F32 tensor");
    QWEN_CUDA_CHECK(cudaSetDevice(dev_));
    QWEN_CUDA_CHECK(cudaMemcpy2DAsync(dst, size_t(src.cols) * 4, src.data, size_t(src.ld) * 4, size_t(src.cols) * 4,
                                      size_t(src.rows), cudaMemcpyDeviceToHost, stream_));
    QWEN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // --- one forward pass --------------------------------------------------------------------------------------
  void begin_forward(const int32_t* ids, int64_t T, int64_t pos0) override {
    QWEN_CUDA_CHECK(cudaSetDevice(dev_));
    check(T >= 1 && pos0 >= 0 && pos0 + T < (int64_t(1) << 31), "begin_forward: bad T or position");
    if (T > ids_cap_) grow_params(T);
    // The previous pass's copy must have read the pinned buffer before it is overwritten.
    QWEN_CUDA_CHECK(cudaEventSynchronize(params_copied_));
    h_params_->pos0 = int32_t(pos0);
    h_params_->T = int32_t(T);
    std::memcpy(const_cast<int32_t*>(cuda::step_ids(h_params_)), ids, size_t(T) * 4);
    QWEN_CUDA_CHECK(cudaMemcpyAsync(d_params_, h_params_, sizeof(StepParams) + size_t(T) * 4, cudaMemcpyHostToDevice,
                                    stream_));
    QWEN_CUDA_CHECK(cudaEventRecord(params_copied_, stream_));
    T_ = T;
    pos0_ = pos0;
  }

  void run_decode_step(const std::function<void()>& body) override {
    QWEN_CUDA_CHECK(cudaSetDevice(dev_));
    if (!tuned_) {
      // The first decode step runs eagerly: it times the one-token matmul shapes and allocates any scratch that
      // decoding needs, so the graph recorded at the next step contains no allocation and no timing.
      tuning_ = true;
      try {
        body();
      } catch (...) {
        tuning_ = false;
        throw;
      }
      tuning_ = false;
      tuned_ = true;
      return;
    }
    if (!use_graph_) {
      body();
      return;
    }
    if (!graph_exec_) {
      QWEN_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
      capturing_ = true;
      cudaGraph_t graph = nullptr;
      try {
        body();
      } catch (...) {
        capturing_ = false;
        cudaStreamEndCapture(stream_, &graph);  // leave the stream usable; the partial graph is dropped
        if (graph) cudaGraphDestroy(graph);
        cudaGetLastError();
        throw;
      }
      capturing_ = false;
      QWEN_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
      cudaGraphExec_t exec = nullptr;
      const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      QWEN_CUDA_CHECK(err);
      graph_exec_ = exec;
    }
    QWEN_CUDA_CHECK(cudaGraphLaunch(graph_exec_, stream_));
  }

  void embed(const Tensor& out, const Tensor& table) override {
    check(out.dtype == DType::F32 && table.dtype == DType::BF16 && out.cols == table.cols && out.rows == T_,
          "embed: expects F32 out (T, hidden) and a bf16 table");
    cuda::launch_embed(out.ptr<float>(), out.ld, table.ptr<bf16>(), table.ld, out.cols, out.rows, d_params_, stream_);
  }

  void rmsnorm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps) override {
    check(x.dtype == DType::F32 && weight.dtype == DType::F32 && out.rows == x.rows && out.cols == x.cols &&
              weight.numel() == x.cols && (out.dtype == DType::F32 || out.dtype == DType::BF16),
          "rmsnorm: expects F32 x and weight");
    cuda::launch_rmsnorm(out.data, out.dtype == DType::F32, out.ld, x.ptr<float>(), x.ld, weight.ptr<float>(), x.cols,
                         x.rows, eps, stream_);
  }

  void matmul(const Tensor& out, const Tensor& x, const Tensor& w, const Tensor* bias, bool accumulate) override {
    const int64_t T = x.rows, n = w.rows, k = w.cols;
    check(w.dtype == DType::BF16 && x.dtype == DType::BF16, "matmul: expects bf16 weights and input");
    check(x.cols == k && out.rows == T && out.cols == n, "matmul: shape mismatch");
    check(out.dtype == DType::F32 || (out.dtype == DType::BF16 && !accumulate),
          "matmul: accumulate needs an F32 output");
    check(!bias || (bias->dtype == DType::F32 && bias->numel() == n), "matmul: bias must be F32 (1, n)");
    const float* b = bias ? bias->ptr<float>() : nullptr;
    if (T == 1 && gemv_mode_ != GemvMode::Cublas && cuda::gemv_supported(w.data, w.ld, x.data, k)) {
      const Choice c = choose(out, x, w);
      if (!c.cublas) {
        cuda::launch_gemv(w.ptr<bf16>(), w.ld, x.ptr<bf16>(), k, n, out.data, out.dtype == DType::F32, accumulate, b,
                          c.wpr, stream_);
        return;
      }
    }
    gemm(out, x, w, b, accumulate);
  }

  void rope(const Tensor& q, const Tensor& k, int64_t head_dim, const Tensor& cos, const Tensor& sin) override {
    check(q.dtype == DType::BF16 && k.dtype == DType::BF16 && cos.dtype == DType::F32 && sin.dtype == DType::F32 &&
              head_dim % 2 == 0 && q.cols % head_dim == 0 && k.cols % head_dim == 0 && q.rows == k.rows &&
              cos.cols == head_dim / 2 && sin.ld == cos.ld && pos0_ + q.rows <= cos.rows,
          "rope: bad shapes");
    cuda::launch_rope(q.ptr<bf16>(), q.ld, q.cols / head_dim, k.ptr<bf16>(), k.ld, k.cols / head_dim, head_dim,
                      cos.ptr<float>(), sin.ptr<float>(), cos.ld, q.rows, d_params_, stream_);
  }

  void kv_store(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                int64_t max_positions) override {
    const int64_t hd = k_cache.cols;
    check(k_cache.dtype == DType::BF16 && v_cache.dtype == DType::BF16 && k.dtype == DType::BF16 &&
              v.dtype == DType::BF16 && k.cols % hd == 0 && v.cols == k.cols && v.rows == k.rows &&
              v_cache.ld == k_cache.ld && k_cache.rows == (k.cols / hd) * max_positions &&
              pos0_ + k.rows <= max_positions,
          "kv_store: bad shapes");
    cuda::launch_kv_store(k_cache.ptr<bf16>(), v_cache.ptr<bf16>(), k_cache.ld, k.ptr<bf16>(), k.ld, v.ptr<bf16>(), v.ld,
                          k.cols / hd, hd, max_positions, k.rows, d_params_, stream_);
  }

  void attention(const Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                 int64_t num_kv_heads, int64_t head_dim, int64_t max_positions) override {
    check(out.dtype == DType::BF16 && q.dtype == DType::BF16 && k_cache.dtype == DType::BF16 &&
              v_cache.dtype == DType::BF16 && out.rows == q.rows && out.cols == q.cols && q.cols % head_dim == 0 &&
              num_kv_heads > 0 && (q.cols / head_dim) % num_kv_heads == 0 && k_cache.ld == v_cache.ld &&
              pos0_ + q.rows <= max_positions,
          "attention: bad shapes");
    cuda::AttnArgs a{};
    a.q = q.ptr<bf16>();
    a.ldq = q.ld;
    a.k_cache = k_cache.ptr<bf16>();
    a.v_cache = v_cache.ptr<bf16>();
    a.ldkv = k_cache.ld;
    a.out = out.ptr<bf16>();
    a.ldo = out.ld;
    a.T = int(q.rows);
    a.heads = int(q.cols / head_dim);
    a.kv_heads = int(num_kv_heads);
    a.group = a.heads / a.kv_heads;
    a.hd = int(head_dim);
    a.max_pos = int(max_positions);
    a.scale = 1.0f / std::sqrt(float(head_dim));
    a.params = d_params_;
    if (!cuda::attention_layout_supported(a))
      throw std::invalid_argument("cuda backend: attention needs an even head_dim of at most " +
                                  std::to_string(cuda::kAttnMaxHeadDim) + " and 4-byte aligned rows (head_dim " +
                                  std::to_string(head_dim) + ")");
    if (a.T > 1) {
      cuda::launch_attention_prefill(a, stream_);
      return;
    }
    // Split-KV decode: enough (split × kv head) blocks to cover every multiprocessor once.
    a.n_hb = (a.group + cuda::kDecodeRows - 1) / cuda::kDecodeRows;
    a.min_chunk = cuda::kDecodeMinChunk;
    a.s_max = int(std::clamp<int64_t>((prop_.multiProcessorCount + int64_t(a.kv_heads) * a.n_hb - 1) /
                                          (int64_t(a.kv_heads) * a.n_hb),
                                      1, std::max<int64_t>(1, (max_positions + a.min_chunk - 1) / a.min_chunk)));
    const size_t part_o = size_t(a.s_max) * a.heads * a.hd, part_ml = size_t(a.s_max) * a.heads * 2,
                 counters = size_t(a.kv_heads) * a.n_hb;
    if (part_o > attn_part_o_cap_ || part_ml > attn_part_ml_cap_ || counters > attn_counters_cap_) {
      ensure_no_capture("attention scratch");
      free_scratch(attn_part_o_);
      free_scratch(attn_part_ml_);
      free_scratch(attn_counters_);
      attn_part_o_ = device_alloc(part_o * 4, "attention scratch");
      attn_part_ml_ = device_alloc(part_ml * 4, "attention scratch");
      attn_counters_ = device_alloc(counters * 4, "attention scratch");
      // On our stream: cudaMemset would run on the legacy stream, unordered with our non-blocking one.
      QWEN_CUDA_CHECK(cudaMemsetAsync(attn_counters_, 0, counters * 4, stream_));
      attn_part_o_cap_ = part_o;
      attn_part_ml_cap_ = part_ml;
      attn_counters_cap_ = counters;
    }
    a.part_o = static_cast<float*>(attn_part_o_);
    a.part_ml = static_cast<float*>(attn_part_ml_);
    a.counters = static_cast<unsigned*>(attn_counters_);
    cuda::launch_attention_decode(a, stream_);
  }

  void silu_mul(const Tensor& out, const Tensor& gate_up) override {
    check(out.dtype == DType::BF16 && gate_up.dtype == DType::BF16 && gate_up.cols == 2 * out.cols &&
              gate_up.rows == out.rows,
          "silu_mul: bad shapes");
    cuda::launch_silu_mul(out.ptr<bf16>(), out.ld, gate_up.ptr<bf16>(), gate_up.ld, out.cols, out.rows, stream_);
  }

  int32_t argmax(const Tensor& row) override {
    check(row.dtype == DType::F32 && row.rows == 1 && row.cols >= 1, "argmax: expects an F32 row");
    QWEN_CUDA_CHECK(cudaSetDevice(dev_));
    cuda::launch_argmax(row.ptr<float>(), row.cols, am_v_, am_i_, am_counter_, am_result_,
                        2 * prop_.multiProcessorCount, stream_);
    QWEN_CUDA_CHECK(cudaMemcpyAsync(h_result_, am_result_, sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
    QWEN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return *h_result_;
  }

 private:
  struct Choice {
    bool cublas = false;
    int wpr = 1;
    float gemv_us = 0, cublas_us = 0;
  };

  void* device_alloc(size_t bytes, const char* what) {
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, std::max<size_t>(bytes, 256));
    if (err != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      throw std::runtime_error(std::string("out of GPU memory on cuda:") + std::to_string(dev_) + " allocating " +
                               mib(int64_t(bytes)) + " for " + what + " (" + cudaGetErrorString(err) + "; " +
                               mib(int64_t(allocated_)) + " already allocated by this model, " +
                               mib(int64_t(free_b)) + " free of " + mib(int64_t(total_b)) + ")");
    }
    allocs_.push_back(p);
    allocated_ += bytes;
    return p;
  }

  void free_scratch(void*& p) {
    if (!p) return;
    QWEN_CUDA_CHECK(cudaStreamSynchronize(stream_));  // no pending kernel still reads it
    auto it = std::find(allocs_.begin(), allocs_.end(), p);
    if (it != allocs_.end()) allocs_.erase(it);
    QWEN_CUDA_CHECK(cudaFree(p));
    p = nullptr;
    invalidate_graph();  // the recorded graph may point at the old buffer
  }

  void ensure_no_capture(const char* what) {
    if (capturing_)
      throw std::logic_error(std::string("cuda backend: ") + what + " would be allocated while recording a CUDA graph");
  }

  void invalidate_graph() {
    if (graph_exec_) {
      cudaGraphExecDestroy(graph_exec_);
      graph_exec_ = nullptr;
    }
  }

  // Pass state: StepParams + ids, on the device and in pinned host memory for the copy.
  void grow_params(int64_t T) {
    ensure_no_capture("the token id buffer");
    const int64_t cap = std::max<int64_t>(T, 2 * ids_cap_);
    if (d_params_) {
      void* old = d_params_;
      free_scratch(old);
      d_params_ = nullptr;
    }
    if (h_params_) {
      QWEN_CUDA_CHECK(cudaEventSynchronize(params_copied_));
      QWEN_CUDA_CHECK(cudaFreeHost(h_params_));
      h_params_ = nullptr;
    }
    const size_t bytes = sizeof(StepParams) + size_t(cap) * 4;
    d_params_ = static_cast<StepParams*>(device_alloc(bytes, "token ids"));
    void* h = nullptr;
    QWEN_CUDA_CHECK(cudaMallocHost(&h, bytes));
    h_params_ = static_cast<StepParams*>(h);
    ids_cap_ = cap;
    invalidate_graph();
  }

  // out (T, n) = x (T, k) · w (n, k)ᵀ through cuBLAS. Row-major (T, n) is column-major (n, T): C = Wᵀ·X with
  // W column-major (k, n) transposed, X column-major (k, T).
  void gemm(const Tensor& out, const Tensor& x, const Tensor& w, const float* bias, bool accumulate) {
    const int64_t T = x.rows, n = w.rows, k = w.cols;
    const float alpha = 1.0f;
    if (out.dtype == DType::F32) {
      const float beta = accumulate ? 1.0f : 0.0f;  // the residual add: x += o_proj(attn) in the GEMM itself
      cublas_gemm(out.data, CUDA_R_32F, out.ld, x, w, T, n, k, alpha, beta);
      if (bias) cuda::launch_add_bias(out.data, true, out.ld, out.ptr<float>(), out.ld, bias, n, T, stream_);
      return;
    }
    if (!bias) {  // bf16 out, rounded once from the f32 accumulators
      cublas_gemm(out.data, CUDA_R_16BF, out.ld, x, w, T, n, k, alpha, 0.0f);
      return;
    }
    // bf16 out with an f32 bias (the fused qkv projection): f32 GEMM into scratch, then bias + rounding in one
    // pass, so the bias is added before the only rounding, as on the CPU.
    const size_t need = size_t(T * n);
    if (need > gemm_scratch_cap_) {
      ensure_no_capture("GEMM scratch");
      free_scratch(gemm_scratch_);
      gemm_scratch_ = device_alloc(need * 4, "GEMM scratch");
      gemm_scratch_cap_ = need;
    }
    cublas_gemm(gemm_scratch_, CUDA_R_32F, n, x, w, T, n, k, alpha, 0.0f);
    cuda::launch_add_bias(out.data, false, out.ld, static_cast<const float*>(gemm_scratch_), n, bias, n, T, stream_);
  }

  void cublas_gemm(void* c, cudaDataType_t ctype, int64_t ldc, const Tensor& x, const Tensor& w, int64_t T, int64_t n,
                   int64_t k, float alpha, float beta) {
    QWEN_CUBLAS_CHECK(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(T), int(k), &alpha, w.data, CUDA_R_16BF,
                                   int(w.ld), x.data, CUDA_R_16BF, int(x.ld), &beta, c, ctype, int(ldc),
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  // --- GEMV or cuBLAS for one-token matmuls --------------------------------------------------------------------
  Choice choose(const Tensor& out, const Tensor& x, const Tensor& w) {
    const std::pair<int64_t, int64_t> key{w.rows, w.cols};
    auto it = choices_.find(key);
    if (it != choices_.end()) return it->second;
    Choice c;
    c.wpr = cuda::gemv_default_warps(w.rows, w.cols, prop_.multiProcessorCount);
    if (gemv_mode_ == GemvMode::Auto && tuning_) {
      c = tune(out, x, w);
      choices_[key] = c;
    } else if (gemv_mode_ == GemvMode::Gemv) {
      choices_[key] = c;
    }
    return c;  // outside the timed first step and not forced: the GEMV with the default split
  }

  // Times the GEMV at every useful split and cuBLAS on this shape, each as a CUDA graph of back-to-back launches
  // (as they will run), into scratch so the real output is untouched.
  Choice tune(const Tensor& out, const Tensor& x, const Tensor& w) {
    const int64_t n = w.rows, k = w.cols;
    if (size_t(n) > tune_cap_) {
      free_scratch(tune_out_);
      tune_out_ = device_alloc(size_t(n) * 4, "GEMV timing scratch");
      QWEN_CUDA_CHECK(cudaMemsetAsync(tune_out_, 0, size_t(n) * 4, stream_));
      tune_cap_ = size_t(n);
    }
    const bool f32 = out.dtype == DType::F32;
    const double bytes = double(n) * double(k) * 2;
    const int reps = int(std::clamp(2.0e8 / bytes, 1.0, double(QWEN_CUDA_TUNE_MAX_REPS)));
    Choice c;
    float best = 1e30f;
    for (int wpr = 1; wpr <= 8; wpr *= 2) {
      if (wpr > 1 && k / 8 < int64_t(wpr) * 32) break;  // fewer than one 16-byte chunk per lane
      const float us = time_us(reps, [&] {
        cuda::launch_gemv(w.ptr<bf16>(), w.ld, x.ptr<bf16>(), k, n, tune_out_, f32, false, nullptr, wpr, stream_);
      });
      if (us < best) {
        best = us;
        c.wpr = wpr;
      }
    }
    c.gemv_us = best;
    c.cublas_us = time_us(reps, [&] {
      cublas_gemm(tune_out_, f32 ? CUDA_R_32F : CUDA_R_16BF, n, x, w, 1, n, k, 1.0f, 0.0f);
    });
    c.cublas = c.cublas_us < c.gemv_us;
    return c;
  }

  float time_us(int reps, const std::function<void()>& launch) {
    cudaGraph_t graph = nullptr;
    QWEN_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    try {
      for (int r = 0; r < reps; ++r) launch();
    } catch (...) {
      cudaStreamEndCapture(stream_, &graph);
      if (graph) cudaGraphDestroy(graph);
      cudaGetLastError();
      throw;
    }
    QWEN_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    QWEN_CUDA_CHECK(err);
    float ms = 0;
    try {
      QWEN_CUDA_CHECK(cudaGraphLaunch(exec, stream_));  // warm-up
      QWEN_CUDA_CHECK(cudaEventRecord(t0_, stream_));
      constexpr int kLaunches = QWEN_CUDA_TUNE_LAUNCHES;
      for (int i = 0; i < kLaunches; ++i) QWEN_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
      QWEN_CUDA_CHECK(cudaEventRecord(t1_, stream_));
      QWEN_CUDA_CHECK(cudaEventSynchronize(t1_));
      QWEN_CUDA_CHECK(cudaEventElapsedTime(&ms, t0_, t1_));
      ms /= float(kLaunches);
    } catch (...) {
      cudaGraphExecDestroy(exec);
      throw;
    }
    cudaGraphExecDestroy(exec);
    return ms * 1000.0f / float(reps);
  }

  void release() noexcept {
    if (dev_ >= 0) cudaSetDevice(dev_);
    if (stream_) cudaStreamSynchronize(stream_);
    if (graph_exec_) cudaGraphExecDestroy(graph_exec_);
    graph_exec_ = nullptr;
    if (blas_) cublasDestroy(blas_);
    blas_ = nullptr;
    for (void* p : allocs_) cudaFree(p);
    allocs_.clear();
    if (h_params_) cudaFreeHost(h_params_);
    h_params_ = nullptr;
    if (h_result_) cudaFreeHost(h_result_);
    h_result_ = nullptr;
    if (params_copied_) cudaEventDestroy(params_copied_);
    if (t0_) cudaEventDestroy(t0_);
    if (t1_) cudaEventDestroy(t1_);
    params_copied_ = t0_ = t1_ = nullptr;
    if (stream_) cudaStreamDestroy(stream_);
    stream_ = nullptr;
    cudaGetLastError();  // nothing sticky left behind for the next model
  }

  int dev_;
  cudaDeviceProp prop_{};
  bool use_graph_ = true;
  GemvMode gemv_mode_ = GemvMode::Auto;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  void* blas_ws_ = nullptr;
  cudaEvent_t params_copied_ = nullptr, t0_ = nullptr, t1_ = nullptr;
  std::vector<void*> allocs_;
  size_t allocated_ = 0;

  StepParams* d_params_ = nullptr;
  StepParams* h_params_ = nullptr;
  int64_t ids_cap_ = 0;
  int64_t T_ = 0, pos0_ = 0;

  bool tuned_ = false, tuning_ = false, capturing_ = false;
  cudaGraphExec_t graph_exec_ = nullptr;
  std::map<std::pair<int64_t, int64_t>, Choice> choices_;

  void* gemm_scratch_ = nullptr;
  size_t gemm_scratch_cap_ = 0;
  void* tune_out_ = nullptr;
  size_t tune_cap_ = 0;
  void* attn_part_o_ = nullptr;
  void* attn_part_ml_ = nullptr;
  void* attn_counters_ = nullptr;
  size_t attn_part_o_cap_ = 0, attn_part_ml_cap_ = 0, attn_counters_cap_ = 0;

  float* am_v_ = nullptr;
  int32_t* am_i_ = nullptr;
  unsigned* am_counter_ = nullptr;
  int32_t* am_result_ = nullptr;
  int32_t* h_result_ = nullptr;
};

}  // namespace

bool cuda_available() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n > 0;
}

std::unique_ptr<Backend> make_cuda_backend(int device_index) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("no usable CUDA device: ") + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
  if (n == 0) throw std::runtime_error("no CUDA device is visible");
  if (device_index < 0 || device_index >= n)
    throw std::invalid_argument("device cuda:" + std::to_string(device_index) + " does not exist: this machine has " +
                                std::to_string(n) + " CUDA device" + (n == 1 ? "" : "s"));
  return std::make_unique<CudaBackend>(device_index);
}

}  // namespace qwen
