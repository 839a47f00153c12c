// The seam between the model (qwen2.cpp) and the hardware. The model says *what* to compute, in the order of the
// math; a backend (cpu/, cuda/) says *how*. Every op works on Tensors the backend allocated. Shapes use T for the
// number of tokens in the current forward pass.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "tensor.h"

namespace qwen {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // --- storage -------------------------------------------------------------------------------------------------
  // Matrices (projections, embeddings, lm_head) are stored in weight_dtype(); norm weights and biases in F32.
  virtual DType weight_dtype() const = 0;
  // Activations between ops (normed inputs, q/k/v, attention output, MLP hidden). The residual stream and the
  // logits are always F32.
  virtual DType activation_dtype() const = 0;
  // Throws std::runtime_error when `bytes` more cannot fit (checked before the weights are allocated).
  virtual void reserve(int64_t bytes) = 0;
  // Allocates rows × cols, owned by the backend until it is destroyed. Contents undefined.
  virtual Tensor alloc(DType dtype, int64_t rows, int64_t cols) = 0;
  // Host memory of `t` when it lives on the host, else nullptr (lets the loader read files straight into it).
  virtual void* host_data(const Tensor& t) { return nullptr; }
  // Converts n host elements of `src_dtype` into contiguous `dst` starting at element `at`. Thread-safe for
  // disjoint ranges.
  virtual void upload(const Tensor& dst, int64_t at, const void* src, DType src_dtype, int64_t n) = 0;
  // Copies an F32 tensor to host memory (rows × cols floats, packed).
  virtual void download(float* dst, const Tensor& src) = 0;

  // --- one forward pass ----------------------------------------------------------------------------------------
  // Token ids of this pass and the cache position of the first one. Called before any op of the pass.
  virtual void begin_forward(const int32_t* ids, int64_t T, int64_t pos0) = 0;
  // Runs `body` (every op of one decode step). A backend may record it once and replay it (CUDA graphs); ops
  // inside must then take positions from the backend's own state, not from values captured at record time.
  virtual void run_decode_step(const std::function<void()>& body) { body(); }

  // out (T, hidden) = table[ids[t]]                                  table (vocab_size, hidden)
  virtual void embed(const Tensor& out, const Tensor& table) = 0;
  // out = x / sqrt(mean(x^2) + eps) * weight, row by row             x F32 (T, n), weight F32 (1, n)
  virtual void rmsnorm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps) = 0;
  // out (T, n) = x (T, k) · w (n, k)ᵀ + bias (1, n); with accumulate, out += instead (the residual add)
  virtual void matmul(const Tensor& out, const Tensor& x, const Tensor& w, const Tensor* bias, bool accumulate) = 0;
  // Rotates q (T, heads*head_dim) and k (T, kv_heads*head_dim) in place, rotate-half layout, token t at position
  // pos0 + t. cos, sin: F32 (max_positions, head_dim / 2).
  virtual void rope(const Tensor& q, const Tensor& k, int64_t head_dim, const Tensor& cos, const Tensor& sin) = 0;
  // Writes k, v (T, kv_heads*head_dim) into the caches at positions pos0 .. pos0+T-1.
  // k_cache, v_cache: (kv_heads * max_positions, head_dim), i.e. [kv_head][position][head_dim].
  virtual void kv_store(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                        int64_t max_positions) = 0;
  // Causal grouped-query attention of q (T, heads*head_dim) over cache positions 0 .. pos0+t for token t;
  // query head h reads kv head h / (heads / kv_heads). out (T, heads*head_dim).
  virtual void attention(const Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                         int64_t num_kv_heads, int64_t head_dim, int64_t max_positions) = 0;
  // out (T, n) = silu(gate_up[:, :n]) * gate_up[:, n:]               gate_up (T, 2n)
  virtual void silu_mul(const Tensor& out, const Tensor& gate_up) = 0;
  // Index of the largest value in an F32 row (1, n); ties go to the lowest index.
  virtual int32_t argmax(const Tensor& row) = 0;
};

// The CPU backend always exists; the CUDA backend only in CUDA builds (make_cuda_backend throws otherwise).
std::unique_ptr<Backend> make_cpu_backend(DType weight_dtype, int num_threads);
std::unique_ptr<Backend> make_cuda_backend(int device_index);
bool cuda_available();

}  // namespace qwen
