// Word2Vec training (skip-gram and CBOW with negative sampling) for fastlm.features.Word2Vec.
//
// The algorithm is word2vec.c's, which gensim also follows:
//   - the corpus is one int32 array of vocabulary ids, cut into sentences by end offsets;
//     each of n_threads std::threads trains on its own run of sentences (split by word count)
//     for every epoch, and all threads update the shared matrices without locks (Hogwild).
//   - a word w is kept in a pass with probability keep[w] (frequent-word subsampling, drawn
//     per occurrence); the window around each kept word is reduced to window - b, b drawn
//     uniformly from [0, window).
//   - skip-gram: for each context word c of the centre word w, the input vector syn0[c] is
//     trained to predict w against `negative` noise words drawn from the unigram^0.75 table;
//     CBOW: the mean (or sum) of the context vectors predicts w, and its gradient goes to
//     every context vector.
//   - one prediction: f = <h, syn1neg[t]>, g = (label - sigmoid(f)) * alpha, the hidden
//     gradient accumulates g * syn1neg[t] and syn1neg[t] += g * h (one fused pass).
//   - alpha falls linearly from alpha0 to min_alpha with the fraction of all words (every
//     epoch, before subsampling) the threads have passed; a thread refreshes it every
//     10,000 words from a shared atomic count.
// The loop itself is in word2vec_kernel.h, compiled twice on x86-64: for the baseline ISA
// (plain loops the compiler vectorises) and for AVX2 + FMA (intrinsics); the AVX2 one runs
// when the CPU reports both (the extension is built without -march).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace fastlm_features {

namespace {

constexpr int kExpTableSize = 1024;
constexpr float kMaxExp = 6.0f;
constexpr int64_t kAlphaRefresh = 10000;

struct W2VArgs {
    const int32_t* corpus;
    const int64_t* sent_ends;  // end offset of each sentence in corpus, ascending
    int64_t n_sent;
    int64_t n_words;
    float* syn0;
    float* syn1neg;
    const float* keep;  // per word probability of keeping an occurrence
    const int32_t* table;
    int64_t table_size;
    int64_t vocab;
    int dim;
    bool sg;
    bool cbow_mean;
    int window;
    int negative;
    int epochs;
    float alpha0;
    float min_alpha;
    uint64_t seed;
    const float* exp_table;  // sigmoid on [-kMaxExp, kMaxExp] in kExpTableSize steps
    std::atomic<int64_t>* words_done;
};

#if defined(__GNUC__)
#define W2V_INLINE inline __attribute__((always_inline))
#else
#define W2V_INLINE inline
#endif

}  // namespace

namespace w2v_baseline {
#define W2V_AVX2 0
#include "features/word2vec_kernel.h"
#undef W2V_AVX2
}  // namespace w2v_baseline

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define W2V_HAVE_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace w2v_avx2 {
#define W2V_AVX2 1
#include "features/word2vec_kernel.h"
#undef W2V_AVX2
}  // namespace w2v_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace {

#if W2V_HAVE_AVX2
bool cpu_has_avx2_fma() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

using ThreadFn = void (*)(const W2VArgs&, int64_t, int64_t, int);

// The best kernel the CPU runs, or the baseline one when `isa` is "baseline".
ThreadFn pick_thread_fn(const std::string& isa, std::string* name) {
#if W2V_HAVE_AVX2
    if (isa != "baseline" && cpu_has_avx2_fma()) {
        if (name) *name = "avx2";
        return &w2v_avx2::train_thread;
    }
#endif
    if (name) *name = "baseline";
    return &w2v_baseline::train_thread;
}

template <class T>
T* checked(py::array& arr, const char* what, int64_t size, bool writable) {
    if (!py::isinstance<py::array_t<T>>(arr) || !py::dtype::of<T>().is(arr.dtype()))
        throw py::type_error(std::string(what) + ": wrong dtype");
    if (!(arr.flags() & py::array::c_style)) throw py::value_error(std::string(what) + " must be C-contiguous");
    if (size >= 0 && arr.size() != size)
        throw py::value_error(std::string(what) + " has " + std::to_string(arr.size()) + " elements, expected " +
                              std::to_string(size));
    if (writable) {
        if (!arr.writeable()) throw py::value_error(std::string(what) + " must be writeable");
        return static_cast<T*>(arr.mutable_data());
    }
    return const_cast<T*>(static_cast<const T*>(arr.data()));
}

int64_t train(py::array corpus, py::array sent_ends, py::array syn0, py::array syn1neg, py::array keep,
              py::array table, bool sg, bool cbow_mean, int window, int negative, int epochs, double alpha,
              double min_alpha, uint64_t seed, int n_threads, const std::string& isa) {
    if (syn0.ndim() != 2) throw py::value_error("syn0 must be 2-D (vocabulary, dim)");
    const int64_t vocab = syn0.shape(0), dim = syn0.shape(1);
    if (vocab < 1 || dim < 1 || dim > (1 << 20)) throw py::value_error("syn0 has an invalid shape");
    if (window < 1 || negative < 1 || epochs < 1 || n_threads < 1)
        throw py::value_error("window, negative, epochs and n_threads must be >= 1");
    if (!(alpha > 0) || !(min_alpha >= 0)) throw py::value_error("alpha must be > 0 and min_alpha >= 0");
    W2VArgs a{};
    a.corpus = checked<int32_t>(corpus, "corpus", -1, false);
    a.n_words = corpus.size();
    a.sent_ends = checked<int64_t>(sent_ends, "sent_ends", -1, false);
    a.n_sent = sent_ends.size();
    a.syn0 = checked<float>(syn0, "syn0", vocab * dim, true);
    a.syn1neg = checked<float>(syn1neg, "syn1neg", vocab * dim, true);
    a.keep = checked<float>(keep, "keep", vocab, false);
    a.table = checked<int32_t>(table, "table", -1, false);
    a.table_size = table.size();
    if (a.table_size < 1) throw py::value_error("the noise table is empty");
    // Every index the threads will follow is checked here, once, before any training.
    int64_t prev = 0;
    for (int64_t s = 0; s < a.n_sent; ++s) {
        if (a.sent_ends[s] < prev || a.sent_ends[s] > a.n_words)
            throw py::value_error("sent_ends must be ascending offsets within the corpus");
        prev = a.sent_ends[s];
    }
    if (a.n_sent && prev != a.n_words) throw py::value_error("the last sentence must end at the corpus end");
    for (int64_t i = 0; i < a.n_words; ++i)
        if (a.corpus[i] < 0 || a.corpus[i] >= vocab) throw py::value_error("corpus holds an id outside the vocabulary");
    for (int64_t i = 0; i < a.table_size; ++i)
        if (a.table[i] < 0 || a.table[i] >= vocab) throw py::value_error("the noise table holds an id outside the vocabulary");
    a.vocab = vocab;
    a.dim = static_cast<int>(dim);
    a.sg = sg;
    a.cbow_mean = cbow_mean;
    a.window = window;
    a.negative = negative;
    a.epochs = epochs;
    a.alpha0 = static_cast<float>(alpha);
    a.min_alpha = static_cast<float>(min_alpha);
    a.seed = seed;
    std::vector<float> exp_table(kExpTableSize);
    for (int i = 0; i < kExpTableSize; ++i) {
        const double x = (i / static_cast<double>(kExpTableSize) * 2 - 1) * kMaxExp;
        exp_table[i] = static_cast<float>(1.0 / (1.0 + std::exp(-x)));
    }
    a.exp_table = exp_table.data();
    std::atomic<int64_t> done{0};
    a.words_done = &done;
    if (a.n_words == 0 || a.n_sent == 0) return 0;

    // Thread t takes the sentences that start in [t, t + 1) * n_words / n_threads.
    const int n = static_cast<int>(std::min<int64_t>(n_threads, a.n_sent));
    std::vector<int64_t> bounds(n + 1, a.n_sent);
    bounds[0] = 0;
    for (int t = 1; t < n; ++t) {
        const int64_t target = a.n_words * t / n;
        bounds[t] = std::upper_bound(a.sent_ends, a.sent_ends + a.n_sent, target) - a.sent_ends;
    }
    ThreadFn fn = pick_thread_fn(isa, nullptr);
    {
        py::gil_scoped_release release;
        std::vector<std::thread> threads;
        try {
            for (int t = 1; t < n; ++t) threads.emplace_back(fn, std::cref(a), bounds[t], bounds[t + 1], t);
        } catch (...) {  // no thread could be started: join those that were, then report it
            for (auto& th : threads) th.join();
            throw;
        }
        fn(a, bounds[0], bounds[1], 0);
        for (auto& th : threads) th.join();
    }
    return done.load();
}

}  // namespace

void register_word2vec(py::module_& m) {
    m.def("word2vec_train", &train, py::arg("corpus"), py::arg("sent_ends"), py::arg("syn0"), py::arg("syn1neg"),
          py::arg("keep"), py::arg("table"), py::arg("sg"), py::arg("cbow_mean"), py::arg("window"),
          py::arg("negative"), py::arg("epochs"), py::arg("alpha"), py::arg("min_alpha"), py::arg("seed"),
          py::arg("n_threads"), py::arg("isa") = "",
          "Train syn0 and syn1neg in place (skip-gram or CBOW, negative sampling); returns the words passed");
    m.def(
        "word2vec_isa",
        [](const std::string& isa) {
            std::string name;
            pick_thread_fn(isa, &name);
            return name;
        },
        py::arg("isa") = "", "the kernel word2vec_train runs with this isa argument: avx2 or baseline");
}

}  // namespace fastlm_features
