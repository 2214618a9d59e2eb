// skinny_matmul.h: out[N,OC] = inp[N,IC] @ W[OC,IC]^T + bias for a few rows (2..16: a batched decode step), with
// W in fp32 or IEEE f16. Shared by matmul.cc (fp32) and matmul_half.cc (f16).
//
// Why not sgemm: at a handful of rows sgemm spends as long packing W as multiplying it, and W is read from
// memory once per step anyway. Here each block of 4 weight rows is read once from memory and multiplied with
// every input row while it sits in L1/L2; the micro-kernel keeps 4 weight rows x up to 3 input rows = 12
// accumulators in registers, so each loaded (and, for f16, converted) weight vector feeds 3 FMAs and each input
// vector 4. Output blocks are fixed by the shape (64 output channels per work item), and every output's sum runs
// in a fixed order, so results do not depend on the thread count.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "formats/half.h"

namespace keel::cpu {

namespace skinny {

__attribute__((target("avx2,fma,f16c"))) inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,f16c"))) inline __m256 Load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t h) { return F16ToFloat(h); }

__attribute__((target("avx2,fma,f16c"))) inline float HorizontalSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// WR weight rows (w[0..WR) at stride IC) x XR input rows: out[r*OC + o + j] = bias[j] + dot(w_j, x_r).
template <int WR, int XR, typename W>
__attribute__((target("avx2,fma,f16c"))) inline void Block(float* out, const float* x, const W* w, const float* bias,
                                                             int IC, int OC, int o) {
  __m256 acc[WR][XR];
  for (int j = 0; j < WR; ++j)
    for (int r = 0; r < XR; ++r) acc[j][r] = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= IC; i += 8) {
    __m256 xv[XR];
    for (int r = 0; r < XR; ++r) xv[r] = _mm256_loadu_ps(x + static_cast<size_t>(r) * IC + i);
    for (int j = 0; j < WR; ++j) {
      const __m256 wv = Load8(w + static_cast<size_t>(j) * IC + i);
      for (int r = 0; r < XR; ++r) acc[j][r] = _mm256_fmadd_ps(wv, xv[r], acc[j][r]);
    }
  }
  for (int j = 0; j < WR; ++j)
    for (int r = 0; r < XR; ++r) {
      float s = HorizontalSum(acc[j][r]);
      for (int k = i; k < IC; ++k) s += ToFloat(w[static_cast<size_t>(j) * IC + k]) * x[static_cast<size_t>(r) * IC + k];
      out[static_cast<size_t>(r) * OC + o + j] = (bias ? bias[o + j] : 0.0f) + s;
    }
}

// All N rows against weight rows [o, o + WR).
template <int WR, typename W>
inline void RowsAgainst(float* out, const float* x, const W* w, const float* bias, int N, int IC, int OC, int o) {
  int r = 0;
  for (; r + 3 <= N; r += 3)
    Block<WR, 3>(out + static_cast<size_t>(r) * OC, x + static_cast<size_t>(r) * IC, w, bias, IC, OC, o);
  switch (N - r) {
    case 2: Block<WR, 2>(out + static_cast<size_t>(r) * OC, x + static_cast<size_t>(r) * IC, w, bias, IC, OC, o); break;
    case 1: Block<WR, 1>(out + static_cast<size_t>(r) * OC, x + static_cast<size_t>(r) * IC, w, bias, IC, OC, o); break;
    default: break;
  }
}

inline bool Supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

}  // namespace skinny

// The skinny product over all output channels (OpenMP over fixed 64-channel chunks). Needs skinny::Supported().
template <typename W>
void SkinnyMatmulT(float* out, const float* inp, const W* w, const float* bias, int N, int IC, int OC) {
  constexpr int kChunk = 64;
  const int chunks = (OC + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int c = 0; c < chunks; ++c) {
    const int hi = std::min(OC, (c + 1) * kChunk);
    int o = c * kChunk;
    for (; o + 4 <= hi; o += 4)
      skinny::RowsAgainst<4>(out, inp, w + static_cast<size_t>(o) * IC, bias, N, IC, OC, o);
    for (; o < hi; ++o) skinny::RowsAgainst<1>(out, inp, w + static_cast<size_t>(o) * IC, bias, N, IC, OC, o);
  }
}

}  // namespace keel::cpu
