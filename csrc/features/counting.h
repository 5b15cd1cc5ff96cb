// Counting terms over documents, in parallel: the core of fastlm.features.
//
// What it computes: for each document the list of (column, count) of its terms, as a CSR
// matrix (indptr, indices, counts) with the indices of a row in increasing order.
//
// A term is a byte string made by a key generator from one document:
//   WordDocs      scikit-learn's default word analyzer: Python's str.lower() (tables taken
//                 from the running interpreter), maximal runs of \w characters of at least
//                 two code points, n-grams joined with one space;
//   SequenceDocs  n-grams of token ids (4 big-endian bytes each, so byte order = id order);
//   TermDocs      terms given ready-made (the output of a Python analyzer).
//
// fit: the documents are split into one contiguous range per thread by byte cost; each
// thread numbers the terms it meets in its own TermTable; the tables are merged into one,
// its terms sorted by bytes (= code-point order for UTF-8, the order of Python's sorted()),
// and every row remapped to the sorted columns and sorted. transform: the threads share the
// fitted, read-only table and drop terms that are not in it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "features/term_table.h"

namespace fastlm_features {

// ----------------------------------------------------------------------------- Unicode tables
// Filled once from the running Python: which code points are \w, and str.lower()'s mapping.
struct UnicodeTables {
    bool ready = false;
    std::vector<uint64_t> word;       // 0x110000 bits
    std::vector<int32_t> lower_page;  // cp >> 8 -> page index into lower_map, or -1
    std::vector<uint32_t> lower_map;  // 256 entries a page: mapped cp, or kMulti | index
    std::vector<std::vector<uint32_t>> lower_multi;
    uint8_t ascii_word[128] = {};
    uint8_t ascii_lower[128] = {};
};

constexpr uint32_t kMulti = 0x80000000u;

struct IdentityTable {
    uint8_t v[128];
    constexpr IdentityTable() : v() {
        for (int i = 0; i < 128; ++i) v[i] = static_cast<uint8_t>(i);
    }
};
inline constexpr IdentityTable kIdentityTable{};
inline constexpr const uint8_t* kIdentity = kIdentityTable.v;

UnicodeTables& tables();

inline bool is_word(const UnicodeTables& t, uint32_t cp) {
    return cp < 0x110000 && ((t.word[cp >> 6] >> (cp & 63)) & 1);
}

inline void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
        out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
        out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
}

// ----------------------------------------------------------------------------- key generators
struct DocText {
    const char* data;
    size_t size;
    bool lower;  // apply the lowercase table (false: lowercase off, or already lowered by Python)
};

// scikit-learn's word analyzer: token_pattern (?u)\b\w\w+\b over the (lowercased) text.
struct WordDocs {
    const std::vector<DocText>* docs;
    int min_n, max_n;

    struct Scratch {
        std::string buf;              // tokens, each followed by one space (and slack)
        std::vector<uint32_t> starts; // token i = buf[starts[i], starts[i+1] - 1)
    };

    size_t count() const { return docs->size(); }
    size_t cost(size_t d) const { return (*docs)[d].size + 16; }

    // Writes the tokens of doc into sc.buf through a raw pointer: the lowered UTF-8 is at
    // most 3/2 the size of the input (U+0130 -> "i\u0307" is 2 -> 3 bytes) and each kept
    // token (>= 2 code points) adds one space, so 2 n + 16 bytes always suffice.
    static void tokenize(const DocText& doc, Scratch& sc) {
        const UnicodeTables& t = tables();
        std::vector<uint32_t>& starts = sc.starts;
        starts.clear();
        const size_t n = doc.size;
        if (sc.buf.size() < 2 * n + 16) sc.buf.resize(2 * n + 16);
        char* const out0 = &sc.buf[0];
        char* w = out0;        // write position
        char* tok = out0;      // start of the current run of word characters
        size_t tok_len = 0;    // its length in code points
        auto end_token = [&]() {
            if (tok_len >= 2) {
                starts.push_back(static_cast<uint32_t>(tok - out0));
                *w++ = ' ';
            } else {
                w = tok;
            }
            tok = w;
            tok_len = 0;
        };
        auto put = [&](uint32_t cp) {
            if (is_word(t, cp)) {
                if (cp < 0x80) {
                    *w++ = static_cast<char>(cp);
                } else if (cp < 0x800) {
                    *w++ = static_cast<char>(0xC0 | (cp >> 6));
                    *w++ = static_cast<char>(0x80 | (cp & 0x3F));
                } else if (cp < 0x10000) {
                    *w++ = static_cast<char>(0xE0 | (cp >> 12));
                    *w++ = static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                    *w++ = static_cast<char>(0x80 | (cp & 0x3F));
                } else {
                    *w++ = static_cast<char>(0xF0 | (cp >> 18));
                    *w++ = static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
                    *w++ = static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                    *w++ = static_cast<char>(0x80 | (cp & 0x3F));
                }
                ++tok_len;
            } else if (tok_len) {
                end_token();
            }
        };
        const unsigned char* s = reinterpret_cast<const unsigned char*>(doc.data);
        const uint8_t* low = doc.lower ? t.ascii_lower : kIdentity;
        size_t i = 0;
        while (i < n) {
            unsigned char b = s[i];
            if (b < 0x80) {
                // a run of ASCII word characters, copied (lowered) in one loop
                unsigned char c = low[b];
                if (t.ascii_word[c]) {
                    const char* run = w;
                    do {
                        *w++ = static_cast<char>(c);
                        if (++i == n) break;
                        b = s[i];
                        if (b >= 0x80) break;
                        c = low[b];
                    } while (t.ascii_word[c]);
                    tok_len += static_cast<size_t>(w - run);
                } else {
                    if (tok_len) end_token();
                    ++i;
                }
                continue;
            }
            uint32_t cp;
            size_t len;
            if (b < 0xE0) {
                len = 2;
                cp = b & 0x1F;
            } else if (b < 0xF0) {
                len = 3;
                cp = b & 0x0F;
            } else {
                len = 4;
                cp = b & 0x07;
            }
            if (i + len > n) break;  // truncated sequence: cannot come from a Python str
            for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (s[i + k] & 0x3F);
            i += len;
            if (doc.lower) {
                const int32_t page = cp < 0x110000 ? t.lower_page[cp >> 8] : -1;
                if (page >= 0) {
                    const uint32_t m = t.lower_map[static_cast<size_t>(page) * 256 + (cp & 255)];
                    if (m & kMulti) {
                        for (uint32_t c : t.lower_multi[m & ~kMulti]) put(c);
                        continue;
                    }
                    cp = m;
                }
            }
            put(cp);
        }
        if (tok_len) end_token();
        starts.push_back(static_cast<uint32_t>(w - out0));
    }

    template <class Emit>
    void keys(size_t d, Scratch& sc, Emit&& emit) const {
        tokenize((*docs)[d], sc);
        const size_t n_tok = sc.starts.size() - 1;
        const char* base = sc.buf.data();
        for (int n = min_n; n <= max_n; ++n) {
            if (static_cast<size_t>(n) > n_tok) break;
            for (size_t i = 0; i + n <= n_tok; ++i) {
                const uint32_t a = sc.starts[i], b = sc.starts[i + n] - 1;
                emit(std::string_view(base + a, b - a));
            }
        }
    }
};

// n-grams of token ids; ids are stored as 4 big-endian bytes so an n-gram is a byte slice.
struct SequenceDocs {
    const std::vector<char>* ids;         // 4 bytes an id
    const std::vector<uint64_t>* offsets; // doc d = ids [offsets[d], offsets[d+1])
    int min_n, max_n;

    struct Scratch {};

    size_t count() const { return offsets->size() - 1; }
    size_t cost(size_t d) const { return 4 * ((*offsets)[d + 1] - (*offsets)[d]) + 16; }

    template <class Emit>
    void keys(size_t d, Scratch&, Emit&& emit) const {
        const uint64_t a = (*offsets)[d], n_tok = (*offsets)[d + 1] - a;
        const char* base = ids->data() + 4 * a;
        for (int n = min_n; n <= max_n; ++n) {
            if (static_cast<uint64_t>(n) > n_tok) break;
            for (uint64_t i = 0; i + n <= n_tok; ++i) emit(std::string_view(base + 4 * i, 4 * n));
        }
    }
};

// Ready-made terms (a Python analyzer's output), one key each.
struct TermDocs {
    const std::vector<char>* arena;
    const std::vector<uint64_t>* term_offsets;  // term j = arena[term_offsets[j], term_offsets[j+1])
    const std::vector<uint64_t>* doc_offsets;   // doc d = terms [doc_offsets[d], doc_offsets[d+1])

    struct Scratch {};

    size_t count() const { return doc_offsets->size() - 1; }
    size_t cost(size_t d) const {
        return (*term_offsets)[(*doc_offsets)[d + 1]] - (*term_offsets)[(*doc_offsets)[d]] + 16;
    }

    template <class Emit>
    void keys(size_t d, Scratch&, Emit&& emit) const {
        for (uint64_t j = (*doc_offsets)[d]; j < (*doc_offsets)[d + 1]; ++j) {
            const uint64_t a = (*term_offsets)[j];
            emit(std::string_view(arena->data() + a, (*term_offsets)[j + 1] - a));
        }
    }
};

// ----------------------------------------------------------------------------- counting
struct Csr {
    std::vector<int64_t> indptr;
    std::vector<int32_t> indices;
    std::vector<int32_t> counts;
};

struct RangeCounts {
    TermTable table;                 // fit: this thread's own terms
    std::vector<uint64_t> row_end;   // entries of doc k end at row_end[k]
    std::vector<uint32_t> ids;
    std::vector<int32_t> cnts;
};

// Contiguous document ranges of about equal cost, one a part.
template <class Gen>
std::vector<size_t> split_by_cost(const Gen& gen, int parts) {
    const size_t n = gen.count();
    std::vector<size_t> bounds{0};
    if (parts <= 1 || n == 0) {
        bounds.push_back(n);
        return bounds;
    }
    double total = 0;
    for (size_t d = 0; d < n; ++d) total += static_cast<double>(gen.cost(d));
    double acc = 0;
    int part = 1;
    for (size_t d = 0; d < n && part < parts; ++d) {
        acc += static_cast<double>(gen.cost(d));
        if (acc >= total * part / parts) {
            bounds.push_back(d + 1);
            ++part;
        }
    }
    if (bounds.back() != n) bounds.push_back(n);
    return bounds;
}

template <class F>
void run_parallel(int n, F&& f) {
    if (n <= 1) {
        if (n == 1) f(0);
        return;
    }
    std::vector<std::thread> threads;
    threads.reserve(n - 1);
    for (int t = 1; t < n; ++t) threads.emplace_back([&f, t] { f(t); });
    f(0);
    for (auto& th : threads) th.join();
}

// Counts docs [a, b): fit (shared == nullptr) numbers new terms in out.table; transform
// looks them up in the shared table and skips unknown ones.
template <class Gen>
void count_range(const Gen& gen, size_t a, size_t b, const TermTable* shared, RangeCounts& out) {
    typename Gen::Scratch scratch;
    std::vector<int32_t> counts;
    std::vector<uint32_t> touched;
    if (shared) counts.assign(shared->size(), 0);
    out.row_end.reserve(b - a);
    for (size_t d = a; d < b; ++d) {
        gen.keys(d, scratch, [&](std::string_view key) {
            uint32_t id;
            if (shared) {
                const int64_t found = shared->find(key);
                if (found < 0) return;
                id = static_cast<uint32_t>(found);
            } else {
                id = out.table.insert(key);
                if (id >= counts.size()) counts.resize(std::max<size_t>(2 * counts.size(), 1024), 0);
            }
            if (counts[id]++ == 0) touched.push_back(id);
        });
        for (uint32_t id : touched) {
            out.ids.push_back(id);
            out.cnts.push_back(counts[id]);
            counts[id] = 0;
        }
        touched.clear();
        out.row_end.push_back(out.ids.size());
    }
}

// Writes every range's rows into one CSR, mapping ids through col (identity when empty) and
// sorting each row by column.
inline Csr assemble(std::vector<RangeCounts>& parts, const std::vector<std::vector<uint32_t>>& cols,
                    int n_threads) {
    const int n_parts = static_cast<int>(parts.size());
    std::vector<uint64_t> row0(n_parts + 1, 0), nnz0(n_parts + 1, 0);
    for (int p = 0; p < n_parts; ++p) {
        row0[p + 1] = row0[p] + parts[p].row_end.size();
        nnz0[p + 1] = nnz0[p] + parts[p].ids.size();
    }
    Csr out;
    out.indptr.assign(row0[n_parts] + 1, 0);
    out.indices.resize(nnz0[n_parts]);
    out.counts.resize(nnz0[n_parts]);
    run_parallel(std::min(n_threads, n_parts), [&](int t) {
        std::vector<uint64_t> packed;
        for (int p = t; p < n_parts; p += std::min(n_threads, n_parts)) {
            RangeCounts& rc = parts[p];
            const uint32_t* map = cols.empty() ? nullptr : cols[p].data();
            uint64_t begin = 0;
            for (size_t r = 0; r < rc.row_end.size(); ++r) {
                const uint64_t end = rc.row_end[r];
                packed.clear();
                for (uint64_t k = begin; k < end; ++k) {
                    const uint32_t c = map ? map[rc.ids[k]] : rc.ids[k];
                    packed.push_back((static_cast<uint64_t>(c) << 32) | static_cast<uint32_t>(rc.cnts[k]));
                }
                std::sort(packed.begin(), packed.end());
                const uint64_t o = nnz0[p] + begin;
                for (size_t k = 0; k < packed.size(); ++k) {
                    out.indices[o + k] = static_cast<int32_t>(packed[k] >> 32);
                    out.counts[o + k] = static_cast<int32_t>(packed[k] & 0xFFFFFFFFu);
                }
                out.indptr[row0[p] + r + 1] = static_cast<int64_t>(nnz0[p] + end);
                begin = end;
            }
            std::vector<uint32_t>().swap(rc.ids);
            std::vector<int32_t>().swap(rc.cnts);
        }
    });
    return out;
}

// The ids of a table's terms in byte order. Terms are compared first by their first 16 bytes
// read as two big-endian words (zero-padded: consistent with byte order, since a term that
// is a prefix of a longer one sorts first), and only on a tie by the whole bytes.
inline std::vector<uint32_t> sorted_order(const TermTable& table) {
    struct Item {
        uint64_t hi, lo;
        uint32_t id;
    };
    auto word_at = [](std::string_view t, size_t from) {
        uint64_t k = 0;
        for (size_t j = from; j < std::min<size_t>(from + 8, t.size()); ++j)
            k |= static_cast<uint64_t>(static_cast<unsigned char>(t[j])) << (56 - 8 * (j - from));
        return k;
    };
    const size_t V = table.size();
    std::vector<Item> items(V);
    for (size_t i = 0; i < V; ++i) {
        const std::string_view t = table.term(i);
        items[i] = Item{word_at(t, 0), word_at(t, 8), static_cast<uint32_t>(i)};
    }
    std::sort(items.begin(), items.end(), [&](const Item& a, const Item& b) {
        if (a.hi != b.hi) return a.hi < b.hi;
        if (a.lo != b.lo) return a.lo < b.lo;
        return table.term(a.id) < table.term(b.id);
    });
    std::vector<uint32_t> order(V);
    for (size_t i = 0; i < V; ++i) order[i] = items[i].id;
    return order;
}

// Learns the vocabulary (sorted by bytes) and counts.
template <class Gen>
Csr fit_counts(const Gen& gen, int n_threads, TermTable& vocab) {
    const std::vector<size_t> bounds = split_by_cost(gen, n_threads);
    const int n_parts = static_cast<int>(bounds.size()) - 1;
    std::vector<RangeCounts> parts(n_parts);
    run_parallel(n_parts, [&](int p) { count_range(gen, bounds[p], bounds[p + 1], nullptr, parts[p]); });

    // Merge the ranges' tables (insertion order), then sort the terms by bytes.
    TermTable merged;
    std::vector<std::vector<uint32_t>> local_to_merged(n_parts);
    if (n_parts == 1) {
        merged = std::move(parts[0].table);
    } else {
        size_t biggest = 0;
        for (auto& p : parts) biggest = std::max(biggest, p.table.size());
        merged.reserve(biggest, 0);
        for (int p = 0; p < n_parts; ++p) {
            const TermTable& t = parts[p].table;
            local_to_merged[p].resize(t.size());
            for (size_t id = 0; id < t.size(); ++id) local_to_merged[p][id] = merged.insert(t.term(id), t.hash_of(id));
            parts[p].table = TermTable();
        }
    }
    const size_t V = merged.size();
    std::vector<uint32_t> order = sorted_order(merged);
    std::vector<uint32_t> rank(V);
    for (size_t r = 0; r < V; ++r) rank[order[r]] = static_cast<uint32_t>(r);
    vocab = TermTable();
    vocab.reserve(V, merged.arena_bytes());
    for (size_t r = 0; r < V; ++r) vocab.insert(merged.term(order[r]), merged.hash_of(order[r]));
    merged = TermTable();

    std::vector<std::vector<uint32_t>> cols(n_parts);
    for (int p = 0; p < n_parts; ++p) {
        if (n_parts == 1) {
            cols[p] = rank;
        } else {
            cols[p].resize(local_to_merged[p].size());
            for (size_t id = 0; id < cols[p].size(); ++id) cols[p][id] = rank[local_to_merged[p][id]];
        }
    }
    return assemble(parts, cols, n_threads);
}

// Counts with a fixed vocabulary; unknown terms are dropped.
template <class Gen>
Csr transform_counts(const Gen& gen, int n_threads, const TermTable& vocab) {
    const std::vector<size_t> bounds = split_by_cost(gen, n_threads);
    const int n_parts = static_cast<int>(bounds.size()) - 1;
    std::vector<RangeCounts> parts(n_parts);
    run_parallel(n_parts, [&](int p) { count_range(gen, bounds[p], bounds[p + 1], &vocab, parts[p]); });
    return assemble(parts, {}, n_threads);
}

}  // namespace fastlm_features
