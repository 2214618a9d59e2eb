// hash.h: fast non-cryptographic 64-bit hashing (checksums of files and of parameter buffers) and the
// counter-based random numbers keel uses wherever a value must be a pure function of its coordinates
// (batch sampling, initialisation), so any process can recompute it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace keel {

// 64-bit hash of n bytes (a word-at-a-time mix; ~several GB/s). Stable across platforms of one endianness.
uint64_t Hash64(const void* data, size_t n, uint64_t seed = 0);
std::string HashHex(uint64_t h);

inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
// Combines coordinates into one well-mixed key.
inline uint64_t MixKey(uint64_t a, uint64_t b) { return SplitMix64(a ^ SplitMix64(b + 0x632BE59BD9B4E019ull)); }

// A small sequential generator (xoshiro256**), seedable and serialisable (4 words of state).
struct Rng {
  uint64_t s[4];
  explicit Rng(uint64_t seed = 0) { Seed(seed); }
  void Seed(uint64_t seed) {
    for (int i = 0; i < 4; ++i) s[i] = seed = SplitMix64(seed + static_cast<uint64_t>(i));
  }
  uint64_t Next() {
    const uint64_t result = Rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t;
    s[3] = Rotl(s[3], 45);
    return result;
  }
  // Uniform in [0, 1) with 24 random bits (exactly representable in float).
  float Uniform() { return static_cast<float>(Next() >> 40) * (1.0f / 16777216.0f); }
  // Standard normal (Box-Muller, double precision internally).
  float Normal();
  // Uniform integer in [0, n).
  uint64_t Below(uint64_t n) { return n ? Next() % n : 0; }

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
};

}  // namespace keel
