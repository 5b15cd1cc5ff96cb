// The training loop of word2vec.cpp, included there once per instruction set: plainly for the
// architecture's baseline and, on x86-64, inside a `target("avx2,fma")` region with
// W2V_AVX2 = 1 (explicit AVX2 + FMA intrinsics for the three vector loops). Each inclusion is
// in its own namespace; word2vec.cpp picks one at run time. No include guard, on purpose.
//
// Expects: W2VArgs, kExpTableSize, kMaxExp, kAlphaRefresh, W2V_INLINE and W2V_AVX2.

#if W2V_AVX2
// Four independent accumulators: the sum is not one chain of dependent FMAs, whose latency
// would bound a dot product of a few hundred floats.
W2V_INLINE float dot(const float* a, const float* b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    const __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    float out = _mm_cvtss_f32(r);
    for (; i < n; ++i) out += a[i] * b[i];
    return out;
}

// acc += g * w; w += g * h: the hidden gradient and the output vector's update in one pass.
W2V_INLINE void update_output(float* __restrict acc, float* __restrict w, const float* __restrict h, float g, int n) {
    const __m256 vg = _mm256_set1_ps(g);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 wv = _mm256_loadu_ps(w + i);
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(vg, wv, _mm256_loadu_ps(acc + i)));
        _mm256_storeu_ps(w + i, _mm256_fmadd_ps(vg, _mm256_loadu_ps(h + i), wv));
    }
    for (; i < n; ++i) {
        acc[i] += g * w[i];
        w[i] += g * h[i];
    }
}

W2V_INLINE void axpy(float* __restrict y, const float* __restrict x, float a, int n) {
    const __m256 va = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; ++i) y[i] += a * x[i];
}
#else
// Plain loops for the compiler to vectorise; the dot product in four partial sums (the
// vectoriser keeps one vector of partial sums per accumulator).
W2V_INLINE float dot(const float* a, const float* b, int n) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; ++i) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

W2V_INLINE void update_output(float* __restrict acc, float* __restrict w, const float* __restrict h, float g, int n) {
    for (int i = 0; i < n; ++i) {
        acc[i] += g * w[i];
        w[i] += g * h[i];
    }
}

W2V_INLINE void axpy(float* __restrict y, const float* __restrict x, float a, int n) {
    for (int i = 0; i < n; ++i) y[i] += a * x[i];
}
#endif

W2V_INLINE uint64_t next_random(uint64_t& r) {
    r = r * 25214903917ULL + 11ULL;  // word2vec.c's linear congruential generator
    return r;
}

// uniform in [0, 1) from the generator's high bits (its low bits have short periods)
W2V_INLINE float uniform01(uint64_t& r) {
    return static_cast<float>((next_random(r) >> 24) & 0xFFFFFF) * (1.0f / 16777216.0f);
}

// The targets of one prediction: `word` (label 1), then `negative` noise words (label 0; a
// draw equal to `word` is dropped); their rows are prefetched, as the noise rows are random.
W2V_INLINE int draw_targets(const W2VArgs& a, int32_t word, int32_t* targets, uint64_t& rnd) {
    int n = 0;
    targets[n++] = word;
    for (int d = 0; d < a.negative; ++d) {
        const int32_t t = a.table[(next_random(rnd) >> 16) % static_cast<uint64_t>(a.table_size)];
        if (t == word) continue;
        targets[n++] = t;
        const char* row = reinterpret_cast<const char*>(a.syn1neg + static_cast<int64_t>(t) * a.dim);
        for (int64_t off = 0; off < static_cast<int64_t>(a.dim) * 4; off += 64) __builtin_prefetch(row + off, 1);
    }
    return n;
}

// h predicts targets[0] against targets[1..n); the hidden gradient is accumulated into acc.
W2V_INLINE void predict(const W2VArgs& a, const float* h, float* acc, const int32_t* targets, int n, float alpha) {
    const int dim = a.dim;
    for (int d = 0; d < n; ++d) {
        const float label = d == 0 ? 1.0f : 0.0f;
        float* w = a.syn1neg + static_cast<int64_t>(targets[d]) * dim;
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

void train_thread(const W2VArgs& a, int64_t s_begin, int64_t s_end, int thread_id) {
    const int dim = a.dim;
    uint64_t rnd = a.seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(thread_id) * 0xBF58476D1CE4E5B9ULL + 1;
    std::vector<int32_t> sen;
    std::vector<float> acc(dim), h(dim);
    std::vector<int32_t> targets(a.negative + 1);
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
                        const int nt = draw_targets(a, word, targets.data(), rnd);
                        predict(a, l1, acc.data(), targets.data(), nt, alpha);
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
                    const int nt = draw_targets(a, word, targets.data(), rnd);
                    predict(a, h.data(), acc.data(), targets.data(), nt, alpha);
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

