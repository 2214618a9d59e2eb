// matmul.cc: the linear layer (out = inp @ W^T + b) and its backward, through OpenBLAS sgemm (1-16 rows, decode
// steps: the weight-streaming kernels of skinny_matmul.h; without AVX2, sgemv for one row and a portable kernel
// for 2-8 rows).
//
// Thread-count invariance: OpenBLAS's own threading changes the rounding of sgemm with the thread count (last-bit
// differences once M*N*K > 2^18, measured when tests/thread_invariance_test.cc still called it threaded). keel
// therefore splits every product into output tiles by a rule that depends on the shape only, and runs each tile
// as a single-threaded sgemm on an OpenMP thread. Each output element's K-reduction then happens inside one
// single-threaded call whose arguments do not depend on the thread count, so results are bit-identical for any
// --threads.
#include <cblas.h>

#include <algorithm>
#include <cstring>

#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/skinny_matmul.h"

namespace keel::cpu {

namespace {

// Row-major C[M,N] = alpha * op(A)[M,K] @ op(B)[K,N] + beta * C, tiled along the larger output dimension. The
// tiling depends on the shape only (see the top of the file): about kTile rows/columns per tile (each tile re-packs
// the other operand, so small tiles cost packing time: 256-row tiles were 2-4% slower over a training step's GEMMs
// on 2 threads; 512 keeps 4 tiles for 2048 rows, work for up to 4 threads), at most kMaxTiles, an even count (so
// two threads, the common case, get equal shares: 3 tiles on 2 threads left one idle a third of the time), and
// tile edges on multiples of 16 (the sgemm micro-kernel's row unroll).
int TileStep(int dim) {
  constexpr int kTile = 512, kMaxTiles = 16, kAlign = 16, kMinSplit = 128;
  if (dim < kMinSplit) return dim;  // one tile
  int tiles = std::clamp((dim + kTile - 1) / kTile, 2, kMaxTiles);
  tiles += tiles % 2;
  const int step = (dim + tiles - 1) / tiles;
  return (step + kAlign - 1) / kAlign * kAlign;
}

void TiledSgemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                const float* B, int ldb, float beta, float* C, int ldc) {
  const bool split_m = M >= N;
  const int dim = split_m ? M : N;
  const int step = TileStep(dim);
  const int tiles = (dim + step - 1) / step;
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < tiles; ++t) {
    const int lo = t * step, len = std::min(step, dim - lo);
    if (len <= 0) continue;
    if (split_m) {
      const float* a = trans_a ? A + lo : A + static_cast<size_t>(lo) * lda;
      cblas_sgemm(CblasRowMajor, ta, tb, len, N, K, alpha, a, lda, B, ldb, beta, C + static_cast<size_t>(lo) * ldc, ldc);
    } else {
      const float* b = trans_b ? B + static_cast<size_t>(lo) * ldb : B + lo;
      cblas_sgemm(CblasRowMajor, ta, tb, M, len, K, alpha, A, lda, b, ldb, beta, C + lo, ldc);
    }
  }
}

// A few rows (a decode batch: one row per sequence): each weight row is read once and dotted with every input
// row while it sits in L1, so the step streams W once like the one-row sgemv, where sgemm would pack W first
// (2-3x slower at GPT-2 small's shapes on 2 threads). Fixed 8-lane accumulators and fixed output chunks: the
// result does not depend on the thread count.
constexpr int kSkinnyMaxRows = 8;
typedef float V8 __attribute__((vector_size(32)));

inline V8 Load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int R>
inline void SkinnyRows(float* out, const float* inp, const float* wr, float bias, int IC, int OC, int o) {
  V8 acc[R] = {};
  int i = 0;
  for (; i + 8 <= IC; i += 8) {
    const V8 wv = Load8(wr + i);
    for (int r = 0; r < R; ++r) acc[r] += wv * Load8(inp + static_cast<size_t>(r) * IC + i);
  }
  for (int r = 0; r < R; ++r) {
    float s = 0.0f;
    for (int l = 0; l < 8; ++l) s += acc[r][l];
    for (int j = i; j < IC; ++j) s += wr[j] * inp[static_cast<size_t>(r) * IC + j];
    out[static_cast<size_t>(r) * OC + o] = bias + s;
  }
}

void SkinnyMatmul(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC) {
  constexpr int kChunk = 64;
  const int chunks = (OC + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int c = 0; c < chunks; ++c) {
    const int hi = std::min(OC, (c + 1) * kChunk);
    for (int o = c * kChunk; o < hi; ++o) {
      const float* wr = w + static_cast<size_t>(o) * IC;
      const float b = bias ? bias[o] : 0.0f;
      float* op = out;
      const float* ip = inp;
      int n = N;
      while (n > 4) {
        SkinnyRows<4>(op, ip, wr, b, IC, OC, o);
        op += static_cast<size_t>(4) * OC;
        ip += static_cast<size_t>(4) * IC;
        n -= 4;
      }
      switch (n) {
        case 4: SkinnyRows<4>(op, ip, wr, b, IC, OC, o); break;
        case 3: SkinnyRows<3>(op, ip, wr, b, IC, OC, o); break;
        case 2: SkinnyRows<2>(op, ip, wr, b, IC, OC, o); break;
        case 1: SkinnyRows<1>(op, ip, wr, b, IC, OC, o); break;
        default: break;
      }
    }
  }
}

}  // namespace

void MatmulForward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC) {
  // 1..16 rows (decode steps): weight streaming (skinny_matmul.h); where the CPU lacks AVX2/FMA, sgemv for one
  // row and the portable 8-row kernel above.
  if (N >= 1 && N <= skinny::kMaxRows && skinny::Supported()) return SkinnyMatmulT(out, inp, w, bias, N, IC, OC);
  if (N >= 2 && N <= kSkinnyMaxRows) return SkinnyMatmul(out, inp, w, bias, N, IC, OC);
  float beta = 0.0f;
  if (bias) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      float* o = out + static_cast<size_t>(n) * OC;
      for (int c = 0; c < OC; ++c) o[c] = bias[c];
    }
    beta = 1.0f;
  }
  if (N == 1) {
    // One row (batch-1 decode, e.g. the LM head): matrix-vector products stream W once, where sgemm would first
    // pack all of it; this path is memory-bandwidth bound. Fixed row chunks keep it thread-count invariant.
    constexpr int kChunk = 256;
    const int chunks = (OC + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
    for (int c = 0; c < chunks; ++c) {
      const int lo = c * kChunk, len = std::min(kChunk, OC - lo);
      cblas_sgemv(CblasRowMajor, CblasNoTrans, len, IC, 1.0f, w + static_cast<size_t>(lo) * IC, IC, inp, 1, beta,
                  out + lo, 1);
    }
    return;
  }
  TiledSgemm(false, true, N, OC, IC, 1.0f, inp, IC, w, IC, beta, out, OC);
}

void MatmulBackward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w, int N,
                    int IC, int OC) {
  if (dinp) TiledSgemm(false, false, N, IC, OC, 1.0f, dout, OC, w, IC, 1.0f, dinp, IC);
  TiledSgemm(true, false, OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dw, IC);
  if (dbias) AccumulateColumnSums(dbias, dout, N, OC);
}

}  // namespace keel::cpu
