// packed_matmul.cc: the linear layer of decoding (a few rows to a prompt chunk per step) from weights repacked
// once into 16-column panels, fp32, IEEE f16 or bfloat16.
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
//
// bfloat16 (--dtype bf16): the weights and the input rows are rounded to bf16 and the products summed in fp32 with
// AVX-512 BF16's VDPBF16PS, which does two multiply-adds per 32-bit lane: twice the FMA peak of fp32, for the
// compute-bound steps of many rows (16 clients), and half the weight bytes of fp32 for one row. The panels hold
// pairs along k: P[OC/16][IC/2][16][2] (IC padded to even with zeros), one 512-bit vector per pair of k. A product
// of two bf16 values is exact in fp32, so VDPBF16PS's two steps per lane (the odd k of the pair, then the even one,
// each rounded to nearest even) are two FMAs; CPUs without AVX-512 BF16 run exactly those FMAs (256-bit), and the
// two give the same bits except where a partial sum is an fp32 denormal (flushed to zero by VDPBF16PS).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "backend/cpu/cpu_ops.h"
#include "core/check.h"
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
      __m256 w0 = LoadW(w), w1 = LoadW(w + 8);
      // Keeps the weights in registers for several rows (GCC 12 would fold the loads into every row's FMA:
      // R loads of each weight vector per k). One row: folding is what it should do.
      if constexpr (R > 1) asm("" : "+x"(w0), "+x"(w1));
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

// Runs fn(g0, g1) over [0, items) on the OpenMP team in contiguous chunks handed out largest first (guided
// scheduling: each take is what is left over twice the team size). The two vCPUs of the development VM run the same
// work at speeds 25-30 % apart, one way or the other from one run to the next, and a static split left the faster
// thread waiting at the barrier for a third of a 16-row step. Contiguous chunks let a thread prefetch the item it
// takes next. Which thread computes an item never changes its bits.
template <typename Fn>
void GuidedChunks(int items, const Fn& fn) {
  std::atomic<int> next{0};
#pragma omp parallel
  {
    const int nt = omp_get_num_threads();
    for (;;) {
      const int take = std::max(1, (items - next.load(std::memory_order_relaxed)) / (2 * nt));
      const int i0 = next.fetch_add(take, std::memory_order_relaxed);
      if (i0 >= items) break;
      fn(i0, std::min(items, i0 + take));
    }
  }
}

template <typename W>
void PackedForward(float* out, const float* inp, const W* packed, const float* bias, int N, int IC, int OC) {
  // Work items: groups of kRows panels (96 columns), fixed by the shape.
  const int panels = static_cast<int>(Panels(OC)), groups = (panels + kRows - 1) / kRows;
  GuidedChunks(groups, [&](int g0, int g1) {
  for (int g = g0; g < g1; ++g) {
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
  });
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

// out[r][o + 16q + c] = acc[q][r][c] + bias, for the columns below OC (the last panel may be partial).
template <int R, int P>
__attribute__((target("avx512f"))) inline void StorePanels512(float* out, const __m512 (&acc)[P][R],
                                                               const float* bias, int OC, int o) {
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

// A byte range to bring into cache over a loop of n iterations, at most two cache lines per iteration: the next
// panel group's weights, fetched from memory while this group's later passes compute from L2 (PackedForward512).
// prefetcht0 rather than t1: a step's products at 16 rows took 2-6 % less with it in three interleaved pairs (bf16;
// f32 within the noise).
struct Prefetch {
  const char* p = nullptr;
  size_t bytes = 0;
};

// KEEL_PACKED_PREFETCH=0 turns the prefetch off (for comparisons), read once.
bool PrefetchEnabled() {
  static const bool on = [] {
    const char* v = std::getenv("KEEL_PACKED_PREFETCH");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

class PrefetchSpread {
 public:
  PrefetchSpread(const Prefetch& pf, int n)
      : p_(pf.p), step_(pf.p && n > 0 ? ((pf.bytes / 64) * 65536 + 2 * static_cast<size_t>(n) - 1) / (2 * n) : 0) {}
  // Prefetching never faults, so a position past the range's end (rounding) is harmless.
  __attribute__((always_inline)) inline void Next() {
    if (step_ == 0) return;
    _mm_prefetch(p_ + (pos_ >> 16) * 64, _MM_HINT_T0);
    pos_ += step_;
    _mm_prefetch(p_ + (pos_ >> 16) * 64, _MM_HINT_T0);
    pos_ += step_;
  }

 private:
  const char* p_;
  size_t step_, pos_ = 0;  // in 1/65536 of a line
};

// R rows x P consecutive panels starting at column o, as PanelRows: each output one accumulator over k in order.
// Per k the P weight vectors are loaded once and each row's input is broadcast once, so R*P + P + 1 <= 32.
template <int R, int P, typename W>
__attribute__((target("avx512f"))) void PanelRows512(float* out, const float* x, const W* panel, const float* bias,
                                                      int IC, int OC, int o, Prefetch next) {
  PrefetchSpread pf(next, IC);
  static_assert(R >= 1 && P >= 1 && R * P + P + 1 <= 32);
  const size_t stride = static_cast<size_t>(IC) * kPanel;
  __m512 acc[P][R];
#pragma GCC unroll 16
  for (int q = 0; q < P; ++q)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[q][r] = _mm512_setzero_ps();
  for (int k = 0; k < IC; ++k) {
    pf.Next();
    __m512 w[P];
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) {
      w[q] = LoadW512(panel + q * stride + static_cast<size_t>(k) * kPanel);
      // Keeps the weights in registers: otherwise GCC 12 folds the load into every row's FMA for some R x P
      // (4 x 4: 16 vector loads per k instead of 4, and the 4-row pass ran 20-40 % slower than the 6-row one).
      if constexpr (R > 1) asm("" : "+v"(w[q]));
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[static_cast<size_t>(r) * IC + k]);
#pragma GCC unroll 16
      for (int q = 0; q < P; ++q) acc[q][r] = _mm512_fmadd_ps(w[q], xb, acc[q][r]);
    }
  }
  StorePanels512<R, P>(out, acc, bias, OC, o);
}

using PanelFn = void (*)(float*, const float*, const void*, const float*, int, int, int, Prefetch);

// A kernel family for PackedForward512: K::Run<R, P> multiplies R rows against P panels.
template <typename W>
struct Fma512 {
  template <int R, int P>
  static void Run(float* out, const float* x, const void* panel, const float* bias, int IC, int OC, int o,
                  Prefetch next) {
    PanelRows512<R, P, W>(out, x, static_cast<const W*>(panel), bias, IC, OC, o, next);
  }
};

// kernels[R - 1] multiplies R rows against P panels.
template <int P, typename K, int... Rm1>
constexpr std::array<PanelFn, sizeof...(Rm1)> Kernels512(std::integer_sequence<int, Rm1...>) {
  return {&K::template Run<Rm1 + 1, P>...};
}

// W: the packed element (float, f16, or a bf16 pair as one 32-bit word, with IC then counting pairs and inp holding
// the rows' pairs).
template <typename K, typename W>
void PackedForward512(float* out, const float* inp, const W* packed, const float* bias, int N, int IC, int OC) {
  static constexpr auto k1 = Kernels512<1, K>(std::make_integer_sequence<int, 2 * kRows512>{});
  static constexpr auto k2 = Kernels512<2, K>(std::make_integer_sequence<int, 2 * kRows512>{});
  static constexpr auto k4 = Kernels512<4, K>(std::make_integer_sequence<int, kRows512>{});
  const int panels = static_cast<int>(Panels(OC)), groups = (panels + kGroup512 - 1) / kGroup512;
  const size_t stride = static_cast<size_t>(IC) * kPanel;
  auto at = [&](int p) { return static_cast<const void*>(packed + static_cast<size_t>(p) * stride); };
  // One pass over the weights when the rows fit the accumulators: up to 6 rows against four panels (24
  // accumulators), 7-12 against two. More rows: four panels at a time, every row against them in passes of up to
  // six while they sit in L2 (the first pass brings them in from memory), as even as the passes allow (16 rows:
  // 5 + 5 + 6). Per k each broadcast input then feeds four FMAs, and the first pass reads four weight streams at
  // once. Measured on GPT-2 small's matrices (Zen 5 VM, 2 threads, f32, best of 8), each comparison in alternating
  // runs of one period (the VM's bandwidth drifts by 20 % over minutes, so the periods' absolute figures differ):
  // 8 rows 15-16 ms in one pass against 17-18 in two passes of four panels; 16 rows 14.5 ms against 16.6 for two
  // panels in passes of 8 + 8 and 18.5 for 12 + 4; 24 rows 23-24 against 25-28 (12 + 12). `kernels[R - 1]` takes
  // R rows against the panels from p on.
  if (N <= 0) return;
  const int passes = (N + kRows512 - 1) / kRows512;
  auto Passes = [&](const auto& kernels, int p, int n, Prefetch next) {
    // n passes over the rows, each of N / n rows or one more, each prefetching its share of `next`.
    const size_t share = n > 1 ? (next.bytes + n - 1) / n : 0;
    for (int i = 0; i < n; ++i) {
      const int r0 = N * i / n, r1 = N * (i + 1) / n;
      const size_t lo = std::min(next.bytes, i * share);
      const Prefetch pf = share ? Prefetch{next.p + lo, std::min(next.bytes - lo, share)} : Prefetch{};
      const int rows = r1 - r0;  // 1..kernels.size() by the choice of n; the check also shows GCC the bound
      KEEL_CHECK(rows >= 1 && rows <= static_cast<int>(kernels.size()), "PackedForward512: a pass's row count");
      kernels[rows - 1](out + static_cast<size_t>(r0) * OC, inp + static_cast<size_t>(r0) * IC, at(p), bias, IC, OC,
                        p * kPanel, pf);
    }
  };
  const bool prefetch = passes > 1 && PrefetchEnabled();
  GuidedChunks(groups, [&](int g0, int g1) {
    for (int g = g0; g < g1; ++g) {
      const int p0 = g * kGroup512, p1 = std::min(panels, p0 + kGroup512);
      int p = p0;
      if (N > kRows512 && N <= 2 * kRows512) {
        for (; p + 2 <= p1; p += 2) Passes(k2, p, 1, Prefetch{});
      } else {
        for (; p + 4 <= p1; p += 4) {
          // Rows in several passes: the first pass reads these four panels from memory and the later ones from
          // L2, where they leave memory idle; prefetching the chunk's next group meanwhile keeps both busy.
          Prefetch next;
          if (prefetch && g + 1 < g1) {
            const int q0 = p1, q1 = std::min(panels, q0 + kGroup512);
            next = Prefetch{reinterpret_cast<const char*>(at(q0)), static_cast<size_t>(q1 - q0) * stride * sizeof(W)};
          }
          Passes(k4, p, passes, next);
        }
      }
      for (; p < p1; ++p) Passes(k1, p, (N + 2 * kRows512 - 1) / (2 * kRows512), Prefetch{});
    }
  });
}

// ---- bfloat16: pairs along k, VDPBF16PS (or the same FMAs in 256-bit vectors) ----

size_t Pairs(int IC) { return (static_cast<size_t>(IC) + 1) / 2; }

// R rows x P panels of bf16 pairs from column o: x holds each row's bf16 pairs as 32-bit words (IC2 per row).
template <int R, int P>
__attribute__((target("avx512f,avx512bf16"))) void PanelRowsBf16(float* out, const float* xf, const void* panel_v,
                                                                 const float* bias, int IC2, int OC, int o,
                                                                 Prefetch next) {
  PrefetchSpread pf(next, IC2);
  static_assert(R >= 1 && P >= 1 && R * P + P + 1 <= 32);
  const auto* x = reinterpret_cast<const uint32_t*>(xf);
  const auto* panel = static_cast<const uint32_t*>(panel_v);
  const size_t stride = static_cast<size_t>(IC2) * kPanel;  // one panel, in pairs
  __m512 acc[P][R];
#pragma GCC unroll 16
  for (int q = 0; q < P; ++q)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[q][r] = _mm512_setzero_ps();
  for (int k = 0; k < IC2; ++k) {
    pf.Next();
    __m512i w[P];
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) w[q] = _mm512_loadu_si512(panel + q * stride + static_cast<size_t>(k) * kPanel);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(x[static_cast<size_t>(r) * IC2 + k]));
#pragma GCC unroll 16
      for (int q = 0; q < P; ++q) acc[q][r] = _mm512_dpbf16_ps(acc[q][r], (__m512bh)w[q], (__m512bh)xb);
    }
  }
  StorePanels512<R, P>(out, acc, bias, OC, o);
}

// The same sums without AVX-512 BF16: per pair, the odd k's FMA and then the even k's, in 256-bit vectors (a bf16
// value is the top half of an fp32 one). R <= 4 rows against one panel: 8 accumulators, 4 weight vectors, 2
// broadcasts. For CPUs without the instruction and as the tests' second opinion; not tuned.
template <int R>
__attribute__((target("avx2,fma"))) void PanelRowsBf16Avx2(float* out, const uint32_t* x, const uint32_t* panel,
                                                           const float* bias, int IC2, int OC, int o) {
  static_assert(R >= 1 && R <= 4);
  __m256 a0[R], a1[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int k = 0; k < IC2; ++k) {
    const uint32_t* w = panel + static_cast<size_t>(k) * kPanel;
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8));
    const __m256 odd0 = _mm256_castsi256_ps(_mm256_and_si256(v0, hi)), even0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
    const __m256 odd1 = _mm256_castsi256_ps(_mm256_and_si256(v1, hi)), even1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint32_t xp = x[static_cast<size_t>(r) * IC2 + k];
      const __m256 xo = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(xp & 0xffff0000u)));
      const __m256 xe = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(xp << 16)));
      a0[r] = _mm256_fmadd_ps(even0, xe, _mm256_fmadd_ps(odd0, xo, a0[r]));
      a1[r] = _mm256_fmadd_ps(even1, xe, _mm256_fmadd_ps(odd1, xo, a1[r]));
    }
  }
  const int cols = std::min(kPanel, OC - o);
  alignas(32) float b[kPanel] = {};
  if (bias) std::memcpy(b, bias + o, sizeof(float) * static_cast<size_t>(cols));
  const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    alignas(32) float t[kPanel];
    _mm256_store_ps(t, _mm256_add_ps(a0[r], b0));
    _mm256_store_ps(t + 8, _mm256_add_ps(a1[r], b1));
    std::memcpy(out + static_cast<size_t>(r) * OC + o, t, sizeof(float) * static_cast<size_t>(cols));
  }
}

void PackedForwardBf16Avx2(float* out, const uint32_t* x, const uint32_t* packed, const float* bias, int N, int IC2,
                           int OC) {
  const int panels = static_cast<int>(Panels(OC));
  const size_t stride = static_cast<size_t>(IC2) * kPanel;
  GuidedChunks(panels, [&](int p0, int p1) {
  for (int p = p0; p < p1; ++p) {
    const uint32_t* panel = packed + static_cast<size_t>(p) * stride;
    for (int r = 0; r < N; r += 4) {
      float* o_r = out + static_cast<size_t>(r) * OC;
      const uint32_t* x_r = x + static_cast<size_t>(r) * IC2;
      switch (std::min(4, N - r)) {
        case 4: PanelRowsBf16Avx2<4>(o_r, x_r, panel, bias, IC2, OC, p * kPanel); break;
        case 3: PanelRowsBf16Avx2<3>(o_r, x_r, panel, bias, IC2, OC, p * kPanel); break;
        case 2: PanelRowsBf16Avx2<2>(o_r, x_r, panel, bias, IC2, OC, p * kPanel); break;
        default: PanelRowsBf16Avx2<1>(o_r, x_r, panel, bias, IC2, OC, p * kPanel); break;
      }
    }
  }
  });
}

struct Bf16Dot512 {
  template <int R, int P>
  static void Run(float* out, const float* x, const void* panel, const float* bias, int IC2, int OC, int o,
                  Prefetch next) {
    PanelRowsBf16<R, P>(out, x, panel, bias, IC2, OC, o, next);
  }
};

// The input rows as bf16 pairs: [N, IC2] 32-bit words, the odd k in the high half (VDPBF16PS's layout).
__attribute__((target("avx512f,avx512bf16"))) void RowsToBf16PairsAvx512(uint32_t* dst, const float* x, int N, int IC) {
  const int IC2 = static_cast<int>(Pairs(IC));
  for (int r = 0; r < N; ++r) {
    const float* xr = x + static_cast<size_t>(r) * IC;
    uint32_t* dr = dst + static_cast<size_t>(r) * IC2;
    int k = 0;
    for (; k + 32 <= IC; k += 32) {  // 16 pairs: evens and odds interleaved as the instruction packs them
      const __m512 lo = _mm512_loadu_ps(xr + k), hi = _mm512_loadu_ps(xr + k + 16);
      // _mm512_cvtne2ps_pbh(a, b): the low 16 bf16 from b, the high 16 from a, in order: element i = x[k + i].
      _mm512_storeu_si512(dr + k / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (; k < IC; k += 2) {
      const uint32_t e = FloatToBf16Ftz(xr[k]), od = k + 1 < IC ? FloatToBf16Ftz(xr[k + 1]) : 0;
      dr[k / 2] = e | (od << 16);
    }
  }
}

void RowsToBf16Pairs(uint32_t* dst, const float* x, int N, int IC) {
  const size_t IC2 = Pairs(IC);
  for (int r = 0; r < N; ++r)
    for (int k = 0; k < IC; k += 2) {
      const float* xr = x + static_cast<size_t>(r) * IC;
      const uint32_t e = FloatToBf16Ftz(xr[k]), od = k + 1 < IC ? FloatToBf16Ftz(xr[k + 1]) : 0;
      dst[static_cast<size_t>(r) * IC2 + static_cast<size_t>(k / 2)] = e | (od << 16);
    }
}

bool CpuHasAvx512() { return __builtin_cpu_supports("avx512f"); }
// The environment's cap on the instruction sets (KEEL_MAX_CPU_ISA, read once, lower case): "avx2" keeps every
// product on the 256-bit kernels; "avx512" keeps AVX-512F but not AVX-512 BF16 (bf16 then runs its 256-bit FMA
// form: what a CPU with AVX-512F and no BF16, such as Skylake-X or Ice Lake, runs).
const std::string& IsaCap() {
  static const std::string cap = [] {
    const char* c = std::getenv("KEEL_MAX_CPU_ISA");
    std::string v = c ? c : "";
    for (auto& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    return v;
  }();
  return cap;
}

bool CpuHasAvx512Bf16() { return __builtin_cpu_supports("avx512bf16") && IsaCap() != "avx512"; }

}  // namespace

bool PackedMatmulSupported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

PackedIsa PackedMatmulIsa() {
  static const PackedIsa isa = CpuHasAvx512() && IsaCap() != "avx2" ? PackedIsa::kAvx512 : PackedIsa::kAvx2;
  return isa;
}

bool PackedMatmulIsaSupported(PackedIsa isa, WeightDtype dtype) {
  if (!PackedMatmulSupported()) return false;
  if (isa == PackedIsa::kAvx2) return true;
  return dtype == WeightDtype::kBF16 ? CpuHasAvx512() && CpuHasAvx512Bf16() : CpuHasAvx512();
}

uint16_t FloatToBf16Ftz(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);  // zero, denormal: signed zero
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN: quiet
  u += 0x7fffu + ((u >> 16) & 1u);  // nearest even (an overflow carries into the exponent: inf)
  return static_cast<uint16_t>(u >> 16);
}

size_t PackedMatmulFloats(int IC, int OC, WeightDtype dtype) {
  const size_t values = Panels(OC) * kPanel * static_cast<size_t>(IC);
  switch (dtype) {
    case WeightDtype::kF16: return (values + 1) / 2;
    case WeightDtype::kBF16: return Panels(OC) * kPanel * Pairs(IC);  // one pair per float
    case WeightDtype::kF32: break;
  }
  return values;
}

void PackMatmulWeight(float* packed, const float* w, int IC, int OC, WeightDtype dtype) {
  const size_t panels = Panels(OC);
  uint16_t* h = reinterpret_cast<uint16_t*>(packed);
  // Serial on purpose: packing runs once, often on another thread than the decode steps (a server packs on its
  // main thread and decodes on its engine thread), and an OpenMP team started here would leave a second idle
  // pool behind. libgomp then counts more threads than cores and stops spinning at barriers: every parallel
  // region of a decode step paid a futex wake-up (12k context switches in 96 steps against 131), and one-row
  // decoding lost a third of its speed.
  auto at_w = [&](size_t o, size_t k) {
    return o < static_cast<size_t>(OC) && k < static_cast<size_t>(IC) ? w[o * static_cast<size_t>(IC) + k] : 0.0f;
  };
  if (dtype == WeightDtype::kBF16) {  // P[p][k/2][j][k%2]
    const size_t IC2 = Pairs(IC);
    for (size_t p = 0; p < panels; ++p)
      for (size_t k2 = 0; k2 < IC2; ++k2)
        for (size_t j = 0; j < kPanel; ++j)
          for (size_t e = 0; e < 2; ++e)
            h[((p * IC2 + k2) * kPanel + j) * 2 + e] = FloatToBf16Ftz(at_w(p * kPanel + j, 2 * k2 + e));
    return;
  }
  for (size_t p = 0; p < panels; ++p)
    for (int k = 0; k < IC; ++k)
      for (int j = 0; j < kPanel; ++j) {
        const float v = at_w(p * kPanel + static_cast<size_t>(j), static_cast<size_t>(k));
        const size_t at = (p * static_cast<size_t>(IC) + static_cast<size_t>(k)) * kPanel + static_cast<size_t>(j);
        if (dtype == WeightDtype::kF16) h[at] = FloatToF16(v);
        else packed[at] = v;
      }
}

void MatmulForwardPackedWith(PackedIsa isa, float* out, const float* inp, const float* packed, const float* bias,
                             int N, int IC, int OC, WeightDtype dtype) {
  const auto* halves = reinterpret_cast<const uint16_t*>(packed);
  if (dtype == WeightDtype::kBF16) {
    // The rows rounded to bf16 pairs once per call, on the calling thread (N x IC values: microseconds), into a
    // buffer that lives as long as the thread and only grows.
    thread_local std::vector<uint32_t> pairs;
    const int IC2 = static_cast<int>(Pairs(IC));
    if (N <= 0) return;
    if (pairs.size() < static_cast<size_t>(N) * IC2) pairs.resize(static_cast<size_t>(N) * IC2);
    const auto* words = reinterpret_cast<const uint32_t*>(packed);
    if (isa == PackedIsa::kAvx512) {
      RowsToBf16PairsAvx512(pairs.data(), inp, N, IC);
      PackedForward512<Bf16Dot512>(out, reinterpret_cast<const float*>(pairs.data()), words, bias, N, IC2, OC);
    } else {
      RowsToBf16Pairs(pairs.data(), inp, N, IC);
      PackedForwardBf16Avx2(out, pairs.data(), words, bias, N, IC2, OC);
    }
    return;
  }
  const bool half = dtype == WeightDtype::kF16;
  if (isa == PackedIsa::kAvx512) {
    if (half) PackedForward512<Fma512<uint16_t>>(out, inp, halves, bias, N, IC, OC);
    else PackedForward512<Fma512<float>>(out, inp, packed, bias, N, IC, OC);
  } else {
    if (half) PackedForward(out, inp, halves, bias, N, IC, OC);
    else PackedForward(out, inp, packed, bias, N, IC, OC);
  }
}

void MatmulForwardPacked(float* out, const float* inp, const float* packed, const float* bias, int N, int IC, int OC,
                         WeightDtype dtype) {
  PackedIsa isa = PackedMatmulIsa();
  if (isa == PackedIsa::kAvx512 && !PackedMatmulIsaSupported(isa, dtype)) isa = PackedIsa::kAvx2;
  MatmulForwardPackedWith(isa, out, inp, packed, bias, N, IC, OC, dtype);
}

}  // namespace keel::cpu
