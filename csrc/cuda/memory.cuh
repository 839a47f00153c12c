// Memory of the CUDA backend: device allocations (tracked, freed together, errors that say what for and how much),
// growable scratch buffers, pinned host buffers, and the pass parameters copied to the device once per pass.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "backend.h"
#include "cuda/common.cuh"

namespace qwen {
namespace cuda {

std::string mib(int64_t bytes);

// Every device allocation of one backend; all are freed when it is destroyed.
class DeviceMemory {
 public:
  // `label` names the device in messages, e.g. "cuda:0 (NVIDIA H200)".
  DeviceMemory(int device, std::string label) : dev_(device), label_(std::move(label)) {}
  ~DeviceMemory();
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  // Throws unless `bytes` more, plus working space (cuBLAS, scratch, graphs), fit in what is free now; `what` says
  // what the bytes are for.
  void reserve(int64_t bytes, const std::string& what) const;
  void* alloc(size_t bytes, const std::string& what);
  // Frees `p` once the work queued on `stream` is done with it.
  void free(void* p, cudaStream_t stream);
  size_t allocated() const { return allocated_; }

 private:
  int dev_;
  std::string label_;
  std::vector<void*> allocs_;
  size_t allocated_ = 0;
};

// A device buffer that grows on demand (contents are lost when it does).
struct Scratch {
  void* p = nullptr;
  size_t bytes = 0;

  // True when it (re)allocated: anything recorded with the old pointer, a CUDA graph, is stale.
  bool ensure(DeviceMemory& mem, size_t need, const std::string& what, cudaStream_t stream);
  template <class T> T* as() const { return static_cast<T*>(p); }
};

// Page-locked host memory: copies from and to it are truly asynchronous and fast.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  // Grows to at least `bytes` (contents lost); the caller makes sure no copy still uses the old memory.
  void ensure(size_t bytes);
  template <class T> T* as() const { return static_cast<T*>(p_); }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// The rows of the current pass as StepParams (common.cuh): assembled in pinned memory, one host→device copy per
// pass, in a device buffer that keeps its address unless a pass needs more room.
class PassParams {
 public:
  explicit PassParams(DeviceMemory& mem) : mem_(mem) {}
  ~PassParams();
  PassParams(const PassParams&) = delete;
  PassParams& operator=(const PassParams&) = delete;

  // Queues the copy of `rows` and `tiles` on `stream`. True when the device buffer moved (grew).
  bool write(const Rows& rows, const std::vector<AttnTile>& tiles, cudaStream_t stream);
  const StepParams* device() const { return dev_.as<const StepParams>(); }

 private:
  DeviceMemory& mem_;
  Scratch dev_;
  PinnedBuffer host_;
  cudaEvent_t copied_ = nullptr;  // the last copy has read host_
};

}  // namespace cuda
}  // namespace qwen
