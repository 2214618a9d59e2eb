// packed_matmul.cc: the linear layer of decoding (a few rows to a prompt chunk per step) from weights repacked
// once into 16-column panels, fp32 or IEEE f16.
//
// Why: a decode step multiplies every weight matrix by 1-64 rows. In the [OC, IC] layout the few-row kernels
// (skinny_matmul.h) keep 12 dot-product accumulators, reload the input rows for every weight row block and end
// each output with a horizontal sum; on the 2-core development VM they reach ~60-80 GFLOP/s at 16 rows, and
// OpenBLAS's sgemm, which packs the weights on every call, ~75. Repacked as panels P[OC/16][IC][16], the
// micro-kernel is the classic outer product: per k it loads 16 weights (two vectors, one contiguous stream per
// panel, which the hardware prefetcher follows) and broadcasts one input value per row, 6 rows x 16 columns = 12
// accumulators. Measured on that VM (2 threads): 110-150 GFLOP/s at 16 rows and 130-160 at 64 (sgemm: 110-117).
// One row stays bound by memory bandwidth, as fast as the row-streaming kernel.
//
// Rounding: every output is one accumulator summed over k in order (with FMA), whatever the number of rows and
// threads, so a row's result does not depend on which other rows share the step: a batched decode equals a
// sequential one bit for bit. The last panel is zero-padded; padded columns are never stored.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "backend/cpu/cpu_ops.h"
#include "formats/half.h"

namespace keel::cpu {

namespace {

constexpr int kPanel = 16;  // output columns per panel: two AVX vectors
constexpr int kRows = 6;    // input rows per micro-kernel call: 6 x 2 accumulators + 2 weights + 1 broadcast

size_t Panels(int OC) { return (static_cast<size_t>(OC) + kPanel - 1) / kPanel; }

__attribute__((target("avx2,fma,f16c"))) inline __m256 LoadW(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,f16c"))) inline __m256 LoadW(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// R rows x one panel: out[r*OC + o + j] = bias[o + j] + sum_k x[r*IC + k] * panel[k*16 + j], j < cols.
// The loops over r are unrolled so that GCC keeps the accumulator arrays in registers (without the pragma it
// stored all twelve to the stack on every k: half the speed).
template <int R, typename W>
__attribute__((target("avx2,fma,f16c"))) void PanelRows(float* out, const float* x, const W* panel,
                                                          const float* bias, int IC, int OC, int o, int cols) {
  __m256 a0[R], a1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int k = 0; k < IC; ++k) {
    const __m256 w0 = LoadW(panel + static_cast<size_t>(k) * kPanel);
    const __m256 w1 = LoadW(panel + static_cast<size_t>(k) * kPanel + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + static_cast<size_t>(r) * IC + k);
      a0[r] = _mm256_fmadd_ps(w0, xb, a0[r]);
      a1[r] = _mm256_fmadd_ps(w1, xb, a1[r]);
    }
  }
  alignas(32) float b[kPanel] = {};
  if (bias) std::memcpy(b, bias + o, sizeof(float) * static_cast<size_t>(cols));
  const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* dst = out + static_cast<size_t>(r) * OC + o;
    if (cols == kPanel) {
      _mm256_storeu_ps(dst, _mm256_add_ps(a0[r], b0));
      _mm256_storeu_ps(dst + 8, _mm256_add_ps(a1[r], b1));
    } else {
      alignas(32) float t[kPanel];
      _mm256_store_ps(t, _mm256_add_ps(a0[r], b0));
      _mm256_store_ps(t + 8, _mm256_add_ps(a1[r], b1));
      std::memcpy(dst, t, sizeof(float) * static_cast<size_t>(cols));
    }
  }
}

template <typename W>
void PackedForward(float* out, const float* inp, const W* packed, const float* bias, int N, int IC, int OC) {
  const int panels = static_cast<int>(Panels(OC));
#pragma omp parallel for schedule(static)
  for (int p = 0; p < panels; ++p) {
    const W* panel = packed + static_cast<size_t>(p) * IC * kPanel;
    const int o = p * kPanel, cols = std::min(kPanel, OC - o);
    int r = 0;
    for (; r + kRows <= N; r += kRows)
      PanelRows<kRows>(out + static_cast<size_t>(r) * OC, inp + static_cast<size_t>(r) * IC, panel, bias, IC, OC, o,
                       cols);
    float* o_r = out + static_cast<size_t>(r) * OC;
    const float* x_r = inp + static_cast<size_t>(r) * IC;
    switch (N - r) {
      case 5: PanelRows<5>(o_r, x_r, panel, bias, IC, OC, o, cols); break;
      case 4: PanelRows<4>(o_r, x_r, panel, bias, IC, OC, o, cols); break;
      case 3: PanelRows<3>(o_r, x_r, panel, bias, IC, OC, o, cols); break;
      case 2: PanelRows<2>(o_r, x_r, panel, bias, IC, OC, o, cols); break;
      case 1: PanelRows<1>(o_r, x_r, panel, bias, IC, OC, o, cols); break;
      default: break;
    }
  }
}

}  // namespace

bool PackedMatmulSupported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

size_t PackedMatmulFloats(int IC, int OC, bool half) {
  const size_t values = Panels(OC) * kPanel * static_cast<size_t>(IC);
  return half ? (values + 1) / 2 : values;
}

void PackMatmulWeight(float* packed, const float* w, int IC, int OC, bool half) {
  const size_t panels = Panels(OC);
  uint16_t* h = reinterpret_cast<uint16_t*>(packed);
#pragma omp parallel for schedule(static)
  for (size_t p = 0; p < panels; ++p)
    for (int k = 0; k < IC; ++k)
      for (int j = 0; j < kPanel; ++j) {
        const size_t o = p * kPanel + static_cast<size_t>(j);
        const float v = o < static_cast<size_t>(OC) ? w[o * static_cast<size_t>(IC) + static_cast<size_t>(k)] : 0.0f;
        const size_t at = (p * static_cast<size_t>(IC) + static_cast<size_t>(k)) * kPanel + static_cast<size_t>(j);
        if (half) h[at] = FloatToF16(v);
        else packed[at] = v;
      }
}

void MatmulForwardPacked(float* out, const float* inp, const float* packed, const float* bias, int N, int IC, int OC,
                         bool half) {
  if (half) PackedForward(out, inp, reinterpret_cast<const uint16_t*>(packed), bias, N, IC, OC);
  else PackedForward(out, inp, packed, bias, N, IC, OC);
}

}  // namespace keel::cpu
