// pointwise.cc: GELU (tanh form, as GPT-2) forward/backward and the residual add.
//
// The GELU loops run kLanes (8 or 16) elements at a time through the vector VecTanh (vec_math.h), which computes
// exactly what the scalar one does; the scalar Gelu*Elem functions are the reference and handle the tails, so every element's
// result is the same whichever path computes it (and independent of the thread count: elements are independent).
#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/vec_math.h"

namespace keel::cpu {

namespace {
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr size_t kSerialBelow = 32768;             // fewer elements: one thread (decode steps)
constexpr size_t kBlock = 4096;                    // elements per OpenMP work item (a multiple of kLanes)

inline float GeluElem(float x) {
  float u = kGeluScale * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + VecTanh(u));
}

inline float GeluGradElem(float x) {
  float u = kGeluScale * (x + 0.044715f * x * x * x);
  float th = VecTanh(u);
  float sech2 = 1.0f - th * th;
  return 0.5f * (1.0f + th) + 0.5f * x * sech2 * kGeluScale * (1.0f + 3.0f * 0.044715f * x * x);
}

// The same expressions on kLanes lanes (operation for operation).
KEEL_VINLINE VecF GeluElem(VecF x) {
  VecF u = kGeluScale * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + VecTanh(u));
}

KEEL_VINLINE VecF GeluGradElem(VecF x) {
  VecF u = kGeluScale * (x + 0.044715f * x * x * x);
  VecF th = VecTanh(u);
  VecF sech2 = 1.0f - th * th;
  return 0.5f * (1.0f + th) + 0.5f * x * sech2 * kGeluScale * (1.0f + 3.0f * 0.044715f * x * x);
}
}  // namespace

void GeluForward(float* out, const float* inp, size_t n) {
  const size_t blocks = (n + kBlock - 1) / kBlock;
  // One block (a decode step's few rows): no fork/join, which costs more than the work.
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (size_t b = 0; b < blocks; ++b) {
    const size_t hi = std::min(n, (b + 1) * kBlock);
    size_t i = b * kBlock;
    for (; i + kLanes <= hi; i += kLanes) StoreV(out + i, GeluElem(LoadV(inp + i)));
    for (; i < hi; ++i) out[i] = GeluElem(inp[i]);
  }
}

void GeluBackward(float* dinp, const float* inp, const float* dout, size_t n) {
  const size_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (size_t b = 0; b < blocks; ++b) {
    const size_t hi = std::min(n, (b + 1) * kBlock);
    size_t i = b * kBlock;
    for (; i + kLanes <= hi; i += kLanes)
      StoreV(dinp + i, LoadV(dinp + i) + GeluGradElem(LoadV(inp + i)) * LoadV(dout + i));
    for (; i < hi; ++i) dinp[i] += GeluGradElem(inp[i]) * dout[i];
  }
}

void ResidualForward(float* out, const float* a, const float* b, size_t n) {
#pragma omp parallel for simd schedule(static) if (n >= kSerialBelow)
  for (size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

}  // namespace keel::cpu
