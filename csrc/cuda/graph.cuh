// CUDA graphs: recording work into an executable graph with every failure cleaned up, and the one-row step of the
// forward pass recorded once and replayed.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <type_traits>

#include "cuda/common.cuh"

namespace qwen {
namespace cuda {

struct GraphExecDeleter {
  void operator()(cudaGraphExec_t e) const { cudaGraphExecDestroy(e); }
};
using GraphExec = std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, GraphExecDeleter>;

// Records what `record` queues on `stream` into an executable graph. When CUDA refuses (beginning or ending the
// capture, a CudaError thrown inside, instantiation) the capture is ended, the partial graph dropped and the error
// cleared, and it returns null with the reason in *why. Anything else thrown inside (an interruption) propagates
// after the same clean-up. Nothing queued during a capture has run.
GraphExec capture_graph(cudaStream_t stream, const std::function<void()>& record, std::string* why);

// The one-row step, recorded at its first run() and replayed at every later one. When the recording fails, this
// step and all later ones run eagerly and describe() says why. QWEN_NATIVE_CUDA_GRAPH=0 turns graphs off.
class DecodeGraph {
 public:
  DecodeGraph();
  void run(cudaStream_t stream, const std::function<void()>& step);
  // A buffer the recorded step uses has moved: the next run() records again.
  void invalidate() { exec_.reset(); }
  bool capturing() const { return capturing_; }
  // "CUDA graph on", "CUDA graph off" or "CUDA graph off (capture failed: <why>)".
  std::string describe() const;

 private:
  bool enabled_;
  bool capturing_ = false;
  std::string failure_;
  GraphExec exec_;
};

}  // namespace cuda
}  // namespace qwen
