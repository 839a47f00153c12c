#include "cpu/probes.h"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <new>
#include <random>
#include <vector>

#include "backend.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"

namespace qwen {

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

double measure_read_bandwidth(int64_t nbytes, int threads, int repeats) {
  const int64_t k = 4096, rows = std::max<int64_t>(16, nbytes / (4 * k));
  const size_t bytes = size_t(rows * k * 4);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  madvise(p, bytes, MADV_HUGEPAGE);
  // Fault every page in before timing, with non-zero data (no zero-page or compression shortcuts).
  float* f = static_cast<float*>(p);
  for (int64_t i = 0; i < rows * k; ++i) f[i] = float(i & 1023) * 0.001f;
  ThreadPool pool(threads);
  const CpuKernels& K = cpu_kernels();
  std::vector<float> x(static_cast<size_t>(k), 1.0f);
  std::vector<float> y(static_cast<size_t>(rows));
  double best = 0;
  // The decode GEMV is the access pattern that matters: every row read once, x stays in cache.
  for (int r = 0; r < std::max(1, repeats) + 1; ++r) {
    const double t0 = now_s();
    pool.parallel_for(rows, 16, [&](int64_t r0, int64_t r1, int) {
      K.gemv_f32(static_cast<const float*>(p), k, x.data(), k, 1, k, y.data(), 0, nullptr, false, r0, r1);
    });
    const double dt = now_s() - t0;
    if (r > 0) best = std::max(best, double(bytes) / dt / 1e9);  // first pass warms up
  }
  munmap(p, bytes);
  return best;
}

double measure_matmul_gflops(int64_t m, int64_t n, int64_t k, Format format, int threads, int repeats) {
  auto backend = make_cpu_backend(threads);
  Tensor x = backend->alloc(DType::F32, m, k), out = backend->alloc(DType::F32, m, n);
  Weight w = backend->alloc_weight(format, n, k);
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t i = 0; i < x.numel(); ++i) x.ptr<float>()[i] = u(rng);
  std::vector<float> row(static_cast<size_t>(k));
  for (int64_t r = 0; r < n; ++r) {
    for (auto& v : row) v = u(rng);
    backend->upload(w.data, r * k, row.data(), DType::F32, k);
  }
  double best = 0;
  for (int r = 0; r < std::max(1, repeats) + 1; ++r) {
    const double t0 = now_s();
    backend->matmul(out, x, w, nullptr, false);
    const double dt = now_s() - t0;
    if (r > 0) best = std::max(best, 2.0 * double(m) * double(n) * double(k) / dt / 1e9);
  }
  return best;
}

}  // namespace qwen
