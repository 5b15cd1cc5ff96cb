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
    if (pattern < 0 || pattern > 2) throw py::value_error("unknown pattern");
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

  // Python lists of the ids. The int objects of the ids are made once (ints_); for long
  // outputs their reference counts are raised in bulk (one add per distinct id, from counts
  // taken without the GIL) and the list slots are then filled without the GIL, in parallel
  // for a batch. A list being filled is reachable from nowhere but here, and its items'
  // references are counted before they are stored, so a garbage collection running
  // meanwhile sees nothing inconsistent.
  static constexpr size_t kBulk = 8192;

  void count_ids(const std::vector<uint32_t>& v, std::vector<uint32_t>& cnt) const {
    for (uint32_t id : v) ++cnt[id];
  }
  void add_refs(const std::vector<uint32_t>& cnt) const {
    for (size_t id = 0; id < cnt.size(); ++id)
      if (cnt[id]) Py_SET_REFCNT(ints_[id], Py_REFCNT(ints_[id]) + Py_ssize_t(cnt[id]));
  }
  void fill(PyObject* l, const std::vector<uint32_t>& v) const {
    PyObject** items = reinterpret_cast<PyListObject*>(l)->ob_item;
    PyObject* const* ints = ints_.data();
    for (size_t i = 0; i < v.size(); ++i) items[i] = ints[v[i]];
  }

  py::list to_list(const std::vector<uint32_t>& v) const {
    PyObject* l = PyList_New(Py_ssize_t(v.size()));
    if (!l) throw py::error_already_set();
    if (v.size() < kBulk) {
      for (size_t i = 0; i < v.size(); ++i) {
        PyObject* o = ints_[v[i]];
        Py_INCREF(o);
        PyList_SET_ITEM(l, Py_ssize_t(i), o);
      }
    } else {
      std::vector<uint32_t> cnt(ints_.size(), 0);
      count_ids(v, cnt);
      add_refs(cnt);
      fill(l, v);
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
      // Longest texts first, so that the threads finish together; one pre-token cache for all.
      std::vector<size_t> order(k);
      size_t total = 0;
      for (size_t i = 0; i < k; ++i) {
        order[i] = i;
        total += ts[i].n;
      }
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ts[a].n > ts[b].n; });
      const std::shared_ptr<SharedPieceCache> cache = bpe_->shared_cache(total);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
      for (int64_t j = 0; j < int64_t(k); ++j) {
        const size_t i = order[size_t(j)];
        try {
          bpe_->encode(ts[i].p, ts[i].n, allowed, disallowed, outs[i], *cache);
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
    int nt = 1;
#ifdef _OPENMP
    nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#endif
    nt = std::max(1, std::min<int>(nt, int(k)));
    // Count the ids (per thread, without the GIL), raise the references, make the lists,
    // then fill them without the GIL.
    std::vector<std::vector<uint32_t>> cnts(static_cast<size_t>(nt));
    {
      py::gil_scoped_release nogil;
#pragma omp parallel num_threads(nt)
      {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        std::vector<uint32_t>& cnt = cnts[size_t(tid)];
        cnt.assign(ints_.size(), 0);
#pragma omp for schedule(dynamic, 4)
        for (int64_t i = 0; i < int64_t(k); ++i) count_ids(outs[size_t(i)], cnt);
      }
      for (size_t t = 1; t < cnts.size(); ++t)
        for (size_t id = 0; id < cnts[0].size(); ++id) cnts[0][id] += cnts[t][id];
    }
    add_refs(cnts[0]);
    py::list res(k);
    std::vector<PyObject*> lists(k);
    for (size_t i = 0; i < k; ++i) {
      PyObject* l = PyList_New(Py_ssize_t(outs[i].size()));
      if (!l) throw py::error_already_set();  // (the raised references then leak; only on out-of-memory)
      lists[i] = l;
      PyList_SET_ITEM(res.ptr(), Py_ssize_t(i), l);
    }
    {
      py::gil_scoped_release nogil;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 4)
      for (int64_t i = 0; i < int64_t(k); ++i) fill(lists[size_t(i)], outs[size_t(i)]);
    }
    return res;
  }

  // Returns the decoded byte length after checking the ids (raises on a bad one).
  size_t checked_size(const std::vector<uint32_t>& ids) const {
    const int64_t total = bpe_->decoded_size(ids.data(), ids.size());
    if (total < 0) {
      const size_t bad = size_t(-1 - total);
      throw py::value_error("token id " + std::to_string(ids[bad]) + " at position " + std::to_string(bad) +
                            " is not in the vocabulary (n_vocab " + std::to_string(bpe_->n_vocab()) + ")");
    }
    return size_t(total);
  }

  py::bytes decode_bytes(py::handle ids_obj) const {
    std::vector<uint32_t> ids;
    ids_of(ids_obj, ids);
    const size_t total = checked_size(ids);
    // 16 spare bytes: decode_into may copy up to 16 bytes past the end of a short token.
    std::string buf(total + 16, '\0');
    bpe_->decode_into(ids.data(), ids.size(), &buf[0]);
    return py::bytes(buf.data(), total);
  }

  py::str decode(py::handle ids_obj, const std::string& errors) const {
    std::vector<uint32_t> ids;
    ids_of(ids_obj, ids);
    const size_t total = checked_size(ids);
    std::string buf(total + 16, '\0');
    bpe_->decode_into(ids.data(), ids.size(), &buf[0]);
    PyObject* s = PyUnicode_DecodeUTF8(buf.data(), Py_ssize_t(total), errors.c_str());
    if (!s) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(s);
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
  void clear_cache() const { bpe_->clear_caches(); }

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
    if (pattern < 0 || pattern > 2) throw py::value_error("unknown pattern");
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
    if (n_tokens > kMaxVocab)
      throw py::value_error("a vocabulary of " + std::to_string(n_tokens) + " tokens is past the limit of " +
                            std::to_string(kMaxVocab) + " ids");
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
      .def("decode", &PyTokenizer::decode, py::arg("ids"), py::arg("errors"))
      .def("token_bytes", &PyTokenizer::token_bytes, py::arg("id"))
      .def("pretokenize", &PyTokenizer::pretokenize, py::arg("text"))
      .def("merges", &PyTokenizer::merges)
      .def("clear_cache", &PyTokenizer::clear_cache)
      .def_property_readonly("n_vocab", &PyTokenizer::n_vocab);
  py::class_<PyTrainer>(m, "Trainer")
      .def(py::init<int, std::vector<std::string>>(), py::arg("pattern"), py::arg("specials"))
      .def("add", &PyTrainer::add, py::arg("texts"), py::arg("num_threads"))
      .def("train", &PyTrainer::train, py::arg("n_tokens"))
      .def_property_readonly("n_words", &PyTrainer::n_words)
      .def_property_readonly("final_tokens", &PyTrainer::final_tokens);
  m.attr("MAX_VOCAB") = py::int_(kMaxVocab);
  m.attr("MAX_TOKEN_BYTES") = py::int_(kMaxTokenBytes);
  m.def("max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
}
