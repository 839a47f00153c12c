// Qwen2ForCausalLM, top to bottom:
//
//   x = embed_tokens[ids]
//   for each layer:
//     h = rmsnorm(x) · input_layernorm
//     q, k, v = h·Wqᵀ + bq, h·Wkᵀ + bk, h·Wvᵀ + bv      (one fused matmul)
//     q, k = rope(q), rope(k)                               (rotate-half, theta = rope_theta)
//     cache[k, v] at positions pos0 ..
//     x += o_proj(softmax(q·kᵀ / sqrt(head_dim) + causal mask) · v)   (grouped-query)
//     h = rmsnorm(x) · post_attention_layernorm
//     x += down_proj(silu(gate_proj(h)) * up_proj(h))       (gate/up one fused matmul)
//   logits = lm_head(rmsnorm(x) · norm)
//
// Names follow config.json and the checkpoint. How each op runs is the backend's business (backend.h).
#include "qwen2.h"

#include <cmath>
#include <map>
#include <stdexcept>
#include <string>

namespace qwen {

namespace {
constexpr int64_t kMaxBatch = 512;  // tokens per batched prefill pass
constexpr int64_t kHeadRows = 32;   // positions per lm_head pass when every position's logits are wanted

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}
}  // namespace

Qwen2Model::Qwen2Model(const Qwen2Config& config, const std::vector<TensorSource>& tensors,
                       std::unique_ptr<Backend> backend, int64_t max_positions)
    : cfg_(config), backend_(std::move(backend)), max_positions_(max_positions) {
  cfg_.validate();
  if (max_positions_ < 1 || max_positions_ > cfg_.max_position_embeddings)
    throw std::invalid_argument("max_context = " + std::to_string(max_positions_) + " must be between 1 and " +
                                "max_position_embeddings (" + std::to_string(cfg_.max_position_embeddings) + ")");
  max_batch_ = std::min(kMaxBatch, max_positions_);
  load(tensors);
}

// Every tensor of a Qwen2ForCausalLM checkpoint with its shape, and (for a model m) where it lands: q/k/v and
// gate/up go into one stacked matrix each. The one list of parameter names; the Python layer asks for it too.
std::vector<Qwen2Model::Slot> Qwen2Model::slots(const Qwen2Config& c, Qwen2Model* m) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, qd = c.q_dim(), kvd = c.kv_dim();
  auto at = [&](Tensor Qwen2Model::*t) { return m ? &(m->*t) : nullptr; };
  std::vector<Slot> out = {{"model.embed_tokens.weight", {V, H}, at(&Qwen2Model::embed_tokens_), 0},
                           {"model.norm.weight", {H}, at(&Qwen2Model::norm_), 0},
                           {"lm_head.weight", {V, H}, at(&Qwen2Model::lm_head_), 0}};
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    Layer* L = m ? &m->layers_[size_t(i)] : nullptr;
    auto in = [&](Tensor Layer::*t) { return L ? &(L->*t) : nullptr; };
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.push_back({p + "input_layernorm.weight", {H}, in(&Layer::input_layernorm), 0});
    out.push_back({p + "self_attn.q_proj.weight", {qd, H}, in(&Layer::qkv), 0});
    out.push_back({p + "self_attn.k_proj.weight", {kvd, H}, in(&Layer::qkv), qd * H});
    out.push_back({p + "self_attn.v_proj.weight", {kvd, H}, in(&Layer::qkv), (qd + kvd) * H});
    out.push_back({p + "self_attn.q_proj.bias", {qd}, in(&Layer::qkv_bias), 0});
    out.push_back({p + "self_attn.k_proj.bias", {kvd}, in(&Layer::qkv_bias), qd});
    out.push_back({p + "self_attn.v_proj.bias", {kvd}, in(&Layer::qkv_bias), qd + kvd});
    out.push_back({p + "self_attn.o_proj.weight", {H, qd}, in(&Layer::o_proj), 0});
    out.push_back({p + "post_attention_layernorm.weight", {H}, in(&Layer::post_attention_layernorm), 0});
    out.push_back({p + "mlp.gate_proj.weight", {I, H}, in(&Layer::gate_up), 0});
    out.push_back({p + "mlp.up_proj.weight", {I, H}, in(&Layer::gate_up), I * H});
    out.push_back({p + "mlp.down_proj.weight", {H, I}, in(&Layer::down_proj), 0});
  }
  return out;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> Qwen2Model::parameter_shapes(const Qwen2Config& c) {
  c.validate();
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  for (Slot& s : slots(c, nullptr)) out.emplace_back(std::move(s.name), std::move(s.shape));
  return out;
}

// Matches the checkpoint's tensors to the parameters config.json implies, then allocates and reads them.
void Qwen2Model::load(const std::vector<TensorSource>& tensors) {
  const Qwen2Config& c = cfg_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t qd = c.q_dim(), qkvd = c.qkv_dim();
  Backend& b = *backend_;
  const DType wt = b.weight_dtype(), act = b.activation_dtype();

  struct Param {
    std::vector<int64_t> shape;
    Tensor* dst;
    int64_t at;  // first element inside dst
    const TensorSource* src = nullptr;
  };
  std::map<std::string, Param> params;
  layers_.assign(size_t(c.num_hidden_layers), Layer{});
  for (Slot& s : slots(c, this)) params[s.name] = {std::move(s.shape), s.dst, s.at};

  for (const TensorSource& s : tensors) {
    auto it = params.find(s.name);
    if (it == params.end())
      throw std::invalid_argument("unexpected tensor " + s.name + " in the checkpoint: not a parameter of a " +
                                  std::to_string(c.num_hidden_layers) + "-layer Qwen2ForCausalLM");
    Param& p = it->second;
    if (p.src) throw std::invalid_argument("tensor " + s.name + " appears twice in the checkpoint");
    if (s.shape != p.shape)
      throw std::invalid_argument("tensor " + s.name + " has shape " + shape_str(s.shape) + " but config.json implies " +
                                  shape_str(p.shape));
    const DType dt = parse_dtype(s);
    int64_t numel = 1;
    for (int64_t d : s.shape) numel *= d;
    if (s.nbytes != numel * int64_t(dtype_size(dt)))
      throw std::invalid_argument("tensor " + s.name + " has " + std::to_string(s.nbytes) + " bytes, but " +
                                  s.dtype + " " + shape_str(s.shape) + " needs " +
                                  std::to_string(numel * int64_t(dtype_size(dt))));
    p.src = &s;
  }
  const bool has_lm_head = params["lm_head.weight"].src != nullptr;
  if (!has_lm_head && !c.tie_word_embeddings)
    throw std::invalid_argument("tensor lm_head.weight is missing, and config.json has tie_word_embeddings false");
  if (!has_lm_head) params.erase("lm_head.weight");
  for (const auto& [name, p] : params)
    if (!p.src) throw std::invalid_argument("tensor " + name + " is missing from the checkpoint");
  check_files(tensors);

  // Everything is known to be consistent: reserve, allocate, read.
  const int64_t ws = int64_t(dtype_size(wt)), as = int64_t(dtype_size(act));
  const int64_t per_layer = (qkvd * H + qd * H + 2 * I * H + H * I) * ws + (2 * H + qkvd) * 4 +
                            2 * c.num_key_value_heads * max_positions_ * c.head_dim * as;
  const int64_t bytes = V * H * ws * (has_lm_head ? 2 : 1) + H * 4 + c.num_hidden_layers * per_layer +
                        max_batch_ * (H * 4 + (H + qkvd + qd + 3 * I) * as) + kHeadRows * (H * as + V * 4) +
                        max_positions_ * c.head_dim * 4;
  b.reserve(bytes);

  embed_tokens_ = b.alloc(wt, V, H);
  lm_head_ = has_lm_head ? b.alloc(wt, V, H) : embed_tokens_;
  norm_ = b.alloc(DType::F32, 1, H);
  for (Layer& L : layers_) {
    L.input_layernorm = b.alloc(DType::F32, 1, H);
    L.qkv = b.alloc(wt, qkvd, H);
    L.qkv_bias = b.alloc(DType::F32, 1, qkvd);
    L.o_proj = b.alloc(wt, H, qd);
    L.post_attention_layernorm = b.alloc(DType::F32, 1, H);
    L.gate_up = b.alloc(wt, 2 * I, H);
    L.down_proj = b.alloc(wt, H, I);
    L.k_cache = b.alloc(act, c.num_key_value_heads * max_positions_, c.head_dim);
    L.v_cache = b.alloc(act, c.num_key_value_heads * max_positions_, c.head_dim);
  }
  x_ = b.alloc(DType::F32, max_batch_, H);
  xn_ = b.alloc(act, max_batch_, H);
  qkv_ = b.alloc(act, max_batch_, qkvd);
  attn_ = b.alloc(act, max_batch_, qd);
  gate_up_ = b.alloc(act, max_batch_, 2 * I);
  mlp_ = b.alloc(act, max_batch_, I);
  head_in_ = b.alloc(act, kHeadRows, H);
  logits_ = b.alloc(DType::F32, kHeadRows, V);

  // Rotary tables, computed in float32 the way transformers does: inv_freq = 1 / theta^(2i/d), angle = pos * inv_freq.
  const int64_t half = c.head_dim / 2;
  rope_cos_ = b.alloc(DType::F32, max_positions_, half);
  rope_sin_ = b.alloc(DType::F32, max_positions_, half);
  std::vector<float> cos_host(size_t(max_positions_ * half)), sin_host(cos_host.size());
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[size_t(i)] = 1.0f / std::pow(float(c.rope_theta), float(2 * i) / float(c.head_dim));
  for (int64_t p = 0; p < max_positions_; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(p) * inv_freq[size_t(i)];
      cos_host[size_t(p * half + i)] = std::cos(angle);
      sin_host[size_t(p * half + i)] = std::sin(angle);
    }
  b.upload(rope_cos_, 0, cos_host.data(), DType::F32, int64_t(cos_host.size()));
  b.upload(rope_sin_, 0, sin_host.data(), DType::F32, int64_t(sin_host.size()));

  std::vector<TensorTarget> targets;
  for (const auto& [name, p] : params) targets.push_back({p.src, parse_dtype(*p.src), *p.dst, p.at});
  read_tensors(b, targets, 2);
}

void Qwen2Model::run_layers(const int32_t* ids, int64_t T) {
  const Qwen2Config& c = cfg_;
  Backend& b = *backend_;
  const float eps = float(c.rms_norm_eps);
  const Tensor x = x_.slice_rows(0, T), xn = xn_.slice_rows(0, T), qkv = qkv_.slice_rows(0, T),
               attn = attn_.slice_rows(0, T), gate_up = gate_up_.slice_rows(0, T), mlp = mlp_.slice_rows(0, T);
  const Tensor q = qkv.slice_cols(0, c.q_dim()), k = qkv.slice_cols(c.q_dim(), c.kv_dim()),
               v = qkv.slice_cols(c.q_dim() + c.kv_dim(), c.kv_dim());

  b.embed(x, embed_tokens_);
  for (const Layer& L : layers_) {
    if (interrupt_check) interrupt_check();
    // self-attention block
    b.rmsnorm(xn, x, L.input_layernorm, eps);
    b.matmul(qkv, xn, L.qkv, &L.qkv_bias, false);
    b.rope(q, k, c.head_dim, rope_cos_, rope_sin_);
    b.kv_store(L.k_cache, L.v_cache, k, v, max_positions_);
    b.attention(attn, q, L.k_cache, L.v_cache, c.num_key_value_heads, c.head_dim, max_positions_);
    b.matmul(x, attn, L.o_proj, nullptr, /*accumulate=*/true);  // x += o_proj(attn)
    // MLP block
    b.rmsnorm(xn, x, L.post_attention_layernorm, eps);
    b.matmul(gate_up, xn, L.gate_up, nullptr, false);
    b.silu_mul(mlp, gate_up);
    b.matmul(x, mlp, L.down_proj, nullptr, /*accumulate=*/true);  // x += down_proj(silu(gate) * up)
  }
}

void Qwen2Model::lm_head_rows(int64_t r0, int64_t n) {
  const Tensor h = head_in_.slice_rows(0, n);
  backend_->rmsnorm(h, x_.slice_rows(r0, n), norm_, float(cfg_.rms_norm_eps));
  backend_->matmul(logits_.slice_rows(0, n), h, lm_head_, nullptr, false);
}

void Qwen2Model::forward(const int32_t* ids, int64_t T, bool all_logits, float* logits) {
  if (T < 1) throw std::invalid_argument("forward needs at least one token");
  if (T > max_positions_ - length_)
    throw std::out_of_range(std::to_string(T) + " tokens do not fit in the KV cache: " + std::to_string(length_) +
                            " of " + std::to_string(max_positions_) + " positions are used");
  for (int64_t t = 0; t < T; ++t)
    if (ids[t] < 0 || ids[t] >= cfg_.vocab_size)
      throw std::out_of_range("token id " + std::to_string(ids[t]) + " is outside the vocabulary [0, " +
                              std::to_string(cfg_.vocab_size) + ")");

  const int64_t V = cfg_.vocab_size, start = length_;
  int64_t pos = start;
  try {
    for (int64_t done = 0; done < T;) {
      const int64_t n = std::min(max_batch_, T - done);
      backend_->begin_forward(ids + done, n, pos);
      auto body = [&] {
        run_layers(ids + done, n);
        if (!all_logits && done + n == T) lm_head_rows(n - 1, 1);
      };
      if (n == 1 && !all_logits) backend_->run_decode_step(body); else body();
      if (all_logits) {
        for (int64_t r = 0; r < n; r += kHeadRows) {
          const int64_t m = std::min(kHeadRows, n - r);
          lm_head_rows(r, m);
          backend_->download(logits + (done + r) * V, logits_.slice_rows(0, m));
        }
      } else if (done + n == T) {
        backend_->download(logits, logits_.slice_rows(0, 1));
      }
      done += n;
      pos += n;
      length_ = pos;  // a chunk is in the cache only once it has fully run
    }
  } catch (...) {
    length_ = start;  // an interrupted pass leaves the cache as it was
    throw;
  }
}

int32_t Qwen2Model::forward_argmax(int32_t id) {
  if (id < 0 || id >= cfg_.vocab_size)
    throw std::out_of_range("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                            std::to_string(cfg_.vocab_size) + ")");
  if (length_ >= max_positions_)
    throw std::out_of_range("the KV cache is full (" + std::to_string(max_positions_) + " positions)");
  backend_->begin_forward(&id, 1, length_);
  backend_->run_decode_step([&] {
    run_layers(&id, 1);
    lm_head_rows(0, 1);
  });
  const int32_t next = backend_->argmax(logits_.slice_rows(0, 1));
  ++length_;
  return next;
}

void Qwen2Model::truncate(int64_t n) {
  if (n < 0 || n > length_)
    throw std::out_of_range("truncate(" + std::to_string(n) + "): the cache holds " + std::to_string(length_) +
                            " positions");
  length_ = n;
}

}  // namespace qwen
