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
// The loops over the vector dimension are plain loops that the compiler vectorises; on x86-64
// the training function is compiled twice, for the baseline ISA and for AVX2 + FMA, and the
// AVX2 one runs when the CPU reports both (the extension is built without -march).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

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

W2V_INLINE float dot(const float* a, const float* b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

// acc += g * w; w += g * h: the hidden gradient and the output vector's update in one pass.
W2V_INLINE void update_output(float* __restrict acc, float* __restrict w, const float* __restrict h, float g, int n) {
#pragma omp simd
    for (int i = 0; i < n; ++i) {
        acc[i] += g * w[i];
        w[i] += g * h[i];
    }
}

W2V_INLINE void axpy(float* __restrict y, const float* __restrict x, float a, int n) {
#pragma omp simd
    for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

W2V_INLINE uint64_t next_random(uint64_t& r) {
    r = r * 25214903917ULL + 11ULL;  // word2vec.c's linear congruential generator
    return r;
}

// uniform in [0, 1) from the generator's high bits (its low bits have short periods)
W2V_INLINE float uniform01(uint64_t& r) {
    return static_cast<float>((next_random(r) >> 24) & 0xFFFFFF) * (1.0f / 16777216.0f);
}

// h predicts `word` (label 1) against `negative` noise words (label 0); the hidden gradient
// is accumulated into acc.
W2V_INLINE void predict(const W2VArgs& a, const float* h, float* acc, int32_t word, float alpha, uint64_t& rnd) {
    const int dim = a.dim;
    for (int d = 0; d <= a.negative; ++d) {
        int32_t target;
        float label;
        if (d == 0) {
            target = word;
            label = 1.0f;
        } else {
            target = a.table[(next_random(rnd) >> 16) % static_cast<uint64_t>(a.table_size)];
            if (target == word) continue;
            label = 0.0f;
        }
        float* w = a.syn1neg + static_cast<int64_t>(target) * dim;
        const float f = dot(h, w, dim);
        float g;
        if (f >= kMaxExp)
            g = (label - 1.0f) * alpha;
        else if (f <= -kMaxExp)
            g = label * alpha;
        else
            g = (label - a.exp_table[static_cast<int>((f + kMaxExp) * (kExpTableSize / kMaxExp / 2))]) * alpha;
        update_output(acc, w, h, g, dim);
    }
}

W2V_INLINE void train_thread_impl(const W2VArgs& a, int64_t s_begin, int64_t s_end, int thread_id) {
    const int dim = a.dim;
    uint64_t rnd = a.seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(thread_id) * 0xBF58476D1CE4E5B9ULL + 1;
    std::vector<int32_t> sen;
    std::vector<float> acc(dim), h(dim);
    const double total = static_cast<double>(a.n_words) * a.epochs;
    int64_t local = 0;  // words passed since the last refresh of alpha
    float alpha = a.alpha0;
    auto refresh = [&]() {
        const int64_t done = a.words_done->fetch_add(local) + local;
        local = 0;
        alpha = a.alpha0 - (a.alpha0 - a.min_alpha) * static_cast<float>(done / total);
        if (alpha < a.min_alpha) alpha = a.min_alpha;
    };
    for (int epoch = 0; epoch < a.epochs; ++epoch) {
        for (int64_t s = s_begin; s < s_end; ++s) {
            const int64_t begin = s == 0 ? 0 : a.sent_ends[s - 1], end = a.sent_ends[s];
            sen.clear();
            for (int64_t i = begin; i < end; ++i) {
                const int32_t w = a.corpus[i];
                if (a.keep[w] < 1.0f && a.keep[w] < uniform01(rnd)) continue;
                sen.push_back(w);
            }
            local += end - begin;
            const int64_t n = static_cast<int64_t>(sen.size());
            for (int64_t pos = 0; pos < n; ++pos) {
                const int32_t word = sen[pos];
                const int64_t b = static_cast<int64_t>((next_random(rnd) >> 16) % static_cast<uint64_t>(a.window));
                const int64_t lo = std::max<int64_t>(0, pos - a.window + b), hi = std::min<int64_t>(n - 1, pos + a.window - b);
                if (a.sg) {
                    for (int64_t c = lo; c <= hi; ++c) {
                        if (c == pos) continue;
                        float* l1 = a.syn0 + static_cast<int64_t>(sen[c]) * dim;
                        std::fill(acc.begin(), acc.end(), 0.0f);
                        predict(a, l1, acc.data(), word, alpha, rnd);
                        axpy(l1, acc.data(), 1.0f, dim);
                    }
                } else {
                    int cw = 0;
                    std::fill(h.begin(), h.end(), 0.0f);
                    for (int64_t c = lo; c <= hi; ++c) {
                        if (c == pos) continue;
                        axpy(h.data(), a.syn0 + static_cast<int64_t>(sen[c]) * dim, 1.0f, dim);
                        ++cw;
                    }
                    if (cw == 0) continue;
                    const float inv = 1.0f / static_cast<float>(cw);
                    if (a.cbow_mean)
                        for (int i = 0; i < dim; ++i) h[i] *= inv;
                    std::fill(acc.begin(), acc.end(), 0.0f);
                    predict(a, h.data(), acc.data(), word, alpha, rnd);
                    // gensim's rule: the mean's gradient goes to each context vector unscaled,
                    // the sum's is divided by the number of context words.
                    const float scale = a.cbow_mean ? 1.0f : inv;
                    for (int64_t c = lo; c <= hi; ++c) {
                        if (c == pos) continue;
                        axpy(a.syn0 + static_cast<int64_t>(sen[c]) * dim, acc.data(), scale, dim);
                    }
                }
            }
            if (local >= kAlphaRefresh) refresh();
        }
    }
    if (local) a.words_done->fetch_add(local);
}

void train_thread_base(const W2VArgs& a, int64_t s_begin, int64_t s_end, int thread_id) {
    train_thread_impl(a, s_begin, s_end, thread_id);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void train_thread_avx2(const W2VArgs& a, int64_t s_begin, int64_t s_end,
                                                            int thread_id) {
    train_thread_impl(a, s_begin, s_end, thread_id);
}

bool cpu_has_avx2_fma() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

using ThreadFn = void (*)(const W2VArgs&, int64_t, int64_t, int);

ThreadFn pick_thread_fn(std::string* name) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx2_fma()) {
        if (name) *name = "avx2";
        return &train_thread_avx2;
    }
#endif
    if (name) *name = "baseline";
    return &train_thread_base;
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
              double min_alpha, uint64_t seed, int n_threads) {
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
    ThreadFn fn = pick_thread_fn(nullptr);
    {
        py::gil_scoped_release release;
        std::vector<std::thread> threads;
        for (int t = 1; t < n; ++t) threads.emplace_back(fn, std::cref(a), bounds[t], bounds[t + 1], t);
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
          py::arg("n_threads"),
          "Train syn0 and syn1neg in place (skip-gram or CBOW, negative sampling); returns the words passed");
    m.def("word2vec_isa", [] {
        std::string name;
        pick_thread_fn(&name);
        return name;
    });
}

}  // namespace fastlm_features
