// loss.cc: softmax + cross-entropy over the vocabulary (forward, and the fused backward into dlogits).
// Each row is reduced in a fixed order by one thread. Both kernels may run in place (probs == logits,
// dlogits == probs), which saves the model a [B*T, V] buffer.
#include <cmath>

#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/vec_math.h"

namespace keel::cpu {

void SoftmaxCrossEntropyForward(float* losses, float* probs, const float* logits, const int32_t* targets, int N,
                                int V, int Vp) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* l = logits + static_cast<size_t>(n) * Vp;
    float* p = probs + static_cast<size_t>(n) * Vp;
    const float target_logit = (targets && losses) ? l[targets[n]] : 0.0f;  // read before any in-place write
    // kLanes (8 or 16) at a time (max is exact in any order; the sum's order is fixed by V); the scalar tail
    // adds last.
    int i = 0;
    float mx = l[0];
    if (V >= kLanes) {
      VecF m = LoadV(l);
      for (i = kLanes; i + kLanes <= V; i += kLanes) {
        const VecF x = LoadV(l + i);
        m = Select(x > m, x, m);
      }
      mx = HMax(m);
    } else {
      i = 1;
    }
    for (; i < V; ++i) mx = l[i] > mx ? l[i] : mx;
    VecF acc = {};
    const VecF vmx = Splat(mx);
    for (i = 0; i + kLanes <= V; i += kLanes) {
      const VecF e = VecExp(LoadV(l + i) - vmx);
      StoreV(p + i, e);
      acc += e;
    }
    float sum = HSum(acc);
    for (; i < V; ++i) {
      p[i] = VecExp(l[i] - mx);
      sum += p[i];
    }
    const float inv = 1.0f / sum;
    for (i = 0; i + kLanes <= V; i += kLanes) StoreV(p + i, LoadV(p + i) * inv);
    for (; i < V; ++i) p[i] *= inv;
    for (i = V; i < Vp; ++i) p[i] = 0.0f;
    if (targets && losses) {
      // log-softmax directly from the logits: finite even where the probability underflows.
      losses[n] = -(target_logit - mx - std::log(sum));
    }
  }
}

void SoftmaxCrossEntropyBackward(float* dlogits, const float* probs, const int32_t* targets, float dloss, int N,
                                 int V, int Vp) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* p = probs + static_cast<size_t>(n) * Vp;
    float* d = dlogits + static_cast<size_t>(n) * Vp;
#pragma omp simd
    for (int i = 0; i < V; ++i) d[i] = p[i] * dloss;
    d[targets[n]] -= dloss;
    for (int i = V; i < Vp; ++i) d[i] = 0.0f;
  }
}

}  // namespace keel::cpu
