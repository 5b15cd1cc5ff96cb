// Byte-level BPE: pre-tokenizer scanners, encoding, decoding, training.
#include "tokenizer/core.h"

#include <algorithm>
#include <chrono>
#include <queue>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tokenizer/unicode_tables.h"

namespace fastlm_tok {

// ----------------------------------------------------------------------------- classes
#define O kOther
#define L kLetter
#define N kNumber
#define S kSpace
const uint8_t kAsciiClass[128] = {
    O, O, O, O, O, O, O, O, O, S, S, S, S, S, O, O,  // 0x00: \t \n \v \f \r are White_Space
    O, O, O, O, O, O, O, O, O, O, O, O, O, O, O, O,  // 0x10 (0x1C..0x1F are not White_Space)
    S, O, O, O, O, O, O, O, O, O, O, O, O, O, O, O,  // 0x20
    N, N, N, N, N, N, N, N, N, N, O, O, O, O, O, O,  // 0x30
    O, L, L, L, L, L, L, L, L, L, L, L, L, L, L, L,  // 0x40
    L, L, L, L, L, L, L, L, L, L, L, O, O, O, O, O,  // 0x50
    O, L, L, L, L, L, L, L, L, L, L, L, L, L, L, L,  // 0x60
    L, L, L, L, L, L, L, L, L, L, L, O, O, O, O, O,  // 0x70
};
#undef O
#undef L
#undef N
#undef S

// Class (bits 0-1) and o200k flags (bits 2-3) of a code point.
static inline uint8_t class_of(uint32_t cp) { return kUnicodeStage2[kUnicodeStage1[cp >> 8]][cp & 0xFF]; }
static inline CharInfo info(uint8_t v, uint8_t len) { return {uint8_t(v & 3), len, uint8_t(v & 12)}; }

CharInfo char_at_slow(const uint8_t* s, size_t i, size_t n) {
  const uint8_t c = s[i];
  auto cont = [&](size_t k) { return i + k < n && (s[i + k] & 0xC0) == 0x80; };
  if (c >= 0xC2 && c <= 0xDF) {
    if (!cont(1)) return {kOther, 1};
    return info(class_of(((c & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu)), 2);
  }
  if (c >= 0xE0 && c <= 0xEF) {
    if (!cont(1) || !cont(2)) return {kOther, 1};
    const uint8_t c1 = s[i + 1];
    if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 > 0x9F)) return {kOther, 1};
    return info(class_of(((c & 0x0Fu) << 12) | ((c1 & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu)), 3);
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (!cont(1) || !cont(2) || !cont(3)) return {kOther, 1};
    const uint8_t c1 = s[i + 1];
    if ((c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 > 0x8F)) return {kOther, 1};
    return info(class_of(((c & 0x07u) << 18) | ((c1 & 0x3Fu) << 12) | ((s[i + 2] & 0x3Fu) << 6) | (s[i + 3] & 0x3Fu)),
                4);
  }
  return {kOther, 1};
}

// Run of characters of class cls starting at k; returns its end.
static inline size_t run_of(const uint8_t* s, size_t k, size_t n, uint8_t cls) {
  while (k < n) {
    const uint8_t c = s[k];
    if (c < 0x80) {
      if (kAsciiClass[c] != cls) break;
      ++k;
    } else {
      CharInfo ci = char_at_slow(s, k, n);
      if (ci.cls != cls) break;
      k += ci.len;
    }
  }
  return k;
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
size_t next_gpt2(const uint8_t* s, size_t i, size_t n) {
  const uint8_t b = s[i];
  if (b == '\'' && i + 1 < n) {
    const uint8_t x = s[i + 1];
    if (x == 's' || x == 't' || x == 'm' || x == 'd') return i + 2;
    if (i + 2 < n) {
      const uint8_t y = s[i + 2];
      if ((x == 'r' && y == 'e') || (x == 'v' && y == 'e') || (x == 'l' && y == 'l')) return i + 3;
    }
  }
  size_t j = i;
  CharInfo first = char_at(s, i, n);
  if (b == ' ' && i + 1 < n) {
    CharInfo d = char_at(s, i + 1, n);
    if (d.cls != kSpace) {
      j = i + 1;
      first = d;
    }
  }
  if (first.cls != kSpace) return run_of(s, j + first.len, n, first.cls);
  // Whitespace: \s+(?!\S) takes the run but its last character when a non-space follows.
  size_t k = i, last = i;
  while (k < n) {
    CharInfo ci = char_at(s, k, n);
    if (ci.cls != kSpace) break;
    last = k;
    k += ci.len;
  }
  if (k == n) return n;
  return last > i ? last : k;
}

static inline bool ascii_lower_is(uint8_t c, char want) { return (c | 0x20) == want; }

// '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s
// \p{N}{1,3} from s[i] (c: the number there): the end of the run.
static inline size_t digits_1_to_3(const uint8_t* s, size_t i, CharInfo c, size_t n) {
  size_t k = i + c.len;
  for (int r = 1; r < 3 && k < n; ++r) {
    const CharInfo d = char_at(s, k, n);
    if (d.cls != kNumber) break;
    k += d.len;
  }
  return k;
}

// " ?[^\s\p{L}\p{N}]+[\r\n]*" from s[i] (c: the character there), with '/' also in the tail
// for o200k's "[\r\n/]*": the end of the match, or 0 where it does not match.
static inline size_t punctuation_run(const uint8_t* s, size_t i, CharInfo c, size_t n, bool slash_tail) {
  size_t j = i;
  CharInfo first = c;
  if (s[i] == ' ' && i + 1 < n) {
    const CharInfo d = char_at(s, i + 1, n);
    if (d.cls == kOther) {
      j = i + 1;
      first = d;
    }
  }
  if (first.cls != kOther) return 0;
  size_t k = run_of(s, j + first.len, n, kOther);
  while (k < n && (s[k] == '\r' || s[k] == '\n' || (slash_tail && s[k] == '/'))) ++k;
  return k;
}

size_t next_cl100k(const uint8_t* s, size_t i, size_t n) {
  const uint8_t b = s[i];
  if (b == '\'' && i + 1 < n) {
    const uint8_t x = s[i + 1];
    if (ascii_lower_is(x, 's') || ascii_lower_is(x, 'd') || ascii_lower_is(x, 'm') || ascii_lower_is(x, 't'))
      return i + 2;
    if (i + 2 < n) {
      const uint8_t y = s[i + 2];
      if (x == 0xC5 && y == 0xBF) return i + 3;  // U+017F LONG S case-folds to 's'
      if ((ascii_lower_is(x, 'l') && ascii_lower_is(y, 'l')) || (ascii_lower_is(x, 'v') && ascii_lower_is(y, 'e')) ||
          (ascii_lower_is(x, 'r') && ascii_lower_is(y, 'e')))
        return i + 3;
    }
  }
  const CharInfo c = char_at(s, i, n);
  if (c.cls == kLetter) return run_of(s, i + c.len, n, kLetter);
  if (c.cls != kNumber && b != '\r' && b != '\n' && i + c.len < n) {
    CharInfo d = char_at(s, i + c.len, n);
    if (d.cls == kLetter) return run_of(s, i + c.len + d.len, n, kLetter);
  }
  if (c.cls == kNumber) return digits_1_to_3(s, i, c, n);
  if (const size_t k = punctuation_run(s, i, c, n, false)) return k;
  // Whitespace.
  size_t k = i, last = i, nl_end = 0;
  while (k < n) {
    CharInfo ci = char_at(s, k, n);
    if (ci.cls != kSpace) break;
    if (s[k] == '\r' || s[k] == '\n') nl_end = k + 1;
    last = k;
    k += ci.len;
  }
  if (k == n) return n;              // \s++$
  if (nl_end) return nl_end;         // \s*[\r\n]
  if (last > i) return last;         // \s+(?!\S)
  return i + c.len;                  // \s
}

// ----------------------------------------------------------------------------- o200k
// Class and flags of the character at s[i], ASCII letters flagged by case.
static inline CharInfo flagged_at(const uint8_t* s, size_t i, size_t n) {
  const uint8_t c = s[i];
  if (c < 0x80) {
    const uint8_t f = (c >= 'A' && c <= 'Z') ? kUpperSet : (c >= 'a' && c <= 'z') ? kLowerSet : 0;
    return {kAsciiClass[c], 1, f};
  }
  return char_at_slow(s, i, n);
}

// End of the run of characters that have the flag, from k.
static inline size_t run_with(const uint8_t* s, size_t k, size_t n, uint8_t flag) {
  while (k < n) {
    const CharInfo ci = flagged_at(s, k, n);
    if (!(ci.flags & flag)) break;
    k += ci.len;
  }
  return k;
}

// Length of (?i:'s|'t|'re|'ve|'m|'ll|'d) at k, 0 when none (U+017F LONG S case-folds to 's').
static inline size_t contraction_at(const uint8_t* s, size_t k, size_t n) {
  if (k + 1 >= n || s[k] != '\'') return 0;
  const uint8_t x = s[k + 1];
  if (ascii_lower_is(x, 's') || ascii_lower_is(x, 't') || ascii_lower_is(x, 'm') || ascii_lower_is(x, 'd')) return 2;
  if (k + 2 < n) {
    const uint8_t y = s[k + 2];
    if (x == 0xC5 && y == 0xBF) return 3;
    if ((ascii_lower_is(x, 'r') && ascii_lower_is(y, 'e')) || (ascii_lower_is(x, 'v') && ascii_lower_is(y, 'e')) ||
        (ascii_lower_is(x, 'l') && ascii_lower_is(y, 'l')))
      return 3;
  }
  return 0;
}

// o200k's two word alternatives at j, where U = upper set, W = lower set and C = contraction:
//   first  U*W+C?   greedy U* backtracks to the last character that is in both sets (Lm Lo M)
//                   when no lower-set character follows the U-run; no match when there is none
//   second U+W*C?   matches whenever the U-run is not empty
// Ends, or 0 for no match (a match is never empty, and j > 0 or the run is not empty).
struct WordEnds {
  size_t first = 0, second = 0;
};
static inline WordEnds word_at(const uint8_t* s, size_t j, size_t n) {
  WordEnds w;
  size_t k = j, both_end = 0;
  while (k < n) {
    const CharInfo ci = flagged_at(s, k, n);
    if (!(ci.flags & kUpperSet)) break;
    k += ci.len;
    if (ci.flags & kLowerSet) both_end = k;
  }
  const bool lower_next = k < n && (flagged_at(s, k, n).flags & kLowerSet);
  const size_t m = lower_next ? run_with(s, k, n, kLowerSet) : k;
  if (lower_next) w.first = m + contraction_at(s, m, n);
  else if (both_end) w.first = both_end + contraction_at(s, both_end, n);
  if (k > j) w.second = m + contraction_at(s, m, n);
  return w;
}

// [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
// [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
// \p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
// Each word alternative is tried with the optional prefix character, then without it (a mark can be
// either), before the next alternative: the order of a backtracking regex engine.
size_t next_o200k(const uint8_t* s, size_t i, size_t n) {
  const uint8_t b = s[i];
  const CharInfo c = flagged_at(s, i, n);
  const bool prefix = c.cls != kLetter && c.cls != kNumber && b != '\r' && b != '\n';
  if (prefix || c.flags) {
    const WordEnds with = prefix && i + c.len < n ? word_at(s, i + c.len, n) : WordEnds{};
    const WordEnds without = c.flags ? word_at(s, i, n) : WordEnds{};
    if (with.first) return with.first;
    if (without.first) return without.first;
    if (with.second) return with.second;
    if (without.second) return without.second;
  }
  if (c.cls == kNumber) return digits_1_to_3(s, i, c, n);
  if (const size_t k = punctuation_run(s, i, c, n, true)) return k;
  // Whitespace.
  size_t k = i, last = i, nl_end = 0;
  while (k < n) {
    const CharInfo ci = char_at(s, k, n);
    if (ci.cls != kSpace) break;
    if (s[k] == '\r' || s[k] == '\n') nl_end = k + 1;
    last = k;
    k += ci.len;
  }
  if (nl_end) return nl_end;         // \s*[\r\n]+
  if (k == n) return n;              // \s+(?!\S) at the end
  if (last > i) return last;         // \s+(?!\S)
  return k;                          // \s+
}

NextFn next_fn(Pattern p) {
  switch (p) {
    case Pattern::GPT2: return next_gpt2;
    case Pattern::CL100K: return next_cl100k;
    case Pattern::O200K: return next_o200k;
  }
  throw std::invalid_argument("unknown pattern");
}

size_t safe_cut(const uint8_t* s, size_t n, size_t from) {
  for (size_t k = std::max<size_t>(from, 2); k < n; ++k) {
    if (s[k - 1] != '\n') continue;
    const uint8_t prev = s[k - 2], next = s[k];
    if (prev >= 0x80 || kAsciiClass[prev] == kSpace) continue;
    if (next > 0x20 && next < 0x7F && next != '/') return k;
  }
  return n;
}

// ----------------------------------------------------------------------------- BPE model
// The number of ordinary tokens, after checking the vocabulary against the limits (core.h).
static size_t checked_count(const std::vector<std::string>& token_bytes,
                            const std::vector<std::pair<std::string, uint32_t>>& specials) {
  if (token_bytes.size() > kMaxVocab)
    throw std::length_error("a vocabulary of " + std::to_string(token_bytes.size()) + " tokens is past the limit of " +
                            std::to_string(kMaxVocab) + " ids");
  for (size_t id = 0; id < token_bytes.size(); ++id)
    if (token_bytes[id].size() > kMaxTokenBytes)
      throw std::length_error("token id " + std::to_string(id) + " has " + std::to_string(token_bytes[id].size()) +
                              " bytes, past the limit of " + std::to_string(kMaxTokenBytes));
  for (auto& sp : specials) {
    if (sp.second >= kMaxVocab)
      throw std::length_error("special token id " + std::to_string(sp.second) + " is past the limit: ids are below " +
                              std::to_string(kMaxVocab));
    if (sp.first.size() > kMaxTokenBytes)
      throw std::length_error("a special token of " + std::to_string(sp.first.size()) +
                              " bytes is past the limit of " + std::to_string(kMaxTokenBytes));
  }
  return token_bytes.size();
}

// Polynomial hashes modulo the Mersenne prime 2^61 - 1, for deriving a tiktoken vocabulary's
// merges: the hashes of all prefixes of a token come in one pass, and then the hashes of the
// two parts of any split cost O(1), where hashing each part afresh would cost the token's
// length per split.
namespace {
constexpr uint64_t kMod61 = (uint64_t(1) << 61) - 1;

inline uint64_t mulmod61(uint64_t a, uint64_t b) {
  const unsigned __int128 p = static_cast<unsigned __int128>(a) * b;
  uint64_t r = uint64_t(p & kMod61) + uint64_t(p >> 61);  // 2^61 = 1 (mod 2^61 - 1)
  r = (r & kMod61) + (r >> 61);
  return r >= kMod61 ? r - kMod61 : r;
}

// The table key of a byte string of length n whose polynomial hash is h (never U64Map::kEmpty).
inline uint64_t split_key(uint64_t h, size_t n) {
  const uint64_t k = mix64(h ^ (uint64_t(n) * 0x9E3779B97F4A7C15ULL));
  return k == U64Map::kEmpty ? k - 1 : k;
}
}  // namespace

BPE::BPE(std::vector<std::string> token_bytes, const std::vector<std::pair<uint32_t, uint32_t>>& merges,
         bool rank_by_id, std::vector<std::pair<std::string, uint32_t>> specials, Pattern pattern)
    : pattern_(pattern), rank_by_id_(rank_by_id), vocab_(checked_count(token_bytes, specials)),
      pairs_(token_bytes.size() * 2), specials_(std::move(specials)) {
  const size_t nt = token_bytes.size();
  size_t total = nt;
  for (auto& sp : specials_) {
    if (sp.first.empty()) throw std::invalid_argument("special tokens must not be empty");
    total = std::max<size_t>(total, size_t(sp.second) + 1);
  }
  n_vocab_ = total;
  tok_off_.assign(total + 1, 0);
  tok_valid_.assign(total, 0);
  std::vector<std::string_view> all(total);
  for (size_t id = 0; id < nt; ++id) {
    all[id] = token_bytes[id];
    if (!token_bytes[id].empty()) tok_valid_[id] = 1;
  }
  for (auto& sp : specials_) {
    if (sp.second < nt && tok_valid_[sp.second])
      throw std::invalid_argument("special token id " + std::to_string(sp.second) + " is also an ordinary token");
    all[sp.second] = sp.first;
    tok_valid_[sp.second] = 2;
  }
  for (size_t id = 0; id < total; ++id) {
    tok_off_[id] = tok_data_.size();
    tok_data_.append(all[id].data(), all[id].size());
  }
  tok_off_[total] = tok_data_.size();
  byte_id_.assign(256, kNoRank);
  for (size_t id = 0; id < nt; ++id) {
    const std::string& t = token_bytes[id];
    if (t.empty()) continue;
    auto p = reinterpret_cast<const uint8_t*>(t.data());
    if (!vocab_.insert(p, t.size(), hash_bytes(p, t.size()), id).second)
      throw std::invalid_argument("token id " + std::to_string(id) + " repeats the bytes of another token");
    if (t.size() == 1) byte_id_[p[0]] = static_cast<uint32_t>(id);
  }
  for (int c = 0; c < 256; ++c)
    if (byte_id_[c] == kNoRank)
      throw std::invalid_argument("the vocabulary has no token for the single byte " + std::to_string(c) +
                                  " (a byte-level BPE needs all 256)");
  if (merges.empty() && rank_by_id) {
    // tiktoken's rule: every split of a token into two tokens is a merge ranked by the
    // token's id. Each token is hashed once (prefix hashes); a split's two parts are looked
    // up by their hashes and confirmed by comparing bytes, so a token of n bytes costs O(n)
    // plus O(n) per split that is a merge. The base is drawn per vocabulary so that no file
    // can be prepared to make many parts share a hash.
    const uint64_t base = (mix64(uint64_t(reinterpret_cast<uintptr_t>(this)) ^
                                 uint64_t(std::chrono::steady_clock::now().time_since_epoch().count())) %
                           (kMod61 - 257)) + 257;
    std::vector<uint64_t> power(kMaxTokenBytes + 1), prefix(kMaxTokenBytes + 1);
    power[0] = 1;
    for (size_t k = 1; k <= kMaxTokenBytes; ++k) power[k] = mulmod61(power[k - 1], base);
    auto hash_prefixes = [&](const std::string& t) {  // prefix[k] = hash of t[0:k]
      prefix[0] = 0;
      for (size_t k = 0; k < t.size(); ++k) {
        const uint64_t h = mulmod61(prefix[k], base) + uint8_t(t[k]) + 1;
        prefix[k + 1] = h >= kMod61 ? h - kMod61 : h;
      }
    };
    U64Map by_hash(nt);  // split_key -> id of the first token with that key
    for (size_t id = 0; id < nt; ++id) {
      if (token_bytes[id].empty()) continue;
      hash_prefixes(token_bytes[id]);
      by_hash.insert(split_key(prefix[token_bytes[id].size()], token_bytes[id].size()), id);
    }
    // The id of the n bytes at p, whose hash is h, or -1.
    auto id_of = [&](const char* p, size_t n, uint64_t h) -> int64_t {
      const uint64_t* v = by_hash.find(split_key(h, n));
      if (!v) return -1;  // no token has this key, so none has these bytes
      const std::string& c = token_bytes[*v];
      if (c.size() == n && std::memcmp(c.data(), p, n) == 0) return int64_t(*v);
      // Another token holds the key: ask the table of exact bytes.
      auto q = reinterpret_cast<const uint8_t*>(p);
      const uint64_t* e = vocab_.find(q, n, hash_bytes(q, n));
      return e ? int64_t(*e) : -1;
    };
    std::vector<Merge> local;
    for (size_t id = 0; id < nt; ++id) {
      const std::string& t = token_bytes[id];
      const size_t n = t.size();
      if (n < 2) continue;
      hash_prefixes(t);
      local.clear();
      for (size_t k = 1; k < n; ++k) {
        const int64_t a = id_of(t.data(), k, prefix[k]);
        if (a < 0) continue;
        // hash of t[k:n] = prefix[n] - prefix[k] * base^(n-k)
        const uint64_t sub = mulmod61(prefix[k], power[n - k]);
        const uint64_t hs = prefix[n] >= sub ? prefix[n] - sub : prefix[n] + kMod61 - sub;
        const int64_t b = id_of(t.data() + k, n - k, hs);
        if (b >= 0) local.push_back({uint32_t(a), uint32_t(b), uint32_t(id)});
      }
      std::sort(local.begin(), local.end(),
                [](const Merge& x, const Merge& y) { return x.a != y.a ? x.a < y.a : x.b < y.b; });
      merges_.insert(merges_.end(), local.begin(), local.end());
    }
  } else {
    auto id_of = [&](const std::string& bytes) -> int64_t {
      const uint64_t* v = vocab_.find(bytes);
      return v ? int64_t(*v) : -1;
    };
    for (size_t r = 0; r < merges.size(); ++r) {
      auto [a, b] = merges[r];
      if (a >= nt || b >= nt || !tok_valid_[a] || !tok_valid_[b])
        throw std::invalid_argument("merge " + std::to_string(r) + " names an unknown token id");
      int64_t id = id_of(token_bytes[a] + token_bytes[b]);
      if (id < 0)
        throw std::invalid_argument("merge " + std::to_string(r) + " makes a token that is not in the vocabulary");
      merges_.push_back({a, b, uint32_t(id)});
    }
  }
  for (size_t r = 0; r < merges_.size(); ++r) {
    const Merge& m = merges_[r];
    const uint64_t rank = rank_by_id_ ? m.id : r;
    pairs_.insert((uint64_t(m.a) << 32) | m.b, (rank << 32) | m.id);  // first one wins
  }
}

PieceCache* BPE::acquire_cache() const {
  std::lock_guard<std::mutex> g(cache_mu_);
  if (caches_.empty()) return new PieceCache();
  PieceCache* c = caches_.back().release();
  caches_.pop_back();
  return c;
}

void BPE::release_cache(PieceCache* c) const {
  std::lock_guard<std::mutex> g(cache_mu_);
  if (caches_.size() < 64)
    caches_.emplace_back(c);
  else
    delete c;
}

struct CacheGuard {
  const BPE& bpe;
  PieceCache* c;
  explicit CacheGuard(const BPE& b) : bpe(b), c(b.acquire_cache()) {}
  ~CacheGuard() { bpe.release_cache(c); }
};

// Short pieces: tiktoken's quadratic scan over parts, on token ids.
void BPE::bpe_short(const uint8_t* p, size_t n, std::vector<uint32_t>& out) const {
  uint32_t tok[256];
  uint64_t rk[256];  // rank << 32 | merged id of (tok[i], tok[i+1])
  for (size_t i = 0; i < n; ++i) tok[i] = byte_id_[p[i]];
  for (size_t i = 0; i + 1 < n; ++i) rk[i] = pair_lookup(tok[i], tok[i + 1]);
  size_t m = n;
  while (m > 1) {
    uint64_t best = ~0ULL;
    size_t bi = 0;
    for (size_t i = 0; i + 1 < m; ++i) {
      // compare ranks only (upper 32 bits); ties go to the leftmost
      if ((rk[i] >> 32) < (best >> 32)) {
        best = rk[i];
        bi = i;
      }
    }
    if ((best >> 32) == kNoRank) break;
    tok[bi] = static_cast<uint32_t>(best);
    for (size_t i = bi + 1; i + 1 < m; ++i) tok[i] = tok[i + 1];
    for (size_t i = bi + 1; i + 2 < m; ++i) rk[i] = rk[i + 1];
    --m;
    if (bi > 0) rk[bi - 1] = pair_lookup(tok[bi - 1], tok[bi]);
    if (bi + 1 < m) rk[bi] = pair_lookup(tok[bi], tok[bi + 1]);
  }
  out.insert(out.end(), tok, tok + m);
}

// Long pieces: a heap of (rank, position) over a linked list of parts, O(n log n).
void BPE::bpe_long(const uint8_t* p, size_t n, std::vector<uint32_t>& out) const {
  constexpr uint32_t kEnd = 0xFFFFFFFFu;
  std::vector<uint32_t> tok(n), nxt(n), prv(n);
  for (size_t i = 0; i < n; ++i) {
    tok[i] = byte_id_[p[i]];
    nxt[i] = i + 1 < n ? uint32_t(i + 1) : kEnd;
    prv[i] = i > 0 ? uint32_t(i - 1) : kEnd;
  }
  std::vector<uint64_t> heap;
  heap.reserve(n);
  for (size_t i = 0; i + 1 < n; ++i) {
    uint64_t r = pair_lookup(tok[i], tok[i + 1]) >> 32;
    if (r != kNoRank) heap.push_back((r << 32) | i);
  }
  auto cmp = std::greater<uint64_t>();
  std::make_heap(heap.begin(), heap.end(), cmp);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), cmp);
    const uint64_t key = heap.back();
    heap.pop_back();
    const uint32_t i = static_cast<uint32_t>(key), r = static_cast<uint32_t>(key >> 32);
    if (tok[i] == kEnd) continue;  // merged into its left neighbour
    const uint32_t j = nxt[i];
    if (j == kEnd) continue;
    const uint64_t pr = pair_lookup(tok[i], tok[j]);
    if ((pr >> 32) != r) continue;  // stale
    tok[i] = static_cast<uint32_t>(pr);
    tok[j] = kEnd;
    nxt[i] = nxt[j];
    if (nxt[j] != kEnd) prv[nxt[j]] = i;
    if (prv[i] != kEnd) {
      uint64_t rl = pair_lookup(tok[prv[i]], tok[i]) >> 32;
      if (rl != kNoRank) {
        heap.push_back((rl << 32) | prv[i]);
        std::push_heap(heap.begin(), heap.end(), cmp);
      }
    }
    if (nxt[i] != kEnd) {
      uint64_t rr = pair_lookup(tok[i], tok[nxt[i]]) >> 32;
      if (rr != kNoRank) {
        heap.push_back((rr << 32) | i);
        std::push_heap(heap.begin(), heap.end(), cmp);
      }
    }
  }
  for (uint32_t i = 0; i != kEnd; i = nxt[i]) out.push_back(tok[i]);
}

// Pre-tokens longer than this are merged in chunks of this many bytes (cut at a UTF-8
// character boundary), which bounds the memory of pathological inputs.
static constexpr size_t kMaxPiece = size_t(1) << 20;

template <class Cache>
inline void BPE::encode_piece(const uint8_t* p, size_t n, std::vector<uint32_t>& out, Cache& cache) const {
  if (n == 1) {
    out.push_back(byte_id_[p[0]]);
    return;
  }
  if (n <= PieceCache::kMaxPieceLen) {
    const PieceCache::Key key = PieceCache::make_key(p, n);
    if (cache.get(key, out)) return;
    const size_t before = out.size();
    const uint64_t* whole = rank_by_id_ ? vocab_.find(p, n, hash_bytes(p, n)) : nullptr;
    if (whole)
      out.push_back(static_cast<uint32_t>(*whole));
    else
      bpe_short(p, n, out);
    cache.put(key, out.data() + before, out.size() - before);
    return;
  }
  if (rank_by_id_) {
    if (const uint64_t* whole = vocab_.find(p, n, hash_bytes(p, n))) {
      out.push_back(static_cast<uint32_t>(*whole));
      return;
    }
  }
  if (n <= 256) {
    bpe_short(p, n, out);
    return;
  }
  while (n > kMaxPiece) {
    size_t cut = kMaxPiece;
    while (cut > 1 && (p[cut] & 0xC0) == 0x80) --cut;
    bpe_long(p, cut, out);
    p += cut;
    n -= cut;
  }
  bpe_long(p, n, out);
}

template <size_t (*Next)(const uint8_t*, size_t, size_t), class Cache>
void BPE::encode_ordinary_t(const uint8_t* s, size_t n, std::vector<uint32_t>& out, Cache& cache) const {
  size_t i = 0;
  while (i < n) {
    const size_t j = Next(s, i, n);
    encode_piece(s + i, j - i, out, cache);
    i = j;
  }
}

template <class Cache>
void BPE::encode_ordinary_cached(const uint8_t* s, size_t n, std::vector<uint32_t>& out, Cache& cache) const {
  if (out.capacity() - out.size() < n / 3) out.reserve(out.size() + n / 3 + 16);
  if (pattern_ == Pattern::GPT2)
    encode_ordinary_t<next_gpt2>(s, n, out, cache);
  else if (pattern_ == Pattern::CL100K)
    encode_ordinary_t<next_cl100k>(s, n, out, cache);
  else
    encode_ordinary_t<next_o200k>(s, n, out, cache);
}

void BPE::encode_ordinary(const uint8_t* s, size_t n, std::vector<uint32_t>& out) const {
  CacheGuard g(*this);
  encode_ordinary_cached(s, n, out, *g.c);
}

void BPE::pretokenize(const uint8_t* s, size_t n, std::vector<std::pair<size_t, size_t>>& out) const {
  const NextFn next = next_fn(pattern_);
  size_t i = 0;
  while (i < n) {
    const size_t j = next(s, i, n);
    out.push_back({i, j});
    i = j;
  }
}

void BPE::encode(const uint8_t* s, size_t n, const std::vector<int>& allowed, const std::vector<int>& disallowed,
                 std::vector<uint32_t>& out) const {
  CacheGuard g(*this);
  encode_with(s, n, allowed, disallowed, out, *g.c);
}

void BPE::encode(const uint8_t* s, size_t n, const std::vector<int>& allowed, const std::vector<int>& disallowed,
                 std::vector<uint32_t>& out, SharedPieceCache& cache) const {
  encode_with(s, n, allowed, disallowed, out, cache);
}

std::shared_ptr<SharedPieceCache> BPE::shared_cache(size_t text_bytes) const {
  // Source text has about one distinct short pre-token per 250 bytes; the cache stops
  // inserting at half full. From 2^15 entries (2 MB) up to 2^19 (32 MB).
  constexpr size_t kMin = size_t(1) << 15, kMax = size_t(1) << 19;
  size_t want = kMin;
  while (want < kMax && want * 128 < text_bytes) want *= 2;
  std::lock_guard<std::mutex> g(cache_mu_);
  if (shared_ && !shared_->full() && shared_->capacity() >= want) return shared_;
  if (shared_ && shared_->full()) want = std::max(want, std::min(kMax, 2 * shared_->capacity()));
  shared_ = std::make_shared<SharedPieceCache>(want);
  return shared_;
}

template <class Cache>
void BPE::encode_with(const uint8_t* s, size_t n, const std::vector<int>& allowed, const std::vector<int>& disallowed,
                      std::vector<uint32_t>& out, Cache& cache) const {
  const std::string_view text(reinterpret_cast<const char*>(s), n);
  for (int k : disallowed)
    if (text.find(specials_[k].first) != std::string_view::npos) throw DisallowedSpecial(specials_[k].first);
  if (allowed.empty()) {
    encode_ordinary_cached(s, n, out, cache);
    return;
  }
  // Next occurrence of each allowed special token at or after pos.
  std::vector<size_t> next(allowed.size(), 0);
  std::vector<uint8_t> fresh(allowed.size(), 0);
  size_t pos = 0;
  while (pos < n) {
    size_t best = std::string_view::npos, best_len = 0;
    int best_k = -1;
    for (size_t a = 0; a < allowed.size(); ++a) {
      const std::string& sp = specials_[allowed[a]].first;
      if (!fresh[a] || (next[a] != std::string_view::npos && next[a] < pos)) {
        next[a] = text.find(sp, pos);
        fresh[a] = 1;
      }
      if (next[a] == std::string_view::npos) continue;
      if (next[a] < best || (next[a] == best && sp.size() > best_len)) {
        best = next[a];
        best_len = sp.size();
        best_k = allowed[a];
      }
    }
    if (best_k < 0) {
      encode_ordinary_cached(s + pos, n - pos, out, cache);
      return;
    }
    encode_ordinary_cached(s + pos, best - pos, out, cache);
    out.push_back(specials_[best_k].second);
    pos = best + best_len;
  }
}

int64_t BPE::decoded_size(const uint32_t* ids, size_t k) const {
  const size_t nt = tok_off_.size() - 1;
  int64_t total = 0;
  for (size_t i = 0; i < k; ++i) {
    const uint32_t id = ids[i];
    if (id >= nt || !tok_valid_[id]) return -1 - int64_t(i);
    total += int64_t(tok_off_[id + 1] - tok_off_[id]);
  }
  return total;
}

void BPE::decode_into(const uint32_t* ids, size_t k, char* dst) const {
  const char* src = tok_data_.data();
  const uint64_t* off = tok_off_.data();
  for (size_t i = 0; i < k; ++i) {
    const uint64_t a = off[ids[i]], len = off[ids[i] + 1] - a;
    if (len <= 16) {
      // Tokens are short: copy 16 bytes when the source has them (the tail is overwritten next).
      if (a + 16 <= tok_data_.size()) {
        std::memcpy(dst, src + a, 16);
      } else {
        std::memcpy(dst, src + a, len);
      }
    } else {
      std::memcpy(dst, src + a, len);
    }
    dst += len;
  }
}

int64_t BPE::decode_append(const uint32_t* ids, size_t k, std::string& out) const {
  const size_t nt = tok_off_.size() - 1;
  size_t total = out.size();
  for (size_t i = 0; i < k; ++i) {
    const uint32_t id = ids[i];
    if (id >= nt || !tok_valid_[id]) return int64_t(i);
    total += tok_off_[id + 1] - tok_off_[id];
  }
  size_t w = out.size();
  out.resize(total);
  char* dst = &out[0];
  const char* src = tok_data_.data();
  for (size_t i = 0; i < k; ++i) {
    const uint64_t a = tok_off_[ids[i]], len = tok_off_[ids[i] + 1] - a;
    std::memcpy(dst + w, src + a, len);
    w += len;
  }
  return -1;
}

// ----------------------------------------------------------------------------- training
void Trainer::add(const std::vector<std::string_view>& texts, int num_threads) {
  // Cut special-token text out, then cut long segments where pre-tokens cannot straddle.
  std::vector<std::string_view> chunks;
  constexpr size_t kChunk = size_t(1) << 16;
  for (std::string_view t : texts) {
    std::vector<std::string_view> segs;
    size_t pos = 0;
    while (pos <= t.size()) {
      size_t best = std::string_view::npos, blen = 0;
      for (const std::string& sp : specials_) {
        size_t f = t.find(sp, pos);
        if (f < best || (f == best && sp.size() > blen)) {
          best = f;
          blen = sp.size();
        }
      }
      if (best == std::string_view::npos) {
        segs.push_back(t.substr(pos));
        break;
      }
      segs.push_back(t.substr(pos, best - pos));
      pos = best + blen;
    }
    for (std::string_view seg : segs) {
      auto s = reinterpret_cast<const uint8_t*>(seg.data());
      size_t start = 0;
      while (start < seg.size()) {
        size_t cut = seg.size() - start > 2 * kChunk ? safe_cut(s, seg.size(), start + kChunk) : seg.size();
        chunks.push_back(seg.substr(start, cut - start));
        start = cut;
      }
    }
  }
  int nthreads = 1;
#ifdef _OPENMP
  nthreads = num_threads > 0 ? num_threads : omp_get_max_threads();
#endif
  nthreads = std::max(1, std::min<int>(nthreads, int(chunks.size())));
  std::vector<BytesMap> local(nthreads, BytesMap(1 << 12));
  const NextFn next = next_fn(pattern_);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t c = 0; c < int64_t(chunks.size()); ++c) {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    BytesMap& m = local[tid];
    auto s = reinterpret_cast<const uint8_t*>(chunks[c].data());
    const size_t n = chunks[c].size();
    size_t i = 0;
    while (i < n) {
      size_t j = next(s, i, n);
      ++*m.insert(s + i, j - i, hash_bytes(s + i, j - i), 0).first;
      i = j;
    }
  }
  for (auto& m : local)
    m.for_each([&](std::string_view k, uint64_t h, uint64_t v) {
      *counts_.insert(reinterpret_cast<const uint8_t*>(k.data()), k.size(), h, 0).first += v;
    });
}

std::vector<Merge> Trainer::train(size_t n_tokens) const {
  // Words in a fixed order (sorted by bytes) so the result never depends on hashing or threads.
  std::vector<std::pair<std::string_view, uint64_t>> words;
  words.reserve(counts_.size());
  uint64_t single = 0;  // occurrences of one-byte pre-tokens
  counts_.for_each([&](std::string_view k, uint64_t, uint64_t v) {
    if (k.size() >= 2)
      words.push_back({k, v});
    else
      single += v;
  });
  std::sort(words.begin(), words.end());
  const size_t nw = words.size();
  std::vector<uint64_t> freq(nw), start(nw + 1);
  std::vector<uint32_t> len(nw);
  std::vector<uint32_t> sym;
  for (size_t w = 0; w < nw; ++w) {
    freq[w] = words[w].second;
    start[w] = sym.size();
    len[w] = words[w].first.size();
    for (unsigned char c : words[w].first) sym.push_back(c);
  }
  start[nw] = sym.size();

  U64Map index(1 << 16);  // pair -> pair number
  std::vector<int64_t> count;
  std::vector<std::vector<uint32_t>> where;
  std::vector<uint64_t> pair_key;
  auto pair_no = [&](uint32_t a, uint32_t b) -> size_t {
    const uint64_t key = (uint64_t(a) << 32) | b;
    auto r = index.insert(key, count.size());
    if (r.second) {
      count.push_back(0);
      where.emplace_back();
      pair_key.push_back(key);
    }
    return size_t(*r.first);
  };
  for (size_t w = 0; w < nw; ++w) {
    const uint32_t* s = sym.data() + start[w];
    for (uint32_t i = 0; i + 1 < len[w]; ++i) {
      size_t p = pair_no(s[i], s[i + 1]);
      count[p] += int64_t(freq[w]);
      if (where[p].empty() || where[p].back() != w) where[p].push_back(uint32_t(w));
    }
  }
  // Max-heap on (count, then the smaller pair first).
  struct Item {
    int64_t count;
    uint64_t key;
  };
  auto less = [](const Item& x, const Item& y) { return x.count != y.count ? x.count < y.count : x.key > y.key; };
  std::priority_queue<Item, std::vector<Item>, decltype(less)> heap(less);
  for (size_t p = 0; p < count.size(); ++p)
    if (count[p] > 0) heap.push({count[p], pair_key[p]});

  std::vector<Merge> merges;
  std::vector<std::string> tok_bytes;
  BytesMap tok_ids(n_tokens + 256);
  for (int c = 0; c < 256; ++c) {
    tok_bytes.push_back(std::string(1, char(c)));
    const uint8_t b = uint8_t(c);
    tok_ids.insert(&b, 1, hash_bytes(&b, 1), uint64_t(c));
  }
  std::vector<uint32_t> stamp(nw, 0xFFFFFFFFu);
  std::vector<size_t> touched;
  while (tok_bytes.size() < n_tokens && !heap.empty()) {
    Item top = heap.top();
    heap.pop();
    const size_t p = size_t(*index.find(top.key));
    if (count[p] != top.count) {
      if (count[p] > 0) heap.push({count[p], top.key});
      continue;
    }
    if (top.count <= 0) break;
    const uint32_t a = uint32_t(top.key >> 32), b = uint32_t(top.key);
    // A pair that would make a token past the length limit is passed over (it comes back only
    // if its count changes, and is passed over again).
    if (tok_bytes[a].size() + tok_bytes[b].size() > kMaxTokenBytes) continue;
    // A pair whose bytes are already a token (made by another pair) reuses that token.
    std::string nb = tok_bytes[a] + tok_bytes[b];
    auto nbp = reinterpret_cast<const uint8_t*>(nb.data());
    auto ins = tok_ids.insert(nbp, nb.size(), hash_bytes(nbp, nb.size()), tok_bytes.size());
    if (ins.second) tok_bytes.push_back(nb);
    const uint32_t c = uint32_t(*ins.first);
    const uint32_t iter = uint32_t(merges.size());
    merges.push_back({a, b, c});
    std::vector<uint32_t> ws;
    ws.swap(where[p]);
    touched.clear();
    for (uint32_t w : ws) {
      if (stamp[w] == iter) continue;
      stamp[w] = iter;
      uint32_t* s = sym.data() + start[w];
      uint32_t n = len[w];
      const int64_t f = int64_t(freq[w]);
      uint32_t i = 0;
      while (i + 1 < n) {
        if (s[i] != a || s[i + 1] != b) {
          ++i;
          continue;
        }
        count[p] -= f;
        if (i > 0) {
          count[pair_no(s[i - 1], a)] -= f;
          size_t q = pair_no(s[i - 1], c);
          count[q] += f;
          if (where[q].empty() || where[q].back() != w) where[q].push_back(w);
          touched.push_back(q);
        }
        if (i + 2 < n) {
          count[pair_no(b, s[i + 2])] -= f;
          size_t q = pair_no(c, s[i + 2]);
          count[q] += f;
          if (where[q].empty() || where[q].back() != w) where[q].push_back(w);
          touched.push_back(q);
        }
        s[i] = c;
        std::memmove(s + i + 1, s + i + 2, (n - i - 2) * sizeof(uint32_t));
        --n;
        ++i;
      }
      len[w] = n;
    }
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (size_t q : touched)
      if (count[q] > 0) heap.push({count[q], pair_key[q]});
  }
  uint64_t total = single;
  for (size_t w = 0; w < nw; ++w) total += freq[w] * len[w];
  final_tokens_ = total;
  return merges;
}

}  // namespace fastlm_tok
