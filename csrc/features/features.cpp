// fastlm._features: the Python face of the term counter (counting.h) and the TF-IDF weighting.
//
// The documents' UTF-8 is gathered while the GIL is held (PyUnicode_AsUTF8AndSize reads it
// in place for ASCII strings and caches it otherwise); counting and weighting then run with
// the GIL released, on n_threads std::threads. Results go back as numpy arrays that own
// the C++ buffers (no copy).
//
// tfidf: for each stored count c of row i, column j:
//   tf = binary ? 1 : (sublinear ? 1 + ln c : c);  w = tf * idf[j] (when idf is given);
//   then each row is divided by its l2 norm sqrt(sum w^2) or l1 norm sum |w| (norm 2 / 1;
//   rows of norm 0 are left as they are), as scikit-learn's TfidfTransformer does.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <stdexcept>

#include "features/counting.h"

namespace py = pybind11;

namespace fastlm_features {

void register_word2vec(py::module_& m);  // word2vec.cpp

UnicodeTables& tables() {
    static UnicodeTables t;
    return t;
}

namespace {

template <class T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
    auto* owned = new std::vector<T>(std::move(v));
    py::capsule free_when_done(owned, [](void* p) { delete reinterpret_cast<std::vector<T>*>(p); });
    return py::array_t<T>({static_cast<py::ssize_t>(owned->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                          owned->data(), free_when_done);
}

py::tuple csr_to_python(Csr&& csr) {
    return py::make_tuple(to_numpy(std::move(csr.indptr)), to_numpy(std::move(csr.indices)),
                          to_numpy(std::move(csr.counts)));
}

void check_threads(int n_threads) {
    if (n_threads < 1) throw py::value_error("n_threads must be >= 1, got " + std::to_string(n_threads));
}

void check_ngrams(int min_n, int max_n) {
    if (min_n < 1 || max_n < min_n)
        throw py::value_error("invalid n-gram range (" + std::to_string(min_n) + ", " + std::to_string(max_n) + ")");
}

void require_tables() {
    if (!tables().ready) throw std::runtime_error("fastlm._features: Unicode tables were not set");
}

// A sorted-or-not vocabulary: the fitted terms, column j = term j.
struct Vocabulary {
    TermTable table;

    size_t size() const { return table.size(); }

    py::list terms_str() const {
        py::list out(table.size());
        for (size_t i = 0; i < table.size(); ++i) {
            std::string_view t = table.term(i);
            PyObject* s = PyUnicode_DecodeUTF8(t.data(), static_cast<Py_ssize_t>(t.size()), "surrogatepass");
            if (!s) throw py::error_already_set();
            PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), s);
        }
        return out;
    }

    py::list terms_bytes() const {
        py::list out(table.size());
        for (size_t i = 0; i < table.size(); ++i) {
            std::string_view t = table.term(i);
            out[i] = py::bytes(t.data(), t.size());
        }
        return out;
    }

    int64_t find(const py::bytes& key) const {
        std::string_view k = key;
        return table.find(k);
    }

    std::shared_ptr<Vocabulary> subset(py::array_t<int64_t, py::array::c_style | py::array::forcecast> keep) const {
        auto out = std::make_shared<Vocabulary>();
        auto k = keep.unchecked<1>();
        out->table.reserve(static_cast<size_t>(k.shape(0)), 0);
        for (py::ssize_t i = 0; i < k.shape(0); ++i) {
            const int64_t id = k(i);
            if (id < 0 || static_cast<size_t>(id) >= table.size()) throw py::index_error("term index out of range");
            out->table.insert(table.term(id), table.hash_of(id));
        }
        if (out->table.size() != static_cast<size_t>(k.shape(0))) throw py::value_error("repeated term index");
        return out;
    }

    static std::shared_ptr<Vocabulary> from_terms(const py::list& terms) {
        auto out = std::make_shared<Vocabulary>();
        out->table.reserve(terms.size(), 0);
        for (const py::handle& item : terms) {
            std::string_view k;
            std::string owned;
            if (PyBytes_Check(item.ptr())) {
                k = item.cast<std::string_view>();
            } else if (PyUnicode_Check(item.ptr())) {
                py::object b = py::reinterpret_steal<py::object>(
                    PyUnicode_AsEncodedString(item.ptr(), "utf-8", "surrogatepass"));
                if (!b) throw py::error_already_set();
                owned = b.cast<std::string>();
                k = owned;
            } else {
                throw py::type_error("vocabulary terms must be str or bytes");
            }
            const size_t before = out->table.size();
            out->table.insert(k);
            if (out->table.size() == before) throw py::value_error("duplicate term in vocabulary: " + std::string(k));
        }
        return out;
    }
};

// The documents' UTF-8, borrowed from the str objects (or from bytes kept alive here).
struct DocBatch {
    std::vector<DocText> docs;
    std::vector<py::object> keep_alive;
};

DocBatch gather_docs(const py::list& texts, bool lowercase, const py::object& prelowered) {
    DocBatch batch;
    const size_t n = texts.size();
    batch.docs.reserve(n);
    std::string_view flags;
    if (!prelowered.is_none()) {
        flags = prelowered.cast<std::string_view>();
        if (flags.size() != n) throw py::value_error("prelowered flags do not match the documents");
    }
    for (size_t i = 0; i < n; ++i) {
        PyObject* o = PyList_GET_ITEM(texts.ptr(), static_cast<Py_ssize_t>(i));
        if (!PyUnicode_Check(o)) throw py::type_error("document " + std::to_string(i) + " is not a str");
        Py_ssize_t size = 0;
        const char* data = PyUnicode_AsUTF8AndSize(o, &size);
        if (!data) {  // lone surrogates: keep them as their 3-byte forms (never word characters)
            PyErr_Clear();
            py::object b = py::reinterpret_steal<py::object>(PyUnicode_AsEncodedString(o, "utf-8", "surrogatepass"));
            if (!b) throw py::error_already_set();
            data = PyBytes_AS_STRING(b.ptr());
            size = PyBytes_GET_SIZE(b.ptr());
            batch.keep_alive.push_back(std::move(b));
        }
        if (size >= (Py_ssize_t{1} << 31))
            throw py::value_error("document " + std::to_string(i) + " is 2 GiB or longer: split it into smaller documents");
        const bool lower = lowercase && !(flags.size() && flags[i]);
        batch.docs.push_back(DocText{data, static_cast<size_t>(size), lower});
    }
    return batch;
}

struct FlatSequences {
    std::vector<char> ids;
    std::vector<uint64_t> offsets{0};
};

FlatSequences gather_sequences(const py::list& seqs) {
    FlatSequences f;
    for (size_t d = 0; d < seqs.size(); ++d) {
        py::handle s = seqs[d];
        if (!PySequence_Check(s.ptr())) throw py::type_error("token sequence " + std::to_string(d) + " is not a sequence");
        py::sequence seq = py::reinterpret_borrow<py::sequence>(s);
        const size_t len = seq.size();
        for (size_t k = 0; k < len; ++k) {
            py::object v = seq[k];
            PyObject* idx = PyNumber_Index(v.ptr());
            if (!idx) {
                PyErr_Clear();
                throw py::type_error("token ids must be integers (sequence " + std::to_string(d) + ")");
            }
            const long long x = PyLong_AsLongLong(idx);
            Py_DECREF(idx);
            if (x == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                throw py::value_error("token id out of range (sequence " + std::to_string(d) + ")");
            }
            if (x < 0 || x > 0xFFFFFFFFll)
                throw py::value_error("token id " + std::to_string(x) + " out of range [0, 2**32)");
            const uint32_t u = static_cast<uint32_t>(x);
            const char be[4] = {static_cast<char>(u >> 24), static_cast<char>(u >> 16), static_cast<char>(u >> 8),
                                static_cast<char>(u)};
            f.ids.insert(f.ids.end(), be, be + 4);
        }
        f.offsets.push_back(f.ids.size() / 4);
    }
    return f;
}

struct FlatTerms {
    std::vector<char> arena;
    std::vector<uint64_t> term_offsets{0};
    std::vector<uint64_t> doc_offsets{0};
};

FlatTerms gather_terms(const py::list& term_lists) {
    FlatTerms f;
    for (size_t d = 0; d < term_lists.size(); ++d) {
        py::handle lst = term_lists[d];
        if (!PyList_Check(lst.ptr())) throw py::type_error("analyzer output " + std::to_string(d) + " is not a list");
        const Py_ssize_t n = PyList_GET_SIZE(lst.ptr());
        for (Py_ssize_t k = 0; k < n; ++k) {
            PyObject* o = PyList_GET_ITEM(lst.ptr(), k);
            if (!PyUnicode_Check(o)) throw py::type_error("analyzer returned a non-str term for document " + std::to_string(d));
            Py_ssize_t size = 0;
            const char* data = PyUnicode_AsUTF8AndSize(o, &size);
            py::object b;
            if (!data) {
                PyErr_Clear();
                b = py::reinterpret_steal<py::object>(PyUnicode_AsEncodedString(o, "utf-8", "surrogatepass"));
                if (!b) throw py::error_already_set();
                data = PyBytes_AS_STRING(b.ptr());
                size = PyBytes_GET_SIZE(b.ptr());
            }
            f.arena.insert(f.arena.end(), data, data + size);
            f.term_offsets.push_back(f.arena.size());
        }
        f.doc_offsets.push_back(f.term_offsets.size() - 1);
    }
    return f;
}

template <class Gen>
py::tuple fit_impl(const Gen& gen, int n_threads) {
    auto vocab = std::make_shared<Vocabulary>();
    Csr csr;
    {
        py::gil_scoped_release nogil;
        csr = fit_counts(gen, n_threads, vocab->table);
    }
    if (vocab->size() >= (size_t{1} << 31)) throw py::value_error("more than 2**31 - 1 distinct terms");
    return py::make_tuple(vocab, to_numpy(std::move(csr.indptr)), to_numpy(std::move(csr.indices)),
                          to_numpy(std::move(csr.counts)));
}

template <class Gen>
py::tuple transform_impl(const Gen& gen, const Vocabulary& vocab, int n_threads) {
    Csr csr;
    {
        py::gil_scoped_release nogil;
        csr = transform_counts(gen, n_threads, vocab.table);
    }
    return csr_to_python(std::move(csr));
}

void set_unicode_tables(const py::bytes& word_bitmap, const std::vector<uint32_t>& lower_from,
                        const std::vector<std::vector<uint32_t>>& lower_to) {
    std::string_view bits = word_bitmap;
    if (bits.size() != 0x110000 / 8) throw py::value_error("word bitmap must have 0x110000 bits");
    if (lower_from.size() != lower_to.size()) throw py::value_error("lowercase tables differ in length");
    UnicodeTables t;
    t.word.assign(0x110000 / 64, 0);
    std::memcpy(t.word.data(), bits.data(), bits.size());  // little-endian bit order, as numpy packbits(bitorder="little")
    t.lower_page.assign(0x110000 >> 8, -1);
    for (size_t i = 0; i < lower_from.size(); ++i) {
        const uint32_t cp = lower_from[i];
        if (cp >= 0x110000 || lower_to[i].empty()) throw py::value_error("bad lowercase mapping");
        int32_t& page = t.lower_page[cp >> 8];
        if (page < 0) {
            page = static_cast<int32_t>(t.lower_map.size() / 256);
            const uint32_t base = cp & ~255u;
            for (uint32_t k = 0; k < 256; ++k) t.lower_map.push_back(base + k);
        }
        uint32_t& slot = t.lower_map[static_cast<size_t>(page) * 256 + (cp & 255)];
        if (lower_to[i].size() == 1) {
            slot = lower_to[i][0];
        } else {
            slot = kMulti | static_cast<uint32_t>(t.lower_multi.size());
            t.lower_multi.push_back(lower_to[i]);
        }
    }
    for (uint32_t c = 0; c < 128; ++c) {
        t.ascii_word[c] = is_word(t, c);
        uint32_t l = c;
        const int32_t page = t.lower_page[0];
        if (page >= 0) {
            const uint32_t m = t.lower_map[static_cast<size_t>(page) * 256 + c];
            if (!(m & kMulti) && m < 128) l = m;
        }
        t.ascii_lower[c] = static_cast<uint8_t>(l);
    }
    t.ready = true;
    tables() = std::move(t);
}

py::array_t<double> tfidf(py::array_t<int64_t, py::array::c_style | py::array::forcecast> indptr_a,
                          py::array_t<int32_t, py::array::c_style | py::array::forcecast> indices_a,
                          py::array_t<int32_t, py::array::c_style | py::array::forcecast> counts_a,
                          py::object idf_o, bool binary, bool sublinear, int norm, int n_threads) {
    check_threads(n_threads);
    if (norm < 0 || norm > 2) throw py::value_error("norm must be 0 (none), 1 (l1) or 2 (l2)");
    const int64_t n_rows = indptr_a.size() - 1;
    if (n_rows < 0) throw py::value_error("indptr is empty");
    const int64_t nnz = indices_a.size();
    if (counts_a.size() != nnz) throw py::value_error("indices and counts differ in length");
    const int64_t* indptr = indptr_a.data();
    if (indptr[0] != 0 || indptr[n_rows] != nnz) throw py::value_error("indptr does not match the entries");
    const int32_t* indices = indices_a.data();
    const int32_t* counts = counts_a.data();
    py::array_t<double, py::array::c_style | py::array::forcecast> idf_a;
    const double* idf = nullptr;
    int64_t n_idf = 0;
    if (!idf_o.is_none()) {
        idf_a = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(idf_o);
        if (!idf_a) throw py::type_error("idf must be a float array");
        idf = idf_a.data();
        n_idf = idf_a.size();
    }
    std::vector<double> out(static_cast<size_t>(nnz));
    {
        py::gil_scoped_release nogil;
        const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_rows)));
        std::atomic<bool> bad_index{false};
        run_parallel(parts, [&](int t) {
            const int64_t r0 = n_rows * t / parts, r1 = n_rows * (t + 1) / parts;
            for (int64_t r = r0; r < r1; ++r) {
                double acc = 0.0;
                for (int64_t k = indptr[r]; k < indptr[r + 1]; ++k) {
                    const double c = static_cast<double>(counts[k]);
                    double w = binary ? 1.0 : (sublinear ? std::log(c) + 1.0 : c);
                    if (idf) {
                        const int32_t j = indices[k];
                        if (j < 0 || j >= n_idf) {
                            bad_index = true;
                            continue;
                        }
                        w *= idf[j];
                    }
                    out[k] = w;
                    acc += norm == 2 ? w * w : std::fabs(w);
                }
                if (norm != 0 && acc != 0.0) {
                    const double s = norm == 2 ? std::sqrt(acc) : acc;
                    for (int64_t k = indptr[r]; k < indptr[r + 1]; ++k) out[k] /= s;
                }
            }
        });
        if (bad_index) out.clear();
    }
    if (static_cast<int64_t>(out.size()) != nnz) throw py::value_error("column index out of range of idf");
    return to_numpy(std::move(out));
}

}  // namespace

}  // namespace fastlm_features

PYBIND11_MODULE(_features, m) {
    using namespace fastlm_features;
    m.doc() = "fastlm's multi-threaded term counter and TF-IDF weighting (used by fastlm.features)";

    py::class_<Vocabulary, std::shared_ptr<Vocabulary>>(m, "Vocabulary")
        .def("__len__", &Vocabulary::size)
        .def("terms", &Vocabulary::terms_str, "the terms as str, in column order")
        .def("terms_bytes", &Vocabulary::terms_bytes, "the terms as bytes, in column order")
        .def("find", &Vocabulary::find, py::arg("term"), "column of a term (bytes), or -1")
        .def("subset", &Vocabulary::subset, py::arg("keep"), "a vocabulary of the terms at the given columns")
        .def_static("from_terms", &Vocabulary::from_terms, py::arg("terms"),
                    "a vocabulary of the given terms (str as UTF-8, or bytes), column j = terms[j]");

    m.def("set_unicode_tables", &set_unicode_tables, py::arg("word_bitmap"), py::arg("lower_from"),
          py::arg("lower_to"));
    m.def("tables_ready", [] { return tables().ready; });

    m.def(
        "fit_words",
        [](const py::list& texts, bool lowercase, const py::object& prelowered, int min_n, int max_n, int n_threads) {
            require_tables();
            check_ngrams(min_n, max_n);
            check_threads(n_threads);
            DocBatch batch = gather_docs(texts, lowercase, prelowered);
            WordDocs gen{&batch.docs, min_n, max_n};
            return fit_impl(gen, n_threads);
        },
        py::arg("texts"), py::arg("lowercase"), py::arg("prelowered"), py::arg("min_n"), py::arg("max_n"),
        py::arg("n_threads"));
    m.def(
        "transform_words",
        [](const Vocabulary& vocab, const py::list& texts, bool lowercase, const py::object& prelowered, int min_n,
           int max_n, int n_threads) {
            require_tables();
            check_ngrams(min_n, max_n);
            check_threads(n_threads);
            DocBatch batch = gather_docs(texts, lowercase, prelowered);
            WordDocs gen{&batch.docs, min_n, max_n};
            return transform_impl(gen, vocab, n_threads);
        },
        py::arg("vocab"), py::arg("texts"), py::arg("lowercase"), py::arg("prelowered"), py::arg("min_n"),
        py::arg("max_n"), py::arg("n_threads"));
    m.def(
        "word_tokens",
        [](const std::string& text, bool lowercase) {
            require_tables();
            std::vector<DocText> docs{DocText{text.data(), text.size(), lowercase}};
            WordDocs::Scratch sc;
            WordDocs::tokenize(docs[0], sc);
            py::list out;
            for (size_t i = 0; i + 1 < sc.starts.size(); ++i) {
                const uint32_t a = sc.starts[i], b = sc.starts[i + 1] - 1;
                out.append(py::reinterpret_steal<py::object>(
                    PyUnicode_DecodeUTF8(sc.buf.data() + a, b - a, "surrogatepass")));
            }
            return out;
        },
        py::arg("text_utf8"), py::arg("lowercase"), "the word tokens of one UTF-8 text (for tests)");
    m.def(
        "fit_sequences",
        [](const py::list& seqs, int min_n, int max_n, int n_threads) {
            check_ngrams(min_n, max_n);
            check_threads(n_threads);
            FlatSequences f = gather_sequences(seqs);
            SequenceDocs gen{&f.ids, &f.offsets, min_n, max_n};
            return fit_impl(gen, n_threads);
        },
        py::arg("sequences"), py::arg("min_n"), py::arg("max_n"), py::arg("n_threads"));
    m.def(
        "transform_sequences",
        [](const Vocabulary& vocab, const py::list& seqs, int min_n, int max_n, int n_threads) {
            check_ngrams(min_n, max_n);
            check_threads(n_threads);
            FlatSequences f = gather_sequences(seqs);
            SequenceDocs gen{&f.ids, &f.offsets, min_n, max_n};
            return transform_impl(gen, vocab, n_threads);
        },
        py::arg("vocab"), py::arg("sequences"), py::arg("min_n"), py::arg("max_n"), py::arg("n_threads"));
    m.def(
        "fit_terms",
        [](const py::list& term_lists, int n_threads) {
            check_threads(n_threads);
            FlatTerms f = gather_terms(term_lists);
            TermDocs gen{&f.arena, &f.term_offsets, &f.doc_offsets};
            return fit_impl(gen, n_threads);
        },
        py::arg("term_lists"), py::arg("n_threads"));
    m.def(
        "transform_terms",
        [](const Vocabulary& vocab, const py::list& term_lists, int n_threads) {
            check_threads(n_threads);
            FlatTerms f = gather_terms(term_lists);
            TermDocs gen{&f.arena, &f.term_offsets, &f.doc_offsets};
            return transform_impl(gen, vocab, n_threads);
        },
        py::arg("vocab"), py::arg("term_lists"), py::arg("n_threads"));
    m.def("tfidf", &tfidf, py::arg("indptr"), py::arg("indices"), py::arg("counts"), py::arg("idf"),
          py::arg("binary"), py::arg("sublinear"), py::arg("norm"), py::arg("n_threads"));
    register_word2vec(m);
}
