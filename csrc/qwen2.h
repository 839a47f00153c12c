// The Qwen2 decoder (Qwen2ForCausalLM): weights and the forward pass over rows of a KV cache.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "backend.h"
#include "config.h"
#include "kv_cache.h"
#include "weights.h"

namespace qwen {

// The format of each matrix: `matrices` (projections, embedding, lm_head) unless `overrides` names the checkpoint
// tensor. q/k/v and gate/up are stored stacked, so the tensors of one stack must agree. Norm weights and biases
// are always F32.
struct WeightFormats {
  Format matrices = Format::F32;
  std::map<std::string, Format> overrides;
};

class Qwen2Model {
 public:
  // Checks `tensors` against the shapes config.json implies, reserves memory for the weights, the activation
  // buffers and a KV cache of shape `cache` in one check (so nothing is allocated when it cannot all fit), then
  // allocates and reads the weights. Throws, naming the tensor or field, on any mismatch. Rotary tables cover
  // cache.max_positions positions.
  Qwen2Model(const Qwen2Config& config, const std::vector<TensorSource>& tensors, Backend& backend,
             const WeightFormats& formats, CacheShape cache);

  // Runs `rows` over `cache` (which must have been made for this model) and appends them to their slots. For the
  // rows listed in logit_rows (ascending row indices), writes their logits (n × vocab_size floats) to `logits`
  // and/or their argmax (n ids) to `argmax`; either may be null. More rows than the activation buffers hold are
  // run in chunks, each one batched pass. An exception (Ctrl-C included) leaves every slot's length unchanged.
  void forward(KVCache& cache, const Rows& rows, const std::vector<int64_t>& logit_rows, float* logits,
               int32_t* argmax);

  int64_t max_positions() const { return max_positions_; }
  const Qwen2Config& config() const { return cfg_; }
  Backend& backend() { return backend_; }
  // "float32", "bfloat16", "int8", "int4" or "mixed" (some matrices in one format, some in another).
  std::string weight_format() const;
  // Bytes of the matrices one decoded token reads, in their stored formats: every layer's projections and the
  // lm_head (the embedding gather, norms and biases are a few kilobytes).
  int64_t decode_bytes() const;
  // Bytes of every parameter as stored (a tied lm_head once).
  int64_t weight_bytes() const;

  // Called between layers; may throw to abandon the pass (Ctrl-C). The cache lengths are then unchanged.
  std::function<void()> interrupt_check;

  // The checkpoint tensors config.json implies, with their shapes (lm_head.weight optional when tied).
  static std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes(const Qwen2Config& config);

 private:
  struct Layer {
    Weight input_layernorm;           // (1, hidden_size)
    Weight qkv, qkv_bias;             // (q_dim + 2 kv_dim, hidden_size), (1, ...): q_proj, k_proj, v_proj stacked
    Weight o_proj;                    // (hidden_size, q_dim)
    Weight post_attention_layernorm;  // (1, hidden_size)
    Weight gate_up;                   // (2 intermediate_size, hidden_size): gate_proj, up_proj stacked
    Weight down_proj;                 // (hidden_size, intermediate_size)
  };

  struct Slot {
    std::string name;
    std::vector<int64_t> shape;
    Weight* dst;  // where it lands (nullptr when only shapes are asked for)
    int64_t at;   // first row inside dst (for a vector: first element)
  };
  static std::vector<Slot> slots(const Qwen2Config& c, Qwen2Model* m);
  void load(const std::vector<TensorSource>& tensors, const WeightFormats& formats, CacheShape cache);
  void run_layers(const KVCache& cache, int64_t T);  // embed + decoder layers into x_
  void lm_head_rows(const int64_t* rows, int64_t n, bool single);  // final norm + lm_head of x_'s rows into logits_

  Qwen2Config cfg_;
  Backend& backend_;
  int64_t max_positions_;
  int64_t max_batch_;  // rows of the activation buffers

  Weight embed_tokens_;  // (vocab_size, hidden_size)
  Weight lm_head_;       // (vocab_size, hidden_size): its own matrix, or embed_tokens_ when tied
  Weight norm_;          // (1, hidden_size)
  std::vector<Layer> layers_;
  Tensor rope_cos_, rope_sin_;  // (max_positions, head_dim / 2), angles pos * theta^(-2i/head_dim) in float32

  // Activations, (max_batch, ...) each; a pass uses the first T rows.
  Tensor x_;        // residual stream, F32 (., hidden_size)
  Tensor xn_;       // normed input of a block (., hidden_size)
  Tensor qkv_;      // (., qkv_dim)
  Tensor attn_;     // (., q_dim)
  Tensor gate_up_;  // (., 2 intermediate_size)
  Tensor mlp_;      // (., intermediate_size)
  Tensor head_in_;  // (kHeadRows, hidden_size): final-normed rows for the lm_head
  Tensor logits_;   // F32 (kHeadRows, vocab_size)
  std::vector<int64_t> wanted_;  // forward()'s scratch: the logit rows of one chunk
};

}  // namespace qwen
