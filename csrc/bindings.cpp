// pybind11 module `qwen_native._core`: the Model class. The bindings convert (a resolved config dict, token ids to
// int32 without wrapping) and leave the checks to the core: C++ exceptions become Python ones (invalid_argument →
// ValueError, out_of_range → IndexError, bad_alloc → MemoryError, the rest → RuntimeError). The GIL is released
// while the model computes; between layers the computation briefly takes it back to look for Ctrl-C and for
// interrupt() from another thread. The benchmark and test hooks are in bindings_testing.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <map>
#include <mutex>
#include <thread>

#include <sched.h>

#include "kv_cache.h"
#include "qwen2.h"

namespace py = pybind11;
using namespace qwen;

namespace qwen {
void add_testing_hooks(py::module_& m);  // bindings_testing.cpp
}

namespace {

// Thrown between layers when interrupt() was called: the pass is abandoned, the cache lengths stay as they were.
struct Interrupted : std::exception {
  const char* what() const noexcept override { return "the forward pass was interrupted"; }
};

int default_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

std::string type_name(const py::handle& v) { return std::string(py::str(py::type::handle_of(v).attr("__name__"))); }

py::object field(const py::dict& d, const char* key) {
  if (!d.contains(key) || d[key].is_none())
    throw py::value_error(std::string("config is missing \"") + key +
                          "\" (pass a resolved config: qwen_native.config.Qwen2Config.to_core_dict())");
  return d[key];
}

int64_t get_int(const py::dict& d, const char* key) {
  py::object v = field(d, key);
  if (!py::isinstance<py::int_>(v) || py::isinstance<py::bool_>(v))
    throw py::type_error(std::string("config \"") + key + "\" must be an integer, got " + type_name(v));
  try {
    return v.cast<int64_t>();
  } catch (const py::cast_error&) {
    throw py::value_error(std::string("config \"") + key + "\" is out of range");
  }
}

double get_float(const py::dict& d, const char* key) {
  py::object v = field(d, key);
  if (py::isinstance<py::bool_>(v) || !(py::isinstance<py::int_>(v) || py::isinstance<py::float_>(v)))
    throw py::type_error(std::string("config \"") + key + "\" must be a number, got " + type_name(v));
  const double x = PyFloat_AsDouble(v.ptr());  // an int beyond the double range sets OverflowError
  if (x == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string("config \"") + key + "\" is out of range");
  }
  return x;
}

bool get_bool(const py::dict& d, const char* key) {
  py::object v = field(d, key);
  if (!py::isinstance<py::bool_>(v)) throw py::type_error(std::string("config \"") + key + "\" must be true or false");
  return v.cast<bool>();
}

// Every field is required: defaults are the Python layer's business (config.py), so they live in one place.
Qwen2Config config_from_dict(const py::dict& d) {
  Qwen2Config c;
  c.vocab_size = get_int(d, "vocab_size");
  c.hidden_size = get_int(d, "hidden_size");
  c.intermediate_size = get_int(d, "intermediate_size");
  c.num_hidden_layers = get_int(d, "num_hidden_layers");
  c.num_attention_heads = get_int(d, "num_attention_heads");
  c.num_key_value_heads = get_int(d, "num_key_value_heads");
  c.head_dim = get_int(d, "head_dim");
  c.max_position_embeddings = get_int(d, "max_position_embeddings");
  c.rope_theta = get_float(d, "rope_theta");
  c.rms_norm_eps = get_float(d, "rms_norm_eps");
  c.tie_word_embeddings = get_bool(d, "tie_word_embeddings");
  c.validate();
  return c;
}

Format parse_format(const std::string& s) {
  for (Format f : {Format::F32, Format::BF16, Format::Q8, Format::Q4, Format::Q6})
    if (s == format_name(f)) return f;
  throw py::value_error("weight format must be \"float32\", \"bfloat16\", \"int8\", \"int4\" or \"int6\", got \"" + s +
                        "\"");
}

[[noreturn]] void outside_vocab(const std::string& id, int64_t vocab) {
  throw py::index_error("token id " + id + " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
}

// A 1-D sequence of integers as int32, converted while still wide so that 2**32 + 5 cannot wrap to 5. `vocab` > 0:
// these are token ids (out of int32 range is outside the vocabulary; the core checks the rest); else `what` names
// them in errors.
std::vector<int32_t> int32_values(const py::handle& obj, const char* what, int64_t vocab) {
  py::array arr = py::module_::import("numpy").attr("asarray")(obj);
  if (arr.ndim() != 1) throw py::value_error(std::string(what) + " must be a 1-D sequence of ints");
  if (arr.size() == 0) throw py::value_error(std::string(what) + " must not be empty");
  const char kind = arr.dtype().kind();
  std::vector<int32_t> out(size_t(arr.size()));
  auto fits = [&](const py::handle& v, const std::string& text) -> int32_t {
    long long x = PyLong_AsLongLong(v.ptr());
    if (x == -1 && PyErr_Occurred()) { PyErr_Clear(); x = INT64_MIN; }  // beyond int64: out of range too
    if (x < INT32_MIN || x > INT32_MAX) {
      if (vocab > 0) outside_vocab(text, vocab);
      throw py::index_error(std::string(what) + " value " + text + " is out of range");
    }
    return int32_t(x);
  };
  if (kind == 'O') {  // Python ints too large for int64, or mixed objects: one by one
    for (size_t i = 0; i < out.size(); ++i) {
      py::object v = arr.attr("__getitem__")(i);
      if (py::isinstance<py::bool_>(v) || (!py::isinstance<py::int_>(v) && !py::hasattr(v, "__index__")))
        throw py::type_error(std::string(what) + " must be integers, got " + type_name(v));
      py::int_ iv = py::reinterpret_steal<py::int_>(PyNumber_Index(v.ptr()));
      if (!iv) throw py::error_already_set();
      out[i] = fits(iv, std::string(py::str(v)));
    }
    return out;
  }
  if (kind != 'i' && kind != 'u')
    throw py::type_error(std::string(what) + " must be integers, got an array of dtype " + std::string(py::str(arr.dtype())));
  if (kind == 'u') {  // uint64 above 2**63 would wrap negative in the cast: compare in the original type
    py::object mx = arr.attr("max")();
    if (mx.cast<uint64_t>() > uint64_t(INT32_MAX)) fits(py::int_(int64_t(1) << 40), std::string(py::str(mx)));
  }
  auto wide = arr.attr("astype")("int64").cast<py::array_t<int64_t, py::array::c_style | py::array::forcecast>>();
  const int64_t* p = wide.data();
  for (size_t i = 0; i < out.size(); ++i) {
    if (p[i] < INT32_MIN || p[i] > INT32_MAX) fits(py::int_(p[i]), std::to_string(p[i]));
    out[i] = int32_t(p[i]);
  }
  return out;
}

int32_t one_token(const py::handle& obj, int64_t vocab) {
  if (py::isinstance<py::bool_>(obj) || (!py::isinstance<py::int_>(obj) && !py::hasattr(obj, "__index__")))
    throw py::type_error("token ids must be ints, got " + type_name(obj));
  py::int_ v = py::reinterpret_steal<py::int_>(PyNumber_Index(obj.ptr()));
  if (!v) throw py::error_already_set();
  long long id = PyLong_AsLongLong(v.ptr());
  if (id == -1 && PyErr_Occurred()) { PyErr_Clear(); id = -1; }
  if (id < 0 || id > INT32_MAX) outside_vocab(std::string(py::str(obj)), vocab);
  return int32_t(id);
}

using TensorTuple = std::tuple<std::string, std::string, std::string, std::vector<int64_t>, int64_t, int64_t>;

class PyModel {
 public:
  PyModel(const py::dict& config, const std::vector<TensorTuple>& tensors, const std::string& dtype,
          const std::string& device, int64_t max_context, int num_threads, int64_t num_slots,
          const std::map<std::string, std::string>& weight_formats) {
    Qwen2Config cfg = config_from_dict(config);
    WeightFormats formats;
    if (dtype != "float32" && dtype != "bfloat16" && dtype != "int8" && dtype != "int4")
      throw py::value_error("dtype must be \"float32\", \"bfloat16\", \"int8\" or \"int4\", got \"" + dtype + "\"");
    formats.matrices = parse_format(dtype);
    for (const auto& [name, f] : weight_formats) formats.overrides[name] = parse_format(f);
    if (num_threads < 0) throw py::value_error("num_threads must be >= 0 (0 = the cores this process may use)");
    if (max_context < 0) throw py::value_error("max_context must be >= 0 (0 = min(max_position_embeddings, 4096))");
    if (num_slots < 1) throw py::value_error("num_slots must be >= 1");
    threads_ = num_threads ? num_threads : default_threads();
    const CacheShape shape{num_slots, max_context ? max_context : std::min<int64_t>(cfg.max_position_embeddings, 4096)};
    std::vector<TensorSource> sources;
    sources.reserve(tensors.size());
    for (const auto& [name, path, dt, tshape, offset, nbytes] : tensors)
      sources.push_back(TensorSource{name, path, dt, tshape, offset, nbytes});
    device_ = device;
    dtype_ = dtype;
    py::gil_scoped_release nogil;
    if (device == "cpu") {
      backend_ = make_cpu_backend(threads_);
    } else if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
      int index = 0;
      if (device.size() > 5) {
        try { index = std::stoi(device.substr(5)); } catch (...) { throw std::invalid_argument("bad device \"" + device + "\""); }
      }
      if (dtype == "float32")  // bf16 activations: int8 and int4 weights are fine, float32 ones are not kept
        throw std::invalid_argument("device \"cuda\" runs in bfloat16, int8 or int4; pass one of those as dtype (or leave dtype unset)");
      backend_ = make_cuda_backend(index);
    } else {
      throw std::invalid_argument("device must be \"cpu\" or \"cuda\", got \"" + device + "\"");
    }
    model_ = std::make_unique<Qwen2Model>(cfg, sources, *backend_, formats, shape);
    cache_ = std::make_unique<KVCache>(*backend_, cfg, shape);
    model_->interrupt_check = [this] {
      if (interrupt_.exchange(false)) throw Interrupted();
      py::gil_scoped_acquire gil;
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    };
  }

  // The general pass: rows (slot, id, position); logits (or argmax ids) of `logit_rows` (default: the last row
  // of each slot's run).
  py::object forward(const py::handle& slots_obj, const py::handle& ids_obj, const py::handle& positions_obj,
                     const py::object& logit_rows_obj, bool argmax) {
    Guard g(this);
    const int64_t V = model_->config().vocab_size;
    std::vector<int32_t> ids = int32_values(ids_obj, "token ids", V);
    std::vector<int32_t> slots = int32_values(slots_obj, "slots", 0);
    std::vector<int32_t> positions = int32_values(positions_obj, "positions", 0);
    if (slots.size() != ids.size() || positions.size() != ids.size())
      throw py::value_error("slots, token ids and positions must have the same length");
    const Rows rows{ids.data(), slots.data(), positions.data(), int64_t(ids.size())};
    std::vector<int64_t> wanted;
    if (logit_rows_obj.is_none()) {
      for (int64_t t = 0; t < rows.T; ++t)
        if (t + 1 == rows.T || slots[size_t(t + 1)] != slots[size_t(t)]) wanted.push_back(t);
    } else if (py::len(logit_rows_obj) > 0) {  // none at all is fine: a pass that only fills the cache
      for (int32_t r : int32_values(logit_rows_obj, "logit_rows", 0)) wanted.push_back(r);
    }
    const int64_t n = int64_t(wanted.size());
    if (argmax) {
      py::array_t<int32_t> out(n);
      int32_t* dst = out.mutable_data();
      py::gil_scoped_release nogil;
      model_->forward(*cache_, rows, wanted, nullptr, dst);
      return std::move(out);
    }
    py::array_t<float> out({n, V});
    float* dst = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      model_->forward(*cache_, rows, wanted, dst, nullptr);
    }
    return std::move(out);
  }

  // One sequence (slot `slot`): `ids` after its cached positions.
  py::array_t<float> prefill(const py::handle& ids_obj, bool all_logits, int64_t slot) {
    Guard g(this);
    const int64_t V = model_->config().vocab_size;
    std::vector<int32_t> ids = int32_values(ids_obj, "token ids", V);
    const int64_t T = int64_t(ids.size());
    const int64_t start = cache_->length(slot);
    const std::vector<int32_t> slots(static_cast<size_t>(T), static_cast<int32_t>(slot));
    std::vector<int32_t> positions(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) positions[size_t(t)] = int32_t(std::min<int64_t>(start + t, INT32_MAX));
    std::vector<int64_t> wanted;
    for (int64_t t = all_logits ? 0 : T - 1; t < T; ++t) wanted.push_back(t);
    py::array_t<float> out = all_logits ? py::array_t<float>({T, V}) : py::array_t<float>({V});
    float* dst = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      model_->forward(*cache_, Rows{ids.data(), slots.data(), positions.data(), T}, wanted, dst, nullptr);
    }
    return out;
  }

  py::array_t<float> decode(const py::handle& id_obj, int64_t slot) {
    Guard g(this);
    int32_t id = one_token(id_obj, model_->config().vocab_size);
    const int32_t s = int32_t(slot), pos = int32_t(std::min<int64_t>(cache_->length(slot), INT32_MAX));
    py::array_t<float> out(model_->config().vocab_size);
    float* dst = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      model_->forward(*cache_, Rows{&id, &s, &pos, 1}, {0}, dst, nullptr);
    }
    return out;
  }

  int32_t decode_argmax(const py::handle& id_obj, int64_t slot) {
    Guard g(this);
    int32_t id = one_token(id_obj, model_->config().vocab_size);
    const int32_t s = int32_t(slot), pos = int32_t(std::min<int64_t>(cache_->length(slot), INT32_MAX));
    int32_t next = -1;
    py::gil_scoped_release nogil;
    model_->forward(*cache_, Rows{&id, &s, &pos, 1}, {0}, nullptr, &next);
    return next;
  }

  void truncate(int64_t n, int64_t slot) {
    Guard g(this);
    cache_->truncate(slot, n);
  }
  void reset(const py::object& slot) {
    Guard g(this);
    if (slot.is_none()) cache_->reset_all();
    else cache_->reset(slot.cast<int64_t>());
  }
  void populate_cache() {
    Guard g(this);
    py::gil_scoped_release nogil;
    cache_->populate(*backend_);
  }
  void close() {
    Guard g(this);
    cache_.reset();
    model_.reset();
    backend_.reset();
    closed_ = true;
  }
  // Makes the pass running in another thread (or the next one) stop at its next layer with Interrupted.
  void interrupt() { interrupt_ = true; }

  int64_t length() { Guard g(this); return cache_->length(0); }
  std::vector<int64_t> lengths() {
    Guard g(this);
    std::vector<int64_t> out;
    for (int64_t s = 0; s < cache_->num_slots(); ++s) out.push_back(cache_->length(s));
    return out;
  }
  int64_t num_slots() { Guard g(this); return cache_->num_slots(); }
  int64_t max_context() { Guard g(this); return cache_->max_positions(); }
  int64_t vocab_size() { Guard g(this); return model_->config().vocab_size; }
  std::string backend_name() { Guard g(this); return backend_->name(); }
  std::string weight_format() { Guard g(this); return model_->weight_format(); }
  int64_t decode_bytes() { Guard g(this); return model_->decode_bytes(); }
  int64_t weight_bytes() { Guard g(this); return model_->weight_bytes(); }
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

  std::mutex mu_;
  // Destroyed in reverse order: the cache and the model hold views into the backend's memory.
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Qwen2Model> model_;
  std::unique_ptr<KVCache> cache_;
  std::atomic<bool> closed_{false}, interrupt_{false};
  std::string dtype_, device_;
  int threads_ = 1;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Native Qwen2 forward pass (internal; use qwen_native.load / qwen_native.generate)";
  py::register_exception<Interrupted>(m, "Interrupted", PyExc_RuntimeError);
  py::class_<PyModel>(m, "Model", R"doc(
A loaded Qwen2 model with a KV cache of `num_slots` sequences.

Model(config, tensors, dtype="float32", device="cpu", max_context=0, num_threads=0, num_slots=1, weight_formats={})

config: a resolved config (qwen_native.config.Qwen2Config.to_core_dict()). tensors: (name, path, dtype, shape,
offset, nbytes) per checkpoint tensor. dtype: the format of every matrix ("float32" or "bfloat16") unless
weight_formats names the checkpoint tensor. max_context: positions per slot (0: min(max_position_embeddings,
4096)). num_threads: 0 = the cores this process may use. Not thread-safe: one thread at a time per object (a
concurrent call raises RuntimeError), except interrupt() and closed.
)doc")
      .def(py::init<const py::dict&, const std::vector<TensorTuple>&, const std::string&, const std::string&, int64_t,
                    int, int64_t, const std::map<std::string, std::string>&>(),
           py::arg("config"), py::arg("tensors"), py::arg("dtype") = "float32", py::arg("device") = "cpu",
           py::arg("max_context") = 0, py::arg("num_threads") = 0, py::arg("num_slots") = 1,
           py::arg("weight_formats") = std::map<std::string, std::string>{})
      .def("forward", &PyModel::forward, py::arg("slots"), py::arg("token_ids"), py::arg("positions"),
           py::arg("logit_rows") = py::none(), py::arg("argmax") = false,
           "Run rows (slot, token id, position) — each slot's rows consecutive, continuing its cached positions — "
           "and return the logits (n, vocab) of `logit_rows` (default: the last row of each slot's run), or with "
           "argmax=True their argmax ids (n,).")
      .def("prefill", &PyModel::prefill, py::arg("token_ids"), py::arg("all_logits") = false, py::arg("slot") = 0,
           "Run token ids of one slot after its cached ones; return the last position's logits (vocab,) or with "
           "all_logits every position's (T, vocab).")
      .def("decode", &PyModel::decode, py::arg("token_id"), py::arg("slot") = 0,
           "Run one token of a slot; return the next-token logits (vocab,).")
      .def("decode_argmax", &PyModel::decode_argmax, py::arg("token_id"), py::arg("slot") = 0,
           "Run one token of a slot; return the argmax of the next-token logits (computed on the device).")
      .def("truncate", &PyModel::truncate, py::arg("length"), py::arg("slot") = 0,
           "Keep the first `length` cached positions of a slot.")
      .def("reset", &PyModel::reset, py::arg("slot") = py::none(), "Empty one slot of the KV cache (None: all).")
      .def("populate_cache", &PyModel::populate_cache,
           "Make the whole KV cache resident now instead of at each slot's first use (a server, at startup); what "
           "it holds stays.")
      .def("close", &PyModel::close, "Free the weights and cache now; the object is unusable afterwards.")
      .def("interrupt", &PyModel::interrupt,
           "Stop the pass running in another thread at its next layer (it raises Interrupted; the cache is unchanged). "
           "Thread-safe.")
      .def_property_readonly("length", &PyModel::length, "Cached positions of slot 0.")
      .def_property_readonly("lengths", &PyModel::lengths, "Cached positions of every slot.")
      .def_property_readonly("num_slots", &PyModel::num_slots)
      .def_property_readonly("max_context", &PyModel::max_context)
      .def_property_readonly("vocab_size", &PyModel::vocab_size)
      .def_property_readonly("backend", &PyModel::backend_name)
      .def_property_readonly("weight_format", &PyModel::weight_format)
      .def_property_readonly("decode_bytes", &PyModel::decode_bytes,
                             "Bytes of weights one decoded token reads, as stored (the decode roofline's numerator).")
      .def_property_readonly("weight_bytes", &PyModel::weight_bytes, "Bytes of every parameter, as stored.")
      .def_property_readonly("dtype", &PyModel::dtype)
      .def_property_readonly("device", &PyModel::device)
      .def_property_readonly("num_threads", &PyModel::num_threads)
      .def_property_readonly("closed", &PyModel::closed);

  py::dict limits;
  for (const ConfigLimit& l : kConfigLimits) limits[l.name] = l.max;
  m.attr("config_limits") = limits;
  m.attr("max_rope_theta") = kMaxRopeTheta;
  m.attr("max_rms_norm_eps") = kMaxRmsNormEps;
  m.def("parameter_shapes", [](const py::dict& config) {
          py::dict out;
          for (auto& [name, shape] : Qwen2Model::parameter_shapes(config_from_dict(config))) out[py::str(name)] = shape;
          return out;
        }, py::arg("config"),
        "{tensor name: shape} of the checkpoint a resolved config describes (lm_head.weight may be absent when tied).");
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
  add_testing_hooks(m);
}
