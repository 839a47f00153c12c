// The Qwen2 decoder (Qwen2ForCausalLM): weights, KV cache and the forward pass.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend.h"
#include "config.h"
#include "weights.h"

namespace qwen {

class Qwen2Model {
 public:
  // Checks `tensors` against the shapes config.json implies, allocates weights, a KV cache for `max_positions`
  // tokens and activation buffers, and reads the weights. Throws, naming the tensor or field, on any mismatch.
  Qwen2Model(const Qwen2Config& config, const std::vector<TensorSource>& tensors, std::unique_ptr<Backend> backend,
             int64_t max_positions);

  // Runs T tokens at cache positions length() .. length()+T-1 and appends them to the cache. Writes the logits of
  // the last position (vocab_size floats) or, with all_logits, of every position (T × vocab_size) to `logits`.
  // Prompts longer than the batch buffers are processed in chunks, each one batched pass.
  void forward(const int32_t* ids, int64_t T, bool all_logits, float* logits);
  // One decode step that returns the argmax of the next-token logits (computed where the logits are).
  int32_t forward_argmax(int32_t id);

  int64_t length() const { return length_; }
  int64_t max_positions() const { return max_positions_; }
  void truncate(int64_t n);  // keep the first n cached positions (reuse a prompt prefix)
  void reset() { length_ = 0; }
  const Qwen2Config& config() const { return cfg_; }
  Backend& backend() { return *backend_; }

  // Called between layers; may throw to abandon the pass (Ctrl-C). The cache length is then unchanged.
  std::function<void()> interrupt_check;

  // The checkpoint tensors config.json implies, with their shapes (lm_head.weight optional when tied).
  static std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes(const Qwen2Config& config);

 private:
  struct Layer {
    Tensor input_layernorm;           // (1, hidden_size)
    Tensor qkv, qkv_bias;             // (q_dim + 2 kv_dim, hidden_size), (1, ...): q_proj, k_proj, v_proj stacked
    Tensor o_proj;                    // (hidden_size, q_dim)
    Tensor post_attention_layernorm;  // (1, hidden_size)
    Tensor gate_up;                   // (2 intermediate_size, hidden_size): gate_proj, up_proj stacked
    Tensor down_proj;                 // (hidden_size, intermediate_size)
    Tensor k_cache, v_cache;          // (num_key_value_heads * max_positions, head_dim)
  };

  struct Slot {
    std::string name;
    std::vector<int64_t> shape;
    Tensor* dst;  // where it lands (nullptr when only shapes are asked for)
    int64_t at;   // first element inside dst
  };
  static std::vector<Slot> slots(const Qwen2Config& c, Qwen2Model* m);
  void load(const std::vector<TensorSource>& tensors);
  void run_layers(const int32_t* ids, int64_t T);  // embed + decoder layers into x_
  void lm_head_rows(int64_t r0, int64_t n);        // final norm + lm_head of rows r0.. of x_ into logits_

  Qwen2Config cfg_;
  std::unique_ptr<Backend> backend_;
  int64_t max_positions_;
  int64_t max_batch_;  // rows of the activation buffers
  int64_t length_ = 0;

  Tensor embed_tokens_;  // (vocab_size, hidden_size)
  Tensor lm_head_;       // (vocab_size, hidden_size): its own matrix, or embed_tokens_ when tied
  Tensor norm_;          // (1, hidden_size)
  std::vector<Layer> layers_;
  Tensor rope_cos_, rope_sin_;  // (max_positions, head_dim / 2), angles pos * theta^(-2i/head_dim) in float32

  // Activations, (max_batch, ...) each; the forward pass uses the first T rows.
  Tensor x_;        // residual stream, F32 (., hidden_size)
  Tensor xn_;       // normed input of a block (., hidden_size)
  Tensor qkv_;      // (., qkv_dim)
  Tensor attn_;     // (., q_dim)
  Tensor gate_up_;  // (., 2 intermediate_size)
  Tensor mlp_;      // (., intermediate_size)
  Tensor head_in_;  // F32 (kHeadRows, hidden_size): final-normed rows for the lm_head
  Tensor logits_;   // F32 (kHeadRows, vocab_size)
};

}  // namespace qwen
