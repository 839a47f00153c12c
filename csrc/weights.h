// Checkpoint tensors on disk (safetensors byte ranges, located by the Python layer from the file headers) and
// reading them into backend memory.
#pragma once

#include <string>
#include <vector>

#include "backend.h"

namespace qwen {

// One tensor of a safetensors file: `nbytes` bytes at absolute file offset `offset`.
struct TensorSource {
  std::string name;
  std::string path;
  std::string dtype;  // safetensors spelling: "BF16", "F16" or "F32"
  std::vector<int64_t> shape;
  int64_t offset = 0;
  int64_t nbytes = 0;
};

// Where a source goes: parameter `dst` starting at element `at` (q/k/v and gate/up land in one fused matrix each;
// in a quantized parameter `at` is the first element of a row).
struct TensorTarget {
  const TensorSource* src;
  DType src_dtype;
  Weight dst;
  int64_t at;
};

// Parses a safetensors dtype name; throws naming the tensor for anything else.
DType parse_dtype(const TensorSource& s);

// Checks that every file exists and holds every byte range (before anything is allocated).
void check_files(const std::vector<TensorSource>& sources);

// Reads each source's bytes into its target, converting to the target's dtype, `threads` files' worth at a time.
// No file stays open afterwards.
void read_tensors(Backend& backend, const std::vector<TensorTarget>& targets, int threads);

}  // namespace qwen
