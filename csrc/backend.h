// The seam between the model (qwen2.cpp) and the hardware. The model says *what* to compute, in the order of the
// math; a backend (cpu/, cuda/) says *how*. Every op works on Tensors and Weights the backend allocated. Shapes use
// T for the number of rows (tokens) in the current forward pass.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

#include "tensor.h"

namespace qwen {

// The rows of one forward pass, as data: row t is token ids[t] of the sequence in KV-cache slot slots[t], at
// cache position positions[t]. The rows of one slot are consecutive and so are their positions (a "run"), so a
// pass may hold 5 prompt tokens of slot 0, then one decode token each of slots 2 and 3. The CPU backend computes each
// run as it would alone (a sequence's results do not depend on what else is in the batch), the single rows of
// several sequences together (the weights read once for all of them).
struct Rows {
  const int32_t* ids = nullptr;
  const int32_t* slots = nullptr;
  const int32_t* positions = nullptr;
  int64_t T = 0;
};

// Where the keys and values of one layer live: k, v are (num_slots * kv_heads * max_positions, head_dim), i.e.
// [slot][kv_head][position][head_dim], so (slot s, kv head g, position p) is row (s * kv_heads + g) * max_positions
// + p.
struct KVLayer {
  Tensor k, v;
  int64_t kv_heads = 0, max_positions = 0;

  int64_t row(int64_t slot, int64_t head, int64_t pos) const { return (slot * kv_heads + head) * max_positions + pos; }
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // --- storage -------------------------------------------------------------------------------------------------
  // Whether this backend can hold (and multiply by) matrices in format f. Norm weights and biases are F32 vectors,
  // which every backend holds.
  virtual bool stores(Format f) const = 0;
  // Activations between ops (normed inputs, q/k/v, attention output, MLP hidden) and the KV cache. The residual
  // stream and the logits are always F32.
  virtual DType activation_dtype() const = 0;
  // Throws std::runtime_error when `bytes` more cannot fit (checked before anything is allocated); `what` says
  // what the bytes are for, for the message.
  virtual void reserve(int64_t bytes, const std::string& what) = 0;
  // Allocates rows × cols, owned by the backend until it is destroyed. Contents undefined.
  virtual Tensor alloc(DType dtype, int64_t rows, int64_t cols) = 0;
  // Makes t's memory resident now rather than at its first use (CPU: every page written, so that the page faults
  // happen here; a no-op where allocation commits memory). Contents unchanged.
  virtual void populate(const Tensor& t) {}
  // A parameter of rows × cols in format f: format_bytes(f, rows, cols) of backend memory (the CPU's bf16 panels pad
  // that by up to 31 rows and one column).
  virtual Weight alloc_weight(Format f, int64_t rows, int64_t cols) {
    if (is_quantized(f)) throw std::invalid_argument(std::string("this backend does not store ") + format_name(f));
    return Weight{alloc(format_dtype(f), rows, cols), f, rows, cols};
  }
  // Host memory of `t` when it lives on the host, else nullptr (lets the loader read files straight into it).
  virtual void* host_data(const Tensor& t) { return nullptr; }
  // Converts n host elements of `src_dtype` into contiguous `dst` starting at element `at`. Thread-safe for
  // disjoint ranges.
  virtual void upload(const Tensor& dst, int64_t at, const void* src, DType src_dtype, int64_t n) = 0;
  // Converts `rows` whole rows of host data in `src_dtype` into rows row0.. of a parameter (quantizing them when its
  // format is quantized). Thread-safe for disjoint rows.
  virtual void upload_weight(const Weight& dst, int64_t row0, const void* src, DType src_dtype, int64_t rows) {
    upload(dst.data, row0 * dst.cols(), src, src_dtype, rows * dst.cols());
  }
  // Copies an F32 tensor to host memory (rows × cols floats, packed).
  virtual void download(float* dst, const Tensor& src) = 0;

  // --- one forward pass ----------------------------------------------------------------------------------------
  // The rows of this pass (valid until the pass ends). Called before any op of the pass.
  virtual void begin_forward(const Rows& rows) = 0;
  // Runs `body` (every op of a one-row pass). A backend may record it once and replay it (CUDA graphs); ops inside
  // must then take ids, slots and positions from the backend's own state, not from values captured at record time.
  virtual void run_decode_step(const std::function<void()>& body) { body(); }

  // out (T, hidden) = table[ids[t]]                                  table (vocab_size, hidden)
  virtual void embed(const Tensor& out, const Weight& table) = 0;
  // out = x / sqrt(mean(x^2) + eps) * weight, row by row             x F32 (T, n), weight F32 (1, n)
  virtual void rmsnorm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps) = 0;
  // out (T, n) = x (T, k) · w (n, k)ᵀ + bias (1, n); with accumulate, out += instead (the residual add). Dispatches
  // on w.format.
  virtual void matmul(const Tensor& out, const Tensor& x, const Weight& w, const Tensor* bias, bool accumulate) = 0;
  // The same with every row of x computed as a one-row matmul would compute it (decode rows of several sequences,
  // their logits). A backend reads the weights once for all rows where it can.
  virtual void matmul_rows(const Tensor& out, const Tensor& x, const Weight& w, const Tensor* bias, bool accumulate) {
    for (int64_t r = 0; r < x.rows; ++r) matmul(out.slice_rows(r, 1), x.slice_rows(r, 1), w, bias, accumulate);
  }
  // Rotates q (T, heads*head_dim) and k (T, kv_heads*head_dim) in place, rotate-half layout, row t at position
  // positions[t]. cos, sin: F32 (max_positions, head_dim / 2).
  virtual void rope(const Tensor& q, const Tensor& k, int64_t head_dim, const Tensor& cos, const Tensor& sin) = 0;
  // Writes k, v (T, kv_heads*head_dim) of row t into its slot's cache at its position.
  virtual void kv_store(const KVLayer& cache, const Tensor& k, const Tensor& v) = 0;
  // Causal grouped-query attention: row t's query q (T, heads*head_dim) attends to positions 0 .. positions[t] of
  // its own slot; query head h reads kv head h / (heads / kv_heads). out (T, heads*head_dim).
  virtual void attention(const Tensor& out, const Tensor& q, const KVLayer& cache, int64_t head_dim) = 0;
  // out (T, n) = silu(gate_up[:, :n]) * gate_up[:, n:]               gate_up (T, 2n)
  virtual void silu_mul(const Tensor& out, const Tensor& gate_up) = 0;
  // Index of the largest value in each F32 row of `rows` (rows × n) into out[r]; ties go to the lowest index.
  virtual void argmax(const Tensor& rows, int32_t* out) = 0;
};

// The CPU backend always exists; the CUDA backend only in CUDA builds (make_cuda_backend throws otherwise).
std::unique_ptr<Backend> make_cpu_backend(int num_threads);
std::unique_ptr<Backend> make_cuda_backend(int device_index);
bool cuda_available();

}  // namespace qwen
