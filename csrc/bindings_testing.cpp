// The benchmark's machine probes and the tests' direct entries into the CPU backend, kept apart from the Model
// bindings (bindings.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sched.h>

#include <cstring>
#include <optional>
#include <thread>

#include "backend.h"
#include "cpu/kernels.h"
#include "cpu/probes.h"

namespace py = pybind11;

namespace qwen {

namespace {
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

int threads_or_default(int n) {
  if (n) return n;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

Format format_arg(const std::string& dtype) {
  for (Format f : {Format::F32, Format::BF16, Format::Q8, Format::Q4, Format::Q6})
    if (dtype == format_name(f)) return f;
  throw py::value_error("dtype must be float32, bfloat16, int8, int4 or int6");
}

Format quant_format(const std::string& format) {
  const Format f = format_arg(format);
  if (!is_quantized(f)) throw py::value_error("format must be int8, int4 or int6");
  return f;
}
}  // namespace

void add_testing_hooks(py::module_& m) {
  m.def("read_bandwidth", [](int64_t nbytes, int num_threads, int repeats) {
          if (nbytes < (1 << 20)) throw py::value_error("nbytes must be at least 1 MiB");
          if (num_threads < 0 || repeats < 1) throw py::value_error("num_threads must be >= 0 and repeats >= 1");
          py::gil_scoped_release nogil;
          return measure_read_bandwidth(nbytes, threads_or_default(num_threads), repeats);
        }, py::arg("nbytes") = int64_t(1) << 30, py::arg("num_threads") = 0, py::arg("repeats") = 5,
        "GB/s of a multi-threaded streaming read (the decode roofline), best of `repeats`.");
  m.def("sgemm_gflops", [](int64_t m_, int64_t n, int64_t k, int num_threads, int repeats, const std::string& dtype) {
          if (m_ < 1 || n < 1 || k < 1 || m_ * k > (int64_t(1) << 28) || n * k > (int64_t(1) << 28))
            throw py::value_error("m, n, k must be positive and m*k, n*k at most 2**28");
          if (num_threads < 0 || repeats < 1) throw py::value_error("num_threads must be >= 0 and repeats >= 1");
          const Format f = format_arg(dtype);
          py::gil_scoped_release nogil;
          return measure_matmul_gflops(m_, n, k, f, threads_or_default(num_threads), repeats);
        }, py::arg("m"), py::arg("n"), py::arg("k"), py::arg("num_threads") = 0, py::arg("repeats") = 3,
        py::arg("dtype") = "float32",
        "GFLOP/s of the CPU backend's batched matmul (m x k) . (n x k)^T with float32 or bfloat16 weights "
        "(the prefill path), best of `repeats`.");
  m.def("_backend_matmul", [](FloatArray x, FloatArray w, py::object bias, py::object out, const std::string& dtype,
                              int num_threads, bool rows) {
          // For tests: one matmul on a fresh CPU backend, exactly as the model calls it.
          if (x.ndim() != 2 || w.ndim() != 2 || x.shape(1) != w.shape(1) || x.shape(0) < 1 || w.shape(0) < 1)
            throw py::value_error("x (T, k) and w (n, k) must be non-empty 2-D arrays with the same k");
          const int64_t T = x.shape(0), k = x.shape(1), n = w.shape(0);
          auto backend = make_cpu_backend(std::max(1, num_threads));
          Tensor X = backend->alloc(DType::F32, T, k), O = backend->alloc(DType::F32, T, n),
                 B = backend->alloc(DType::F32, 1, n);
          Weight W = backend->alloc_weight(format_arg(dtype), n, k);
          backend->upload(X, 0, x.data(), DType::F32, T * k);
          backend->upload_weight(W, 0, w.data(), DType::F32, n);
          if (!bias.is_none()) {
            auto b = bias.cast<FloatArray>();
            if (b.size() != n) throw py::value_error("bias must have n elements");
            backend->upload(B, 0, b.data(), DType::F32, n);
          }
          const bool accumulate = !out.is_none();
          if (accumulate) {
            auto o = out.cast<FloatArray>();
            if (o.ndim() != 2 || o.shape(0) != T || o.shape(1) != n) throw py::value_error("out must be (T, n)");
            backend->upload(O, 0, o.data(), DType::F32, T * n);
          }
          if (rows) backend->matmul_rows(O, X, W, bias.is_none() ? nullptr : &B, accumulate);
          else backend->matmul(O, X, W, bias.is_none() ? nullptr : &B, accumulate);
          py::array_t<float> result({T, n});
          backend->download(result.mutable_data(), O);
          return result;
        }, py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("out") = py::none(),
        py::arg("dtype") = "float32", py::arg("num_threads") = 1, py::arg("rows") = false,
        "For tests: one matmul on a fresh CPU backend (rows=True: every row as a one-row matmul).");
  m.def("_quantize", [](FloatArray x, const std::string& format) {
          // For tests: rows of x in a quantized format's bytes (tensor.h's layout), as the loader stores them.
          if (x.ndim() != 2 || x.shape(0) < 1 || x.shape(1) < 1) throw py::value_error("x must be a non-empty (n, k) array");
          const Format f = quant_format(format);
          const int64_t n = x.shape(0), k = x.shape(1), row_bytes = quant_block_bytes(f, k);
          py::array_t<uint8_t> out({quant_blocks(n), row_bytes});
          std::memset(out.mutable_data(), 0, size_t(out.size()));
          for (int64_t r = 0; r < n; ++r)
            if (!cpu_kernels().quantize_row(f, x.data() + r * k, k, out.mutable_data() + (r / kQuantRows) * row_bytes,
                                            int(r % kQuantRows)))
              throw py::value_error("a value does not fit the format (NaN, inf, |x| >= 2^125, or too large for a "
                                    "float16 scale)");
          return out;
        }, py::arg("x"), py::arg("format"));
  m.def("_dequantize", [](py::array_t<uint8_t, py::array::c_style | py::array::forcecast> q, const std::string& format,
                          int64_t n, int64_t k) {
          const Format f = quant_format(format);
          const int64_t row_bytes = quant_block_bytes(f, k);
          if (n < 1 || k < 1 || q.size() != quant_blocks(n) * row_bytes) throw py::value_error("q has the wrong size");
          py::array_t<float> out({n, k});
          for (int64_t r = 0; r < n; ++r) {
            const uint8_t* block = q.data() + (r / kQuantRows) * row_bytes;
            const auto dequant = f == Format::Q8   ? cpu_kernels().dequant_q8
                                 : f == Format::Q4 ? cpu_kernels().dequant_q4
                                                   : cpu_kernels().dequant_q6;
            dequant(block, int(r % kQuantRows), k, out.mutable_data() + r * k);
          }
          return out;
        }, py::arg("q"), py::arg("format"), py::arg("n"), py::arg("k"));
  m.def("isa", [] { return std::string(cpu_kernels().isa); }, "The CPU kernel set in use (chosen from CPUID).");
  m.def("quant_dot_rows", [](const std::string& format) { return cpu_kernels().dot_rows(quant_format(format)); },
        py::arg("format"),
        "The longest run of a quantized format the kernel set in use takes on integer dot products (longer: tiles).");
  m.def("cpu_features", [] {
          const CpuFeatures f = detect_cpu_features();
          py::dict d;
          d["model"] = f.model;
          d["avx2"] = f.avx2; d["fma"] = f.fma; d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw;
          d["avx512vl"] = f.avx512vl; d["avx512dq"] = f.avx512dq; d["avx512_bf16"] = f.avx512_bf16;
          d["avx512_vnni"] = f.avx512_vnni; d["avx_vnni"] = f.avx_vnni; d["amx_tile"] = f.amx_tile;
          d["amx_bf16"] = f.amx_bf16; d["amx_int8"] = f.amx_int8;
          return d;
        }, "The CPU's name and the instruction-set features CPUID reports.");
  m.def("select_isa", [](const py::dict& flags, std::optional<std::string> force) {
          // The kernel-set choice for any set of features (tests run it for every kind of CPU).
          CpuFeatures f;
          auto get = [&](const char* key) {
            if (!flags.contains(key)) return false;
            return flags[key].cast<bool>();
          };
          f.avx2 = get("avx2"); f.fma = get("fma"); f.avx512f = get("avx512f"); f.avx512bw = get("avx512bw");
          f.avx512vl = get("avx512vl"); f.avx512dq = get("avx512dq"); f.avx512_bf16 = get("avx512_bf16");
          f.avx512_vnni = get("avx512_vnni"); f.avx_vnni = get("avx_vnni"); f.amx_tile = get("amx_tile");
          f.amx_bf16 = get("amx_bf16"); f.amx_int8 = get("amx_int8");
          return std::string(select_isa(f, force ? force->c_str() : nullptr));
        }, py::arg("features"), py::arg("force") = py::none());
}

}  // namespace qwen
