// Machine measurements the benchmark prints beside our numbers: the roofline (read bandwidth) and the sgemm peak.
#pragma once

#include <cstdint>

namespace qwen {

// GB/s of a streaming read by `threads` threads over an `nbytes` buffer (far larger than the caches), best of
// `repeats` passes. Each thread reads its own contiguous slice, like the decode GEMVs do.
double measure_read_bandwidth(int64_t nbytes, int threads, int repeats);

// GFLOP/s of the CPU backend's batched matmul (m × k) · (n × k)ᵀ in float32, best of `repeats`.
double measure_sgemm_gflops(int64_t m, int64_t n, int64_t k, int threads, int repeats);

}  // namespace qwen
