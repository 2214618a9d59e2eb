// exact_sum.cc: fixed-point conversion for deterministic gradient sums.
#include "train/exact_sum.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace keel {

namespace {

// The saturation bound, just under 2^16 in value (2^56 in fixed point): 2^56 - 16 is a double exactly, and
// kMaxExactMicroBatches (2^7) of them sum to 2^63 - 2048, inside int64 (2^7 x 2^56 would be 2^63, one past it).
const double kLimit = std::ldexp(1.0, 16 + kFixedFractionBits) - 16.0;
static_assert(kMaxExactMicroBatches <= 128, "the saturation bound leaves headroom for 2^7 micro-batches only");

}  // namespace

size_t AddFixedPoint(int64_t* acc, const float* g, size_t n, size_t* saturated) {
  const double kScale = std::ldexp(1.0, kFixedFractionBits);
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

namespace {

// One element of RoundThroughFixedPoint: the reference (and the loop tail).
inline float RoundOne(float gi, double scale, double inv, double limit, size_t* bad, size_t* sat) {
  double x = static_cast<double>(gi) * scale;
  if (!std::isfinite(x)) {
    ++*bad;
    return gi;
  }
  if (x > limit || x < -limit) ++*sat;
  x = x > limit ? limit : (x < -limit ? -limit : x);
  return static_cast<float>(static_cast<double>(std::llrint(x)) * inv);
}

}  // namespace

size_t RoundThroughFixedPoint(float* g, size_t n, size_t* saturated) {
  const double kScale = std::ldexp(1.0, kFixedFractionBits), kInv = std::ldexp(1.0, -kFixedFractionBits);
  constexpr size_t kBlock = 8192;  // elements per OpenMP work item
  const size_t blocks = (n + kBlock - 1) / kBlock;
  size_t bad = 0, sat = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad, sat)
  for (size_t b = 0; b < blocks; ++b) {
    const size_t hi = std::min(n, (b + 1) * kBlock);
    size_t i = b * kBlock;
#ifdef __AVX2__
    // 4 lanes, the same result as RoundOne bit for bit (GCC leaves the scalar loop scalar: llrint and the
    // branch; it was ~10% of a GPT-2-small step): x = g * 2^40 (exact) clamped to +-2^56, rounded to an integer
    // ties-to-even by adding and subtracting 1.5 * 2^52 where |x| < 2^51 (larger values here are integers
    // already: a float has 24 bits), which like llrint gives +0 for -0.3; scaled back and rounded to float.
    // Non-finite lanes keep their input and are counted.
    const __m256d scale = _mm256_set1_pd(kScale), inv = _mm256_set1_pd(kInv), top = _mm256_set1_pd(kLimit),
                  bottom = _mm256_set1_pd(-kLimit), magic = _mm256_set1_pd(6755399441055744.0),
                  small = _mm256_set1_pd(0x1p51), sign = _mm256_set1_pd(-0.0);
    for (; i + 4 <= hi; i += 4) {
      const __m128 gv = _mm_loadu_ps(g + i);
      const __m128 finite = _mm_cmpeq_ps(_mm_sub_ps(gv, gv), _mm_setzero_ps());
      __m256d x = _mm256_mul_pd(_mm256_cvtps_pd(gv), scale);
      sat += static_cast<size_t>(__builtin_popcount(  // finite lanes beyond the bound (lane order matches)
          _mm256_movemask_pd(_mm256_cmp_pd(_mm256_andnot_pd(sign, x), top, _CMP_GT_OQ)) & _mm_movemask_ps(finite)));
      x = _mm256_min_pd(_mm256_max_pd(x, bottom), top);
      const __m256d rounded = _mm256_sub_pd(_mm256_add_pd(x, magic), magic);
      const __m256d use = _mm256_cmp_pd(_mm256_andnot_pd(sign, x), small, _CMP_LT_OQ);
      const __m128 out = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_blendv_pd(x, rounded, use), inv));
      _mm_storeu_ps(g + i, _mm_blendv_ps(gv, out, finite));
      bad += static_cast<size_t>(4 - __builtin_popcount(_mm_movemask_ps(finite)));
    }
#endif
    for (; i < hi; ++i) g[i] = RoundOne(g[i], kScale, kInv, kLimit, &bad, &sat);
  }
  if (saturated) *saturated = sat;
  return bad;
}

void FixedPointToFloat(float* out, const int64_t* acc, size_t n, double scale) {
  const double k = std::ldexp(1.0, -kFixedFractionBits) * scale;
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(static_cast<double>(acc[i]) * k);
}

}  // namespace keel
