// One-row matmuls: our GEMV (gemv.cu, each row split across 1, 2, 4 or 8 warps) or cuBLAS, chosen per weight shape.
// QWEN_NATIVE_GEMV=gemv|cublas forces one path; by default (auto) each shape is timed once, during the first
// one-row step, as CUDA graphs of back-to-back launches (as they will run in the decode graph), the faster kept.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>

#include "cuda/memory.cuh"

namespace qwen {
namespace cuda {

class GemvTuner {
 public:
  enum class Mode { Auto, Gemv, Cublas };
  struct Choice {
    bool cublas = false;
    int wpr = 1;  // the GEMV's warps per row
    float gemv_us = 0, cublas_us = 0;
  };
  // Launchers of the two candidates for one shape, writing into `out` (scratch of n floats) instead of the real
  // output.
  using GemvLaunch = std::function<void(void* out, int wpr)>;
  using CublasLaunch = std::function<void(void* out)>;

  GemvTuner(DeviceMemory& mem, int sms);  // the mode from QWEN_NATIVE_GEMV
  ~GemvTuner();
  GemvTuner(const GemvTuner&) = delete;
  GemvTuner& operator=(const GemvTuner&) = delete;

  Mode mode() const { return mode_; }
  // The path of a one-row matmul by an (n, k) weight. In auto mode a new shape is timed when `timing` (the first
  // one-row step); outside it an untimed shape gets the GEMV at its default split.
  Choice choose(int64_t n, int64_t k, bool timing, cudaStream_t stream, const GemvLaunch& gemv,
                const CublasLaunch& cublas);
  // e.g. "timed 1536x1536=gemv/2 (gemv 3.1 us, cublas 4.0 us), ..." or "gemv (forced) ...".
  std::string describe() const;

 private:
  Choice tune(int64_t n, int64_t k, cudaStream_t stream, const GemvLaunch& gemv, const CublasLaunch& cublas);
  float time_us(cudaStream_t stream, int reps, const std::function<void()>& launch);

  DeviceMemory& mem_;
  int sms_;
  Mode mode_;
  std::map<std::pair<int64_t, int64_t>, Choice> choices_;
  Scratch out_;  // where timed launches write
  cudaEvent_t t0_ = nullptr, t1_ = nullptr;
};

}  // namespace cuda
}  // namespace qwen
