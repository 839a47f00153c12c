// A fixed set of threads kept alive for the model's lifetime: ops hand them work without creating threads, and
// idle workers spin briefly (ops follow each other within microseconds) before sleeping on a futex.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace qwen {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);  // the calling thread counts as one
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_; }

  // Calls fn(i) for every i in [0, size()), the caller running i = 0; returns when all are done.
  template <class F>
  void run(F&& fn) {
    using Fn = std::remove_reference_t<F>;
    run_impl([](void* ctx, int i) { (*static_cast<Fn*>(ctx))(i); }, &fn);
  }

  // Splits [0, n) into size() contiguous ranges (multiples of `align` except the last) and calls
  // fn(begin, end, thread_index) for each non-empty one.
  template <class F>
  void parallel_for(int64_t n, int64_t align, F&& fn) {
    if (n_ == 1 || n <= align) { fn(int64_t(0), n, 0); return; }
    const int64_t blocks = (n + align - 1) / align;
    run([&](int i) {
      const int64_t b0 = blocks * i / n_, b1 = blocks * (i + 1) / n_;
      const int64_t lo = std::min(n, b0 * align), hi = std::min(n, b1 * align);
      if (lo < hi) fn(lo, hi, i);
    });
  }

 private:
  void run_impl(void (*fn)(void*, int), void* ctx);
  void worker(int index);

  int n_;
  std::vector<std::thread> threads_;
  void (*fn_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
  std::atomic<uint32_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace qwen
