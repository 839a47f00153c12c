# CUDA backend: filled in by the CUDA backend work (issue 5).
message(STATUS "qwen-native: CUDA backend not built (CPU-only)")
target_sources(_core PRIVATE csrc/no_cuda.cpp)
