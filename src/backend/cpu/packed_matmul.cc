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
// Fewer than six rows take several panels at a time (one row: six panels, twelve independent chains), so one row
// stays bound by memory bandwidth like the row-streaming kernel.
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
constexpr int kRows = 6;    // rows x panels per micro-kernel call: 6 x 2 accumulators + 2 weights + 1 broadcast

size_t Panels(int OC) { return (static_cast<size_t>(OC) + kPanel - 1) / kPanel; }

__attribute__((target("avx2,fma,f16c"))) inline __m256 LoadW(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,f16c"))) inline __m256 LoadW(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// R rows x P consecutive panels (columns o .. o + 16P, the last panel possibly partial: OC bounds the stores):
// out[r*OC + c] = bias[c] + sum_k x[r*IC + k] * W[c][k]. Each output is one accumulator, summed over k in order,
// whatever R and P, so every (R, P) gives the same bits. R*P <= 6 (12 accumulators): few rows take several
// panels at once, or one row would be a single dependent chain of FMAs per panel, bound by the FMA latency (it
// ran at 2/3 of the row-streaming kernel's speed). The loops are unrolled so that GCC keeps the accumulator
// arrays in registers (without the pragmas it stored all twelve to the stack on every k: half the speed).
template <int R, int P, typename W>
__attribute__((target("avx2,fma,f16c"))) void PanelRows(float* out, const float* x, const W* panel,
                                                          const float* bias, int IC, int OC, int o) {
  static_assert(R * P <= kRows && R >= 1 && P >= 1);
  const size_t stride = static_cast<size_t>(IC) * kPanel;  // one panel, in values
  __m256 a0[P][R], a1[P][R];
#pragma GCC unroll 8
  for (int q = 0; q < P; ++q)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a0[q][r] = a1[q][r] = _mm256_setzero_ps();
  // Registers: 12 accumulators, the panel's two weight vectors and one broadcast input (re-broadcast per panel
  // rather than held: holding six would spill).
  for (int k = 0; k < IC; ++k) {
#pragma GCC unroll 8
    for (int q = 0; q < P; ++q) {
      const W* w = panel + q * stride + static_cast<size_t>(k) * kPanel;
      const __m256 w0 = LoadW(w), w1 = LoadW(w + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(x + static_cast<size_t>(r) * IC + k);
        a0[q][r] = _mm256_fmadd_ps(w0, xb, a0[q][r]);
        a1[q][r] = _mm256_fmadd_ps(w1, xb, a1[q][r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < P; ++q) {
    const int oq = o + q * kPanel, cols = std::min(kPanel, OC - oq);
    alignas(32) float b[kPanel] = {};
    if (bias) std::memcpy(b, bias + oq, sizeof(float) * static_cast<size_t>(cols));
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float* dst = out + static_cast<size_t>(r) * OC + oq;
      if (cols == kPanel) {
        _mm256_storeu_ps(dst, _mm256_add_ps(a0[q][r], b0));
        _mm256_storeu_ps(dst + 8, _mm256_add_ps(a1[q][r], b1));
      } else {
        alignas(32) float t[kPanel];
        _mm256_store_ps(t, _mm256_add_ps(a0[q][r], b0));
        _mm256_store_ps(t + 8, _mm256_add_ps(a1[q][r], b1));
        std::memcpy(dst, t, sizeof(float) * static_cast<size_t>(cols));
      }
    }
  }
}

// R rows against panels [p0, p1): as many at a time as the accumulators allow, then one at a time.
template <int R, typename W>
void RowsAgainstPanels(float* out, const float* x, const W* packed, const float* bias, int IC, int OC, int p0,
                       int p1) {
  constexpr int P = kRows / R;
  const size_t stride = static_cast<size_t>(IC) * kPanel;
  int p = p0;
  if constexpr (P > 1)
    for (; p + P <= p1; p += P) PanelRows<R, P>(out, x, packed + p * stride, bias, IC, OC, p * kPanel);
  for (; p < p1; ++p) PanelRows<R, 1>(out, x, packed + p * stride, bias, IC, OC, p * kPanel);
}

template <int R, typename W>
void RowsAgainstPanel(float* out, const float* x, const W* packed, const float* bias, int IC, int OC, int p) {
  PanelRows<R, 1>(out, x, packed + static_cast<size_t>(p) * IC * kPanel, bias, IC, OC, p * kPanel);
}

template <typename W>
void PackedForward(float* out, const float* inp, const W* packed, const float* bias, int N, int IC, int OC) {
  // Work items: groups of kRows panels (96 columns), fixed by the shape.
  const int panels = static_cast<int>(Panels(OC)), groups = (panels + kRows - 1) / kRows;
#pragma omp parallel for schedule(static)
  for (int g = 0; g < groups; ++g) {
    const int p0 = g * kRows, p1 = std::min(panels, p0 + kRows);
    if (N < kRows) {  // a few rows (decoding): bound by memory; several panels at a time keep enough FMAs going
      switch (N) {
        case 5: RowsAgainstPanels<5>(out, inp, packed, bias, IC, OC, p0, p1); break;
        case 4: RowsAgainstPanels<4>(out, inp, packed, bias, IC, OC, p0, p1); break;
        case 3: RowsAgainstPanels<3>(out, inp, packed, bias, IC, OC, p0, p1); break;
        case 2: RowsAgainstPanels<2>(out, inp, packed, bias, IC, OC, p0, p1); break;
        case 1: RowsAgainstPanels<1>(out, inp, packed, bias, IC, OC, p0, p1); break;
        default: break;
      }
      continue;
    }
    // Six rows or more: panel by panel, every row against it while it sits in L2 (the first six-row pass brings
    // it in from memory; a group of six panels at IC = 3072 would not fit L2).
    for (int p = p0; p < p1; ++p) {
      int r = 0;
      for (; r + kRows <= N; r += kRows)
        RowsAgainstPanel<kRows>(out + static_cast<size_t>(r) * OC, inp + static_cast<size_t>(r) * IC, packed, bias,
                                IC, OC, p);
      float* o_r = out + static_cast<size_t>(r) * OC;
      const float* x_r = inp + static_cast<size_t>(r) * IC;
      switch (N - r) {
        case 5: RowsAgainstPanel<5>(o_r, x_r, packed, bias, IC, OC, p); break;
        case 4: RowsAgainstPanel<4>(o_r, x_r, packed, bias, IC, OC, p); break;
        case 3: RowsAgainstPanel<3>(o_r, x_r, packed, bias, IC, OC, p); break;
        case 2: RowsAgainstPanel<2>(o_r, x_r, packed, bias, IC, OC, p); break;
        case 1: RowsAgainstPanel<1>(o_r, x_r, packed, bias, IC, OC, p); break;
        default: break;
      }
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
  // Serial on purpose: packing runs once, often on another thread than the decode steps (a server packs on its
  // main thread and decodes on its engine thread), and an OpenMP team started here would leave a second idle
  // pool behind. libgomp then counts more threads than cores and stops spinning at barriers: every parallel
  // region of a decode step paid a futex wake-up (12k context switches in 96 steps against 131), and one-row
  // decoding lost a third of its speed.
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
