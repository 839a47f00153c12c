#include "cuda/graph.cuh"

#include <cctype>
#include <cstdlib>

namespace qwen {
namespace cuda {

namespace {

bool env_flag(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  std::string s(v);
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  if (s == "0" || s == "false" || s == "off" || s == "no") return false;
  if (s == "1" || s == "true" || s == "on" || s == "yes") return true;
  throw std::invalid_argument(std::string(name) + "=" + v + ": expected 0 or 1");
}

std::string error_text(const char* call, cudaError_t e) {
  return std::string(call) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

}  // namespace

GraphExec capture_graph(cudaStream_t stream, const std::function<void()>& record, std::string* why) {
  cudaError_t e = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
  if (e != cudaSuccess) {
    cudaGetLastError();
    *why = error_text("cudaStreamBeginCapture", e);
    return nullptr;
  }
  // Ends the capture (the stream is usable again) and drops what it recorded.
  auto abandon = [&] {
    cudaGraph_t partial = nullptr;
    cudaStreamEndCapture(stream, &partial);
    if (partial) cudaGraphDestroy(partial);
    cudaGetLastError();
  };
  try {
    record();
  } catch (const CudaError& err) {
    abandon();
    *why = err.what();
    return nullptr;
  } catch (...) {
    abandon();
    throw;
  }
  cudaGraph_t graph = nullptr;
  e = cudaStreamEndCapture(stream, &graph);
  if (e != cudaSuccess || !graph) {
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();
    *why = error_text("cudaStreamEndCapture", e);
    return nullptr;
  }
  cudaGraphExec_t exec = nullptr;
  e = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (e != cudaSuccess) {
    cudaGetLastError();
    *why = error_text("cudaGraphInstantiate", e);
    return nullptr;
  }
  return GraphExec(exec);
}

DecodeGraph::DecodeGraph() : enabled_(env_flag("QWEN_NATIVE_CUDA_GRAPH", true)) {}

void DecodeGraph::run(cudaStream_t stream, const std::function<void()>& step) {
  if (!enabled_) {
    step();
    return;
  }
  if (!exec_) {
    std::string why;
    capturing_ = true;
    try {
      exec_ = capture_graph(stream, step, &why);
    } catch (...) {
      capturing_ = false;
      throw;
    }
    capturing_ = false;
    if (!exec_) {
      // Eager from now on rather than failing every later step; this step has not run yet.
      enabled_ = false;
      failure_ = why;
      step();
      return;
    }
  }
  QWEN_CUDA_CHECK(cudaGraphLaunch(exec_.get(), stream));
}

std::string DecodeGraph::describe() const {
  if (!failure_.empty()) return "CUDA graph off (capture failed: " + failure_ + ")";
  return enabled_ ? "CUDA graph on" : "CUDA graph off";
}

}  // namespace cuda
}  // namespace qwen
