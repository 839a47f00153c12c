// Qwen2Config as the C++ side sees it: the fields of config.json the forward pass needs, validated before anything
// is allocated. Python validates the same file first (with friendlier messages); this is the core's own guard.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace qwen {

struct Qwen2Config {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  // hidden_size / num_attention_heads unless config.json says otherwise
  int64_t max_position_embeddings = 0;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
  int64_t qkv_dim() const { return q_dim() + 2 * kv_dim(); }

  // Throws std::invalid_argument naming the field. Bounds are generous (far above any Qwen2 model) and exist so
  // that absurd values fail here rather than in an allocation.
  void validate() const {
    auto check = [](const char* name, int64_t v, int64_t hi) {
      if (v <= 0 || v > hi)
        throw std::invalid_argument(std::string("config.json: ") + name + " = " + std::to_string(v) +
                                    " is out of range (expected 1.." + std::to_string(hi) + ")");
    };
    check("vocab_size", vocab_size, int64_t(1) << 22);
    check("hidden_size", hidden_size, int64_t(1) << 16);
    check("intermediate_size", intermediate_size, int64_t(1) << 18);
    check("num_hidden_layers", num_hidden_layers, 1024);
    check("num_attention_heads", num_attention_heads, 1024);
    check("num_key_value_heads", num_key_value_heads, 1024);
    check("head_dim", head_dim, 1024);
    check("max_position_embeddings", max_position_embeddings, int64_t(1) << 24);
    if (num_attention_heads % num_key_value_heads != 0)
      throw std::invalid_argument("config.json: num_attention_heads (" + std::to_string(num_attention_heads) +
                                  ") is not a multiple of num_key_value_heads (" +
                                  std::to_string(num_key_value_heads) + ")");
    if (head_dim % 2 != 0)
      throw std::invalid_argument("config.json: head_dim (" + std::to_string(head_dim) +
                                  ") must be even for rotary embeddings");
    if (!(rope_theta > 0) || rope_theta > 1e12)
      throw std::invalid_argument("config.json: rope_theta must be a positive number");
    if (!(rms_norm_eps > 0) || rms_norm_eps > 1)
      throw std::invalid_argument("config.json: rms_norm_eps must be in (0, 1]");
  }
};

}  // namespace qwen
