// Qwen2ForCausalLM, top to bottom:
//
//   x = embed_tokens[ids]
//   for each layer:
//     h = rmsnorm(x) · input_layernorm
//     q, k, v = h·Wqᵀ + bq, h·Wkᵀ + bk, h·Wvᵀ + bv      (one fused matmul)
//     q, k = rope(q), rope(k)                               (rotate-half, theta = rope_theta)
//     cache[k, v] of each row's slot at its position
//     x += o_proj(softmax(q·kᵀ / sqrt(head_dim) + causal mask) · v)   (grouped-query, each row over its own slot)
//     h = rmsnorm(x) · post_attention_layernorm
//     x += down_proj(silu(gate_proj(h)) * up_proj(h))       (gate/up one fused matmul)
//   logits = lm_head(rmsnorm(x) · norm)
//
// Names follow config.json and the checkpoint. How each op runs is the backend's business (backend.h); which
// sequences and positions a pass computes is data (Rows over a KVCache), not state of the model.
#include "qwen2.h"

#include <cmath>
#include <algorithm>
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

Qwen2Model::Qwen2Model(const Qwen2Config& config, const std::vector<TensorSource>& tensors, Backend& backend,
                       const WeightFormats& formats, CacheShape cache)
    : cfg_(config), backend_(backend), max_positions_(cache.max_positions) {
  cfg_.validate();
  if (max_positions_ < 1 || max_positions_ > cfg_.max_position_embeddings)
    throw std::invalid_argument("max_context = " + std::to_string(max_positions_) + " must be between 1 and " +
                                "max_position_embeddings (" + std::to_string(cfg_.max_position_embeddings) + ")");
  if (cache.num_slots < 1) throw std::invalid_argument("a KV cache needs at least one slot");
  max_batch_ = std::min(kMaxBatch, max_positions_ * cache.num_slots);
  load(tensors, formats, cache);
}

// Every tensor of a Qwen2ForCausalLM checkpoint with its shape, and (for a model m) where it lands: q/k/v and
// gate/up go into one stacked matrix each. The one list of parameter names; the Python layer asks for it too.
std::vector<Qwen2Model::Slot> Qwen2Model::slots(const Qwen2Config& c, Qwen2Model* m) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, qd = c.q_dim(), kvd = c.kv_dim();
  auto at = [&](Weight Qwen2Model::*t) { return m ? &(m->*t) : nullptr; };
  std::vector<Slot> out = {{"model.embed_tokens.weight", {V, H}, at(&Qwen2Model::embed_tokens_), 0},
                           {"model.norm.weight", {H}, at(&Qwen2Model::norm_), 0},
                           {"lm_head.weight", {V, H}, at(&Qwen2Model::lm_head_), 0}};
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    Layer* L = m ? &m->layers_[size_t(i)] : nullptr;
    auto in = [&](Weight Layer::*t) { return L ? &(L->*t) : nullptr; };
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.push_back({p + "input_layernorm.weight", {H}, in(&Layer::input_layernorm), 0});
    out.push_back({p + "self_attn.q_proj.weight", {qd, H}, in(&Layer::qkv), 0});
    out.push_back({p + "self_attn.k_proj.weight", {kvd, H}, in(&Layer::qkv), qd});
    out.push_back({p + "self_attn.v_proj.weight", {kvd, H}, in(&Layer::qkv), qd + kvd});
    out.push_back({p + "self_attn.q_proj.bias", {qd}, in(&Layer::qkv_bias), 0});
    out.push_back({p + "self_attn.k_proj.bias", {kvd}, in(&Layer::qkv_bias), qd});
    out.push_back({p + "self_attn.v_proj.bias", {kvd}, in(&Layer::qkv_bias), qd + kvd});
    out.push_back({p + "self_attn.o_proj.weight", {H, qd}, in(&Layer::o_proj), 0});
    out.push_back({p + "post_attention_layernorm.weight", {H}, in(&Layer::post_attention_layernorm), 0});
    out.push_back({p + "mlp.gate_proj.weight", {I, H}, in(&Layer::gate_up), 0});
    out.push_back({p + "mlp.up_proj.weight", {I, H}, in(&Layer::gate_up), I});
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

std::string Qwen2Model::weight_format() const {
  std::vector<const Weight*> all = {&embed_tokens_, &lm_head_};
  for (const Layer& L : layers_) all.insert(all.end(), {&L.qkv, &L.o_proj, &L.gate_up, &L.down_proj});
  for (const Weight* w : all)
    if (w->format != all[0]->format) return "mixed";
  return format_name(all[0]->format);
}

int64_t Qwen2Model::decode_bytes() const {
  auto bytes = [](const Weight& w) { return format_bytes(w.format, w.rows(), w.cols()); };
  int64_t n = bytes(lm_head_);
  for (const Layer& L : layers_) n += bytes(L.qkv) + bytes(L.o_proj) + bytes(L.gate_up) + bytes(L.down_proj);
  return n;
}

int64_t Qwen2Model::weight_bytes() const {
  auto bytes = [](const Weight& w) { return format_bytes(w.format, w.rows(), w.cols()); };
  int64_t n = bytes(embed_tokens_) + bytes(norm_) + (lm_head_.data.data == embed_tokens_.data.data ? 0 : bytes(lm_head_));
  for (const Layer& L : layers_)
    n += bytes(L.input_layernorm) + bytes(L.qkv) + bytes(L.qkv_bias) + bytes(L.o_proj) +
         bytes(L.post_attention_layernorm) + bytes(L.gate_up) + bytes(L.down_proj);
  return n;
}

// Matches the checkpoint's tensors to the parameters config.json implies, then reserves, allocates and reads them.
void Qwen2Model::load(const std::vector<TensorSource>& tensors, const WeightFormats& formats, CacheShape cache) {
  const Qwen2Config& c = cfg_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t qd = c.q_dim(), qkvd = c.qkv_dim();
  Backend& b = backend_;
  const DType act = b.activation_dtype();

  struct Param {
    std::vector<int64_t> shape;
    Weight* dst;
    int64_t at;
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

  // The format of each destination: one per stacked matrix, vectors always F32.
  for (const auto& [name, f] : formats.overrides)
    if (!params.count(name))
      throw std::invalid_argument("a weight format is given for " + name + ", which is not a matrix of this model");
  std::map<Weight*, std::pair<Format, std::string>> fmt;  // destination → (format, the tensor that decided it)
  for (const auto& [name, p] : params) {
    const bool vector = p.shape.size() == 1;
    auto o = formats.overrides.find(name);
    if (vector && o != formats.overrides.end() && o->second != Format::F32)
      throw std::invalid_argument(name + " is a norm weight or bias: those are stored as float32");
    const Format f = vector ? Format::F32 : o != formats.overrides.end() ? o->second : formats.matrices;
    auto [it, fresh] = fmt.emplace(p.dst, std::make_pair(f, name));
    if (!fresh && it->second.first != f)
      throw std::invalid_argument(name + " and " + it->second.second + " are stored as one stacked matrix: give them "
                                  "the same format");
    if (!vector && !b.stores(f))
      throw std::invalid_argument("the " + b.name() + " backend cannot store " + name + " as " + format_name(f));
  }

  // Everything is known to be consistent: one memory check for all of it, then allocate and read.
  std::map<Weight*, std::pair<int64_t, int64_t>> dims;  // destination → (rows, cols) of the whole stack
  for (const auto& [name, p] : params) {
    auto& d = dims[p.dst];
    if (p.shape.size() == 1) d = {1, std::max(d.second, p.at + p.shape[0])};
    else d = {std::max(d.first, p.at + p.shape[0]), p.shape[1]};
  }
  int64_t weight_bytes = 0;
  for (const auto& [w, d] : dims) weight_bytes += format_bytes(fmt[w].first, d.first, d.second);
  const int64_t as = int64_t(dtype_size(act));
  const int64_t act_bytes = max_batch_ * (H * 4 + (H + qkvd + qd + 3 * I) * as) + kHeadRows * (H * as + V * 4) +
                            2 * max_positions_ * (c.head_dim / 2) * 4;
  const int64_t kv_bytes = KVCache::bytes(c, cache, act);
  auto mib = [](int64_t n) { return std::to_string((n + (1 << 20) - 1) >> 20) + " MiB"; };
  b.reserve(weight_bytes + act_bytes + kv_bytes,
            "weights " + mib(weight_bytes) + ", KV cache " + mib(kv_bytes) +
                " (" + std::to_string(cache.num_slots) + " slot(s) x " + std::to_string(cache.max_positions) +
                " positions), activations " + mib(act_bytes));

  for (auto& [w, d] : dims) *w = b.alloc_weight(fmt[w].first, d.first, d.second);
  if (!has_lm_head) lm_head_ = embed_tokens_;
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
  for (const auto& [name, p] : params)  // a matrix lands at a row of its stack, a vector at an element of its row
    targets.push_back({p.src, parse_dtype(*p.src), *p.dst, p.shape.size() == 1 ? p.at : p.at * p.shape[1]});
  read_tensors(b, targets, 2);
}

void Qwen2Model::run_layers(const KVCache& cache, int64_t T) {
  const Qwen2Config& c = cfg_;
  Backend& b = backend_;
  const float eps = float(c.rms_norm_eps);
  const Tensor x = x_.slice_rows(0, T), xn = xn_.slice_rows(0, T), qkv = qkv_.slice_rows(0, T),
               attn = attn_.slice_rows(0, T), gate_up = gate_up_.slice_rows(0, T), mlp = mlp_.slice_rows(0, T);
  const Tensor q = qkv.slice_cols(0, c.q_dim()), k = qkv.slice_cols(c.q_dim(), c.kv_dim()),
               v = qkv.slice_cols(c.q_dim() + c.kv_dim(), c.kv_dim());

  b.embed(x, embed_tokens_);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& L = layers_[i];
    const KVLayer& kv = cache.layer(i);
    if (interrupt_check) interrupt_check();
    // self-attention block
    b.rmsnorm(xn, x, L.input_layernorm.data, eps);
    b.matmul(qkv, xn, L.qkv, &L.qkv_bias.data, false);
    b.rope(q, k, c.head_dim, rope_cos_, rope_sin_);
    b.kv_store(kv, k, v);
    b.attention(attn, q, kv, c.head_dim);
    b.matmul(x, attn, L.o_proj, nullptr, /*accumulate=*/true);  // x += o_proj(attn)
    // MLP block
    b.rmsnorm(xn, x, L.post_attention_layernorm.data, eps);
    b.matmul(gate_up, xn, L.gate_up, nullptr, false);
    b.silu_mul(mlp, gate_up);
    b.matmul(x, mlp, L.down_proj, nullptr, /*accumulate=*/true);  // x += down_proj(silu(gate) * up)
  }
}

// Final norm of x_'s rows `rows` (ascending) into head_in_, consecutive rows in one op, then the lm_head over all of
// them: as one matmul when they are rows of one sequence, as one-row matmuls (`single`) when each is the only row of
// its sequence.
void Qwen2Model::lm_head_rows(const int64_t* rows, int64_t n, bool single) {
  const float eps = float(cfg_.rms_norm_eps);
  for (int64_t j = 0; j < n;) {
    int64_t e = j + 1;
    while (e < n && rows[e] == rows[e - 1] + 1) ++e;
    backend_.rmsnorm(head_in_.slice_rows(j, e - j), x_.slice_rows(rows[j], e - j), norm_.data, eps);
    j = e;
  }
  if (single) backend_.matmul_rows(logits_.slice_rows(0, n), head_in_.slice_rows(0, n), lm_head_, nullptr, false);
  else backend_.matmul(logits_.slice_rows(0, n), head_in_.slice_rows(0, n), lm_head_, nullptr, false);
}

void Qwen2Model::forward(KVCache& cache, const Rows& rows, const std::vector<int64_t>& logit_rows, float* logits,
                         int32_t* argmax) {
  if (cache.max_positions() > max_positions_)
    throw std::invalid_argument("this KV cache has more positions than the model's rotary tables cover");
  for (int64_t t = 0; t < rows.T; ++t)
    if (rows.ids[t] < 0 || rows.ids[t] >= cfg_.vocab_size)
      throw std::out_of_range("token id " + std::to_string(rows.ids[t]) + " is outside the vocabulary [0, " +
                              std::to_string(cfg_.vocab_size) + ")");
  cache.check(rows);
  for (size_t j = 0; j < logit_rows.size(); ++j)
    if (logit_rows[j] < 0 || logit_rows[j] >= rows.T || (j && logit_rows[j] <= logit_rows[j - 1]))
      throw std::out_of_range("logit rows must be ascending row indices of the pass (0.." +
                              std::to_string(rows.T - 1) + ")");

  const int64_t V = cfg_.vocab_size;
  size_t next = 0;  // the first logit row not yet computed
  for (int64_t done = 0; done < rows.T;) {
    // A pass of whole runs up to max_batch_ rows; a run longer than that alone is cut every max_batch_ rows from
    // its start. Either way how a run is cut does not depend on the other runs.
    int64_t end = done;
    while (end < rows.T) {
      int64_t run_end = end + 1;
      while (run_end < rows.T && rows.slots[run_end] == rows.slots[end]) ++run_end;
      if (end == done) end = std::min(run_end, done + max_batch_);
      else if (run_end - done <= max_batch_) end = run_end;
      else break;
      if (end < run_end) break;
    }
    const int64_t n = end - done;
    const Rows chunk{rows.ids + done, rows.slots + done, rows.positions + done, n};
    std::vector<int64_t>& wanted = wanted_;  // logit rows of this pass, relative to it
    wanted.clear();
    for (size_t j = next; j < logit_rows.size() && logit_rows[j] < end; ++j) wanted.push_back(logit_rows[j] - done);
    backend_.begin_forward(chunk);
    if (n == 1) {  // one row: the step a backend may record once and replay, so always the same work
      const int64_t row0 = 0;
      backend_.run_decode_step([&] {
        run_layers(cache, 1);
        lm_head_rows(&row0, 1, true);
      });
    } else {
      run_layers(cache, n);
    }
    // The lm_head in blocks of up to kHeadRows: rows of one sequence together, or the single rows of several
    // sequences together; either way each sequence's logits are what it gets alone.
    auto slot = [&](size_t j) { return chunk.slots[wanted[j]]; };
    auto alone = [&](size_t j) {  // the only wanted row of its sequence (a sequence's rows are consecutive)
      return (j == 0 || slot(j - 1) != slot(j)) && (j + 1 == wanted.size() || slot(j + 1) != slot(j));
    };
    for (size_t j = 0; j < wanted.size();) {
      const bool single = alone(j);
      size_t e = j + 1;
      while (e < wanted.size() && int64_t(e - j) < kHeadRows && (single ? alone(e) : slot(e) == slot(j))) ++e;
      const int64_t m = int64_t(e - j);
      if (n > 1) lm_head_rows(wanted.data() + j, m, single);
      const size_t out = next + j;
      if (logits) backend_.download(logits + int64_t(out) * V, logits_.slice_rows(0, m));
      if (argmax) backend_.argmax(logits_.slice_rows(0, m), argmax + out);
      j = e;
    }
    next += wanted.size();
    done = end;
  }
  cache.commit(rows);  // only a pass that fully ran is in the cache
}

}  // namespace qwen
