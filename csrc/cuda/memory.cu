#include "cuda/memory.cuh"

#include <algorithm>
#include <cstring>

namespace qwen {
namespace cuda {

namespace {
constexpr int64_t kReserveMargin = int64_t(256) << 20;  // cuBLAS, scratch buffers, the graph, fragmentation
constexpr int64_t kMinRows = 4096;                     // rows PassParams has room for from the start
}  // namespace

std::string mib(int64_t bytes) { return std::to_string((bytes + (int64_t(1) << 20) - 1) >> 20) + " MiB"; }

DeviceMemory::~DeviceMemory() {
  cudaSetDevice(dev_);
  for (void* p : allocs_) cudaFree(p);
  cudaGetLastError();  // nothing sticky left behind for the next model
}

void DeviceMemory::reserve(int64_t bytes, const std::string& what) const {
  QWEN_CUDA_CHECK(cudaSetDevice(dev_));
  size_t free_b = 0, total_b = 0;
  QWEN_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  const int64_t need = bytes + kReserveMargin;
  if (need > int64_t(free_b))
    throw std::runtime_error("loading this model on " + label_ + " needs " + mib(need) + " of GPU memory (" + what +
                             ", plus " + mib(kReserveMargin) + " working space) but only " + mib(int64_t(free_b)) +
                             " of " + mib(int64_t(total_b)) + " is free; use a smaller max_context, fewer slots or "
                             "a smaller model, or free the GPU");
}

void* DeviceMemory::alloc(size_t bytes, const std::string& what) {
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, std::max<size_t>(bytes, 256));
  if (err != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    throw std::runtime_error("out of GPU memory on " + label_ + " allocating " + mib(int64_t(bytes)) + " for " + what +
                             " (" + cudaGetErrorString(err) + "; " + mib(int64_t(allocated_)) +
                             " already allocated by this model, " + mib(int64_t(free_b)) + " free of " +
                             mib(int64_t(total_b)) + ")");
  }
  allocs_.push_back(p);
  allocated_ += bytes;
  return p;
}

void DeviceMemory::free(void* p, cudaStream_t stream) {
  if (!p) return;
  QWEN_CUDA_CHECK(cudaStreamSynchronize(stream));  // no queued kernel still reads it
  auto it = std::find(allocs_.begin(), allocs_.end(), p);
  if (it != allocs_.end()) allocs_.erase(it);
  QWEN_CUDA_CHECK(cudaFree(p));
}

bool Scratch::ensure(DeviceMemory& mem, size_t need, const std::string& what, cudaStream_t stream) {
  if (need <= bytes && p) return false;
  mem.free(p, stream);
  p = nullptr;
  bytes = 0;
  p = mem.alloc(need, what);
  bytes = need;
  return true;
}

PinnedBuffer::~PinnedBuffer() {
  if (p_) cudaFreeHost(p_);
}

void PinnedBuffer::ensure(size_t bytes) {
  if (bytes <= bytes_ && p_) return;
  if (p_) QWEN_CUDA_CHECK(cudaFreeHost(p_));
  p_ = nullptr;
  bytes_ = 0;
  QWEN_CUDA_CHECK(cudaMallocHost(&p_, bytes));
  bytes_ = bytes;
}

PassParams::~PassParams() {
  if (copied_) cudaEventDestroy(copied_);
}

bool PassParams::write(const Rows& rows, const std::vector<AttnTile>& tiles, cudaStream_t stream) {
  if (!copied_) QWEN_CUDA_CHECK(cudaEventCreateWithFlags(&copied_, cudaEventDisableTiming));
  // The previous pass's copy must have read the pinned buffer before it is overwritten (or freed).
  QWEN_CUDA_CHECK(cudaEventSynchronize(copied_));
  const size_t bytes = sizeof(StepParams) + size_t(rows.T) * sizeof(StepRow) + tiles.size() * sizeof(AttnTile);
  // Room for kMinRows rows and as many tiles (each tile has a row of its own), or twice what was there.
  const size_t room = sizeof(StepParams) + size_t(std::max<int64_t>(rows.T, kMinRows)) * (sizeof(StepRow) +
                                                                                          sizeof(AttnTile));
  const bool moved = dev_.ensure(mem_, bytes <= dev_.bytes ? bytes : std::max(room, 2 * dev_.bytes), "pass parameters",
                                 stream);
  host_.ensure(dev_.bytes);
  StepParams* h = host_.as<StepParams>();
  *h = StepParams{int32_t(rows.T), int32_t(tiles.size()), {0, 0}};
  StepRow* r = reinterpret_cast<StepRow*>(h + 1);
  for (int64_t t = 0; t < rows.T; ++t) r[t] = StepRow{rows.ids[t], rows.slots[t], rows.positions[t], 0};
  if (!tiles.empty()) std::memcpy(r + rows.T, tiles.data(), tiles.size() * sizeof(AttnTile));
  QWEN_CUDA_CHECK(cudaMemcpyAsync(dev_.p, h, bytes, cudaMemcpyHostToDevice, stream));
  QWEN_CUDA_CHECK(cudaEventRecord(copied_, stream));
  return moved;
}

}  // namespace cuda
}  // namespace qwen
