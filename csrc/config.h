// Qwen2Config as the C++ side sees it: the fields of config.json the forward pass needs, fully resolved (defaults
// filled in by the Python layer, which validates the file first with friendlier messages), and validated again
// here before anything is allocated: the core's own guard.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace qwen {

// Upper bounds of the config fields: generous (far above any Qwen2 model) so that absurd values fail here rather
// than in an allocation. The Python layer reads them from here (_core.config_limits) for its own messages.
struct ConfigLimit {
  const char* name;
  int64_t max;
};
inline constexpr ConfigLimit kConfigLimits[] = {
    {"vocab_size", int64_t(1) << 22},        {"hidden_size", int64_t(1) << 16},
    {"intermediate_size", int64_t(1) << 18}, {"num_hidden_layers", 1024},
    {"num_attention_heads", 1024},           {"num_key_value_heads", 1024},
    {"head_dim", 1024},                      {"max_position_embeddings", int64_t(1) << 24},
};
inline constexpr double kMaxRopeTheta = 1e12;  // rope_theta in (0, kMaxRopeTheta]
inline constexpr double kMaxRmsNormEps = 1.0;  // rms_norm_eps in (0, kMaxRmsNormEps]

struct Qwen2Config {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  // config.json's, or hidden_size / num_attention_heads when it has none
  int64_t max_position_embeddings = 0;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
  int64_t qkv_dim() const { return q_dim() + 2 * kv_dim(); }

  // Throws std::invalid_argument naming the field.
  void validate() const {
    const int64_t values[] = {vocab_size,          hidden_size,         intermediate_size, num_hidden_layers,
                              num_attention_heads, num_key_value_heads, head_dim,          max_position_embeddings};
    static_assert(sizeof(values) / sizeof(values[0]) == sizeof(kConfigLimits) / sizeof(kConfigLimits[0]));
    for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); ++i)
      if (values[i] <= 0 || values[i] > kConfigLimits[i].max)
        throw std::invalid_argument(std::string("config.json: ") + kConfigLimits[i].name + " = " +
                                    std::to_string(values[i]) + " is out of range (expected 1.." +
                                    std::to_string(kConfigLimits[i].max) + ")");
    if (num_attention_heads % num_key_value_heads != 0)
      throw std::invalid_argument("config.json: num_attention_heads (" + std::to_string(num_attention_heads) +
                                  ") is not a multiple of num_key_value_heads (" +
                                  std::to_string(num_key_value_heads) + ")");
    if (head_dim % 2 != 0)
      throw std::invalid_argument("config.json: head_dim (" + std::to_string(head_dim) +
                                  ") must be even for rotary embeddings");
    if (!(rope_theta > 0) || rope_theta > kMaxRopeTheta)
      throw std::invalid_argument("config.json: rope_theta must be a positive number up to 1e12");
    if (!(rms_norm_eps > 0) || rms_norm_eps > kMaxRmsNormEps)
      throw std::invalid_argument("config.json: rms_norm_eps must be in (0, 1]");
  }
};

}  // namespace qwen
