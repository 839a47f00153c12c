// The KV cache as data: keys and values of every layer for num_slots sequences of up to max_positions tokens each,
// allocated once. Each slot has its own length; a forward pass is told which rows (slot, token, position) to
// compute and appends them to their slots.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backend.h"
#include "config.h"

namespace qwen {

struct CacheShape {
  int64_t num_slots = 1;
  int64_t max_positions = 0;
};

class KVCache {
 public:
  // Allocates the cache in `backend` (the caller has reserved bytes(...) already).
  KVCache(Backend& backend, const Qwen2Config& config, CacheShape shape);

  // Bytes of a cache of this shape holding `dtype` elements.
  static int64_t bytes(const Qwen2Config& config, CacheShape shape, DType dtype);

  int64_t num_slots() const { return shape_.num_slots; }
  int64_t max_positions() const { return shape_.max_positions; }
  int64_t length(int64_t slot) const;
  void truncate(int64_t slot, int64_t n);  // keep the first n positions of a slot (reuse a prompt prefix)
  void reset(int64_t slot) { truncate(slot, 0); }
  void reset_all();
  // Makes every layer's memory resident now (Backend::populate); lengths unchanged.
  void populate(Backend& backend) const;

  const KVLayer& layer(size_t i) const { return layers_[i]; }

  // Throws (std::invalid_argument / std::out_of_range, naming the row) unless every row's slot exists, the rows of
  // a slot are one run of consecutive rows whose positions continue that slot from its length, and all of them
  // fit. After a pass that succeeded, commit() makes the rows part of their slots.
  void check(const Rows& rows) const;
  void commit(const Rows& rows);

 private:
  CacheShape shape_;
  std::vector<KVLayer> layers_;  // one per decoder layer
  std::vector<int64_t> length_;  // per slot
  mutable std::vector<uint64_t> seen_;  // check()'s scratch
  mutable uint64_t stamp_ = 0;
};

}  // namespace qwen
