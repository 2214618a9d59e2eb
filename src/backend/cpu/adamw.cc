// adamw.cc: the AdamW update (decoupled weight decay, bias-corrected moments) and the sum of squares used
// for global gradient-norm clipping.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/vec_math.h"

namespace keel::cpu {

namespace {

// One element of the update: the reference. The vector loop below performs the same float operations in the same
// order on kLanes elements at a time (IEEE division and square root are correctly rounded in both), so every
// element's result is the same on either path.
inline void AdamWElem(float* params, const float* grads, float* m, float* v, size_t i, float wd, float bc1,
                      float bc2, const AdamWParams& p) {
  float g = grads[i] * p.grad_scale;
  float mi = p.beta1 * m[i] + (1.0f - p.beta1) * g;
  float vi = p.beta2 * v[i] + (1.0f - p.beta2) * g * g;
  m[i] = mi;
  v[i] = vi;
  float mhat = mi / bc1, vhat = vi / bc2;
  params[i] -= p.lr * (mhat / (std::sqrt(vhat) + p.eps) + wd * params[i]);
}

}  // namespace

void AdamW(float* params, const float* grads, float* m, float* v, const uint8_t* decay_mask, size_t n,
           const AdamWParams& p) {
  // t counts from 1 (AdamW::Step passes step + 1); t <= 0 would make the bias corrections 0 and every update inf.
  const double t = p.t < 1 ? 1.0 : static_cast<double>(p.t);
  const float bc1 = 1.0f - static_cast<float>(std::pow(static_cast<double>(p.beta1), t));
  const float bc2 = 1.0f - static_cast<float>(std::pow(static_cast<double>(p.beta2), t));
  constexpr size_t kBlock = 8192;  // elements per OpenMP work item (a multiple of kLanes)
  const size_t blocks = (n + kBlock - 1) / kBlock;
  const float omb1 = 1.0f - p.beta1, omb2 = 1.0f - p.beta2;
#pragma omp parallel for schedule(static)
  for (size_t b = 0; b < blocks; ++b) {
    const size_t hi = std::min(n, (b + 1) * kBlock);
    size_t i = b * kBlock;
    for (; i + kLanes <= hi; i += kLanes) {
      VecF wd = Splat(p.weight_decay);
      if (decay_mask)
        for (int l = 0; l < kLanes; ++l) wd[l] = decay_mask[i + l] ? p.weight_decay : 0.0f;
      const VecF g = LoadV(grads + i) * p.grad_scale;
      const VecF mi = p.beta1 * LoadV(m + i) + omb1 * g;
      const VecF vi = p.beta2 * LoadV(v + i) + omb2 * g * g;
      StoreV(m + i, mi);
      StoreV(v + i, vi);
      const VecF mhat = mi / bc1, vhat = vi / bc2;
      const VecF w = LoadV(params + i);
      StoreV(params + i, w - p.lr * (mhat / (VecSqrt(vhat) + p.eps) + wd * w));
    }
    for (; i < hi; ++i)
      AdamWElem(params, grads, m, v, i, (decay_mask == nullptr || decay_mask[i]) ? p.weight_decay : 0.0f, bc1, bc2,
                p);
  }
}

double SumSquares(const float* x, size_t n) {
  // Fixed-size chunks summed in order: the result depends on n only, not on the thread count.
  constexpr size_t kChunk = 1 << 16;
  size_t chunks = (n + kChunk - 1) / kChunk;
  double total = 0.0;
  std::vector<double> partial(chunks);
#pragma omp parallel for schedule(static)
  for (size_t c = 0; c < chunks; ++c) {
    size_t lo = c * kChunk, hi = lo + kChunk < n ? lo + kChunk : n;
    // kLanes double accumulators, folded in lane order: the order depends on n only.
    size_t i = lo;
    double s = 0.0;
#if defined(__AVX2__) && !defined(__AVX512F__)
    // kLanes = 8 as two 4-lane registers (GCC's lowering of an 8-double vector type to AVX2 was slow).
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    for (; i + 8 <= hi; i += 8) {
      const __m256d d0 = _mm256_cvtps_pd(_mm_loadu_ps(x + i)), d1 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4));
      acc0 = _mm256_add_pd(acc0, _mm256_mul_pd(d0, d0));
      acc1 = _mm256_add_pd(acc1, _mm256_mul_pd(d1, d1));
    }
    alignas(32) double lanes[8];
    _mm256_store_pd(lanes, acc0);
    _mm256_store_pd(lanes + 4, acc1);
    for (int l = 0; l < 8; ++l) s += lanes[l];
#else
    typedef double VecD __attribute__((vector_size(8 * kLanes)));
    VecD acc = {};
    for (; i + kLanes <= hi; i += kLanes) {
      const VecD d = __builtin_convertvector(LoadV(x + i), VecD);
      acc += d * d;
    }
    for (int l = 0; l < kLanes; ++l) s += acc[l];
#endif
    for (; i < hi; ++i) s += static_cast<double>(x[i]) * x[i];
    partial[c] = s;
  }
  for (size_t c = 0; c < chunks; ++c) total += partial[c];
  return total;
}

}  // namespace keel::cpu
