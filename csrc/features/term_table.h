// Term table: a hash set of byte strings that numbers its keys 0, 1, 2, ... in insertion order.
//
// Keys live back to back in one arena (offsets[i]..offsets[i+1]); the open-addressing table
// (linear probing, power-of-two capacity, load <= 1/2) holds one 64-bit slot per entry:
// the upper 32 bits of the key's hash and id + 1 (0 = empty), so a probe compares hashes
// without touching the arena. One table is owned by one thread while it is written; a
// finished table is shared read-only by all threads.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

namespace fastlm_features {

// a == b for short keys without a call into libc.
inline bool same_bytes(const char* a, const char* b, size_t n) {
    while (n >= 8) {
        uint64_t x, y;
        std::memcpy(&x, a, 8);
        std::memcpy(&y, b, 8);
        if (x != y) return false;
        a += 8;
        b += 8;
        n -= 8;
    }
    while (n--) {
        if (*a++ != *b++) return false;
    }
    return true;
}

inline uint64_t hash_bytes(const char* p, size_t n) {
    const uint64_t m = 0x9FB21C651E98DF25ull;
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (static_cast<uint64_t>(n) * 0xFF51AFD7ED558CCDull);
    while (n >= 8) {
        uint64_t w;
        std::memcpy(&w, p, 8);
        h = (h ^ w) * m;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t w = 0;
        std::memcpy(&w, p, n);
        h = (h ^ w) * m;
        h ^= h >> 29;
    }
    h ^= h >> 32;
    h *= 0xD6E8FEB86659FD93ull;
    h ^= h >> 32;
    return h;
}

class TermTable {
  public:
    TermTable() { reset_slots(16); }

    size_t size() const { return offsets_.size() - 1; }
    size_t arena_bytes() const { return arena_.size(); }

    std::string_view term(size_t id) const {
        return std::string_view(arena_.data() + offsets_[id], offsets_[id + 1] - offsets_[id]);
    }

    // id of key, or -1 when absent.
    int64_t find(std::string_view key) const { return find(key, hash_bytes(key.data(), key.size())); }

    int64_t find(std::string_view key, uint64_t h) const {
        const uint32_t tag = static_cast<uint32_t>(h >> 32);
        for (uint64_t i = h & mask_;; i = (i + 1) & mask_) {
            const uint64_t s = slots_[i];
            if (s == 0) return -1;
            if (static_cast<uint32_t>(s >> 32) == tag) {
                const uint32_t id = static_cast<uint32_t>(s) - 1;
                if (equals(id, key)) return id;
            }
        }
    }

    // id of key, inserting it (with the next id) when absent.
    uint32_t insert(std::string_view key) { return insert(key, hash_bytes(key.data(), key.size())); }

    uint32_t insert(std::string_view key, uint64_t h) {
        const uint32_t tag = static_cast<uint32_t>(h >> 32);
        uint64_t i = h & mask_;
        for (;; i = (i + 1) & mask_) {
            const uint64_t s = slots_[i];
            if (s == 0) break;
            if (static_cast<uint32_t>(s >> 32) == tag) {
                const uint32_t id = static_cast<uint32_t>(s) - 1;
                if (equals(id, key)) return id;
            }
        }
        const uint32_t id = static_cast<uint32_t>(size());
        arena_.insert(arena_.end(), key.data(), key.data() + key.size());
        offsets_.push_back(arena_.size());
        hashes_.push_back(h);
        slots_[i] = (static_cast<uint64_t>(tag) << 32) | (static_cast<uint64_t>(id) + 1);
        if (2 * size() > slots_.size()) rehash(2 * slots_.size());
        return id;
    }

    void reserve(size_t n_terms, size_t n_bytes) {
        arena_.reserve(n_bytes);
        offsets_.reserve(n_terms + 1);
        hashes_.reserve(n_terms);
        size_t cap = slots_.size();
        while (cap < 2 * n_terms + 2) cap *= 2;
        if (cap != slots_.size()) rehash(cap);
    }

    uint64_t hash_of(size_t id) const { return hashes_[id]; }

    bool equals(size_t id, std::string_view key) const {
        const uint64_t a = offsets_[id];
        return offsets_[id + 1] - a == key.size() && same_bytes(arena_.data() + a, key.data(), key.size());
    }

  private:
    void reset_slots(size_t cap) {
        slots_.assign(cap, 0);
        mask_ = cap - 1;
    }

    void rehash(size_t cap) {
        reset_slots(cap);
        for (size_t id = 0; id < size(); ++id) {
            const uint64_t h = hashes_[id];
            uint64_t i = h & mask_;
            while (slots_[i] != 0) i = (i + 1) & mask_;
            slots_[i] = ((h >> 32) << 32) | (static_cast<uint64_t>(id) + 1);
        }
    }

    std::vector<char> arena_;
    std::vector<uint64_t> offsets_{0};
    std::vector<uint64_t> hashes_;
    std::vector<uint64_t> slots_;
    uint64_t mask_ = 0;
};

}  // namespace fastlm_features
