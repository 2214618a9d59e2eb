// adamw.cc: the AdamW update (decoupled weight decay, bias-corrected moments) and the sum of squares used
// for global gradient-norm clipping.
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_ops.h"

namespace keel::cpu {

void AdamW(float* params, const float* grads, float* m, float* v, const uint8_t* decay_mask, size_t n,
           const AdamWParams& p) {
  const float bc1 = 1.0f - static_cast<float>(std::pow(static_cast<double>(p.beta1), static_cast<double>(p.t)));
  const float bc2 = 1.0f - static_cast<float>(std::pow(static_cast<double>(p.beta2), static_cast<double>(p.t)));
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) {
    float g = grads[i] * p.grad_scale;
    float mi = p.beta1 * m[i] + (1.0f - p.beta1) * g;
    float vi = p.beta2 * v[i] + (1.0f - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float mhat = mi / bc1, vhat = vi / bc2;
    float wd = (decay_mask == nullptr || decay_mask[i]) ? p.weight_decay : 0.0f;
    params[i] -= p.lr * (mhat / (std::sqrt(vhat) + p.eps) + wd * params[i]);
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
    double s = 0.0;
    for (size_t i = lo; i < hi; ++i) s += static_cast<double>(x[i]) * x[i];
    partial[c] = s;
  }
  for (size_t c = 0; c < chunks; ++c) total += partial[c];
  return total;
}

}  // namespace keel::cpu
