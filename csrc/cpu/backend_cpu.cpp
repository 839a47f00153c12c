// The CPU backend: float32 activations; weights in float32 or bfloat16. One-token matmuls run on our own GEMV
// kernels (bandwidth-bound: every weight is read once per token), batched ones on sgemm (OpenBLAS, single-threaded
// per call, one call per thread on a slice of the output columns, so one thread pool drives everything).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"

#if defined(QWEN_BLAS_OPENBLAS)
#include <cblas.h>
#if defined(QWEN_BLAS_SCIPY)  // scipy-openblas32 prefixes every symbol with scipy_
#define QWEN_SGEMM scipy_cblas_sgemm
#define QWEN_BLAS_SET_THREADS scipy_openblas_set_num_threads
#else
#define QWEN_SGEMM cblas_sgemm
#define QWEN_BLAS_SET_THREADS openblas_set_num_threads
#endif
#endif

namespace qwen {

namespace {

constexpr int64_t kTileFloats = int64_t(2) << 20;  // per-thread f32 tile of bf16 weights for sgemm (8 MB)
constexpr int64_t kRowAlign = 16;                  // rows per thread are multiples of this (cache lines of y)

int64_t available_memory_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  int64_t kb;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return int64_t(sysconf(_SC_PHYS_PAGES)) * int64_t(sysconf(_SC_PAGE_SIZE));
}

// out (T, n) = x (T, k) · w (n, k)ᵀ (+= with beta 1), f32, single-threaded.
void sgemm_nt(int64_t T, int64_t n, int64_t k, const float* x, int64_t ldx, const float* w, int64_t ldw, float* out,
              int64_t ldo, float beta, const CpuKernels& K) {
#if defined(QWEN_BLAS_OPENBLAS)
  (void)K;
  QWEN_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, int(T), int(n), int(k), 1.0f, x, int(ldx), w, int(ldw), beta,
             out, int(ldo));
#else
  // No BLAS in this build: blocks of w rows small enough to stay in L2 while every x row passes over them.
  const int64_t block = std::max<int64_t>(4, (int64_t(64) << 10) / std::max<int64_t>(k, 1));
  for (int64_t r0 = 0; r0 < n; r0 += block) {
    const int64_t r1 = std::min(n, r0 + block);
    for (int64_t t = 0; t < T; ++t) {
      float* o = out + t * ldo;
      if (beta == 0.0f) std::fill(o + r0, o + r1, 0.0f);
      K.gemv_f32(w, ldw, x + t * ldx, k, o, nullptr, true, r0, r1);
    }
  }
#endif
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(DType weight_dtype, int num_threads)
      : wdt_(weight_dtype), pool_(num_threads), K_(cpu_kernels()) {
#if defined(QWEN_BLAS_OPENBLAS)
    QWEN_BLAS_SET_THREADS(1);  // parallelism comes from our pool: one sgemm per thread on its own columns
#endif
    scratch_.resize(size_t(pool_.size()));
    tiles_.resize(size_t(pool_.size()));
    if (wdt_ == DType::BF16 && K_.gemm_bf16_cols) {
      panels_.assign(size_t(pool_.size()), std::vector<uint16_t>(size_t(gemm_bf16_panel_elems())));
    } else if (wdt_ == DType::BF16) {
      for (auto& t : tiles_) t.resize(size_t(kTileFloats));
    }
  }

  ~CpuBackend() override {
    for (auto& [p, bytes] : allocations_) munmap(p, bytes);
  }

  std::string name() const override { return std::string("cpu (") + K_.isa + ", " + std::to_string(pool_.size()) + " threads)"; }
  DType weight_dtype() const override { return wdt_; }
  DType activation_dtype() const override { return DType::F32; }

  void reserve(int64_t bytes) override {
    const int64_t avail = available_memory_bytes();
    if (bytes > avail)
      throw std::runtime_error("loading this model needs " + std::to_string(bytes >> 20) + " MiB of memory but only " +
                               std::to_string(avail >> 20) + " MiB is available; use dtype=\"bfloat16\" (half the "
                               "weight memory), a smaller max_context, or a smaller model");
  }

  Tensor alloc(DType dtype, int64_t rows, int64_t cols) override {
    const size_t bytes = size_t(rows * cols) * dtype_size(dtype);
    const size_t mapped = std::max<size_t>(bytes, 1);
    // Anonymous mappings: page-aligned, zeroed lazily, returned to the OS on free; large ones on huge pages so
    // streaming gigabytes of weights per token does not thrash the TLB.
    void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    if (mapped >= (size_t(2) << 20)) madvise(p, mapped, MADV_HUGEPAGE);
    allocations_.emplace_back(p, mapped);
    if (dtype == DType::BF16 && size_t(cols) > xs_.size()) xs_.resize(size_t(cols));  // at load, not per step
    return Tensor{p, dtype, rows, cols, cols};
  }

  void* host_data(const Tensor& t) override { return t.data; }

  void upload(const Tensor& dst, int64_t at, const void* src, DType src_dtype, int64_t n) override {
    if (at < 0 || n < 0 || at + n > dst.numel()) throw std::out_of_range("upload outside its tensor");
    if (dst.dtype == src_dtype) {
      std::memcpy(static_cast<char*>(dst.data) + at * int64_t(dtype_size(dst.dtype)), src, size_t(n) * dtype_size(src_dtype));
      return;
    }
    const uint16_t* s16 = static_cast<const uint16_t*>(src);
    const float* s32 = static_cast<const float*>(src);
    if (dst.dtype == DType::F32) {
      float* d = dst.ptr<float>() + at;
      if (src_dtype == DType::BF16) K_.bf16_to_f32(s16, d, n);
      else for (int64_t i = 0; i < n; ++i) d[i] = f16_to_f32(s16[i]);
    } else if (dst.dtype == DType::BF16) {
      uint16_t* d = dst.ptr<uint16_t>() + at;
      if (src_dtype == DType::F32) for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s32[i]);
      else for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(f16_to_f32(s16[i]));
    } else {
      throw std::invalid_argument("the CPU backend does not store F16 tensors");
    }
  }

  void download(float* dst, const Tensor& src) override {
    for (int64_t r = 0; r < src.rows; ++r) std::memcpy(dst + r * src.cols, src.row<float>(r), size_t(src.cols) * 4);
  }

  void begin_forward(const int32_t* ids, int64_t T, int64_t pos0) override {
    ids_ = ids;
    T_ = T;
    pos0_ = pos0;
  }

  void embed(const Tensor& out, const Tensor& table) override {
    for (int64_t t = 0; t < T_; ++t) {
      float* o = out.row<float>(t);
      if (table.dtype == DType::F32) std::memcpy(o, table.row<float>(ids_[t]), size_t(table.cols) * 4);
      else K_.bf16_to_f32(table.row<uint16_t>(ids_[t]), o, table.cols);
    }
  }

  void rmsnorm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps) override {
    for_rows(x.rows, [&](int64_t t) { K_.rmsnorm_row(out.row<float>(t), x.row<float>(t), weight.ptr<float>(), x.cols, eps); });
  }

  void matmul(const Tensor& out, const Tensor& x, const Tensor& w, const Tensor* bias, bool accumulate) override {
    const int64_t T = x.rows, n = w.rows, k = w.cols;
    const float* b = bias ? bias->ptr<float>() : nullptr;
    if (T == 1) {  // decode: bandwidth-bound GEMV, rows of w split across threads
      if (w.dtype == DType::BF16) K_.prepare_x_bf16(x.ptr<float>(), k, xs_.data());
      pool_.parallel_for(n, kRowAlign, [&](int64_t r0, int64_t r1, int) {
        if (w.dtype == DType::F32)
          K_.gemv_f32(w.ptr<float>(), w.ld, x.ptr<float>(), k, out.ptr<float>(), b, accumulate, r0, r1);
        else
          K_.gemv_bf16(w.ptr<uint16_t>(), w.ld, x.ptr<float>(), xs_.data(), k, out.ptr<float>(), b, accumulate, r0, r1);
      });
      return;
    }
    if (w.dtype == DType::BF16 && K_.gemm_bf16_cols) {
      const int64_t k2 = k + (k & 1);
      if (x16_.size() < size_t(T * k2)) x16_.resize(size_t(T * k2));  // batched passes only, grows once
      for_rows(T, [&](int64_t t) { K_.round_rows_bf16(x.ptr<float>(), x.ld, t, t + 1, k, x16_.data()); });
      pool_.parallel_for(n, 32, [&](int64_t r0, int64_t r1, int tid) {
        K_.gemm_bf16_cols(x16_.data(), T, k, w.ptr<uint16_t>(), w.ld, out.ptr<float>(), out.ld, b, accumulate, r0, r1,
                          panels_[size_t(tid)].data());
      }, /*chunks_per_thread=*/4);
      return;
    }
    pool_.parallel_for(n, kRowAlign, [&](int64_t r0, int64_t r1, int tid) {
      float* o = out.ptr<float>() + r0;
      if (b && !accumulate)
        for (int64_t t = 0; t < T; ++t) std::memcpy(o + t * out.ld, b + r0, size_t(r1 - r0) * 4);
      const float beta = (accumulate || b) ? 1.0f : 0.0f;
      if (w.dtype == DType::F32) {
        sgemm_nt(T, r1 - r0, k, x.ptr<float>(), x.ld, w.row<float>(r0), w.ld, o, out.ld, beta, K_);
        return;
      }
      // bf16 weights without the bf16 GEMM: widen a tile of rows at a time, then sgemm on the tile.
      std::vector<float>& tile = tiles_[size_t(tid)];
      const int64_t rows_per_tile = std::max<int64_t>(kRowAlign, kTileFloats / k);
      const size_t need = size_t(std::min(rows_per_tile, r1 - r0) * k);
      if (tile.size() < need) tile.resize(need);  // only when a matrix is wider than the tile budget
      for (int64_t t0 = r0; t0 < r1; t0 += rows_per_tile) {
        const int64_t m = std::min(rows_per_tile, r1 - t0);
        for (int64_t r = 0; r < m; ++r) K_.bf16_to_f32(w.row<uint16_t>(t0 + r), tile.data() + r * k, k);
        sgemm_nt(T, m, k, x.ptr<float>(), x.ld, tile.data(), k, o + (t0 - r0), out.ld, beta, K_);
      }
    }, /*chunks_per_thread=*/2);
  }

  void rope(const Tensor& q, const Tensor& k, int64_t head_dim, const Tensor& cos, const Tensor& sin) override {
    const int64_t half = head_dim / 2;
    auto rotate = [&](float* v, const float* c, const float* s) {
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c[i] - x2 * s[i];
        v[i + half] = x2 * c[i] + x1 * s[i];
      }
    };
    for_rows(q.rows, [&](int64_t t) {
      const float* c = cos.row<float>(pos0_ + t);
      const float* s = sin.row<float>(pos0_ + t);
      for (int64_t h = 0; h < q.cols / head_dim; ++h) rotate(q.row<float>(t) + h * head_dim, c, s);
      for (int64_t h = 0; h < k.cols / head_dim; ++h) rotate(k.row<float>(t) + h * head_dim, c, s);
    });
  }

  void kv_store(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                int64_t max_positions) override {
    const int64_t hd = k_cache.cols, heads = k.cols / hd;
    for (int64_t t = 0; t < k.rows; ++t)
      for (int64_t g = 0; g < heads; ++g) {
        const int64_t row = g * max_positions + pos0_ + t;
        std::memcpy(k_cache.row<float>(row), k.row<float>(t) + g * hd, size_t(hd) * 4);
        std::memcpy(v_cache.row<float>(row), v.row<float>(t) + g * hd, size_t(hd) * 4);
      }
  }

  void attention(const Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                 int64_t num_kv_heads, int64_t head_dim, int64_t max_positions) override {
    const int64_t T = q.rows, heads = q.cols / head_dim, group = heads / num_kv_heads;
    const float scale = 1.0f / std::sqrt(float(head_dim));
    // Work items: (head, block of query rows), claimed one at a time: later rows see more positions.
    const int64_t rows_per_item = 16, blocks = (T + rows_per_item - 1) / rows_per_item;
    pool_.parallel_for(heads * blocks, 1, [&](int64_t i0, int64_t i1, int tid) {
      std::vector<float>& scores = scratch_[size_t(tid)];
      if (scores.size() < size_t(pos0_ + T)) scores.resize(size_t(max_positions));
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t h = it % heads, t0 = (it / heads) * rows_per_item, n = std::min(rows_per_item, T - t0);
        const int64_t g = h / group;
        K_.attend(q.row<float>(t0) + h * head_dim, q.ld, n, k_cache.row<float>(g * max_positions),
                  v_cache.row<float>(g * max_positions), pos0_ + t0 + 1, head_dim, scale, scores.data(),
                  out.row<float>(t0) + h * head_dim, out.ld);
      }
    }, /*chunks_per_thread=*/1 << 20);
  }

  void silu_mul(const Tensor& out, const Tensor& gate_up) override {
    const int64_t n = out.cols;
    if (out.rows == 1) {  // decode: split the one row's columns
      const float* g = gate_up.ptr<float>();
      pool_.parallel_for(n, 64, [&](int64_t c0, int64_t c1, int) {
        K_.silu_mul_row(out.ptr<float>() + c0, g + c0, g + n + c0, c1 - c0);
      });
      return;
    }
    for_rows(out.rows, [&](int64_t t) {
      const float* g = gate_up.row<float>(t);
      K_.silu_mul_row(out.row<float>(t), g, g + n, n);
    });
  }

  int32_t argmax(const Tensor& row) override {
    const float* p = row.ptr<float>();
    return int32_t(std::max_element(p, p + row.cols) - p);
  }

 private:
  // Runs fn(t) for every row, split across the pool when there are enough rows to pay for it.
  template <class F>
  void for_rows(int64_t rows, F&& fn) {
    if (rows < 4) {
      for (int64_t t = 0; t < rows; ++t) fn(t);
      return;
    }
    pool_.parallel_for(rows, 1, [&](int64_t a, int64_t b, int) { for (int64_t t = a; t < b; ++t) fn(t); });
  }

  DType wdt_;
  ThreadPool pool_;
  const CpuKernels& K_;
  std::vector<std::pair<void*, size_t>> allocations_;
  std::vector<std::vector<float>> scratch_;  // per thread: attention scores
  std::vector<std::vector<float>> tiles_;    // per thread: widened bf16 weight tiles
  std::vector<uint16_t> x16_;               // batched bf16 GEMM: the input rounded to bf16 (T × even k)
  std::vector<std::vector<uint16_t>> panels_;  // per thread: packed weight panel of the bf16 GEMM
  std::vector<float> xs_;                    // the decode input rearranged for the bf16 GEMV (widest bf16 matrix)
  const int32_t* ids_ = nullptr;
  int64_t T_ = 0, pos0_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(DType weight_dtype, int num_threads) {
  if (weight_dtype != DType::F32 && weight_dtype != DType::BF16)
    throw std::invalid_argument("the CPU backend stores weights as float32 or bfloat16");
  return std::make_unique<CpuBackend>(weight_dtype, num_threads);
}

}  // namespace qwen
