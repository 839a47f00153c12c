// Machine measurements the benchmark prints beside our numbers: the roofline (read bandwidth) and the sgemm peak.
#pragma once

#include <cstdint>

#include "tensor.h"

namespace qwen {

// GB/s of a streaming read by `threads` threads over an `nbytes` buffer (far larger than the caches), best of
// `repeats` passes. Each thread reads its own contiguous slice, like the decode GEMVs do.
double measure_read_bandwidth(int64_t nbytes, int threads, int repeats);

// GFLOP/s of the CPU backend's batched matmul (m × k) · (n × k)ᵀ with weights in `format` (F32: sgemm; BF16: the
// bf16 GEMM where the CPU has one, else widened tiles through sgemm), best of `repeats`.
double measure_matmul_gflops(int64_t m, int64_t n, int64_t k, Format format, int threads, int repeats);

}  // namespace qwen
