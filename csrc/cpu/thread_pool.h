// A fixed set of threads kept alive for the model's lifetime: ops hand them work without creating threads. Work
// is split into chunks that threads claim as they go, so a thread the OS preempts (another process on the core)
// delays a matmul by one chunk, not by its whole share. Idle workers spin briefly (ops follow each other within
// microseconds), then sleep on a futex.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <vector>

namespace qwen {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);  // the calling thread counts as one
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_; }

  // Calls fn(begin, end, thread_index) over chunks covering [0, n): chunk sizes are multiples of `align` (the last
  // may be shorter), about `chunks_per_thread` per thread. thread_index is in [0, size()) and no two concurrent
  // calls share one, so it can index per-thread scratch. Returns when every chunk is done.
  template <class F>
  void parallel_for(int64_t n, int64_t align, F&& fn, int chunks_per_thread = 8) {
    if (n <= 0) return;
    if (n_ == 1 || n <= align) { fn(int64_t(0), n, 0); return; }
    const int64_t target = std::max<int64_t>(1, int64_t(n_) * chunks_per_thread);
    const int64_t chunk = std::max<int64_t>(align, (n / target + align - 1) / align * align);
    using Fn = std::remove_reference_t<F>;
    run_chunks([](void* ctx, int64_t lo, int64_t hi, int tid) { (*static_cast<Fn*>(ctx))(lo, hi, tid); }, &fn, n,
               chunk);
  }

 private:
  using ChunkFn = void (*)(void*, int64_t, int64_t, int);
  void run_chunks(ChunkFn fn, void* ctx, int64_t n, int64_t chunk);
  void claim_chunks(int tid);
  void worker(int index);
  void wake_all();

  int n_;
  std::vector<std::thread> threads_;
  // The current job. Written by the caller before it opens the job; read by workers only while they hold a claim.
  ChunkFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t items_ = 0, chunk_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<uint32_t> state_{0};  // (job generation << 1) | open; 32 bits so wait() is a plain futex
  std::atomic<int> claims_{0};      // workers currently inside a job
  std::atomic<int> sleepers_{0};    // workers blocked in futex_wait on state_
  std::atomic<bool> stop_{false};
};

}  // namespace qwen
