// hash.cc: Hash64 (word-at-a-time multiply-xor mix) and Rng::Normal.
#include "core/hash.h"

#include <cmath>
#include <cstdio>
#include <cstring>

namespace keel {

uint64_t Hash64(const void* data, size_t n, uint64_t seed) {
  const auto* p = static_cast<const uint8_t*>(data);
  constexpr uint64_t kM = 0x9FB21C651E98DF25ull;
  // Four independent lanes so the multiply latency overlaps.
  uint64_t h[4] = {seed ^ 0x243F6A8885A308D3ull, seed ^ 0x13198A2E03707344ull, seed ^ 0xA4093822299F31D0ull,
                   seed ^ 0x082EFA98EC4E6C89ull};
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int l = 0; l < 4; ++l) {
      uint64_t w;
      std::memcpy(&w, p + i + 8 * l, 8);
      h[l] = (h[l] ^ w) * kM;
      h[l] ^= h[l] >> 29;
    }
  }
  uint64_t tail = 0;
  size_t rem = n - i;
  for (size_t j = 0; j < rem; ++j) tail |= static_cast<uint64_t>(p[i + j]) << (8 * (j % 8));
  uint64_t r = SplitMix64(h[0]) ^ SplitMix64(h[1] + 1) ^ SplitMix64(h[2] + 2) ^ SplitMix64(h[3] + 3);
  // The tail beyond 8 bytes is folded in word by word.
  for (size_t j = 0; j < rem; j += 8) {
    uint64_t w = 0;
    std::memcpy(&w, p + i + j, rem - j < 8 ? rem - j : 8);
    r = SplitMix64(r ^ w);
  }
  (void)tail;
  return SplitMix64(r ^ static_cast<uint64_t>(n));
}

std::string HashHex(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

float Rng::Normal() {
  // Two 53-bit uniforms; u1 in (0, 1] so the log is finite.
  double u1 = (static_cast<double>(Next() >> 11) + 1.0) * (1.0 / 9007199254740992.0);
  double u2 = static_cast<double>(Next() >> 11) * (1.0 / 9007199254740992.0);
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
}

}  // namespace keel
