// The CUDA backend: bf16 weights and activations on one NVIDIA GPU (compute capability 8.0+), f32 residual stream
// and logits, every op on one stream.
//
//   matmuls      T > 1: cuBLAS (cublasGemmEx, bf16 in, f32 compute, f32 or bf16 out; the residual add is the
//                GEMM's beta = 1). T = 1: our bf16 GEMV (gemv.cu) or cuBLAS, per shape (tuner.cu).
//   other ops    our kernels (kernels.cu, attention.cu); token ids, slots and positions are read from device memory
//                (StepParams, memory.cu), written once per pass by begin_forward.
//   one-row step recorded once into a CUDA graph and replayed for every later one-row pass, whatever its slot and
//                position (graph.cu); greedy decoding brings back 4 bytes per token.
//
// Every CUDA and cuBLAS call is checked; failures throw CudaError (a std::runtime_error) with the library's error
// string.
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "backend.h"
#include "cuda/graph.cuh"
#include "cuda/kernels.cuh"
#include "cuda/memory.cuh"
#include "cuda/tuner.cuh"

#define QWEN_CUBLAS_CHECK(expr)                                                                               \
  do {                                                                                                        \
    cublasStatus_t qwen_st_ = (expr);                                                                         \
    if (qwen_st_ != CUBLAS_STATUS_SUCCESS)                                                                    \
      throw ::qwen::cuda::CudaError(std::string("cuBLAS error ") + cublasGetStatusName(qwen_st_) + " (" +     \
                                    cublasGetStatusString(qwen_st_) + ") in " #expr " at " __FILE__ ":" +     \
                                    std::to_string(__LINE__));                                                \
  } while (0)

namespace qwen {

namespace {

using cuda::bf16;
using cuda::CudaError;
using cuda::GemvTuner;
using cuda::Scratch;

constexpr size_t kCublasWorkspace = size_t(32) << 20;  // what cuBLAS recommends for Hopper; set so graphs capture

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("cuda backend: " + what);
}

std::string device_label(int dev, const cudaDeviceProp& prop) {
  return "cuda:" + std::to_string(dev) + " (" + prop.name + ")";
}

cudaDeviceProp device_properties(int dev) {
  QWEN_CUDA_CHECK(cudaSetDevice(dev));
  cudaDeviceProp prop{};
  QWEN_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  if (prop.major < 8)
    throw std::runtime_error(device_label(dev, prop) + " has compute capability " + std::to_string(prop.major) + "." +
                             std::to_string(prop.minor) + ": the CUDA backend needs bfloat16 tensor cores, compute "
                             "capability 8.0 (Ampere) or newer");
  QWEN_CUDA_CHECK(cudaFree(nullptr));  // create the context now, so reserve() sees what is really free
  return prop;
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device)
      : dev_(device), prop_(device_properties(device)), mem_(device, device_label(device, prop_)),
        pass_(mem_), tuner_(mem_, prop_.multiProcessorCount) {
    try {
      QWEN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      QWEN_CUBLAS_CHECK(cublasCreate(&blas_));
      QWEN_CUBLAS_CHECK(cublasSetStream(blas_, stream_));
      void* ws = mem_.alloc(kCublasWorkspace, "the cuBLAS workspace");
      QWEN_CUBLAS_CHECK(cublasSetWorkspace(blas_, ws, kCublasWorkspace));
      QWEN_CUBLAS_CHECK(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH));  // no TF32 anywhere
      const size_t n = cuda::kArgmaxMaxBlocks;
      am_v_ = static_cast<float*>(mem_.alloc(n * 4, "argmax scratch"));
      am_i_ = static_cast<int32_t*>(mem_.alloc(n * 4, "argmax scratch"));
      am_counters_ = static_cast<unsigned*>(mem_.alloc(n * 4, "argmax scratch"));
      am_result_ = static_cast<int32_t*>(mem_.alloc(n * 4, "argmax scratch"));
      QWEN_CUDA_CHECK(cudaMemsetAsync(am_counters_, 0, n * 4, stream_));
      am_host_.ensure(n * 4);
    } catch (...) {
      release();
      throw;
    }
  }

  // The members free their memory after this (cuBLAS's workspace included): the stream is idle by then.
  ~CudaBackend() override { release(); }

  std::string name() const override {
    std::ostringstream s;
    s << "cuda:" << dev_ << " (" << prop_.name << ", sm_" << prop_.major << prop_.minor << ", "
      << prop_.multiProcessorCount << " SMs, " << cuda::mib(int64_t(mem_.allocated())) << " allocated; "
      << graph_.describe() << "; one-token matmuls: " << tuner_.describe() << ")";
    return s.str();
  }

  bool stores(Format f) const override { return f == Format::BF16; }
  DType activation_dtype() const override { return DType::BF16; }

  // --- memory ------------------------------------------------------------------------------------------------
  void reserve(int64_t bytes, const std::string& what) override { mem_.reserve(bytes, what); }

  Tensor alloc(DType dtype, int64_t rows, int64_t cols) override {
    check(rows >= 0 && cols >= 0, "alloc of a negative shape");
    void* p = mem_.alloc(size_t(rows * cols) * dtype_size(dtype), "a tensor");
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
  void begin_forward(const Rows& rows) override {
    QWEN_CUDA_CHECK(cudaSetDevice(dev_));
    check(rows.T >= 1 && rows.T < (int64_t(1) << 30), "begin_forward: bad row count");
    max_slot_ = max_pos_ = 0;
    for (int64_t t = 0; t < rows.T; ++t) {
      check(rows.slots[t] >= 0 && rows.positions[t] >= 0, "begin_forward: negative slot or position");
      max_slot_ = std::max<int64_t>(max_slot_, rows.slots[t]);
      max_pos_ = std::max<int64_t>(max_pos_, rows.positions[t]);
    }
    if (rows.T > 1) cuda::attention_tiles(rows.slots, rows.positions, rows.T, tiles_);
    else tiles_.clear();  // one row: the decode attention, no tiles
    if (pass_.write(rows, tiles_, stream_)) graph_.invalidate();
    T_ = rows.T;
  }

  void run_decode_step(const std::function<void()>& body) override {
    QWEN_CUDA_CHECK(cudaSetDevice(dev_));
    if (!warmed_up_) {
      // The first one-row step runs eagerly: it times the one-row matmul shapes and allocates any scratch that
      // decoding needs, so the graph recorded at the next step contains no allocation and no timing.
      timing_ = true;
      try {
        body();
      } catch (...) {
        timing_ = false;
        throw;
      }
      timing_ = false;
      warmed_up_ = true;
      return;
    }
    graph_.run(stream_, body);
  }

  void embed(const Tensor& out, const Weight& table) override {
    check(table.format == Format::BF16 && out.dtype == DType::F32 && out.cols == table.cols() && out.rows == T_,
          "embed: expects F32 out (T, hidden) and a bf16 table");
    cuda::launch_embed(out.ptr<float>(), out.ld, table.data.ptr<bf16>(), table.data.ld, out.cols, out.rows,
                       pass_.device(), stream_);
  }

  void rmsnorm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps) override {
    check(x.dtype == DType::F32 && weight.dtype == DType::F32 && out.rows == x.rows && out.cols == x.cols &&
              weight.numel() == x.cols && (out.dtype == DType::F32 || out.dtype == DType::BF16),
          "rmsnorm: expects F32 x and weight");
    cuda::launch_rmsnorm(out.data, out.dtype == DType::F32, out.ld, x.ptr<float>(), x.ld, weight.ptr<float>(), x.cols,
                         x.rows, eps, stream_);
  }

  void matmul(const Tensor& out, const Tensor& x, const Weight& weight, const Tensor* bias, bool accumulate) override {
    const Tensor& w = weight.data;
    const int64_t T = x.rows, n = w.rows, k = w.cols;
    check(weight.format == Format::BF16 && x.dtype == DType::BF16, "matmul: expects bf16 weights and input");
    check(x.cols == k && out.rows == T && out.cols == n, "matmul: shape mismatch");
    check(out.dtype == DType::F32 || (out.dtype == DType::BF16 && !accumulate),
          "matmul: accumulate needs an F32 output");
    check(!bias || (bias->dtype == DType::F32 && bias->numel() == n), "matmul: bias must be F32 (1, n)");
    const float* b = bias ? bias->ptr<float>() : nullptr;
    const bool f32 = out.dtype == DType::F32;
    if (T == 1 && tuner_.mode() != GemvTuner::Mode::Cublas && cuda::gemv_supported(w.data, w.ld, x.data, k)) {
      const GemvTuner::Choice c = tuner_.choose(
          n, k, timing_, stream_,
          [&](void* o, int wpr) {
            cuda::launch_gemv(w.ptr<bf16>(), w.ld, x.ptr<bf16>(), k, n, o, f32, false, nullptr, wpr, stream_);
          },
          [&](void* o) { cublas_gemm(o, f32 ? CUDA_R_32F : CUDA_R_16BF, n, x, w, 1, n, k, 1.0f, 0.0f); });
      if (!c.cublas) {
        cuda::launch_gemv(w.ptr<bf16>(), w.ld, x.ptr<bf16>(), k, n, out.data, f32, accumulate, b, c.wpr, stream_);
        return;
      }
    }
    gemm(out, x, w, b, accumulate);
  }

  void rope(const Tensor& q, const Tensor& k, int64_t head_dim, const Tensor& cos, const Tensor& sin) override {
    check(q.dtype == DType::BF16 && k.dtype == DType::BF16 && cos.dtype == DType::F32 && sin.dtype == DType::F32 &&
              head_dim % 2 == 0 && q.cols % head_dim == 0 && k.cols % head_dim == 0 && q.rows == T_ &&
              k.rows == T_ && cos.cols == head_dim / 2 && sin.ld == cos.ld && max_pos_ < cos.rows,
          "rope: bad shapes or a position past the tables");
    cuda::launch_rope(q.ptr<bf16>(), q.ld, q.cols / head_dim, k.ptr<bf16>(), k.ld, k.cols / head_dim, head_dim,
                      cos.ptr<float>(), sin.ptr<float>(), cos.ld, q.rows, pass_.device(), stream_);
  }

  void kv_store(const KVLayer& cache, const Tensor& k, const Tensor& v) override {
    const int64_t hd = cache.k.cols;
    check_cache(cache, hd, "kv_store");
    check(k.dtype == DType::BF16 && v.dtype == DType::BF16 && k.cols == cache.kv_heads * hd && v.cols == k.cols &&
              k.rows == T_ && v.rows == T_,
          "kv_store: bad shapes");
    cuda::launch_kv_store(cache.k.ptr<bf16>(), cache.v.ptr<bf16>(), cache.k.ld, k.ptr<bf16>(), k.ld, v.ptr<bf16>(),
                          v.ld, cache.kv_heads, hd, cache.max_positions, k.rows, pass_.device(), stream_);
  }

  void attention(const Tensor& out, const Tensor& q, const KVLayer& cache, int64_t head_dim) override {
    check_cache(cache, head_dim, "attention");
    check(out.dtype == DType::BF16 && q.dtype == DType::BF16 && out.rows == q.rows && out.cols == q.cols &&
              q.rows == T_ && q.cols % head_dim == 0 && (q.cols / head_dim) % cache.kv_heads == 0,
          "attention: bad shapes");
    cuda::AttnArgs a{};
    a.q = q.ptr<bf16>();
    a.ldq = q.ld;
    a.k_cache = cache.k.ptr<bf16>();
    a.v_cache = cache.v.ptr<bf16>();
    a.ldkv = cache.k.ld;
    a.out = out.ptr<bf16>();
    a.ldo = out.ld;
    a.T = int(q.rows);
    a.heads = int(q.cols / head_dim);
    a.kv_heads = int(cache.kv_heads);
    a.group = a.heads / a.kv_heads;
    a.hd = int(head_dim);
    a.max_pos = int(cache.max_positions);
    a.n_tiles = int(tiles_.size());
    a.scale = 1.0f / std::sqrt(float(head_dim));
    a.params = pass_.device();
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
    const int64_t pairs = int64_t(a.kv_heads) * a.n_hb;  // (kv head, head batch) blocks per split
    a.s_max = int(std::clamp<int64_t>((prop_.multiProcessorCount + pairs - 1) / pairs, 1,
                                      std::max<int64_t>(1, (cache.max_positions + a.min_chunk - 1) / a.min_chunk)));
    const size_t part_o = size_t(a.s_max) * a.heads * a.hd * 4, part_ml = size_t(a.s_max) * a.heads * 2 * 4,
                 counters = size_t(pairs) * 4;
    grow(attn_part_o_, part_o, "attention scratch");
    grow(attn_part_ml_, part_ml, "attention scratch");
    if (grow(attn_counters_, counters, "attention scratch"))  // zero between launches; the kernel keeps them so
      QWEN_CUDA_CHECK(cudaMemsetAsync(attn_counters_.p, 0, counters, stream_));
    a.part_o = attn_part_o_.as<float>();
    a.part_ml = attn_part_ml_.as<float>();
    a.counters = attn_counters_.as<unsigned>();
    cuda::launch_attention_decode(a, stream_);
  }

  void silu_mul(const Tensor& out, const Tensor& gate_up) override {
    check(out.dtype == DType::BF16 && gate_up.dtype == DType::BF16 && gate_up.cols == 2 * out.cols &&
              gate_up.rows == out.rows,
          "silu_mul: bad shapes");
    cuda::launch_silu_mul(out.ptr<bf16>(), out.ld, gate_up.ptr<bf16>(), gate_up.ld, out.cols, out.rows, stream_);
  }

  void argmax(const Tensor& rows, int32_t* out) override {
    check(rows.dtype == DType::F32 && rows.rows >= 1 && rows.cols >= 1, "argmax: expects F32 rows");
    QWEN_CUDA_CHECK(cudaSetDevice(dev_));
    for (int64_t r0 = 0; r0 < rows.rows; r0 += cuda::kArgmaxMaxBlocks) {
      const int64_t m = std::min<int64_t>(cuda::kArgmaxMaxBlocks, rows.rows - r0);
      const int blocks = int(std::max<int64_t>(1, 2 * prop_.multiProcessorCount / m));
      cuda::launch_argmax(rows.row<float>(r0), rows.ld, rows.cols, m, am_v_, am_i_, am_counters_, am_result_, blocks,
                          stream_);
      QWEN_CUDA_CHECK(cudaMemcpyAsync(am_host_.as<int32_t>(), am_result_, size_t(m) * 4, cudaMemcpyDeviceToHost,
                                      stream_));
      QWEN_CUDA_CHECK(cudaStreamSynchronize(stream_));
      std::copy(am_host_.as<int32_t>(), am_host_.as<int32_t>() + m, out + r0);
    }
  }

 private:
  // The slots and positions of this pass fit `cache`, whose rows are head_dim wide.
  void check_cache(const KVLayer& c, int64_t head_dim, const char* op) const {
    check(c.k.dtype == DType::BF16 && c.v.dtype == DType::BF16 && c.k.cols == head_dim && c.v.cols == head_dim &&
              c.v.ld == c.k.ld && c.v.rows == c.k.rows && c.kv_heads > 0 && c.max_positions > 0 &&
              c.k.rows % (c.kv_heads * c.max_positions) == 0,
          std::string(op) + ": bad KV cache shapes");
    check(max_slot_ < c.k.rows / (c.kv_heads * c.max_positions) && max_pos_ < c.max_positions,
          std::string(op) + ": a row's slot or position is outside the KV cache");
  }

  // Grows a scratch buffer (never while recording a graph); true when it moved, after dropping the recorded graph
  // that may point at the old buffer.
  bool grow(Scratch& s, size_t bytes, const char* what) {
    if (s.p && bytes <= s.bytes) return false;
    if (graph_.capturing())
      throw CudaError(std::string("cuda backend: ") + what + " would be allocated while recording a CUDA graph");
    s.ensure(mem_, bytes, what, stream_);
    graph_.invalidate();
    return true;
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
    grow(gemm_scratch_, size_t(T * n) * 4, "GEMM scratch");
    cublas_gemm(gemm_scratch_.p, CUDA_R_32F, n, x, w, T, n, k, alpha, 0.0f);
    cuda::launch_add_bias(out.data, false, out.ld, gemm_scratch_.as<const float>(), n, bias, n, T, stream_);
  }

  void cublas_gemm(void* c, cudaDataType_t ctype, int64_t ldc, const Tensor& x, const Tensor& w, int64_t T, int64_t n,
                   int64_t k, float alpha, float beta) {
    QWEN_CUBLAS_CHECK(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(T), int(k), &alpha, w.data, CUDA_R_16BF,
                                   int(w.ld), x.data, CUDA_R_16BF, int(x.ld), &beta, c, ctype, int(ldc),
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  // The stream and the cuBLAS handle; the members free everything else.
  void release() noexcept {
    cudaSetDevice(dev_);
    if (stream_) cudaStreamSynchronize(stream_);
    if (blas_) cublasDestroy(blas_);
    blas_ = nullptr;
    if (stream_) cudaStreamDestroy(stream_);
    stream_ = nullptr;
  }

  int dev_;
  cudaDeviceProp prop_;
  cuda::DeviceMemory mem_;  // first: freed after every member that allocated from it
  cuda::PassParams pass_;
  GemvTuner tuner_;
  cuda::DecodeGraph graph_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;

  int64_t T_ = 0, max_slot_ = 0, max_pos_ = 0;  // of the current pass
  std::vector<cuda::AttnTile> tiles_;           // of the current pass (prefill attention)
  bool warmed_up_ = false, timing_ = false;

  Scratch gemm_scratch_, attn_part_o_, attn_part_ml_, attn_counters_;
  float* am_v_ = nullptr;
  int32_t* am_i_ = nullptr;
  unsigned* am_counters_ = nullptr;
  int32_t* am_result_ = nullptr;
  cuda::PinnedBuffer am_host_;
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
