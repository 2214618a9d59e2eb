// exact_sum.cc: fixed-point conversion for deterministic gradient sums.
#include "train/exact_sum.h"

#include <cmath>

namespace keel {

size_t AddFixedPoint(int64_t* acc, const float* g, size_t n, size_t* saturated) {
  const double kScale = std::ldexp(1.0, kFixedFractionBits);
  const double kLimit = std::ldexp(1.0, 16 + kFixedFractionBits);
  size_t bad = 0, sat = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad, sat)
  for (size_t i = 0; i < n; ++i) {
    double x = static_cast<double>(g[i]) * kScale;  // exact: a float times a power of two
    if (!std::isfinite(x)) {
      ++bad;
      continue;
    }
    if (x > kLimit) { x = kLimit; ++sat; }
    if (x < -kLimit) { x = -kLimit; ++sat; }
    acc[i] += std::llrint(x);  // round-half-even: deterministic
  }
  if (saturated) *saturated = sat;
  return bad;
}

size_t RoundThroughFixedPoint(float* g, size_t n) {
  const double kScale = std::ldexp(1.0, kFixedFractionBits), kInv = std::ldexp(1.0, -kFixedFractionBits);
  const double kLimit = std::ldexp(1.0, 16 + kFixedFractionBits);
  size_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad)
  for (size_t i = 0; i < n; ++i) {
    double x = static_cast<double>(g[i]) * kScale;
    if (!std::isfinite(x)) {
      ++bad;
      continue;
    }
    x = x > kLimit ? kLimit : (x < -kLimit ? -kLimit : x);
    g[i] = static_cast<float>(static_cast<double>(std::llrint(x)) * kInv);
  }
  return bad;
}

void FixedPointToFloat(float* out, const int64_t* acc, size_t n, double scale) {
  const double k = std::ldexp(1.0, -kFixedFractionBits) * scale;
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(static_cast<double>(acc[i]) * k);
}

}  // namespace keel
