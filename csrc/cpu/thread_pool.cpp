#include "cpu/thread_pool.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

namespace qwen {

namespace {
constexpr int kSpinBeforeSleep = 20000;  // ~100 µs of pause instructions
}

ThreadPool::ThreadPool(int num_threads) : n_(num_threads < 1 ? 1 : num_threads) {
  for (int i = 1; i < n_; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  generation_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::run_impl(void (*fn)(void*, int), void* ctx) {
  if (n_ == 1) { fn(ctx, 0); return; }
  fn_ = fn;
  ctx_ = ctx;
  pending_.store(n_ - 1, std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_release);
  generation_.notify_all();
  fn(ctx, 0);
  for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < kSpinBeforeSleep) cpu_relax(); else std::this_thread::yield();
  }
}

void ThreadPool::worker(int index) {
  uint32_t seen = 0;
  for (;;) {
    uint32_t g;
    for (int spins = 0; (g = generation_.load(std::memory_order_acquire)) == seen; ++spins) {
      if (spins < kSpinBeforeSleep) cpu_relax(); else generation_.wait(seen, std::memory_order_acquire);
    }
    seen = g;
    if (stop_.load(std::memory_order_acquire)) return;
    fn_(ctx_, index);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

}  // namespace qwen
