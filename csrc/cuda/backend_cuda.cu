// The CUDA backend: bf16, int8 (Q8) or int4 (Q4) weights and bf16 activations on one NVIDIA GPU (compute capability
// 8.0+), f32 residual stream and logits, every op on one stream.
//
//   matmuls      T > 1: cuBLAS (cublasGemmEx, bf16 in, f32 compute, f32 or bf16 out; the residual add is the
//                GEMM's beta = 1). T = 1: our bf16 GEMV (gemv.cu) or cuBLAS, per shape (tuner.cu).
//   quantized    weights in tensor.h's layout, quantized on the host at load by the CPU's own quantize_row (the
//                same bytes as a CPU model of that format). T = 1: our quantized GEMV (quant.cu). T > 1: tiles of
//                rows dequantized to bf16 into one scratch buffer sized at load, each multiplied by cuBLAS.
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
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "backend.h"
#include "cpu/kernels.h"
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
// bf16 elements of the tile a batched quantized matmul dequantizes at a time: 8 MiB, which stays in L2 between
// its writing and cuBLAS reading it (the CPU emulation in tests/cuda_emu makes it small, so matrices take several).
#ifndef QWEN_CUDA_DEQUANT_TILE_ELEMS
#define QWEN_CUDA_DEQUANT_TILE_ELEMS (int64_t(4) << 20)
#endif
constexpr int64_t kDequantTileElems = QWEN_CUDA_DEQUANT_TILE_ELEMS;

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("cuda backend: " + what);
}

// n host values of dtype `from` (F32, BF16 or F16) as `to` (F32 or BF16).
void convert(const void* src, DType from, DType to, int64_t n, void* out) {
  if (from == to) {
    std::memcpy(out, src, size_t(n) * dtype_size(to));
    return;
  }
  auto fill = [&](auto value) {  // one loop per source type
    if (to == DType::F32) for (int64_t i = 0; i < n; ++i) static_cast<float*>(out)[i] = value(i);
    else if (to == DType::BF16) for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(out)[i] = f32_to_bf16(value(i));
    else throw std::invalid_argument(std::string("the CUDA backend does not store ") + dtype_name(to) + " tensors");
  };
  const uint16_t* s16 = static_cast<const uint16_t*>(src);
  const float* s32 = static_cast<const float*>(src);
  if (from == DType::F32) fill([&](int64_t i) { return s32[i]; });
  else if (from == DType::BF16) fill([&](int64_t i) { return bf16_to_f32(s16[i]); });
  else if (from == DType::F16) fill([&](int64_t i) { return f16_to_f32(s16[i]); });
  else throw std::invalid_argument(std::string("cannot load a ") + dtype_name(from) + " tensor");
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
      << graph_.describe() << "; one-token matmuls: " << tuner_.describe();
    if (!qgemv_splits_.empty()) {
      s << "; quantized one-token matmuls:";
      for (const auto& [shape, wpb] : qgemv_splits_)
        s << " " << format_name(std::get<0>(shape)) << " " << std::get<1>(shape) << "x" << std::get<2>(shape)
          << "=qgemv/" << wpb;
    }
    s << ")";
    return s.str();
  }

  bool stores(Format f) const override { return f == Format::BF16 || is_quantized(f); }
  DType activation_dtype() const override { return DType::BF16; }

  // --- memory ------------------------------------------------------------------------------------------------
  void reserve(int64_t bytes, const std::string& what) override { mem_.reserve(bytes, what); }

  Tensor alloc(DType dtype, int64_t rows, int64_t cols) override {
    check(rows >= 0 && cols >= 0, "alloc of a negative shape");
    void* p = mem_.alloc(size_t(rows * cols) * dtype_size(dtype), "a tensor");
    return Tensor{p, dtype, rows, cols, cols};
  }

  Weight alloc_weight(Format f, int64_t rows, int64_t cols) override {
    if (!is_quantized(f)) return Backend::alloc_weight(f, rows, cols);
    check(rows > 0 && cols > 0, "alloc_weight of an empty matrix");
    const int64_t bytes = format_bytes(f, rows, cols), row_bytes = quant_block_bytes(f, cols);
    void* p = mem_.alloc(size_t(bytes), "a quantized weight");
    // Zeros: the padding rows of the last block are defined, and so are rows not uploaded yet when upload_weight
    // patches a block shared by two calls.
    QWEN_CUDA_CHECK(cudaMemsetAsync(p, 0, size_t(bytes), stream_));
    // The batched matmuls' bf16 tile: as many whole blocks of rows as fit kDequantTileElems, at least one.
    const int64_t ld = quant_groups(cols) * kQuantGroup;
    const int64_t tile_blocks = std::min(quant_blocks(rows), std::max<int64_t>(1, kDequantTileElems / ld / kQuantRows));
    grow(dequant_tile_, size_t(tile_blocks * kQuantRows * ld) * 2, "dequantized weight tiles");
    return Weight{Tensor{p, DType::U8, quant_blocks(rows), row_bytes, row_bytes}, f, rows, cols};
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
    thread_local std::vector<uint8_t> buf;
    buf.resize(bytes);
    convert(src, src_dtype, dst.dtype, n, buf.data());
    copy(buf.data());
  }

  // Quantized rows are made on the host by the CPU kernels' quantize_row, a block of 4 rows at a time in this
  // thread's buffer, then copied. Blocks whose rows all come in this call are copied whole; a block shared with
  // another call (where q_proj meets k_proj in the stacked qkv, or a chunk of rows ends; perhaps on the other loader
  // thread) is read back, gets this call's rows (quantize_row writes only its own row's bytes) and is written back,
  // under a lock.
  void upload_weight(const Weight& dst, int64_t row0, const void* src, DType src_dtype, int64_t rows) override {
    if (!is_quantized(dst.format)) return Backend::upload_weight(dst, row0, src, src_dtype, rows);
    if (row0 < 0 || rows < 0 || row0 + rows > dst.rows()) throw std::out_of_range("upload outside its weight");
    if (rows == 0) return;
    QWEN_CUDA_CHECK(cudaSetDevice(dev_));  // loader threads are new threads
    const int64_t k = dst.cols(), bb = dst.data.cols, end = row0 + rows;
    const int64_t b0 = row0 / kQuantRows, b1 = (end - 1) / kQuantRows + 1;  // the blocks touched
    thread_local std::vector<uint8_t> blocks;
    thread_local std::vector<float> row;
    blocks.assign(size_t((b1 - b0) * bb), 0);
    row.resize(size_t(k));
    auto quantize = [&](int64_t r) {
      convert(static_cast<const char*>(src) + (r - row0) * k * int64_t(dtype_size(src_dtype)), src_dtype, DType::F32,
              k, row.data());
      if (!cpu_kernels().quantize_row(dst.format, row.data(), k, &blocks[size_t((r / kQuantRows - b0) * bb)],
                                      int(r % kQuantRows)))
        throw std::invalid_argument(std::string("a weight has a value that ") + format_name(dst.format) +
                                    " cannot hold (NaN, inf, |x| >= 2^125, or a float16 scale that would "
                                    "overflow); load this model in bfloat16");
    };
    auto copy = [&](int64_t b, int64_t n, bool to_device) {
      void* dev = dst.data.row<uint8_t>(b);
      void* host = &blocks[size_t((b - b0) * bb)];
      QWEN_CUDA_CHECK(cudaMemcpyAsync(to_device ? dev : host, to_device ? host : dev, size_t(n * bb),
                                      to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost, stream_));
      QWEN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    };
    auto whole = [&](int64_t b) {
      return b * kQuantRows >= row0 && std::min((b + 1) * kQuantRows, dst.rows()) <= end;
    };
    const int64_t w0 = whole(b0) ? b0 : b0 + 1, w1 = whole(b1 - 1) ? b1 : b1 - 1;  // [w0, w1): this call's alone
    for (int64_t r = std::max(row0, w0 * kQuantRows); r < std::min(end, w1 * kQuantRows); ++r) quantize(r);
    if (w1 > w0) copy(w0, w1 - w0, true);
    const int64_t edges[2] = {b0, b1 - 1};
    for (int i = 0; i < (b1 - 1 > b0 ? 2 : 1); ++i) {
      const int64_t b = edges[i];
      if (b >= w0 && b < w1) continue;
      std::lock_guard<std::mutex> lock(shared_blocks_);
      copy(b, 1, false);
      for (int64_t r = std::max(row0, b * kQuantRows); r < std::min(end, (b + 1) * kQuantRows); ++r) quantize(r);
      copy(b, 1, true);
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
    check((table.format == Format::BF16 || is_quantized(table.format)) && out.dtype == DType::F32 &&
              out.cols == table.cols() && out.rows == T_,
          "embed: expects F32 out (T, hidden) and a bf16 or quantized table");
    if (is_quantized(table.format)) {
      cuda::launch_dequant(table.format, table.data.ptr<uint8_t>(), out.cols, 0, out.rows, out.data, true, out.ld,
                           pass_.device(), stream_);
      return;
    }
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
    const int64_t T = x.rows, n = weight.rows(), k = weight.cols();
    check((weight.format == Format::BF16 || is_quantized(weight.format)) && x.dtype == DType::BF16,
          "matmul: expects bf16 or quantized weights and a bf16 input");
    check(x.cols == k && out.rows == T && out.cols == n, "matmul: shape mismatch");
    check(out.dtype == DType::F32 || (out.dtype == DType::BF16 && !accumulate),
          "matmul: accumulate needs an F32 output");
    check(!bias || (bias->dtype == DType::F32 && bias->numel() == n), "matmul: bias must be F32 (1, n)");
    const float* b = bias ? bias->ptr<float>() : nullptr;
    const bool f32 = out.dtype == DType::F32;
    if (is_quantized(weight.format)) {
      if (T == 1 && cuda::qgemv_supported(x.data, k)) {
        const int wpb = cuda::gemv_default_warps(quant_blocks(n), w.cols / 16, prop_.multiProcessorCount);
        qgemv_splits_.emplace(std::make_tuple(weight.format, n, k), wpb);
        cuda::launch_qgemv(weight.format, w.ptr<uint8_t>(), x.ptr<bf16>(), k, n, out.data, f32, accumulate, b, wpb,
                           stream_);
        return;
      }
      quantized_gemm(out, x, weight, b, accumulate);
      return;
    }
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

  // The batched product by a quantized weight: tiles of its rows dequantized to bf16 (row stride a whole number of
  // groups), each through gemm() into its columns of out.
  void quantized_gemm(const Tensor& out, const Tensor& x, const Weight& w, const float* bias, bool accumulate) {
    const int64_t n = w.rows(), k = w.cols(), ld = quant_groups(k) * kQuantGroup;
    const int64_t tile = int64_t(dequant_tile_.bytes / size_t(ld * 2)) / kQuantRows * kQuantRows;
    check(dequant_tile_.p && tile >= kQuantRows, "matmul: a quantized weight not allocated by this backend");
    for (int64_t n0 = 0; n0 < n; n0 += tile) {
      const int64_t nt = std::min(tile, n - n0);
      cuda::launch_dequant(w.format, w.data.ptr<uint8_t>(), k, n0, nt, dequant_tile_.p, false, ld, nullptr, stream_);
      gemm(out.slice_cols(n0, nt), x, Tensor{dequant_tile_.p, DType::BF16, nt, k, ld}, bias ? bias + n0 : nullptr,
           accumulate);
    }
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
  Scratch dequant_tile_;       // bf16 rows of a quantized weight, for batched matmuls (sized at load)
  std::mutex shared_blocks_;  // upload_weight's read-patch-write of blocks that two calls share
  std::map<std::tuple<Format, int64_t, int64_t>, int> qgemv_splits_;  // (format, n, k) → warps per block
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
