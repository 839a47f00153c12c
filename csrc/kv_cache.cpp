#include "kv_cache.h"

#include <stdexcept>

namespace qwen {

namespace {
std::string row_str(int64_t t) { return "row " + std::to_string(t); }
}  // namespace

KVCache::KVCache(Backend& backend, const Qwen2Config& c, CacheShape shape) : shape_(shape) {
  if (shape.num_slots < 1 || shape.max_positions < 1)
    throw std::invalid_argument("a KV cache needs at least one slot of at least one position");
  const int64_t rows = shape.num_slots * c.num_key_value_heads * shape.max_positions;
  const DType dt = backend.activation_dtype();
  layers_.reserve(size_t(c.num_hidden_layers));
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    layers_.push_back(KVLayer{backend.alloc(dt, rows, c.head_dim), backend.alloc(dt, rows, c.head_dim),
                              c.num_key_value_heads, shape.max_positions});
  length_.assign(size_t(shape.num_slots), 0);
  seen_.assign(size_t(shape.num_slots), 0);
}

int64_t KVCache::bytes(const Qwen2Config& c, CacheShape shape, DType dtype) {
  return 2 * c.num_hidden_layers * shape.num_slots * c.num_key_value_heads * shape.max_positions * c.head_dim *
         int64_t(dtype_size(dtype));
}

int64_t KVCache::length(int64_t slot) const {
  if (slot < 0 || slot >= shape_.num_slots)
    throw std::out_of_range("slot " + std::to_string(slot) + " does not exist: the KV cache has " +
                            std::to_string(shape_.num_slots) + " slot(s)");
  return length_[size_t(slot)];
}

void KVCache::truncate(int64_t slot, int64_t n) {
  const int64_t len = length(slot);
  if (n < 0 || n > len)
    throw std::out_of_range("truncate(" + std::to_string(n) + "): slot " + std::to_string(slot) + " holds " +
                            std::to_string(len) + " positions");
  length_[size_t(slot)] = n;
}

void KVCache::reset_all() { length_.assign(length_.size(), 0); }

void KVCache::populate(Backend& backend) const {
  for (const KVLayer& l : layers_) {
    backend.populate(l.k);
    backend.populate(l.v);
  }
}

void KVCache::check(const Rows& rows) const {
  if (rows.T < 1) throw std::invalid_argument("a forward pass needs at least one row");
  ++stamp_;  // seen_[s] == stamp_: slot s has had its run in this pass (no allocation per pass)
  for (int64_t t = 0; t < rows.T;) {
    const int64_t s = rows.slots[t];
    if (s < 0 || s >= shape_.num_slots)
      throw std::out_of_range(row_str(t) + ": slot " + std::to_string(s) + " does not exist: the KV cache has " +
                              std::to_string(shape_.num_slots) + " slot(s)");
    if (seen_[size_t(s)] == stamp_)
      throw std::invalid_argument(row_str(t) + ": the rows of slot " + std::to_string(s) +
                                  " must be consecutive (one run per slot in a pass)");
    seen_[size_t(s)] = stamp_;
    int64_t end = t;
    while (end < rows.T && rows.slots[end] == s) ++end;
    const int64_t len = length_[size_t(s)];
    if (rows.positions[t] != len)
      throw std::invalid_argument(row_str(t) + ": slot " + std::to_string(s) + " holds " + std::to_string(len) +
                                  " positions, so its next row is at position " + std::to_string(len) + ", not " +
                                  std::to_string(rows.positions[t]) + " (truncate the slot first to overwrite)");
    for (int64_t r = t + 1; r < end; ++r)
      if (rows.positions[r] != rows.positions[r - 1] + 1)
        throw std::invalid_argument(row_str(r) + ": positions of a slot's rows must be consecutive");
    if (end - t > shape_.max_positions - len)
      throw std::out_of_range(std::to_string(end - t) + " tokens do not fit in slot " + std::to_string(s) +
                              " of the KV cache: " + std::to_string(len) + " of " +
                              std::to_string(shape_.max_positions) + " positions are used");
    t = end;
  }
}

void KVCache::commit(const Rows& rows) {
  for (int64_t t = 0; t < rows.T; ++t) length_[size_t(rows.slots[t])] = rows.positions[t] + 1;
}

}  // namespace qwen
