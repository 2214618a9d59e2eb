// packed_matmul.cc: the linear layer of decoding (a few rows to a prompt chunk per step) from weights repacked
// once into 16-column panels, fp32 or IEEE f16.
//
// Why: a decode step multiplies every weight matrix by 1-64 rows. In the [OC, IC] layout the few-row kernels
// (skinny_matmul.h) keep 12 dot-product accumulators, reload the input rows for every weight row block and end
// each output with a horizontal sum; on the 2-core Zen 3 development VM (AVX2 only) they reach ~60-80 GFLOP/s at 16 rows, and
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
//
// Two instruction sets, one layout: where the CPU has AVX-512 the same panels are multiplied with 512-bit vectors
// (one vector per panel row, 32 registers: up to 6 rows x 4 panels or 12 x 2 per call). On the Zen 5 development VM a
// 512-bit FMA runs at the same rate as a 256-bit one, so the compute peak doubles (201 vs 101 GFLOP/s per core,
// measured with a register-only FMA loop), which is what a 16-row step needs: it is compute bound. Each lane does
// the same FMA sequence in both paths, so they give the same bits (tested). KEEL_MAX_CPU_ISA=avx2 caps the choice,
// as oneDNN's ONEDNN_MAX_CPU_ISA does (for comparisons, or a CPU that slows down on 512-bit vectors).
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

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

// ---- AVX-512: the same panels, one 512-bit vector per panel row ----

constexpr int kGroup512 = 4;    // panels per work item (64 columns): OC = 384 still splits evenly over 2 threads
constexpr int kRows512 = 6;     // rows per pass with four panels: 24 accumulators + 4 weights + 1 broadcast;
                                // twice as many with two panels

__attribute__((target("avx512f"))) inline __m512 LoadW512(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 LoadW512(const uint16_t* p) {
  // The maskz form: GCC 12 warns about the unmasked one's undefined pass-through source.
  return _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// R rows x P consecutive panels starting at column o, as PanelRows: each output one accumulator over k in order.
// Per k the P weight vectors are loaded once and each row's input is broadcast once, so R*P + P + 1 <= 32.
template <int R, int P, typename W>
__attribute__((target("avx512f"))) void PanelRows512(float* out, const float* x, const W* panel, const float* bias,
                                                      int IC, int OC, int o) {
  static_assert(R >= 1 && P >= 1 && R * P + P + 1 <= 32);
  const size_t stride = static_cast<size_t>(IC) * kPanel;
  __m512 acc[P][R];
#pragma GCC unroll 16
  for (int q = 0; q < P; ++q)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[q][r] = _mm512_setzero_ps();
  for (int k = 0; k < IC; ++k) {
    __m512 w[P];
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) w[q] = LoadW512(panel + q * stride + static_cast<size_t>(k) * kPanel);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[static_cast<size_t>(r) * IC + k]);
#pragma GCC unroll 16
      for (int q = 0; q < P; ++q) acc[q][r] = _mm512_fmadd_ps(w[q], xb, acc[q][r]);
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < P; ++q) {
    const int oq = o + q * kPanel, cols = std::min(kPanel, OC - oq);
    const __mmask16 mask = static_cast<__mmask16>(cols == kPanel ? 0xffffu : (1u << cols) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + oq) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(out + static_cast<size_t>(r) * OC + oq, mask, _mm512_add_ps(acc[q][r], b));
  }
}

using PanelFn = void (*)(float*, const float*, const void*, const float*, int, int, int);

template <int R, int P, typename W>
void PanelRows512Erased(float* out, const float* x, const void* panel, const float* bias, int IC, int OC, int o) {
  PanelRows512<R, P, W>(out, x, static_cast<const W*>(panel), bias, IC, OC, o);
}

// kernels[R - 1] multiplies R rows against P panels.
template <int P, typename W, int... Rm1>
constexpr std::array<PanelFn, sizeof...(Rm1)> Kernels512(std::integer_sequence<int, Rm1...>) {
  return {&PanelRows512Erased<Rm1 + 1, P, W>...};
}

template <typename W>
void PackedForward512(float* out, const float* inp, const W* packed, const float* bias, int N, int IC, int OC) {
  static constexpr auto k1 = Kernels512<1, W>(std::make_integer_sequence<int, 2 * kRows512>{});
  static constexpr auto k2 = Kernels512<2, W>(std::make_integer_sequence<int, 2 * kRows512>{});
  static constexpr auto k4 = Kernels512<4, W>(std::make_integer_sequence<int, kRows512>{});
  const int panels = static_cast<int>(Panels(OC)), groups = (panels + kGroup512 - 1) / kGroup512;
  const size_t stride = static_cast<size_t>(IC) * kPanel;
  auto at = [&](int p) { return static_cast<const void*>(packed + static_cast<size_t>(p) * stride); };
  // One pass over the weights when the rows fit the accumulators: up to 6 rows against four panels (24
  // accumulators), 7-12 against two. More rows: four panels at a time, every row against them in passes of up to
  // six while they sit in L2 (the first pass brings them in from memory), as even as the passes allow (16 rows:
  // 6 + 5 + 5). Per k each broadcast input then feeds four FMAs, and the first pass reads four weight streams at
  // once. Measured on GPT-2 small's matrices (Zen 5 VM, 2 threads, f32, best of 8), each comparison in alternating
  // runs of one period (the VM's bandwidth drifts by 20 % over minutes, so the periods' absolute figures differ):
  // 8 rows 15-16 ms in one pass against 17-18 in two passes of four panels; 16 rows 14.5 ms against 16.6 for two
  // panels in passes of 8 + 8 and 18.5 for 12 + 4; 24 rows 23-24 against 25-28 (12 + 12). `kernels[R - 1]` takes
  // R rows against the panels from p on.
  if (N <= 0) return;
  const int passes = (N + kRows512 - 1) / kRows512, per_pass = (N + passes - 1) / passes;
  auto Passes = [&](const auto& kernels, int p, int per) {
    for (int r = 0; r < N; r += per)
      kernels[std::min({per, N - r, static_cast<int>(kernels.size())}) - 1](
          out + static_cast<size_t>(r) * OC, inp + static_cast<size_t>(r) * IC, at(p), bias, IC, OC, p * kPanel);
  };
#pragma omp parallel for schedule(static)
  for (int g = 0; g < groups; ++g) {
    const int p0 = g * kGroup512, p1 = std::min(panels, p0 + kGroup512);
    int p = p0;
    if (N > kRows512 && N <= 2 * kRows512) {
      for (; p + 2 <= p1; p += 2) Passes(k2, p, N);
    } else {
      for (; p + 4 <= p1; p += 4) Passes(k4, p, per_pass);
    }
    for (; p < p1; ++p) Passes(k1, p, std::min(N, 2 * kRows512));
  }
}

bool CpuHasAvx512() { return __builtin_cpu_supports("avx512f"); }

}  // namespace

bool PackedMatmulSupported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

PackedIsa PackedMatmulIsa() {
  static const PackedIsa isa = [] {
    const char* cap = std::getenv("KEEL_MAX_CPU_ISA");
    std::string v = cap ? cap : "";
    for (auto& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    const bool capped = v == "avx2";
    return CpuHasAvx512() && !capped ? PackedIsa::kAvx512 : PackedIsa::kAvx2;
  }();
  return isa;
}

bool PackedMatmulIsaSupported(PackedIsa isa) {
  return PackedMatmulSupported() && (isa == PackedIsa::kAvx2 || CpuHasAvx512());
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

void MatmulForwardPackedWith(PackedIsa isa, float* out, const float* inp, const float* packed, const float* bias,
                             int N, int IC, int OC, bool half) {
  const auto* halves = reinterpret_cast<const uint16_t*>(packed);
  if (isa == PackedIsa::kAvx512) {
    if (half) PackedForward512(out, inp, halves, bias, N, IC, OC);
    else PackedForward512(out, inp, packed, bias, N, IC, OC);
  } else {
    if (half) PackedForward(out, inp, halves, bias, N, IC, OC);
    else PackedForward(out, inp, packed, bias, N, IC, OC);
  }
}

void MatmulForwardPacked(float* out, const float* inp, const float* packed, const float* bias, int N, int IC, int OC,
                         bool half) {
  MatmulForwardPackedWith(PackedMatmulIsa(), out, inp, packed, bias, N, IC, OC, half);
}

}  // namespace keel::cpu
