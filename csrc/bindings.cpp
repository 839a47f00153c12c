// pybind11 module `qwen_native._core`: the Model class. Every argument is checked here before native code touches
// memory; C++ exceptions become Python ones (invalid_argument → ValueError, out_of_range → IndexError, bad_alloc →
// MemoryError, the rest → RuntimeError). The GIL is released while the model computes; between layers the
// computation briefly takes it back to look for Ctrl-C.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <mutex>
#include <thread>

#include <sched.h>

#include "cpu/kernels.h"
#include "cpu/probes.h"
#include "qwen2.h"

namespace py = pybind11;
using namespace qwen;

namespace {

int default_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// A key that is absent or null (JSON null) is missing, as in the Python layer.
bool has(const py::dict& d, const char* key) { return d.contains(key) && !d[key].is_none(); }

int64_t get_int(const py::dict& d, const char* key, bool required = true, int64_t fallback = 0) {
  if (!has(d, key)) {
    if (required) throw py::value_error(std::string("config is missing \"") + key + "\"");
    return fallback;
  }
  py::object v = d[key];
  if (!py::isinstance<py::int_>(v) || py::isinstance<py::bool_>(v))
    throw py::type_error(std::string("config \"") + key + "\" must be an integer, got " +
                         std::string(py::str(py::type::handle_of(v).attr("__name__"))));
  try {
    return v.cast<int64_t>();
  } catch (const py::cast_error&) {
    throw py::value_error(std::string("config \"") + key + "\" is out of range");
  }
}

double get_float(const py::dict& d, const char* key, double fallback) {
  if (!has(d, key)) return fallback;
  py::object v = d[key];
  if (py::isinstance<py::bool_>(v) || !(py::isinstance<py::int_>(v) || py::isinstance<py::float_>(v)))
    throw py::type_error(std::string("config \"") + key + "\" must be a number");
  const double x = PyFloat_AsDouble(v.ptr());  // an int beyond the double range sets OverflowError
  if (x == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string("config \"") + key + "\" is out of range");
  }
  return x;
}

Qwen2Config config_from_dict(const py::dict& d) {
  Qwen2Config c;
  c.vocab_size = get_int(d, "vocab_size");
  c.hidden_size = get_int(d, "hidden_size");
  c.intermediate_size = get_int(d, "intermediate_size");
  c.num_hidden_layers = get_int(d, "num_hidden_layers");
  c.num_attention_heads = get_int(d, "num_attention_heads");
  c.num_key_value_heads = get_int(d, "num_key_value_heads", false, c.num_attention_heads);
  if (c.num_attention_heads <= 0) throw py::value_error("config \"num_attention_heads\" must be positive");
  c.head_dim = has(d, "head_dim") ? get_int(d, "head_dim") : c.hidden_size / c.num_attention_heads;
  c.max_position_embeddings = get_int(d, "max_position_embeddings");
  c.rope_theta = get_float(d, "rope_theta", 10000.0);
  c.rms_norm_eps = get_float(d, "rms_norm_eps", 1e-6);
  if (has(d, "tie_word_embeddings")) {
    py::object v = d["tie_word_embeddings"];
    if (!py::isinstance<py::bool_>(v)) throw py::type_error("config \"tie_word_embeddings\" must be true or false");
    c.tie_word_embeddings = v.cast<bool>();
  }
  c.validate();
  return c;
}

int32_t one_token(const py::handle& obj, int64_t vocab);

// Token ids as int32, range-checked while still wide (an id of 2**32 + 5 must not wrap to 5).
std::vector<int32_t> token_ids(const py::handle& obj, int64_t vocab) {
  py::array arr = py::module_::import("numpy").attr("asarray")(obj);
  if (arr.ndim() != 1) throw py::value_error("token ids must be a 1-D sequence of ints");
  if (arr.size() == 0) throw py::value_error("token ids must not be empty");
  const char kind = arr.dtype().kind();
  std::vector<int32_t> ids(size_t(arr.size()));
  if (kind == 'O') {  // Python ints too large for int64, or mixed objects: check one by one
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = one_token(arr.attr("__getitem__")(i), vocab);
    return ids;
  }
  if (kind != 'i' && kind != 'u')
    throw py::type_error("token ids must be integers, got an array of dtype " + std::string(py::str(arr.dtype())));
  if (kind == 'u') {  // uint64 above 2**63 would wrap negative in the cast: compare in the original type
    py::object mx = arr.attr("max")();
    if (mx.cast<uint64_t>() >= uint64_t(vocab))
      throw py::index_error("token id " + std::string(py::str(mx)) + " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  }
  auto wide = arr.attr("astype")("int64").cast<py::array_t<int64_t, py::array::c_style | py::array::forcecast>>();
  const int64_t* p = wide.data();
  for (size_t i = 0; i < ids.size(); ++i) {
    if (p[i] < 0 || p[i] >= vocab)
      throw py::index_error("token id " + std::to_string(p[i]) + " at index " + std::to_string(i) +
                            " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
    ids[i] = int32_t(p[i]);
  }
  return ids;
}

int32_t one_token(const py::handle& obj, int64_t vocab) {
  if (py::isinstance<py::bool_>(obj) || (!py::isinstance<py::int_>(obj) && !py::hasattr(obj, "__index__")))
    throw py::type_error("token ids must be ints, got " + std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  py::int_ v = py::reinterpret_steal<py::int_>(PyNumber_Index(obj.ptr()));
  if (!v) throw py::error_already_set();
  long long id = PyLong_AsLongLong(v.ptr());
  if (id == -1 && PyErr_Occurred()) { PyErr_Clear(); id = -1; }
  if (id < 0 || id >= vocab)
    throw py::index_error("token id " + std::string(py::str(obj)) + " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  return int32_t(id);
}

class PyModel {
 public:
  PyModel(const py::dict& config, const std::vector<std::tuple<std::string, std::string, std::string, std::vector<int64_t>,
                                                             int64_t, int64_t>>& tensors,
          const std::string& dtype, const std::string& device, int64_t max_context, int num_threads) {
    Qwen2Config cfg = config_from_dict(config);
    if (dtype != "float32" && dtype != "bfloat16")
      throw py::value_error("dtype must be \"float32\" or \"bfloat16\", got \"" + dtype + "\"");
    if (num_threads < 0) throw py::value_error("num_threads must be >= 0 (0 = the cores this process may use)");
    if (max_context < 0) throw py::value_error("max_context must be >= 0 (0 = min(max_position_embeddings, 4096))");
    threads_ = num_threads ? num_threads : default_threads();
    const int64_t ctx = max_context ? max_context : std::min<int64_t>(cfg.max_position_embeddings, 4096);
    std::vector<TensorSource> sources;
    sources.reserve(tensors.size());
    for (const auto& [name, path, dt, shape, offset, nbytes] : tensors)
      sources.push_back(TensorSource{name, path, dt, shape, offset, nbytes});
    device_ = device;
    py::gil_scoped_release nogil;
    std::unique_ptr<Backend> backend;
    if (device == "cpu") {
      backend = make_cpu_backend(dtype == "bfloat16" ? DType::BF16 : DType::F32, threads_);
    } else if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
      int index = 0;
      if (device.size() > 5) {
        try { index = std::stoi(device.substr(5)); } catch (...) { throw std::invalid_argument("bad device \"" + device + "\""); }
      }
      if (dtype != "bfloat16") throw std::invalid_argument("device \"cuda\" runs in bfloat16; pass dtype=\"bfloat16\" (or leave dtype unset)");
      backend = make_cuda_backend(index);
    } else {
      throw std::invalid_argument("device must be \"cpu\" or \"cuda\", got \"" + device + "\"");
    }
    dtype_ = dtype;
    model_ = std::make_unique<Qwen2Model>(cfg, sources, std::move(backend), ctx);
    model_->interrupt_check = [] {
      py::gil_scoped_acquire gil;
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    };
  }

  py::array_t<float> prefill(const py::handle& ids_obj, bool all_logits) {
    Guard g(this);
    std::vector<int32_t> ids = token_ids(ids_obj, model_->config().vocab_size);
    const int64_t T = int64_t(ids.size()), V = model_->config().vocab_size;
    check_room(T);
    py::array_t<float> out = all_logits ? py::array_t<float>({T, V}) : py::array_t<float>({V});
    float* dst = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      model_->forward(ids.data(), T, all_logits, dst);
    }
    return out;
  }

  py::array_t<float> decode(const py::handle& id_obj) {
    Guard g(this);
    int32_t id = one_token(id_obj, model_->config().vocab_size);
    check_room(1);
    py::array_t<float> out({model_->config().vocab_size});
    float* dst = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      model_->forward(&id, 1, false, dst);
    }
    return out;
  }

  int32_t decode_argmax(const py::handle& id_obj) {
    Guard g(this);
    int32_t id = one_token(id_obj, model_->config().vocab_size);
    check_room(1);
    py::gil_scoped_release nogil;
    return model_->forward_argmax(id);
  }

  void truncate(int64_t n) {
    Guard g(this);
    model_->truncate(n);
  }
  void reset() {
    Guard g(this);
    model_->reset();
  }
  void close() {
    Guard g(this);
    model_.reset();
    closed_ = true;
  }

  int64_t length() { Guard g(this); return model_->length(); }
  int64_t max_context() { Guard g(this); return model_->max_positions(); }
  int64_t vocab_size() { Guard g(this); return model_->config().vocab_size; }
  std::string backend_name() { Guard g(this); return model_->backend().name(); }
  const std::string& dtype() const { return dtype_; }
  const std::string& device() const { return device_; }
  int num_threads() const { return threads_; }
  bool closed() const { return closed_; }  // no lock: any thread may ask, even while another computes

 private:
  // One model object is one KV cache: it serves one thread at a time. A second thread gets a clear error rather
  // than interleaving its tokens into another conversation's cache.
  struct Guard {
    explicit Guard(PyModel* m) : lock(m->mu_, std::try_to_lock) {
      if (!lock.owns_lock())
        throw std::runtime_error("this qwen_native model is in use by another thread; use one model per thread "
                                 "or serialize calls (qwen_native.Model.generate does)");
      if (!m->model_) throw std::runtime_error("this model has been closed");
    }
    std::unique_lock<std::mutex> lock;
  };

  void check_room(int64_t T) {
    if (T > model_->max_positions() - model_->length())
      throw py::index_error(std::to_string(T) + " more tokens do not fit: the KV cache holds " +
                            std::to_string(model_->length()) + " of max_context = " +
                            std::to_string(model_->max_positions()) + " positions (reset() or truncate() first, "
                            "or load with a larger max_context)");
  }

  std::mutex mu_;
  std::unique_ptr<Qwen2Model> model_;
  std::atomic<bool> closed_{false};
  std::string dtype_, device_;
  int threads_ = 1;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Native Qwen2 forward pass (internal; use qwen_native.load / qwen_native.generate)";
  py::class_<PyModel>(m, "Model", R"doc(
A loaded Qwen2 model with its KV cache.

Model(config, tensors, dtype="float32", device="cpu", max_context=0, num_threads=0)

config: config.json as a dict. tensors: (name, path, dtype, shape, offset, nbytes) per checkpoint tensor.
max_context: KV cache positions (0: min(max_position_embeddings, 4096)). num_threads: 0 = the cores this process
may use. Not thread-safe: one thread at a time per object (a concurrent call raises RuntimeError).
)doc")
      .def(py::init<const py::dict&,
                    const std::vector<std::tuple<std::string, std::string, std::string, std::vector<int64_t>, int64_t, int64_t>>&,
                    const std::string&, const std::string&, int64_t, int>(),
           py::arg("config"), py::arg("tensors"), py::arg("dtype") = "float32", py::arg("device") = "cpu",
           py::arg("max_context") = 0, py::arg("num_threads") = 0)
      .def("prefill", &PyModel::prefill, py::arg("token_ids"), py::arg("all_logits") = false,
           "Run token ids through the model after the cached ones; return the last position's logits (vocab,) or "
           "with all_logits every position's (T, vocab).")
      .def("decode", &PyModel::decode, py::arg("token_id"), "Run one token; return the next-token logits (vocab,).")
      .def("decode_argmax", &PyModel::decode_argmax, py::arg("token_id"),
           "Run one token; return the argmax of the next-token logits (computed on the device).")
      .def("truncate", &PyModel::truncate, py::arg("length"), "Keep the first `length` cached positions.")
      .def("reset", &PyModel::reset, "Empty the KV cache.")
      .def("close", &PyModel::close, "Free the weights and cache now; the object is unusable afterwards.")
      .def_property_readonly("length", &PyModel::length)
      .def_property_readonly("max_context", &PyModel::max_context)
      .def_property_readonly("vocab_size", &PyModel::vocab_size)
      .def_property_readonly("backend", &PyModel::backend_name)
      .def_property_readonly("dtype", &PyModel::dtype)
      .def_property_readonly("device", &PyModel::device)
      .def_property_readonly("num_threads", &PyModel::num_threads)
      .def_property_readonly("closed", &PyModel::closed);

  m.def("read_bandwidth", [](int64_t nbytes, int num_threads, int repeats) {
          if (nbytes < (1 << 20)) throw py::value_error("nbytes must be at least 1 MiB");
          if (num_threads < 0 || repeats < 1) throw py::value_error("num_threads must be >= 0 and repeats >= 1");
          py::gil_scoped_release nogil;
          return measure_read_bandwidth(nbytes, num_threads ? num_threads : default_threads(), repeats);
        }, py::arg("nbytes") = int64_t(1) << 30, py::arg("num_threads") = 0, py::arg("repeats") = 5,
        "GB/s of a multi-threaded streaming read (the decode roofline), best of `repeats`.");
  m.def("sgemm_gflops", [](int64_t m_, int64_t n, int64_t k, int num_threads, int repeats, const std::string& dtype) {
          if (m_ < 1 || n < 1 || k < 1 || m_ * k > (int64_t(1) << 28) || n * k > (int64_t(1) << 28))
            throw py::value_error("m, n, k must be positive and m*k, n*k at most 2**28");
          if (num_threads < 0 || repeats < 1) throw py::value_error("num_threads must be >= 0 and repeats >= 1");
          if (dtype != "float32" && dtype != "bfloat16") throw py::value_error("dtype must be float32 or bfloat16");
          py::gil_scoped_release nogil;
          return measure_matmul_gflops(m_, n, k, dtype == "bfloat16" ? DType::BF16 : DType::F32,
                                       num_threads ? num_threads : default_threads(), repeats);
        }, py::arg("m"), py::arg("n"), py::arg("k"), py::arg("num_threads") = 0, py::arg("repeats") = 3,
        py::arg("dtype") = "float32",
        "GFLOP/s of the CPU backend's batched matmul (m x k) . (n x k)^T with float32 or bfloat16 weights "
        "(the prefill path), best of `repeats`.");
  m.def("_backend_matmul", [](py::array_t<float, py::array::c_style | py::array::forcecast> x,
                              py::array_t<float, py::array::c_style | py::array::forcecast> w, py::object bias,
                              py::object out, const std::string& dtype, int num_threads) {
          // For tests: one matmul on a fresh CPU backend, exactly as the model calls it.
          if (x.ndim() != 2 || w.ndim() != 2 || x.shape(1) != w.shape(1) || x.shape(0) < 1 || w.shape(0) < 1)
            throw py::value_error("x (T, k) and w (n, k) must be non-empty 2-D arrays with the same k");
          const int64_t T = x.shape(0), k = x.shape(1), n = w.shape(0);
          auto backend = make_cpu_backend(dtype == "bfloat16" ? DType::BF16 : DType::F32, std::max(1, num_threads));
          Tensor X = backend->alloc(DType::F32, T, k), W = backend->alloc(backend->weight_dtype(), n, k),
                 O = backend->alloc(DType::F32, T, n), B = backend->alloc(DType::F32, 1, n);
          backend->upload(X, 0, x.data(), DType::F32, T * k);
          backend->upload(W, 0, w.data(), DType::F32, n * k);
          if (!bias.is_none()) {
            auto b = bias.cast<py::array_t<float, py::array::c_style | py::array::forcecast>>();
            if (b.size() != n) throw py::value_error("bias must have n elements");
            backend->upload(B, 0, b.data(), DType::F32, n);
          }
          const bool accumulate = !out.is_none();
          if (accumulate) {
            auto o = out.cast<py::array_t<float, py::array::c_style | py::array::forcecast>>();
            if (o.ndim() != 2 || o.shape(0) != T || o.shape(1) != n) throw py::value_error("out must be (T, n)");
            backend->upload(O, 0, o.data(), DType::F32, T * n);
          }
          backend->matmul(O, X, W, bias.is_none() ? nullptr : &B, accumulate);
          py::array_t<float> result({T, n});
          backend->download(result.mutable_data(), O);
          return result;
        }, py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("out") = py::none(),
        py::arg("dtype") = "float32", py::arg("num_threads") = 1);
  m.def("isa", [] { return std::string(cpu_kernels().isa); }, "The CPU kernel set in use (chosen from CPUID).");
  m.def("parameter_shapes", [](const py::dict& config) {
          py::dict out;
          for (auto& [name, shape] : Qwen2Model::parameter_shapes(config_from_dict(config))) out[py::str(name)] = shape;
          return out;
        }, py::arg("config"),
        "{tensor name: shape} of the checkpoint config.json describes (lm_head.weight may be absent when tied).");
  m.def("cuda_available", &cuda_available, "True when this build has the CUDA backend and a GPU is visible.");
  m.def("build_info", [] {
    py::dict d;
#if defined(QWEN_BLAS_SCIPY)
    d["blas"] = "scipy-openblas32";
#elif defined(QWEN_BLAS_OPENBLAS)
    d["blas"] = "openblas";
#else
    d["blas"] = "builtin";
#endif
#if defined(QWEN_CUDA)
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    return d;
  });
}
