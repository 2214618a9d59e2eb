// formats_half_test.cc: tests of the F16/BF16 conversions (formats/half.h).
// Exhaustive round trips, rounding ties, specials, subnormals, and agreement with independent references
// (the compiler's _Float16 and a nearest-neighbour search).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "core/hash.h"
#include "formats/half.h"

namespace keel {
namespace {

uint32_t Bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  return x;
}
float FromBits(uint32_t x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

TEST(HalfTest, F16ExhaustiveRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t hb = static_cast<uint16_t>(h);
    const float f = F16ToFloat(hb);
    const bool nan = (hb & 0x7c00) == 0x7c00 && (hb & 0x3ff);
    if (nan) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      const uint16_t back = FloatToF16(f);
      ASSERT_EQ(back & 0x7c00, 0x7c00);
      ASSERT_NE(back & 0x3ff, 0);
      ASSERT_EQ(back & 0x8000, hb & 0x8000);
    } else {
      ASSERT_EQ(FloatToF16(f), hb) << std::hex << h << " -> " << f;
    }
  }
}

TEST(HalfTest, BF16ExhaustiveRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t hb = static_cast<uint16_t>(h);
    const float f = BF16ToFloat(hb);
    ASSERT_EQ(Bits(f), h << 16);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(BF16ToFloat(FloatToBF16(f))));
    } else {
      ASSERT_EQ(FloatToBF16(f), hb) << std::hex << h;
    }
  }
}

TEST(HalfTest, F16KnownValues) {
  EXPECT_EQ(FloatToF16(0.0f), 0x0000);
  EXPECT_EQ(FloatToF16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToF16(1.0f), 0x3c00);
  EXPECT_EQ(FloatToF16(-2.0f), 0xc000);
  EXPECT_EQ(FloatToF16(0.5f), 0x3800);
  EXPECT_EQ(FloatToF16(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToF16(std::ldexp(1.0f, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(FloatToF16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(FloatToF16(std::ldexp(1023.0f, -24)), 0x03ff);  // largest subnormal
  EXPECT_EQ(F16ToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToFloat(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(F16ToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(F16ToFloat(0x3555), 0.333251953125f);
}

TEST(HalfTest, F16RoundsToNearestEven) {
  // Ties between 1 and 1+2^-10 go to the even 1; between 1+2^-10 and 1+2^-9 to the even 1+2^-9.
  EXPECT_EQ(FloatToF16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(FloatToF16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  // Just above a tie rounds up, just below rounds down.
  EXPECT_EQ(FloatToF16(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)), 0x3c01);
  EXPECT_EQ(FloatToF16(1.0f + std::ldexp(1.0f, -11) - std::ldexp(1.0f, -20)), 0x3c00);
  // Mantissa carry into the exponent: 2 - 2^-12 rounds up to 2.
  EXPECT_EQ(FloatToF16(2.0f - std::ldexp(1.0f, -12)), 0x4000);
  // Subnormal ties (units of 2^-24): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2; and just above 0.5 -> 1.
  EXPECT_EQ(FloatToF16(std::ldexp(1.0f, -25)), 0x0000);
  EXPECT_EQ(FloatToF16(-std::ldexp(1.0f, -25)), 0x8000);
  EXPECT_EQ(FloatToF16(std::ldexp(3.0f, -25)), 0x0002);
  EXPECT_EQ(FloatToF16(std::ldexp(5.0f, -25)), 0x0002);
  EXPECT_EQ(FloatToF16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  // The largest subnormal plus half a unit is a tie that rounds up to the smallest normal (even).
  EXPECT_EQ(FloatToF16(std::ldexp(1023.5f, -24)), 0x0400);
  EXPECT_EQ(FloatToF16(std::ldexp(1.0f, -30)), 0x0000);  // underflow
}

TEST(HalfTest, F16OverflowInfNan) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(FloatToF16(inf), 0x7c00);
  EXPECT_EQ(FloatToF16(-inf), 0xfc00);
  EXPECT_EQ(FloatToF16(65519.0f), 0x7bff);   // below the tie
  EXPECT_EQ(FloatToF16(65520.0f), 0x7c00);   // tie with 2^16: even is inf
  EXPECT_EQ(FloatToF16(1e10f), 0x7c00);
  EXPECT_EQ(FloatToF16(-1e10f), 0xfc00);
  EXPECT_EQ(FloatToF16(std::numeric_limits<float>::max()), 0x7c00);
  const uint16_t n = FloatToF16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(n & 0x7c00, 0x7c00);
  EXPECT_NE(n & 0x3ff, 0);
  // A NaN whose payload lives only in the low float bits must not become infinity.
  const uint16_t low = FloatToF16(FromBits(0x7f800001));
  EXPECT_EQ(low & 0x7c00, 0x7c00);
  EXPECT_NE(low & 0x3ff, 0);
  EXPECT_TRUE(std::isinf(F16ToFloat(0x7c00)));
  EXPECT_TRUE(std::isnan(F16ToFloat(0x7e00)));
  EXPECT_TRUE(std::signbit(F16ToFloat(0x8000)));
}

TEST(HalfTest, BF16RoundingAndSpecials) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(FloatToBF16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBF16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBF16(FromBits(0x3f808000)), 0x3f80);  // tie, even stays
  EXPECT_EQ(FloatToBF16(FromBits(0x3f818000)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(FloatToBF16(FromBits(0x3f808001)), 0x3f81);
  EXPECT_EQ(FloatToBF16(FromBits(0x3f807fff)), 0x3f80);
  EXPECT_EQ(FloatToBF16(inf), 0x7f80);
  EXPECT_EQ(FloatToBF16(-inf), 0xff80);
  EXPECT_EQ(FloatToBF16(std::numeric_limits<float>::max()), 0x7f80);  // rounds past the largest bf16
  EXPECT_EQ(FloatToBF16(FromBits(0x00000001)), 0x0000);  // float subnormal -> 0
  EXPECT_EQ(FloatToBF16(FromBits(0x00018000)), 0x0002);  // subnormal tie to even
  // NaNs stay NaN even when the payload is only in the dropped low bits.
  for (uint32_t nan_bits : {0x7f800001u, 0xff800001u, 0x7fc00000u, 0x7fffffffu}) {
    const uint16_t b = FloatToBF16(FromBits(nan_bits));
    EXPECT_TRUE(std::isnan(BF16ToFloat(b))) << std::hex << nan_bits;
    EXPECT_EQ(b & 0x8000, (nan_bits >> 16) & 0x8000);
  }
}

// Reference rounding by search: the nearest of the two neighbouring 16-bit values, ties to even.
template <typename ToFloat>
uint16_t NearestRef(float x, uint16_t lo, ToFloat to_float) {
  const uint16_t hi = static_cast<uint16_t>(lo + 1);
  const double a = to_float(lo), b = to_float(hi), v = x;
  const double da = std::fabs(v - a), db = std::fabs(b - v);
  if (da < db) return lo;
  if (db < da) return hi;
  return (lo & 1) ? hi : lo;
}

TEST(HalfTest, RandomFloatsMatchReferences) {
  Rng rng(1234);
  for (int i = 0; i < 200000; ++i) {
    const float x = FromBits(static_cast<uint32_t>(rng.Next()));
    if (std::isnan(x)) continue;
    // BF16: neighbours are truncation and truncation + 1 ulp (away from zero).
    const uint16_t trunc = static_cast<uint16_t>(Bits(x) >> 16);
    if (!std::isinf(x) && (trunc & 0x7fff) != 0x7f7f) {
      ASSERT_EQ(FloatToBF16(x), NearestRef(x, trunc, BF16ToFloat)) << std::hex << Bits(x);
    }
#if defined(__FLT16_MAX__)
    ASSERT_EQ(FloatToF16(x), [&] {
      _Float16 h = static_cast<_Float16>(x);
      uint16_t b;
      std::memcpy(&b, &h, 2);
      return b;
    }()) << std::hex << Bits(x);
#endif
  }
#if defined(__FLT16_MAX__)
  // Dense sweep through the F16 subnormal/normal boundary region and the overflow boundary.
  for (uint32_t b = 0x32f00000u; b < 0x38900000u; b += 0x101) {
    _Float16 h = static_cast<_Float16>(FromBits(b));
    uint16_t ref;
    std::memcpy(&ref, &h, 2);
    ASSERT_EQ(FloatToF16(FromBits(b)), ref) << std::hex << b;
  }
  for (uint32_t b = 0x477f0000u; b < 0x47810000u; ++b) {
    _Float16 h = static_cast<_Float16>(FromBits(b));
    uint16_t ref;
    std::memcpy(&ref, &h, 2);
    ASSERT_EQ(FloatToF16(FromBits(b)), ref) << std::hex << b;
  }
#endif
}

TEST(HalfTest, BulkFormsMatchScalar) {
  float src[5] = {0.1f, -3.5f, 65504.0f, 1e-7f, 7.0f};
  uint16_t h[5], b[5];
  float back[5];
  FloatToF16N(src, h, 5);
  FloatToBF16N(src, b, 5);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(h[i], FloatToF16(src[i]));
    EXPECT_EQ(b[i], FloatToBF16(src[i]));
  }
  F16ToFloatN(h, back, 5);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(back[i], F16ToFloat(h[i]));
  BF16ToFloatN(b, back, 5);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(back[i], BF16ToFloat(b[i]));
}

}  // namespace
}  // namespace keel
