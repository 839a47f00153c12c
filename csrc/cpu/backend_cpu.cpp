// The CPU backend: float32 activations and KV cache; each weight in float32 or bfloat16. One-row matmuls run on
// our own GEMV kernels (bandwidth-bound: every weight is read once per token), batched ones on sgemm (OpenBLAS, single-threaded
// per call, one call per thread on a slice of the output columns, so one thread pool drives everything).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
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
constexpr int64_t kAttnRows = 16;                  // query rows per attention work item
constexpr int64_t kGemvRows = 32;                  // float32 / bf16 runs up to this long use the GEMV
constexpr int64_t kQuantTileRows = 32;             // quantized rows per bf16 tile of the VDPBF16PS GEMM

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
      K.gemv_f32(w, ldw, x + t * ldx, ldx, 1, k, o, 0, nullptr, true, r0, r1);
    }
  }
#endif
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int num_threads) : pool_(num_threads), K_(cpu_kernels()) {
#if defined(QWEN_BLAS_OPENBLAS)
    QWEN_BLAS_SET_THREADS(1);  // parallelism comes from our pool: one sgemm per thread on its own columns
#endif
    scratch_.resize(size_t(pool_.size()));
    tiles_.resize(size_t(pool_.size()));
    tiles16_.resize(size_t(pool_.size()));
    panels_.resize(size_t(pool_.size()));
  }

  ~CpuBackend() override {
    for (auto& [p, bytes] : allocations_) munmap(p, bytes);
  }

  // The kernel set, then the path each kind of matmul takes.
  std::string name() const override {
#if defined(QWEN_BLAS_OPENBLAS)
    const std::string sgemm = "OpenBLAS sgemm";
#else
    const std::string sgemm = "built-in sgemm";
#endif
    auto quantized = [&](int64_t limit) {
      return "integer dot products with the inputs quantized to int8, " +
             (limit == std::numeric_limits<int64_t>::max()
                  ? std::string("any number of rows")
                  : "up to " + std::to_string(limit) + " rows, then tiles " +
                        (K_.gemm_bf16_cols ? std::string("rounded to bf16 + VDPBF16PS")
                                           : "widened to float32 + " + sgemm));
    };
    const std::string bf16 =
        K_.gemm_bf16_cols     ? "bfloat16: panels, VDPBF16PS on bf16-rounded inputs, any rows"
        : K_.gemm_bf16_panels ? "bfloat16: panels widened to float32 in registers, any rows"
                              : std::string("bfloat16: one row the ") + K_.isa +
                                    " GEMV, several tiles widened to float32 + " + sgemm;
    return std::string("cpu (") + K_.isa + ", " + std::to_string(pool_.size()) + " threads; " + bf16 +
           "; float32: one row the " + K_.isa + " GEMV, several " + sgemm +
           "; int8: " + quantized(K_.q8_dot_rows) + "; int4: " + quantized(K_.coded_dot_rows) + ")";
  }
  bool stores(Format) const override { return true; }
  DType activation_dtype() const override { return DType::F32; }

  void reserve(int64_t bytes, const std::string& what) override {
    const int64_t avail = available_memory_bytes();
    if (bytes > avail)
      throw std::runtime_error("loading this model needs " + std::to_string(bytes >> 20) + " MiB of memory (" + what +
                               ") but only " + std::to_string(avail >> 20) + " MiB is available; use dtype=\"bfloat16\" "
                               "(half the weight memory), a smaller max_context or fewer sequences at once, or a "
                               "smaller model");
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
    return Tensor{p, dtype, rows, cols, cols};
  }

  // A server's KV cache faulted in at startup by all threads, not page by page (2 MB huge pages, each cleared by the
  // kernel) in the passes of the first requests that reach each slot. Each 4 KB page is written with its own first
  // byte, so what the cache holds stays.
  void populate(const Tensor& t) override {
    const int64_t bytes = t.rows * t.ld * int64_t(dtype_size(t.dtype));
    constexpr int64_t kChunk = int64_t(2) << 20, kPage = 4096;
    volatile char* base = static_cast<char*>(t.data);
    pool_.parallel_for((bytes + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1, int) {
      for (int64_t at = c0 * kChunk; at < std::min(bytes, c1 * kChunk); at += kPage) base[at] = base[at];
    });
  }

  // Scratch of the matmuls is sized here, at load, never per step.
  Weight alloc_weight(Format f, int64_t rows, int64_t cols) override {
    const int64_t k2 = cols + (cols & 1);
    const bool panels = f == Format::BF16 && K_.gemm_bf16_panels;
    if (panels && size_t(k2) > xp_.size()) xp_.resize(size_t(k2));
    if ((f == Format::BF16 && !panels) || (is_quantized(f) && !K_.gemm_bf16_cols))  // passes widen tiles to float32
      for (auto& t : tiles_) t.resize(std::max(t.size(), size_t(kTileFloats)));
    if (is_quantized(f) && K_.gemm_bf16_cols)  // long quantized runs: a row widened, then bf16 tiles of rows
      for (size_t i = 0; i < tiles_.size(); ++i) {
        tiles_[i].resize(std::max(tiles_[i].size(), size_t(cols)));
        tiles16_[i].resize(std::max(tiles16_[i].size(), size_t(kQuantTileRows * k2)));
        panels_[i].resize(size_t(kBf16PanelCols * kBf16PanelK));
      }
    if (panels) {  // zeroed by mmap: the pad column and the last block's missing rows stay zero
      Weight w{alloc(DType::BF16, (rows + kBf16PanelCols - 1) / kBf16PanelCols, kBf16PanelCols * k2), f, rows, cols};
      w.panels = true;
      return w;
    }
    if (!is_quantized(f)) return Weight{alloc(format_dtype(f), rows, cols), f, rows, cols};
    const int64_t groups = quant_groups(cols);
    if (size_t(groups) > sx_.size()) {
      qx_.resize(size_t(groups * kQuantGroup));
      sx_.resize(size_t(groups));
      xsum_.resize(size_t(groups));
    }
    return Weight{alloc(DType::U8, quant_blocks(rows), quant_block_bytes(f, cols)), f, rows, cols};
  }

  void upload_weight(const Weight& dst, int64_t row0, const void* src, DType src_dtype, int64_t rows) override {
    if (dst.panels) return upload_panels(dst, row0, src, src_dtype, rows);
    if (!is_quantized(dst.format)) return Backend::upload_weight(dst, row0, src, src_dtype, rows);
    if (row0 < 0 || rows < 0 || row0 + rows > dst.rows()) throw std::out_of_range("upload outside its weight");
    const int64_t k = dst.cols();
    std::vector<float> row(static_cast<size_t>(k));  // one row of floats at a time: never a float copy of the matrix
    for (int64_t r = row0; r < row0 + rows; ++r) {
      Tensor one{row.data(), DType::F32, 1, k, k};
      upload(one, 0, static_cast<const char*>(src) + (r - row0) * k * int64_t(dtype_size(src_dtype)), src_dtype, k);
      if (!K_.quantize_row(dst.format, row.data(), k, dst.data.row<uint8_t>(r / kQuantRows), int(r % kQuantRows)))
        throw std::invalid_argument(std::string("a weight has a value that ") + format_name(dst.format) +
                                    " cannot hold (NaN, inf or |x| >= 2^125); load this model in bfloat16 or "
                                    "float32");
    }
  }

  // Rows of a bf16 weight into its panels: the blocks this call covers whole packed at once, the rows of a block
  // shared with another call (another tensor of a fused weight) element by element, leaving the others' alone.
  void upload_panels(const Weight& dst, int64_t row0, const void* src, DType src_dtype, int64_t rows) {
    if (row0 < 0 || rows < 0 || row0 + rows > dst.rows()) throw std::out_of_range("upload outside its weight");
    const int64_t k = dst.cols(), k2 = k + (k & 1);
    uint16_t* P = dst.data.ptr<uint16_t>();
    std::vector<uint16_t> block(src_dtype == DType::BF16 ? 0 : size_t(kBf16PanelCols * k));  // converted rows
    for (int64_t r = row0; r < row0 + rows;) {
      const int64_t b = r / kBf16PanelCols * kBf16PanelCols, m = std::min(b + kBf16PanelCols, row0 + rows) - r;
      const void* from = static_cast<const char*>(src) + (r - row0) * k * int64_t(dtype_size(src_dtype));
      const uint16_t* rows16 = static_cast<const uint16_t*>(from);
      if (src_dtype != DType::BF16) {
        upload(Tensor{block.data(), DType::BF16, m, k, k}, 0, from, src_dtype, m * k);
        rows16 = block.data();
      }
      if (r == b && (m == kBf16PanelCols || b + m == dst.rows())) {
        K_.pack_bf16_block(rows16, k, m, k, P + b * k2);
      } else {
        for (int64_t i = 0; i < m; ++i)
          for (int64_t c = 0; c < k; ++c) P[bf16_panel_at(k, r + i, c)] = rows16[i * k + c];
      }
      r += m;
    }
  }

  // Row r of a quantized weight as floats.
  void dequant_row(const Weight& w, int64_t r, float* out) const {
    const uint8_t* block = w.data.row<uint8_t>(r / kQuantRows);
    if (w.format == Format::Q8) K_.dequant_q8(block, int(r % kQuantRows), w.cols(), out);
    else if (w.format == Format::Q4) K_.dequant_q4(block, int(r % kQuantRows), w.cols(), out);
    else K_.dequant_q6(block, int(r % kQuantRows), w.cols(), out);
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

  void begin_forward(const Rows& rows) override {
    rows_ = rows;
    runs_.clear();
    blocks_.clear();
    for (int64_t t = 0; t < rows.T;) {
      int64_t end = t + 1;
      while (end < rows.T && rows.slots[end] == rows.slots[t]) ++end;
      runs_.push_back({t, end - t});
      // Attention works on blocks of up to kAttnRows rows of a run: later rows see more positions, so smaller
      // items balance the threads.
      for (int64_t b = t; b < end; b += kAttnRows) blocks_.push_back({b, std::min(kAttnRows, end - b)});
      t = end;
    }
  }

  void embed(const Tensor& out, const Weight& table) override {
    for (int64_t t = 0; t < rows_.T; ++t) {
      float* o = out.row<float>(t);
      const int64_t id = rows_.ids[t];
      switch (table.format) {
        case Format::F32: std::memcpy(o, table.data.row<float>(id), size_t(table.cols()) * 4); break;
        case Format::BF16:
          if (!table.panels) {
            K_.bf16_to_f32(table.data.row<uint16_t>(id), o, table.cols());
            break;
          }
          for (int64_t i = 0; i < table.cols(); ++i)
            o[i] = bf16_to_f32(table.data.ptr<uint16_t>()[bf16_panel_at(table.cols(), id, i)]);
          break;
        case Format::Q8: case Format::Q4: case Format::Q6: dequant_row(table, id, o); break;
      }
    }
  }

  void rmsnorm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps) override {
    for_rows(x.rows, [&](int64_t t) { K_.rmsnorm_row(out.row<float>(t), x.row<float>(t), weight.ptr<float>(), x.cols, eps); });
  }

  void matmul(const Tensor& out, const Tensor& x, const Weight& weight, const Tensor* bias, bool accumulate) override {
    // Each run of the pass on its own, so that a sequence's results do not depend on what else is in the batch:
    // consecutive runs whose rows are computed one by one (decode steps, short runs: per_row) together as rows of
    // one matmul reading the weights once, a longer run on the GEMM. x has the pass's rows exactly when it has T of
    // them: other callers (the lm_head) pass rows of one run.
    if (runs_.size() > 1 && x.rows == rows_.T) {
      for (size_t i = 0; i < runs_.size();) {
        const auto [r0, n] = runs_[i++];
        if (!per_row(weight, n)) {
          matmul_run(out.slice_rows(r0, n), x.slice_rows(r0, n), weight, bias, accumulate);
          continue;
        }
        int64_t m = n;
        for (; i < runs_.size() && per_row(weight, runs_[i].second); ++i) m += runs_[i].second;
        matmul_rows(out.slice_rows(r0, m), x.slice_rows(r0, m), weight, bias, accumulate);
      }
      return;
    }
    matmul_run(out, x, weight, bias, accumulate);
  }

  // Whether a run of n rows is computed row by row (each row the arithmetic of a one-row matmul, so runs can share
  // one pass over the weights, and verified proposals are decode steps bit for bit): single rows; bf16 panels at
  // any length (one kernel for all); quantized runs of up to the kernel set's limit for their format (integer dot
  // products); float32 and other bf16 runs of up to kGemvRows.
  bool per_row(const Weight& w, int64_t n) const {
    return n == 1 || w.panels || (is_quantized(w.format) && n <= K_.dot_rows(w.format)) ||
           ((w.format == Format::F32 || w.format == Format::BF16) && n <= kGemvRows);
  }

  void matmul_rows(const Tensor& out, const Tensor& x, const Weight& weight, const Tensor* bias,
                   bool accumulate) override {
    const Tensor& w = weight.data;
    const int64_t T = x.rows, n = weight.rows(), k = weight.cols();
    const float* b = bias ? bias->ptr<float>() : nullptr;
    if (is_quantized(weight.format)) return matmul_quantized(out, x, weight, b, accumulate);  // rows independent
    if (weight.panels) return gemm_panels(out, x, weight, b, accumulate);                     // rows independent
    pool_.parallel_for(n, kRowAlign, [&](int64_t r0, int64_t r1, int) {
      if (weight.format == Format::F32)
        K_.gemv_f32(w.ptr<float>(), w.ld, x.ptr<float>(), x.ld, T, k, out.ptr<float>(), out.ld, b, accumulate, r0, r1);
      else
        K_.gemv_bf16(w.ptr<uint16_t>(), w.ld, x.ptr<float>(), x.ld, T, k, out.ptr<float>(), out.ld, b, accumulate, r0,
                     r1);
    });
  }

 private:
  void matmul_run(const Tensor& out, const Tensor& x, const Weight& weight, const Tensor* bias, bool accumulate) {
    const int64_t T = x.rows;
    const float* b = bias ? bias->ptr<float>() : nullptr;
    // Row by row: a one-row GEMV (bandwidth-bound); quantized runs on integer dot products, the weights read once,
    // up to the kernel set's limit for the format (K_.dot_rows); bf16 runs of up to kGemvRows (verified proposals,
    // short prompts, a prompt's last chunk) on the several-input GEMV, the weights read as bf16 instead of widened
    // to float32 tiles first (Zen 3, 1.5B, 2 threads: 4 rows 682 -> 236 ms, 16 rows 1093 -> 628 ms, 32 rows 1454 ->
    // 1075 ms).
    if (per_row(weight, T)) return matmul_rows(out, x, weight, bias, accumulate);
    // A long run's last row is computed as a one-row pass computes it: the scheduler recomputes a cached prompt's
    // last token alone, and this way its logits are those of the prompt prefilled at once, bit for bit (the GEMMs
    // round otherwise; quantized weights' bf16 tiles even take bf16 inputs, not int8). One more pass over the
    // weights per run: 1-2% of a 512-token chunk.
    gemm_run(out.slice_rows(0, T - 1), x.slice_rows(0, T - 1), weight, b, accumulate);
    matmul_rows(out.slice_rows(T - 1, 1), x.slice_rows(T - 1, 1), weight, bias, accumulate);
  }

  void gemm_run(const Tensor& out, const Tensor& x, const Weight& weight, const float* b, bool accumulate) {
    const Tensor& w = weight.data;
    if (is_quantized(weight.format) && K_.gemm_bf16_cols) return gemm_quant_bf16(out, x, weight, b, accumulate);
    if (weight.format == Format::F32) gemm_f32(out, x, w, b, accumulate);
    else gemm_widened(out, x, weight, b, accumulate);
  }

  // Q8 / Q4 / Q6, any number of rows: each input row quantized to int8 once, then integer dot products, the weights
  // streamed once for all rows (a one-row pass is the same arithmetic as one row of a prompt).
  void matmul_quantized(const Tensor& out, const Tensor& x, const Weight& weight, const float* b, bool accumulate) {
    const int64_t T = x.rows, k = weight.cols(), groups = quant_groups(k);
    if (qx_.size() < size_t(T * groups * kQuantGroup)) {  // batched passes only, grows once
      qx_.resize(size_t(T * groups * kQuantGroup));
      sx_.resize(size_t(T * groups));
      xsum_.resize(size_t(T * groups));
    }
    for_rows(T, [&](int64_t t) {
      K_.quantize_x(x.row<float>(t), k, qx_.data() + t * groups * kQuantGroup, sx_.data() + t * groups,
                    xsum_.data() + t * groups);
    });
    const uint8_t* W = weight.data.ptr<uint8_t>();
    pool_.parallel_for(weight.rows(), kRowAlign, [&](int64_t r0, int64_t r1, int) {
      if (weight.format == Format::Q8)
        K_.gemm_q8(W, groups, qx_.data(), sx_.data(), T, out.ptr<float>(), out.ld, b, accumulate, r0, r1);
      else
        (weight.format == Format::Q4 ? K_.gemm_q4 : K_.gemm_q6)(W, groups, qx_.data(), sx_.data(), xsum_.data(), T,
                                                                 out.ptr<float>(), out.ld, b, accumulate, r0, r1);
    });
  }
 public:

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
      const float* c = cos.row<float>(rows_.positions[t]);
      const float* s = sin.row<float>(rows_.positions[t]);
      for (int64_t h = 0; h < q.cols / head_dim; ++h) rotate(q.row<float>(t) + h * head_dim, c, s);
      for (int64_t h = 0; h < k.cols / head_dim; ++h) rotate(k.row<float>(t) + h * head_dim, c, s);
    });
  }

  void kv_store(const KVLayer& cache, const Tensor& k, const Tensor& v) override {
    const int64_t hd = cache.k.cols;
    for (int64_t t = 0; t < k.rows; ++t)
      for (int64_t g = 0; g < cache.kv_heads; ++g) {
        const int64_t row = cache.row(rows_.slots[t], g, rows_.positions[t]);
        std::memcpy(cache.k.row<float>(row), k.row<float>(t) + g * hd, size_t(hd) * 4);
        std::memcpy(cache.v.row<float>(row), v.row<float>(t) + g * hd, size_t(hd) * 4);
      }
  }

  void attention(const Tensor& out, const Tensor& q, const KVLayer& cache, int64_t head_dim) override {
    const int64_t heads = q.cols / head_dim, group = heads / cache.kv_heads;
    const float scale = 1.0f / std::sqrt(float(head_dim));
    const int64_t blocks = int64_t(blocks_.size());
    // Work items (block of rows of one slot, kv head, part of its query heads), claimed one at a time. A kv head's
    // query heads go together (its K and V read once for all of them), split into parts only when there are
    // fewer items than threads (a decode step of one sequence on more threads than kv heads).
    const int64_t items = blocks * cache.kv_heads;
    const int64_t parts = std::min(group, std::max<int64_t>(1, (pool_.size() + items - 1) / items));
    const int64_t per_part = (group + parts - 1) / parts;
    pool_.parallel_for(items * parts, 1, [&](int64_t i0, int64_t i1, int tid) {
      std::vector<float>& scores = scratch_[size_t(tid)];
      const size_t need = size_t(per_part * cache.max_positions);
      if (scores.size() < need) scores.resize(need);
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t part = it % parts, g = it / parts % cache.kv_heads;
        const int64_t h0 = g * group + part * per_part, nh = std::min(per_part, (g + 1) * group - h0);
        if (nh <= 0) continue;
        const auto [t0, n] = blocks_[size_t(it / parts / cache.kv_heads)];
        const int64_t first = cache.row(rows_.slots[t0], g, 0);
        K_.attend(q.row<float>(t0) + h0 * head_dim, q.ld, nh, n, cache.k.row<float>(first),
                  cache.v.row<float>(first), rows_.positions[t0] + 1, head_dim, scale, scores.data(),
                  cache.max_positions, out.row<float>(t0) + h0 * head_dim, out.ld);
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

  void argmax(const Tensor& rows, int32_t* out) override {
    for (int64_t r = 0; r < rows.rows; ++r) {
      const float* p = rows.row<float>(r);
      out[r] = int32_t(std::max_element(p, p + rows.cols) - p);
    }
  }

 private:
  // Batched: out (T, n) (=|+=) x · wᵀ (+ bias) on sgemm, one single-threaded call per thread on its own columns.
  void gemm_f32(const Tensor& out, const Tensor& x, const Tensor& w, const float* b, bool accumulate) {
    const int64_t T = x.rows, k = w.cols;
    pool_.parallel_for(w.rows, kRowAlign, [&](int64_t r0, int64_t r1, int) {
      float* o = out.ptr<float>() + r0;
      if (b && !accumulate)
        for (int64_t t = 0; t < T; ++t) std::memcpy(o + t * out.ld, b + r0, size_t(r1 - r0) * 4);
      sgemm_nt(T, r1 - r0, k, x.ptr<float>(), x.ld, w.row<float>(r0), w.ld, o, out.ld,
               (accumulate || b) ? 1.0f : 0.0f, K_);
    }, /*chunks_per_thread=*/2);
  }

  // bf16 weights as panels (AVX-512), any number of rows: the inputs prepared once (rounded to bf16 for VDPBF16PS).
  void gemm_panels(const Tensor& out, const Tensor& x, const Weight& weight, const float* b, bool accumulate) {
    const int64_t T = x.rows, n = weight.rows(), k = weight.cols(), k2 = k + (k & 1);
    if (xp_.size() < size_t(T * k2)) xp_.resize(size_t(T * k2));  // several rows: grows once
    for_rows(T, [&](int64_t t) { K_.panel_inputs(x.ptr<float>(), x.ld, t, t + 1, k, xp_.data()); });
    pool_.parallel_for(n, kBf16PanelCols, [&](int64_t r0, int64_t r1, int) {
      K_.gemm_bf16_panels(xp_.data(), T, k, weight.data.ptr<uint16_t>(), n, out.ptr<float>(), out.ld, b, accumulate,
                          r0, r1);
    });
  }

  // Long quantized runs on CPUs with the bf16 GEMM: tiles of rows dequantized and rounded to bf16 (never the whole
  // matrix), through the GEMM with the inputs rounded to bf16 once, as a bf16 model's prompt. The weights' values
  // round to bf16 too (int8's have up to 19 significant bits): prompts of a quantized model are computed as
  // precisely as a bf16 model's, and at its rate less the dequantizing.
  void gemm_quant_bf16(const Tensor& out, const Tensor& x, const Weight& weight, const float* b, bool accumulate) {
    const int64_t T = x.rows, n = weight.rows(), k = weight.cols(), k2 = k + (k & 1);
    if (xp_.size() < size_t(T * k2)) xp_.resize(size_t(T * k2));  // batched passes only, grows once
    uint16_t* x16 = reinterpret_cast<uint16_t*>(xp_.data());         // (bf16 in the first half)
    for_rows(T, [&](int64_t t) { K_.round_rows_bf16(x.ptr<float>(), x.ld, t, t + 1, k, x16); });
    pool_.parallel_for(n, kQuantTileRows, [&](int64_t r0, int64_t r1, int tid) {
      float* row = tiles_[size_t(tid)].data();
      uint16_t* tile = tiles16_[size_t(tid)].data();
      for (int64_t t0 = r0; t0 < r1; t0 += kQuantTileRows) {
        const int64_t m = std::min(kQuantTileRows, r1 - t0);
        for (int64_t r = 0; r < m; ++r) {
          dequant_row(weight, t0 + r, row);
          K_.round_rows_bf16(row, k, 0, 1, k, tile + r * k2);
        }
        K_.gemm_bf16_cols(x16, T, k, tile, k2, out.ptr<float>() + t0, out.ld, b ? b + t0 : nullptr, accumulate,
                          0, m, panels_[size_t(tid)].data());
      }
    }, /*chunks_per_thread=*/4);
  }

  // Batched with weights in a narrower format (bf16 without the bf16 GEMM, Q8, Q4, Q6): tiles of rows widened to
  // float32 (never the whole matrix) and fed to sgemm.
  void gemm_widened(const Tensor& out, const Tensor& x, const Weight& weight, const float* b, bool accumulate) {
    const int64_t T = x.rows, n = weight.rows(), k = weight.cols();
    auto widen = [&](int64_t r, float* dst) {
      if (weight.format == Format::BF16) K_.bf16_to_f32(weight.data.row<uint16_t>(r), dst, k);
      else dequant_row(weight, r, dst);
    };
    pool_.parallel_for(n, kRowAlign, [&](int64_t r0, int64_t r1, int tid) {
      float* o = out.ptr<float>() + r0;
      if (b && !accumulate)
        for (int64_t t = 0; t < T; ++t) std::memcpy(o + t * out.ld, b + r0, size_t(r1 - r0) * 4);
      const float beta = (accumulate || b) ? 1.0f : 0.0f;
      std::vector<float>& tile = tiles_[size_t(tid)];
      const int64_t rows_per_tile = std::max<int64_t>(kRowAlign, kTileFloats / k);
      const size_t need = size_t(std::min(rows_per_tile, r1 - r0) * k);
      if (tile.size() < need) tile.resize(need);  // only when a matrix is wider than the tile budget
      for (int64_t t0 = r0; t0 < r1; t0 += rows_per_tile) {
        const int64_t m = std::min(rows_per_tile, r1 - t0);
        for (int64_t r = 0; r < m; ++r) widen(t0 + r, tile.data() + r * k);
        sgemm_nt(T, m, k, x.ptr<float>(), x.ld, tile.data(), k, o + (t0 - r0), out.ld, beta, K_);
      }
    }, /*chunks_per_thread=*/2);
  }

  // Runs fn(t) for every row, split across the pool when there are enough rows to pay for it.
  template <class F>
  void for_rows(int64_t rows, F&& fn) {
    if (rows < 4) {
      for (int64_t t = 0; t < rows; ++t) fn(t);
      return;
    }
    pool_.parallel_for(rows, 1, [&](int64_t a, int64_t b, int) { for (int64_t t = a; t < b; ++t) fn(t); });
  }

  ThreadPool pool_;
  const CpuKernels& K_;
  std::vector<std::pair<void*, size_t>> allocations_;
  std::vector<std::vector<float>> scratch_;  // per thread: attention scores
  std::vector<std::vector<float>> tiles_;    // per thread: widened bf16 weight tiles
  std::vector<float> xp_;  // bf16 panels and quantized tiles: the inputs as their kernels take them (T × even k)
  std::vector<std::vector<uint16_t>> tiles16_;  // per thread: quantized rows as bf16 for the bf16 GEMM
  std::vector<std::vector<uint16_t>> panels_;   // per thread: the panel of a tile the bf16 GEMM packs as it goes
  std::vector<int8_t> qx_;                   // the decode input quantized for the Q8/Q4 GEMVs: levels,
  std::vector<float> sx_, xsum_;             // steps and sums per group (widest quantized matrix)
  Rows rows_;                                  // of the current pass
  std::vector<std::pair<int64_t, int64_t>> runs_;    // (first row, rows): the runs of the current pass
  std::vector<std::pair<int64_t, int64_t>> blocks_;  // (first row, rows): attention blocks of the current pass
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int num_threads) { return std::make_unique<CpuBackend>(num_threads); }

}  // namespace qwen
