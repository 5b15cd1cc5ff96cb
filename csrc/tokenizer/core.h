// Byte-level BPE tokenizer core: pre-tokenizer scanners, hash tables, BPE merging,
// encoding/decoding and training. Plain C++17, no Python and no torch in this header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace fastlm_tok {

// ----------------------------------------------------------------------------- patterns
enum class Pattern : int { GPT2 = 0, CL100K = 1, O200K = 2 };

enum CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3 };

// o200k's two word sets, as flags beside the class: [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}] ("upper")
// and [\p{Ll}\p{Lm}\p{Lo}\p{M}] ("lower"). A mark (\p{M}) is class kOther with both flags.
enum CharFlag : uint8_t { kUpperSet = 4, kLowerSet = 8 };

struct CharInfo {
  uint8_t cls;    // CharClass
  uint8_t len;    // bytes
  uint8_t flags;  // CharFlag bits (set by char_at_slow and the o200k scanner only)
};

// Class and byte length of the UTF-8 character at s[i] (i < n). Invalid UTF-8 bytes are
// single-byte characters of class kOther.
CharInfo char_at_slow(const uint8_t* s, size_t i, size_t n);
extern const uint8_t kAsciiClass[128];

inline CharInfo char_at(const uint8_t* s, size_t i, size_t n) {
  uint8_t c = s[i];
  if (c < 0x80) return {kAsciiClass[c], 1};
  return char_at_slow(s, i, n);
}

// End of the pre-token that starts at i (the regexes of tiktoken's r50k/p50k, cl100k and o200k).
size_t next_gpt2(const uint8_t* s, size_t i, size_t n);
size_t next_cl100k(const uint8_t* s, size_t i, size_t n);
size_t next_o200k(const uint8_t* s, size_t i, size_t n);
using NextFn = size_t (*)(const uint8_t*, size_t, size_t);
NextFn next_fn(Pattern p);

// Positions where a text can be cut without changing its pre-tokens: just after a '\n'
// that is preceded by a non-space and followed by a printable non-space ASCII character
// other than '/' (o200k's punctuation runs take a tail of [\r\n/]*).
size_t safe_cut(const uint8_t* s, size_t n, size_t from);

// ----------------------------------------------------------------------------- hashing
inline uint64_t mix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ULL;
  h ^= h >> 33;
  return h;
}

inline uint64_t hash_bytes(const uint8_t* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ (n * 0x100000001b3ULL);
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    h = (h ^ v) * 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 29;
    p += 8;
    n -= 8;
  }
  if (n) {
    uint64_t v = 0;
    std::memcpy(&v, p, n);
    h = (h ^ v) * 0x94d049bb133111ebULL;
  }
  return mix64(h) | 1;  // 0 marks an empty slot
}

// uint64 key -> uint64 value, open addressing, linear probing. Key ~0 is reserved.
class U64Map {
 public:
  static constexpr uint64_t kEmpty = ~0ULL;
  explicit U64Map(size_t expected = 16) { rehash(expected * 2 + 16); }
  const uint64_t* find(uint64_t key) const {
    size_t i = mix64(key) & mask_;
    while (true) {
      const Slot& s = slots_[i];
      if (s.key == key) return &s.val;
      if (s.key == kEmpty) return nullptr;
      i = (i + 1) & mask_;
    }
  }
  // Returns the value slot and whether it was inserted (value set to init).
  std::pair<uint64_t*, bool> insert(uint64_t key, uint64_t init) {
    if ((count_ + 1) * 2 > slots_.size()) rehash(slots_.size() * 2);
    size_t i = mix64(key) & mask_;
    while (true) {
      Slot& s = slots_[i];
      if (s.key == key) return {&s.val, false};
      if (s.key == kEmpty) {
        s.key = key;
        s.val = init;
        ++count_;
        return {&s.val, true};
      }
      i = (i + 1) & mask_;
    }
  }
  size_t size() const { return count_; }
  template <class F>
  void for_each(F&& f) const {
    for (const Slot& s : slots_)
      if (s.key != kEmpty) f(s.key, s.val);
  }

 private:
  struct Slot {
    uint64_t key;
    uint64_t val;
  };
  void rehash(size_t want) {
    size_t cap = 16;
    while (cap < want) cap <<= 1;
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(cap, Slot{kEmpty, 0});
    mask_ = cap - 1;
    count_ = 0;
    for (const Slot& s : old)
      if (s.key != kEmpty) *insert(s.key, 0).first = s.val;
  }
  std::vector<Slot> slots_;
  size_t mask_ = 0, count_ = 0;
};

// Byte-string key -> uint64 value; keys are copied into an arena.
class BytesMap {
 public:
  explicit BytesMap(size_t expected = 16) { rehash(expected * 2 + 16); }
  const uint64_t* find(const uint8_t* p, size_t n, uint64_t h) const {
    size_t i = h & mask_;
    while (true) {
      const Slot& s = slots_[i];
      if (s.hash == 0) return nullptr;
      if (s.hash == h && s.len == n && std::memcmp(keys_.data() + s.off, p, n) == 0) return &s.val;
      i = (i + 1) & mask_;
    }
  }
  const uint64_t* find(std::string_view k) const {
    auto p = reinterpret_cast<const uint8_t*>(k.data());
    return find(p, k.size(), hash_bytes(p, k.size()));
  }
  std::pair<uint64_t*, bool> insert(const uint8_t* p, size_t n, uint64_t h, uint64_t init) {
    if ((count_ + 1) * 2 > slots_.size()) rehash(slots_.size() * 2);
    size_t i = h & mask_;
    while (true) {
      Slot& s = slots_[i];
      if (s.hash == 0) {
        s.hash = h;
        s.off = keys_.size();
        s.len = static_cast<uint32_t>(n);
        s.val = init;
        keys_.append(reinterpret_cast<const char*>(p), n);
        ++count_;
        return {&s.val, true};
      }
      if (s.hash == h && s.len == n && std::memcmp(keys_.data() + s.off, p, n) == 0) return {&s.val, false};
      i = (i + 1) & mask_;
    }
  }
  size_t size() const { return count_; }
  size_t key_bytes() const { return keys_.size(); }
  void clear() {
    for (Slot& s : slots_) s.hash = 0;
    keys_.clear();
    count_ = 0;
  }
  template <class F>
  void for_each(F&& f) const {
    for (const Slot& s : slots_)
      if (s.hash) f(std::string_view(keys_.data() + s.off, s.len), s.hash, s.val);
  }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint64_t off = 0;
    uint32_t len = 0;
    uint64_t val = 0;
  };
  void rehash(size_t want) {
    size_t cap = 16;
    while (cap < want) cap <<= 1;
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
    for (const Slot& s : old) {
      if (!s.hash) continue;
      size_t i = s.hash & mask_;
      while (slots_[i].hash) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }
  std::vector<Slot> slots_;
  std::string keys_;
  size_t mask_ = 0, count_ = 0;
};

// A cache entry (PieceCache's or SharedPieceCache's): does it hold key k, and store k and its ids.
template <class Entry, class Key>
inline bool entry_holds(const Entry& e, const Key& k) {
  return e.len == k.len && e.w[0] == k.w[0] && e.w[1] == k.w[1] && e.w[2] == k.w[2];
}
template <class Entry, class Key>
inline void entry_fill(Entry& e, const Key& k, const uint32_t* ids, size_t nids) {
  e.len = uint8_t(k.len);
  e.nids = uint8_t(nids);
  e.w[0] = k.w[0];
  e.w[1] = k.w[1];
  e.w[2] = k.w[2];
  std::memcpy(e.ids, ids, nids * sizeof(uint32_t));
}

// Pre-token -> token ids, bounded (cleared when full). One 64-byte entry per pre-token of at
// most 24 bytes and 6 ids, key and ids inline, so a hit touches one cache line.
class PieceCache {
 public:
  static constexpr size_t kMaxPieceLen = 24;
  static constexpr size_t kMaxIds = 6;
  static constexpr size_t kMaxEntries = size_t(1) << 18;  // at most 32 MB of table

  struct Key {
    uint64_t w[3];
    uint64_t hash;
    uint32_t len;
  };
  static inline Key make_key(const uint8_t* p, size_t n) {
    Key k;
    k.w[0] = k.w[1] = k.w[2] = 0;
    std::memcpy(k.w, p, n);
    uint64_t h = (k.w[0] ^ (uint64_t(n) << 56)) * 0x9E3779B97F4A7C15ULL;
    h = (h ^ (h >> 32) ^ k.w[1]) * 0xbf58476d1ce4e5b9ULL;
    h = (h ^ (h >> 29) ^ k.w[2]) * 0x94d049bb133111ebULL;
    h ^= h >> 31;
    k.hash = h | 1;
    k.len = uint32_t(n);
    return k;
  }
  PieceCache() { table_.assign(size_t(1) << 15, Entry{}); mask_ = table_.size() - 1; }
  // Appends the ids and returns true when the piece is cached.
  inline bool get(const Key& k, std::vector<uint32_t>& out) const {
    size_t i = k.hash & mask_;
    while (true) {
      const Entry& e = table_[i];
      if (e.hash == k.hash && entry_holds(e, k)) {
        out.insert(out.end(), e.ids, e.ids + e.nids);
        return true;
      }
      if (e.hash == 0) return false;
      i = (i + 1) & mask_;
    }
  }
  void put(const Key& k, const uint32_t* ids, size_t nids) {
    if (nids > kMaxIds) return;
    if ((count_ + 1) * 2 > table_.size()) {
      if (table_.size() >= 2 * kMaxEntries) {
        std::fill(table_.begin(), table_.end(), Entry{});
        count_ = 0;
      } else {
        grow();
      }
    }
    size_t i = k.hash & mask_;
    while (table_[i].hash != 0) {
      const Entry& e = table_[i];
      if (e.hash == k.hash && entry_holds(e, k)) return;
      i = (i + 1) & mask_;
    }
    Entry& e = table_[i];
    e.hash = k.hash;
    entry_fill(e, k, ids, nids);
    ++count_;
  }

 private:
  struct alignas(64) Entry {
    uint64_t hash = 0;
    uint8_t len = 0, nids = 0;
    uint8_t pad[6] = {};
    uint64_t w[3] = {0, 0, 0};
    uint32_t ids[6] = {};
  };
  void grow() {
    std::vector<Entry> old;
    old.swap(table_);
    table_.assign(old.size() * 2, Entry{});
    mask_ = table_.size() - 1;
    for (const Entry& e : old) {
      if (!e.hash) continue;
      size_t i = e.hash & mask_;
      while (table_[i].hash) i = (i + 1) & mask_;
      table_[i] = e;
    }
  }
  std::vector<Entry> table_;
  size_t mask_ = 0, count_ = 0;
};

// Pre-token -> token ids, shared by the threads of a batch: insert-only and lock-free, with a
// fixed capacity (inserts stop at half full; a full cache is replaced by the next batch). A
// slot is claimed by a compare-and-swap of its hash word from 0 to a busy mark (the hash with
// its low bit cleared: real hashes are odd), filled, then published by storing the hash with
// release order; a reader compares a slot's fields only after loading that hash with acquire
// order, so it never sees a half-written entry, and a slot being written reads as a miss.
// Sharing the cache means a pre-token is merged once per batch, not once per thread.
class SharedPieceCache {
 public:
  explicit SharedPieceCache(size_t capacity) {  // capacity: a power of two
    raw_ = static_cast<char*>(std::calloc(capacity * sizeof(Entry) + 64, 1));  // zero pages, lazily
    if (!raw_) throw std::bad_alloc();
    table_ = reinterpret_cast<Entry*>((reinterpret_cast<uintptr_t>(raw_) + 63) & ~uintptr_t(63));
    mask_ = capacity - 1;
    limit_ = capacity / 2;
  }
  ~SharedPieceCache() { std::free(raw_); }
  SharedPieceCache(const SharedPieceCache&) = delete;
  SharedPieceCache& operator=(const SharedPieceCache&) = delete;

  size_t capacity() const { return mask_ + 1; }
  bool full() const { return __atomic_load_n(&count_, __ATOMIC_RELAXED) >= limit_; }

  inline bool get(const PieceCache::Key& k, std::vector<uint32_t>& out) const {
    size_t i = k.hash & mask_;
    while (true) {
      const Entry& e = table_[i];
      const uint64_t h = __atomic_load_n(&e.hash, __ATOMIC_ACQUIRE);
      if (h == k.hash && entry_holds(e, k)) {
        out.insert(out.end(), e.ids, e.ids + e.nids);
        return true;
      }
      if (h == 0) return false;
      i = (i + 1) & mask_;
    }
  }
  void put(const PieceCache::Key& k, const uint32_t* ids, size_t nids) {
    if (nids > PieceCache::kMaxIds || full()) return;
    size_t i = k.hash & mask_;
    for (size_t probes = 0; probes <= mask_; ++probes, i = (i + 1) & mask_) {
      Entry& e = table_[i];
      uint64_t h = __atomic_load_n(&e.hash, __ATOMIC_ACQUIRE);
      if (h == 0) {
        if (!__atomic_compare_exchange_n(&e.hash, &h, k.hash & ~uint64_t(1), false, __ATOMIC_ACQUIRE,
                                         __ATOMIC_ACQUIRE)) {
          if (h == k.hash) return;  // another thread stored this key (or one of the same hash) here
          continue;
        }
        entry_fill(e, k, ids, nids);
        __atomic_store_n(&e.hash, k.hash, __ATOMIC_RELEASE);
        __atomic_add_fetch(&count_, 1, __ATOMIC_RELAXED);
        return;
      }
      if (h == k.hash && entry_holds(e, k)) return;
    }
  }

 private:
  struct alignas(64) Entry {
    uint64_t hash;  // 0: empty; even: being written; odd: the key's hash, fields valid
    uint8_t len, nids;
    uint8_t pad[6];
    uint64_t w[3];
    uint32_t ids[6];
  };
  char* raw_ = nullptr;
  Entry* table_ = nullptr;
  size_t mask_ = 0, limit_ = 0, count_ = 0;
};

// ----------------------------------------------------------------------------- limits
// What one tokenizer may hold. Memory is sized by the largest id and the time to derive a
// tiktoken vocabulary's merges grows with each token's length, so a vocabulary past these is
// refused (std::length_error) before anything is allocated for it. Real vocabularies hold a
// few hundred thousand ids and tokens of at most a few hundred bytes.
constexpr size_t kMaxVocab = size_t(1) << 21;  // every id, ordinary or special, is below this
constexpr size_t kMaxTokenBytes = 1024;        // bytes of one token (a special token's text included)

// ----------------------------------------------------------------------------- the BPE model
class DisallowedSpecial : public std::runtime_error {
 public:
  explicit DisallowedSpecial(const std::string& tok) : std::runtime_error(tok) {}
};

struct Merge {
  uint32_t a, b, id;
};

class BPE {
 public:
  static constexpr uint32_t kNoRank = 0xFFFFFFFFu;

  // token_bytes[id] = the bytes of token id (every one of the 256 single bytes must be a
  // token). merges: ordered pairs (a, b); empty with rank_by_id derives them from the
  // vocabulary (tiktoken's rule: any two adjacent parts whose concatenation is a token
  // merge, lowest id first). rank_by_id also makes a whole pre-token that is itself a
  // token encode as that token (tiktoken does that; Hugging Face's ignore_merges).
  BPE(std::vector<std::string> token_bytes, const std::vector<std::pair<uint32_t, uint32_t>>& merges,
      bool rank_by_id, std::vector<std::pair<std::string, uint32_t>> specials, Pattern pattern);

  size_t n_vocab() const { return n_vocab_; }
  Pattern pattern() const { return pattern_; }
  bool rank_by_id() const { return rank_by_id_; }
  const std::vector<Merge>& merges() const { return merges_; }
  const std::vector<std::pair<std::string, uint32_t>>& specials() const { return specials_; }
  // Bytes of a token (ordinary or special); empty view for an unknown id.
  std::string_view token(uint32_t id) const {
    if (id >= tok_off_.size() - 1) return {};
    return std::string_view(tok_data_.data() + tok_off_[id], tok_off_[id + 1] - tok_off_[id]);
  }
  bool is_token(uint32_t id) const { return id < tok_off_.size() - 1 && tok_valid_[id]; }

  // Encoding. allowed/disallowed: indices into specials(). Throws DisallowedSpecial.
  void encode(const uint8_t* s, size_t n, const std::vector<int>& allowed, const std::vector<int>& disallowed,
              std::vector<uint32_t>& out) const;
  void encode_ordinary(const uint8_t* s, size_t n, std::vector<uint32_t>& out) const;
  // The same, with a cache shared by the threads of a batch (see shared_cache()).
  void encode(const uint8_t* s, size_t n, const std::vector<int>& allowed, const std::vector<int>& disallowed,
              std::vector<uint32_t>& out, SharedPieceCache& cache) const;
  // Split into pre-tokens (for tests and training).
  void pretokenize(const uint8_t* s, size_t n, std::vector<std::pair<size_t, size_t>>& out) const;

  // Decoding: appends token bytes; returns the first invalid id or -1.
  int64_t decode_append(const uint32_t* ids, size_t k, std::string& out) const;
  // Byte length of the tokens' text, or -1 - (position of the first invalid id).
  int64_t decoded_size(const uint32_t* ids, size_t k) const;
  // Writes the bytes of valid ids (checked by decoded_size) to dst.
  void decode_into(const uint32_t* ids, size_t k, char* dst) const;

  // The merge rank and result of a pair, or kNoRank.
  inline uint64_t pair_lookup(uint32_t a, uint32_t b) const {
    const uint64_t* v = pairs_.find((uint64_t(a) << 32) | b);
    return v ? *v : (uint64_t(kNoRank) << 32);
  }

  struct CacheLease;
  PieceCache* acquire_cache() const;
  void clear_caches() const {
    std::lock_guard<std::mutex> g(cache_mu_);
    caches_.clear();
    shared_.reset();
  }
  void release_cache(PieceCache* c) const;
  // The batch cache, kept between batches; replaced by a larger one when it is full or
  // smaller than a batch of text_bytes bytes wants.
  std::shared_ptr<SharedPieceCache> shared_cache(size_t text_bytes) const;

 private:
  template <size_t (*Next)(const uint8_t*, size_t, size_t), class Cache>
  void encode_ordinary_t(const uint8_t* s, size_t n, std::vector<uint32_t>& out, Cache& cache) const;
  template <class Cache>
  void encode_piece(const uint8_t* p, size_t n, std::vector<uint32_t>& out, Cache& cache) const;
  void bpe_short(const uint8_t* p, size_t n, std::vector<uint32_t>& out) const;
  void bpe_long(const uint8_t* p, size_t n, std::vector<uint32_t>& out) const;
  template <class Cache>
  void encode_ordinary_cached(const uint8_t* s, size_t n, std::vector<uint32_t>& out, Cache& cache) const;
  template <class Cache>
  void encode_with(const uint8_t* s, size_t n, const std::vector<int>& allowed, const std::vector<int>& disallowed,
                   std::vector<uint32_t>& out, Cache& cache) const;

  Pattern pattern_;
  bool rank_by_id_;
  size_t n_vocab_ = 0;
  std::vector<uint32_t> byte_id_;  // 256 entries
  std::string tok_data_;
  std::vector<uint64_t> tok_off_;
  std::vector<uint8_t> tok_valid_;
  BytesMap vocab_;  // ordinary token bytes -> id
  U64Map pairs_;    // (a << 32 | b) -> (rank << 32 | merged id)
  std::vector<Merge> merges_;
  std::vector<std::pair<std::string, uint32_t>> specials_;
  mutable std::mutex cache_mu_;
  mutable std::vector<std::unique_ptr<PieceCache>> caches_;
  mutable std::shared_ptr<SharedPieceCache> shared_;
};

// ----------------------------------------------------------------------------- training
class Trainer {
 public:
  Trainer(Pattern pattern, std::vector<std::string> specials) : pattern_(pattern), specials_(std::move(specials)) {}
  // Count the pre-tokens of texts (special-token text is cut out), using num_threads threads.
  void add(const std::vector<std::string_view>& texts, int num_threads);
  size_t n_words() const { return counts_.size(); }
  // Learn merges until there are n_tokens ordinary tokens (the 256 bytes included) or no pair
  // is left. Returns the merges in order, (a, b) -> id; new ids are 256, 257, ... in order of
  // creation, and a merge whose bytes are already a token reuses its id (as Hugging Face's
  // BpeTrainer does). Ties on count go to the smaller (a, b).
  std::vector<Merge> train(size_t n_tokens) const;
  // Tokens of the counted corpus under the segmentation the last train() ended with.
  uint64_t final_tokens() const { return final_tokens_; }

 private:
  Pattern pattern_;
  std::vector<std::string> specials_;
  BytesMap counts_{1 << 16};
  mutable uint64_t final_tokens_ = 0;
};

}  // namespace fastlm_tok
