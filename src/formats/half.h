// half.h: conversions between float and IEEE binary16 (F16) and bfloat16 (BF16).
// Contract: pure functions, no errors, thread-safe. Float->16-bit rounds to nearest, ties to even; values
// beyond the target's range become +-inf; NaN stays NaN (made quiet, sign and top payload bits kept);
// F16 subnormals are produced and read exactly. 16->float is exact for every input.
#pragma once
#include <cstddef>
#include <cstdint>

namespace keel {

uint16_t FloatToF16(float f);
float F16ToFloat(uint16_t h);
uint16_t FloatToBF16(float f);
float BF16ToFloat(uint16_t h);

// Bulk forms (n elements; src and dst must not overlap).
void F16ToFloatN(const uint16_t* src, float* dst, size_t n);
void BF16ToFloatN(const uint16_t* src, float* dst, size_t n);
void FloatToF16N(const float* src, uint16_t* dst, size_t n);
void FloatToBF16N(const float* src, uint16_t* dst, size_t n);

}  // namespace keel
