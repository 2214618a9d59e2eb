// half.cc: bit-exact float <-> F16/BF16 conversion with round-to-nearest-even.
// Integer arithmetic only, so results do not depend on the FPU rounding mode or flush-to-zero settings.
#include "formats/half.h"

#include <cstring>

namespace keel {
namespace {

uint32_t Bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  return x;
}
float FromBits(uint32_t x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

}  // namespace

uint16_t FloatToF16(float f) {
  const uint32_t x = Bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) {  // NaN: quiet it, keep the top payload bits
    return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  }
  // 65520 = halfway between the largest half (65504) and 2^16; ties go to even, which is infinity.
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  if (a >= 0x38800000u) {  // result is a normal half (|f| >= 2^-14 before rounding)
    uint32_t r = a - (112u << 23);         // rebias the exponent from 127 to 15
    r += 0xfffu + ((r >> 13) & 1u);        // round the 13 dropped bits to nearest even
    return static_cast<uint16_t>(sign | (r >> 13));  // a carry into the exponent is correct rounding
  }
  if (a <= 0x33000000u) return sign;  // |f| <= 2^-25: rounds to zero (2^-25 is a tie, zero is even)
  // Result is a subnormal half (units of 2^-24), possibly rounding up to the smallest normal.
  const uint32_t e = a >> 23;                        // 102..112
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;    // 24-bit significand, value = m * 2^(e-150)
  const uint32_t shift = 126u - e;                   // 14..24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

float F16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  if (e == 0x1f) return FromBits(sign | 0x7f800000u | (m << 13));  // inf / NaN (payload kept)
  if (e == 0) {
    if (m == 0) return FromBits(sign);
    e = 113;  // subnormal: normalise; value = m * 2^-24
    while (!(m & 0x400u)) {
      m <<= 1;
      --e;
    }
    m &= 0x3ffu;
    return FromBits(sign | (e << 23) | (m << 13));
  }
  return FromBits(sign | ((e + 112u) << 23) | (m << 13));
}

uint16_t FloatToBF16(float f) {
  uint32_t x = Bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);  // round to nearest even; overflow correctly carries into inf
  return static_cast<uint16_t>(x >> 16);
}

float BF16ToFloat(uint16_t h) { return FromBits(static_cast<uint32_t>(h) << 16); }

void F16ToFloatN(const uint16_t* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = F16ToFloat(src[i]);
}
void BF16ToFloatN(const uint16_t* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = BF16ToFloat(src[i]);
}
void FloatToF16N(const float* src, uint16_t* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = FloatToF16(src[i]);
}
void FloatToBF16N(const float* src, uint16_t* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = FloatToBF16(src[i]);
}

}  // namespace keel
