#include "cuda/tuner.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "cuda/graph.cuh"
#include "cuda/kernels.cuh"

// Graphs of up to QWEN_CUDA_TUNE_MAX_REPS launches, each timed QWEN_CUDA_TUNE_LAUNCHES times after a warm-up (the
// CPU emulation in tests/cuda_emu sets both to 1).
#ifndef QWEN_CUDA_TUNE_MAX_REPS
#define QWEN_CUDA_TUNE_MAX_REPS 50
#endif
#ifndef QWEN_CUDA_TUNE_LAUNCHES
#define QWEN_CUDA_TUNE_LAUNCHES 3
#endif

namespace qwen {
namespace cuda {

namespace {
GemvTuner::Mode mode_from_env() {
  const char* v = std::getenv("QWEN_NATIVE_GEMV");
  if (!v || !*v || std::string(v) == "auto") return GemvTuner::Mode::Auto;
  if (std::string(v) == "gemv") return GemvTuner::Mode::Gemv;
  if (std::string(v) == "cublas") return GemvTuner::Mode::Cublas;
  throw std::invalid_argument(std::string("QWEN_NATIVE_GEMV=") + v + ": expected auto, gemv or cublas");
}
}  // namespace

GemvTuner::GemvTuner(DeviceMemory& mem, int sms) : mem_(mem), sms_(sms), mode_(mode_from_env()) {}

GemvTuner::~GemvTuner() {
  if (t0_) cudaEventDestroy(t0_);
  if (t1_) cudaEventDestroy(t1_);
}

GemvTuner::Choice GemvTuner::choose(int64_t n, int64_t k, bool timing, cudaStream_t stream, const GemvLaunch& gemv,
                                    const CublasLaunch& cublas) {
  const std::pair<int64_t, int64_t> key{n, k};
  auto it = choices_.find(key);
  if (it != choices_.end()) return it->second;
  Choice c;
  c.wpr = gemv_default_warps(n, k / 8, sms_);
  if (mode_ == Mode::Auto && timing) {
    c = tune(n, k, stream, gemv, cublas);
    choices_[key] = c;
  } else if (mode_ == Mode::Gemv) {
    choices_[key] = c;
  }
  return c;
}

// Times the GEMV at every useful split and cuBLAS on this shape, into scratch so the real output is untouched.
GemvTuner::Choice GemvTuner::tune(int64_t n, int64_t k, cudaStream_t stream, const GemvLaunch& gemv,
                                  const CublasLaunch& cublas) {
  if (out_.ensure(mem_, size_t(n) * 4, "GEMV timing scratch", stream))
    QWEN_CUDA_CHECK(cudaMemsetAsync(out_.p, 0, size_t(n) * 4, stream));
  const double bytes = double(n) * double(k) * 2;
  const int reps = int(std::clamp(2.0e8 / bytes, 1.0, double(QWEN_CUDA_TUNE_MAX_REPS)));
  Choice c;
  float best = 1e30f;
  for (int wpr = 1; wpr <= 8; wpr *= 2) {
    if (wpr > 1 && k / 8 < int64_t(wpr) * 32) break;  // fewer than one 16-byte chunk per lane
    const float us = time_us(stream, reps, [&] { gemv(out_.p, wpr); });
    if (us < best) {
      best = us;
      c.wpr = wpr;
    }
  }
  c.gemv_us = best;
  c.cublas_us = time_us(stream, reps, [&] { cublas(out_.p); });
  c.cublas = c.cublas_us < c.gemv_us;
  return c;
}

// Per launch; as a graph of `reps` launches, or launched one by one where the graph cannot be recorded.
float GemvTuner::time_us(cudaStream_t stream, int reps, const std::function<void()>& launch) {
  if (!t0_) QWEN_CUDA_CHECK(cudaEventCreate(&t0_));
  if (!t1_) QWEN_CUDA_CHECK(cudaEventCreate(&t1_));
  auto all = [&] {
    for (int r = 0; r < reps; ++r) launch();
  };
  std::string why;
  const GraphExec exec = capture_graph(stream, all, &why);
  auto run = [&] {
    if (exec) QWEN_CUDA_CHECK(cudaGraphLaunch(exec.get(), stream));
    else all();
  };
  run();  // warm-up
  QWEN_CUDA_CHECK(cudaEventRecord(t0_, stream));
  constexpr int kLaunches = QWEN_CUDA_TUNE_LAUNCHES;
  for (int i = 0; i < kLaunches; ++i) run();
  QWEN_CUDA_CHECK(cudaEventRecord(t1_, stream));
  QWEN_CUDA_CHECK(cudaEventSynchronize(t1_));
  float ms = 0;
  QWEN_CUDA_CHECK(cudaEventElapsedTime(&ms, t0_, t1_));
  return ms * 1000.0f / float(kLaunches * reps);
}

std::string GemvTuner::describe() const {
  std::string s = mode_ == Mode::Gemv ? "gemv (forced)" : mode_ == Mode::Cublas ? "cublas (forced)" : "timed";
  bool first = true;
  for (const auto& [shape, c] : choices_) {
    s += (first ? " " : ", ") + std::to_string(shape.first) + "x" + std::to_string(shape.second) + "=" +
         (c.cublas ? std::string("cublas") : "gemv/" + std::to_string(c.wpr));
    if (c.gemv_us > 0 && c.cublas_us > 0) {
      char buf[64];
      std::snprintf(buf, sizeof buf, " (gemv %.1f us, cublas %.1f us)", c.gemv_us, c.cublas_us);
      s += buf;
    }
    first = false;
  }
  return s;
}

}  // namespace cuda
}  // namespace qwen
