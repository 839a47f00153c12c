// A CPU-only build: asking for the GPU explains how to get it.
#include <stdexcept>

#include "backend.h"

namespace qwen {

bool cuda_available() { return false; }

std::unique_ptr<Backend> make_cuda_backend(int) {
  throw std::runtime_error(
      "this qwen_native build has no CUDA backend: reinstall with nvcc and cuBLAS available, e.g. "
      "pip install nvidia-cublas && pip install . --config-settings=cmake.define.QWEN_NATIVE_CUDA=ON");
}

}  // namespace qwen
