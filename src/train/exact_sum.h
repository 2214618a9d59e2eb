// exact_sum.h: order-independent summation of gradients (keel's deterministic mode).
//
// Floating-point addition is not associative, so a gradient summed over micro-batches in a different grouping
// (one worker doing 4 micro-batches vs 4 workers doing one each) differs in the last bits. keel converts each
// micro-batch's gradient to 64-bit fixed point with 40 fractional bits, sums integers (exact, hence
// independent of order and grouping — also across workers, via an int64 allreduce), and converts back once.
// Values are saturated just below +-2^16 (counted), which leaves headroom for 2^7 summed micro-batches; the
// resolution 2^-40 ~ 9e-13 is below a float ulp for gradients above ~1e-5 in magnitude.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace keel {

inline constexpr int kFixedFractionBits = 40;
inline constexpr int kMaxExactMicroBatches = 128;

// acc[i] += fixed(g[i]). Returns the number of non-finite inputs (their slots are left unchanged);
// *saturated (if given) receives the number of inputs clamped to +-2^16.
size_t AddFixedPoint(int64_t* acc, const float* g, size_t n, size_t* saturated = nullptr);
// g[i] = float(fixed(g[i]) * 2^-40): the one-term sum, in place. Returns the number of non-finite inputs;
// *saturated as above.
size_t RoundThroughFixedPoint(float* g, size_t n, size_t* saturated = nullptr);
// out[i] = float(acc[i] * 2^-40 * scale), rounding once through double.
void FixedPointToFloat(float* out, const int64_t* acc, size_t n, double scale);

}  // namespace keel
