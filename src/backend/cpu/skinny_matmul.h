// skinny_matmul.h: out[N,OC] = inp[N,IC] @ W[OC,IC]^T + bias for a few rows (1..16: a batched decode step), with
// W in fp32 or IEEE f16. Shared by matmul.cc (fp32) and matmul_half.cc (f16).
//
// Why not sgemm: at a handful of rows sgemm spends as long packing W as multiplying it, and W is read from
// memory once per step anyway. One row is pure streaming (fp32: 8 weight rows at a time; f16: one at a time
// with four accumulators, whichever measured faster). For several rows each block of 4 weight rows is read once
// from memory and multiplied with every input row while it sits in L1/L2 (the next block is prefetched
// meanwhile); the micro-kernel keeps 4 weight rows x up to 3 input rows = 12 accumulators in registers, so each
// loaded (and, for f16, converted) weight vector feeds 3 FMAs and each input vector 4. Output blocks are fixed
// by the shape (64 output channels per work item), and every output's sum runs in a fixed order, so results do
// not depend on the thread count.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "formats/half.h"

namespace keel::cpu {

namespace skinny {

constexpr int kMaxRows = 16;  // rows SkinnyMatmulT takes (beyond that, prompt chunks go to sgemm)

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
                                                             int IC, int OC, int o, const W* prefetch = nullptr) {
  __m256 acc[WR][XR];
  for (int j = 0; j < WR; ++j)
    for (int r = 0; r < XR; ++r) acc[j][r] = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= IC; i += 8) {
    if (prefetch && i % 16 == 0)  // one 64-byte line of each of the next block's rows every 16 floats
      for (int j = 0; j < WR; ++j) _mm_prefetch(reinterpret_cast<const char*>(prefetch + static_cast<size_t>(j) * IC + i), _MM_HINT_T0);
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

// One weight row against one input row, 32 inputs per iteration in four independent accumulators (a single
// chain would be bound by the FMA latency).
template <typename W>
__attribute__((target("avx2,fma,f16c"))) inline void RowStream(float* out, const float* x, const W* w, const float* bias,
                                                                 int IC, int o) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int i = 0;
  for (; i + 32 <= IC; i += 32) {
    a0 = _mm256_fmadd_ps(Load8(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(Load8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(Load8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(Load8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= IC; i += 8) a0 = _mm256_fmadd_ps(Load8(w + i), _mm256_loadu_ps(x + i), a0);
  float s = HorizontalSum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < IC; ++i) s += ToFloat(w[i]) * x[i];
  out[o] = (bias ? bias[o] : 0.0f) + s;
}

// All N rows against weight rows [o, o + WR). The first group of rows reads the block from memory and the
// others from L1; next (the following block, or nullptr) is prefetched during the second group, so that its
// memory reads overlap this block's arithmetic.
template <int WR, typename W>
inline void RowsAgainst(float* out, const float* x, const W* w, const float* bias, int N, int IC, int OC, int o,
                        const W* next = nullptr) {
  int r = 0;
  for (; r + 3 <= N; r += 3)
    Block<WR, 3>(out + static_cast<size_t>(r) * OC, x + static_cast<size_t>(r) * IC, w, bias, IC, OC, o,
                 r == 3 ? next : nullptr);
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
    // One row is memory bound. Measured on GPT-2 small, 2 threads, best of 5 (decode_bench): fp32 weights read
    // 8 rows at a time take 16.2 ms/token against 21.4 one row at a time (and 19.7 for 4 rows); f16 weights the
    // other way round, 10.5 ms one row at a time against 13.5 for 8 rows.
    if (N == 1 && std::is_same_v<W, uint16_t>) {
      for (; o < hi; ++o) skinny::RowStream(out, inp, w + static_cast<size_t>(o) * IC, bias, IC, o);
    } else if (N == 1) {
      for (; o + 8 <= hi; o += 8) skinny::Block<8, 1>(out, inp, w + static_cast<size_t>(o) * IC, bias, IC, OC, o);
    } else if (N == 2) {
      for (; o + 6 <= hi; o += 6) skinny::Block<6, 2>(out, inp, w + static_cast<size_t>(o) * IC, bias, IC, OC, o);
    }
    for (; o + 4 <= hi; o += 4)
      skinny::RowsAgainst<4>(out, inp, w + static_cast<size_t>(o) * IC, bias, N, IC, OC, o,
                             o + 8 <= OC ? w + static_cast<size_t>(o + 4) * IC : nullptr);
    for (; o < hi; ++o) skinny::RowsAgainst<1>(out, inp, w + static_cast<size_t>(o) * IC, bias, N, IC, OC, o);
  }
}

}  // namespace keel::cpu
