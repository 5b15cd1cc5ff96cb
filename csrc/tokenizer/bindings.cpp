// Python bindings of the tokenizer core (fastlm._tokenizer). No torch headers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tokenizer/core.h"

namespace py = pybind11;
using namespace fastlm_tok;

namespace {

// Texts longer than this are encoded with the GIL released.
constexpr Py_ssize_t kReleaseGil = 4096;

struct Text {
  const uint8_t* p = nullptr;
  size_t n = 0;
};

// UTF-8 view of a str (cached inside the str object) or of a bytes object. A str holding
// lone surrogates raises UnicodeEncodeError (the Python layer replaces them, as tiktoken does).
Text text_of(py::handle obj) {
  Text t;
  if (PyUnicode_Check(obj.ptr())) {
    Py_ssize_t n = 0;
    const char* p = PyUnicode_AsUTF8AndSize(obj.ptr(), &n);
    if (!p) throw py::error_already_set();
    t.p = reinterpret_cast<const uint8_t*>(p);
    t.n = size_t(n);
  } else if (PyBytes_Check(obj.ptr())) {
    char* p = nullptr;
    Py_ssize_t n = 0;
    if (PyBytes_AsStringAndSize(obj.ptr(), &p, &n) != 0) throw py::error_already_set();
    t.p = reinterpret_cast<const uint8_t*>(p);
    t.n = size_t(n);
  } else {
    throw py::type_error(std::string("expected str or bytes, got ") + Py_TYPE(obj.ptr())->tp_name);
  }
  return t;
}

int64_t id_value(PyObject* o, size_t i) {
  if (!PyLong_Check(o)) {
    throw py::type_error("token ids must be integers; item " + std::to_string(i) + " is " + Py_TYPE(o)->tp_name);
  }
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow || v < 0 || v > 0xFFFFFFFFLL) return -1;
  return v;
}

void ids_of(py::handle obj, std::vector<uint32_t>& ids) {
  PyObject* o = obj.ptr();
  auto bad = [](size_t i, long long v) {
    throw py::value_error("token id " + std::to_string(v) + " at position " + std::to_string(i) + " is out of range");
  };
  if (PyList_Check(o) || PyTuple_Check(o)) {
    const bool is_list = PyList_Check(o);
    const Py_ssize_t n = is_list ? PyList_GET_SIZE(o) : PyTuple_GET_SIZE(o);
    ids.resize(size_t(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* it = is_list ? PyList_GET_ITEM(o, i) : PyTuple_GET_ITEM(o, i);
      int64_t v = id_value(it, size_t(i));
      if (v < 0) bad(size_t(i), PyLong_AsLongLong(it));
      ids[size_t(i)] = uint32_t(v);
    }
    return;
  }
  if (PyObject_CheckBuffer(o)) {
    py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request();
    if (info.ndim != 1) throw py::value_error("token ids must be a one-dimensional array");
    const std::string f = info.format;
    const char kind = f.empty() ? '?' : f.back();
    const bool is_signed = kind == 'b' || kind == 'h' || kind == 'i' || kind == 'l' || kind == 'q';
    const bool is_unsigned = kind == 'B' || kind == 'H' || kind == 'I' || kind == 'L' || kind == 'Q';
    if (!is_signed && !is_unsigned) throw py::type_error("token ids must be an integer array, got format '" + f + "'");
    ids.resize(size_t(info.shape[0]));
    const char* base = static_cast<const char*>(info.ptr);
    for (py::ssize_t i = 0; i < info.shape[0]; ++i) {
      const char* q = base + i * info.strides[0];
      long long v = 0;
      unsigned long long u = 0;
      switch (info.itemsize) {
        case 1: v = is_signed ? *reinterpret_cast<const int8_t*>(q) : *reinterpret_cast<const uint8_t*>(q); break;
        case 2: v = is_signed ? *reinterpret_cast<const int16_t*>(q) : *reinterpret_cast<const uint16_t*>(q); break;
        case 4: v = is_signed ? *reinterpret_cast<const int32_t*>(q) : *reinterpret_cast<const uint32_t*>(q); break;
        case 8:
          if (is_signed) {
            v = *reinterpret_cast<const int64_t*>(q);
          } else {
            u = *reinterpret_cast<const uint64_t*>(q);
            v = u > 0xFFFFFFFFULL ? -1 : (long long)u;
          }
          break;
        default: throw py::type_error("unsupported integer size");
      }
      if (v < 0 || v > 0xFFFFFFFFLL) bad(size_t(i), v);
      ids[size_t(i)] = uint32_t(v);
    }
    return;
  }
  py::list l = py::list(py::reinterpret_borrow<py::iterable>(obj));
  ids_of(l, ids);
}

class PyTokenizer {
 public:
  PyTokenizer(const std::vector<py::bytes>& token_bytes, const std::vector<std::pair<uint32_t, uint32_t>>& merges,
              bool rank_by_id, const std::vector<std::pair<std::string, uint32_t>>& specials, int pattern) {
    if (pattern != 0 && pattern != 1) throw py::value_error("unknown pattern");
    std::vector<std::string> toks;
    toks.reserve(token_bytes.size());
    for (auto& b : token_bytes) toks.emplace_back(std::string(b));
    bpe_ = std::make_unique<BPE>(std::move(toks), merges, rank_by_id, specials, Pattern(pattern));
    ints_.reserve(bpe_->n_vocab());
    for (size_t i = 0; i < bpe_->n_vocab(); ++i) ints_.push_back(PyLong_FromSize_t(i));
  }
  ~PyTokenizer() {
    if (Py_IsInitialized())
      for (PyObject* o : ints_) Py_XDECREF(o);
  }

  py::list to_list(const std::vector<uint32_t>& v) const {
    PyObject* l = PyList_New(Py_ssize_t(v.size()));
    if (!l) throw py::error_already_set();
    for (size_t i = 0; i < v.size(); ++i) {
      PyObject* o = ints_[v[i]];
      Py_INCREF(o);
      PyList_SET_ITEM(l, Py_ssize_t(i), o);
    }
    return py::reinterpret_steal<py::list>(l);
  }

  void run_encode(Text t, const std::vector<int>& allowed, const std::vector<int>& disallowed,
                  std::vector<uint32_t>& out) const {
    check_specials(allowed);
    check_specials(disallowed);
    if (t.n >= size_t(kReleaseGil)) {
      py::gil_scoped_release nogil;
      bpe_->encode(t.p, t.n, allowed, disallowed, out);
    } else {
      bpe_->encode(t.p, t.n, allowed, disallowed, out);
    }
  }

  py::list encode(py::handle text, const std::vector<int>& allowed, const std::vector<int>& disallowed) const {
    std::vector<uint32_t> out;
    run_encode(text_of(text), allowed, disallowed, out);
    return to_list(out);
  }

  // Little-endian uint32 ids as bytes (numpy.frombuffer-ready).
  py::bytes encode_to_bytes(py::handle text, const std::vector<int>& allowed, const std::vector<int>& disallowed) const {
    std::vector<uint32_t> out;
    run_encode(text_of(text), allowed, disallowed, out);
    return py::bytes(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(uint32_t));
  }

  py::list encode_batch(const py::list& texts, const std::vector<int>& allowed, const std::vector<int>& disallowed,
                        int num_threads) const {
    check_specials(allowed);
    check_specials(disallowed);
    const size_t k = texts.size();
    std::vector<Text> ts(k);
    for (size_t i = 0; i < k; ++i) ts[i] = text_of(texts[i]);
    std::vector<std::vector<uint32_t>> outs(k);
    std::string err;
    bool disallowed_hit = false;
    {
      py::gil_scoped_release nogil;
      int nt = 1;
#ifdef _OPENMP
      nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#endif
      nt = std::max(1, std::min<int>(nt, int(k)));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
      for (int64_t i = 0; i < int64_t(k); ++i) {
        try {
          bpe_->encode(ts[i].p, ts[i].n, allowed, disallowed, outs[i]);
        } catch (const DisallowedSpecial& e) {
#pragma omp critical
          {
            disallowed_hit = true;
            err = e.what();
          }
        } catch (const std::exception& e) {
#pragma omp critical
          err = e.what();
        }
      }
    }
    if (disallowed_hit) throw DisallowedSpecial(err);
    if (!err.empty()) throw std::runtime_error(err);
    py::list res(k);
    for (size_t i = 0; i < k; ++i) res[i] = to_list(outs[i]);
    return res;
  }

  py::bytes decode_bytes(py::handle ids_obj) const {
    std::vector<uint32_t> ids;
    ids_of(ids_obj, ids);
    std::string out;
    int64_t bad;
    if (ids.size() >= 16384) {
      py::gil_scoped_release nogil;
      bad = bpe_->decode_append(ids.data(), ids.size(), out);
    } else {
      bad = bpe_->decode_append(ids.data(), ids.size(), out);
    }
    if (bad >= 0)
      throw py::value_error("token id " + std::to_string(ids[size_t(bad)]) + " at position " + std::to_string(bad) +
                            " is not in the vocabulary (n_vocab " + std::to_string(bpe_->n_vocab()) + ")");
    return py::bytes(out);
  }

  py::object token_bytes(int64_t id) const {
    if (id < 0 || uint64_t(id) >= bpe_->n_vocab() || !bpe_->is_token(uint32_t(id)))
      throw py::value_error("token id " + std::to_string(id) + " is not in the vocabulary");
    std::string_view t = bpe_->token(uint32_t(id));
    return py::bytes(t.data(), t.size());
  }

  py::list pretokenize(py::handle text) const {
    Text t = text_of(text);
    std::vector<std::pair<size_t, size_t>> spans;
    bpe_->pretokenize(t.p, t.n, spans);
    py::list res(spans.size());
    for (size_t i = 0; i < spans.size(); ++i)
      res[i] = py::bytes(reinterpret_cast<const char*>(t.p) + spans[i].first, spans[i].second - spans[i].first);
    return res;
  }

  std::vector<std::tuple<uint32_t, uint32_t, uint32_t>> merges() const {
    std::vector<std::tuple<uint32_t, uint32_t, uint32_t>> r;
    r.reserve(bpe_->merges().size());
    for (auto& m : bpe_->merges()) r.emplace_back(m.a, m.b, m.id);
    return r;
  }

  size_t n_vocab() const { return bpe_->n_vocab(); }

 private:
  void check_specials(const std::vector<int>& ks) const {
    for (int k : ks)
      if (k < 0 || size_t(k) >= bpe_->specials().size()) throw py::value_error("bad special-token index");
  }
  std::unique_ptr<BPE> bpe_;
  std::vector<PyObject*> ints_;
};

class PyTrainer {
 public:
  PyTrainer(int pattern, std::vector<std::string> specials) : t_(Pattern(pattern), std::move(specials)) {
    if (pattern != 0 && pattern != 1) throw py::value_error("unknown pattern");
  }
  void add(const py::list& texts, int num_threads) {
    std::vector<std::string_view> views;
    views.reserve(texts.size());
    for (auto h : texts) {
      Text t = text_of(h);
      views.emplace_back(reinterpret_cast<const char*>(t.p), t.n);
    }
    py::gil_scoped_release nogil;
    t_.add(views, num_threads);
  }
  std::vector<std::tuple<uint32_t, uint32_t, uint32_t>> train(size_t n_tokens) const {
    std::vector<Merge> ms;
    {
      py::gil_scoped_release nogil;
      ms = t_.train(n_tokens);
    }
    std::vector<std::tuple<uint32_t, uint32_t, uint32_t>> r;
    for (auto& m : ms) r.emplace_back(m.a, m.b, m.id);
    return r;
  }
  size_t n_words() const { return t_.n_words(); }
  uint64_t final_tokens() const { return t_.final_tokens(); }

 private:
  Trainer t_;
};

}  // namespace

PYBIND11_MODULE(_tokenizer, m) {
  m.doc() = "fastlm byte-level BPE tokenizer core (C++)";
  static py::exception<DisallowedSpecial> disallowed_exc(m, "DisallowedSpecialError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const DisallowedSpecial& e) {
      const std::string t = e.what();
      py::set_error(disallowed_exc,
                    ("Encountered text corresponding to disallowed special token '" + t +
                     "'.\nIf you want this text to be encoded as a special token, pass it to `allowed_special`, "
                     "e.g. `allowed_special={'" + t + "', ...}`.\nIf you want this text to be encoded as normal "
                     "text, disable the check for this token by passing `disallowed_special=(enc.special_tokens_set "
                     "- {'" + t + "'})`.\nTo disable this check for all special tokens, pass `disallowed_special=()`.")
                        .c_str());
    }
  });
  py::class_<PyTokenizer>(m, "Core")
      .def(py::init<const std::vector<py::bytes>&, const std::vector<std::pair<uint32_t, uint32_t>>&, bool,
                    const std::vector<std::pair<std::string, uint32_t>>&, int>(),
           py::arg("token_bytes"), py::arg("merges"), py::arg("rank_by_id"), py::arg("specials"), py::arg("pattern"))
      .def("encode", &PyTokenizer::encode, py::arg("text"), py::arg("allowed"), py::arg("disallowed"))
      .def("encode_to_bytes", &PyTokenizer::encode_to_bytes, py::arg("text"), py::arg("allowed"),
           py::arg("disallowed"))
      .def("encode_batch", &PyTokenizer::encode_batch, py::arg("texts"), py::arg("allowed"), py::arg("disallowed"),
           py::arg("num_threads"))
      .def("decode_bytes", &PyTokenizer::decode_bytes, py::arg("ids"))
      .def("token_bytes", &PyTokenizer::token_bytes, py::arg("id"))
      .def("pretokenize", &PyTokenizer::pretokenize, py::arg("text"))
      .def("merges", &PyTokenizer::merges)
      .def_property_readonly("n_vocab", &PyTokenizer::n_vocab);
  py::class_<PyTrainer>(m, "Trainer")
      .def(py::init<int, std::vector<std::string>>(), py::arg("pattern"), py::arg("specials"))
      .def("add", &PyTrainer::add, py::arg("texts"), py::arg("num_threads"))
      .def("train", &PyTrainer::train, py::arg("n_tokens"))
      .def_property_readonly("n_words", &PyTrainer::n_words)
      .def_property_readonly("final_tokens", &PyTrainer::final_tokens);
  m.def("max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
}
