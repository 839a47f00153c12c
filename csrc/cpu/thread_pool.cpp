#include "cpu/thread_pool.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

namespace qwen {

namespace {
constexpr int kSpinBeforeSleep = 20000;  // pause instructions (~0.1-0.5 ms) before a worker sleeps

// Raw futex on the 32-bit state word: the kernel re-checks the value, so a change between our load and the
// sleep cannot be missed.
void futex_wait(std::atomic<uint32_t>* addr, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}
}  // namespace

// Sleepers announce themselves before re-checking the state; publishers change the state before checking for
// sleepers (both seq_cst), so a wake-up is never lost and is skipped when nobody sleeps.
void ThreadPool::wake_all() {
  if (sleepers_.load() > 0) futex_wake_all(&state_);
}

ThreadPool::ThreadPool(int num_threads) : n_(num_threads < 1 ? 1 : num_threads) {
  for (int i = 1; i < n_; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  state_.fetch_add(2);  // a new generation wakes everyone; they see stop_
  wake_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::claim_chunks(int tid) {
  for (;;) {
    const int64_t lo = next_.fetch_add(chunk_, std::memory_order_relaxed);
    if (lo >= items_) return;
    fn_(ctx_, lo, std::min(items_, lo + chunk_), tid);
  }
}

// Publication protocol (all seq_cst): a worker first takes a claim, then checks that a job is open; the caller
// closes the job, then waits for the claims to drain. Either the caller sees the claim and waits, or the worker
// sees the job closed and leaves without touching it, so the caller never returns while a worker still uses fn_
// or ctx_, and never waits for a worker that has not woken up yet.
void ThreadPool::run_chunks(ChunkFn fn, void* ctx, int64_t n, int64_t chunk) {
  fn_ = fn;
  ctx_ = ctx;
  items_ = n;
  chunk_ = chunk;
  next_.store(0);
  const uint32_t gen = (state_.load() >> 1) + 1;
  state_.store(gen << 1 | 1);
  wake_all();
  claim_chunks(0);
  state_.store(gen << 1);
  for (int spins = 0; claims_.load() != 0; ++spins) {
    if (spins < kSpinBeforeSleep) cpu_relax(); else std::this_thread::yield();
  }
}

void ThreadPool::worker(int index) {
  uint32_t seen = 0;  // the generation before any job: a worker that starts late still sees every later change
  for (;;) {
    uint32_t s;
    for (int spins = 0; ((s = state_.load()) >> 1) == seen; ++spins) {
      if (spins < kSpinBeforeSleep) {
        cpu_relax();
      } else {
        sleepers_.fetch_add(1);
        if (state_.load() == s) futex_wait(&state_, s);
        sleepers_.fetch_sub(1);
      }
    }
    seen = s >> 1;
    if (stop_.load()) return;
    claims_.fetch_add(1);
    const uint32_t now = state_.load();
    if ((now & 1) && (now >> 1) == seen) claim_chunks(index);
    claims_.fetch_sub(1);
  }
}

}  // namespace qwen
