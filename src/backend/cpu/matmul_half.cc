// matmul_half.cc: the linear layer with IEEE half-precision (f16) weights and fp32 activations, for decoding
// (`keel serve --dtype f16`, `keel sample --dtype f16`).
//
// Why: decoding a few rows per step reads every weight once per step, so it is bound by memory bandwidth
// (~20 GB/s here); f16 weights halve the bytes read and nearly double the decode rate, as llama.cpp's f16 files
// do. Each weight is converted to fp32 in registers (F16C) and multiplied in fp32, so the result equals the fp32
// matmul on the f16-rounded weights up to the order of summation.
//
// Shapes: 1..kHalfMaxRows rows use the kernels of skinny_matmul.h (one row streams each weight row with four
// accumulators; several rows are register-blocked, each weight block read once from memory and used for every
// row); more rows (prompt chunks) convert blocks of weight rows to fp32 and run a single-threaded sgemm per block. Output blocks are fixed by the shape, so results do not depend on the thread count.
#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/skinny_matmul.h"
#include "formats/half.h"

namespace keel::cpu {

namespace {

constexpr int kHalfMaxRows = 16;
constexpr int kOutChunk = 64;  // output channels per parallel work item

// Portable fallback (no F16C): one output at a time, fp32 arithmetic on converted weights.
void HalfRowsScalar(float* out, const float* inp, const uint16_t* wr, float bias, int R, int IC, int OC, int o) {
  for (int r = 0; r < R; ++r) {
    float s = 0.0f;
    for (int i = 0; i < IC; ++i) s += F16ToFloat(wr[i]) * inp[static_cast<size_t>(r) * IC + i];
    out[static_cast<size_t>(r) * OC + o] = bias + s;
  }
}

}  // namespace

void MatmulForwardHalf(float* out, const float* inp, const uint16_t* w, const float* bias, int N, int IC, int OC) {
  const int chunks = (OC + kOutChunk - 1) / kOutChunk;
  if (N >= 1 && N <= kHalfMaxRows && skinny::Supported())
    return SkinnyMatmulT(out, inp, w, bias, N, IC, OC);
  if (N <= kHalfMaxRows) {
#pragma omp parallel for schedule(static)
    for (int c = 0; c < chunks; ++c) {
      const int hi = std::min(OC, (c + 1) * kOutChunk);
      for (int o = c * kOutChunk; o < hi; ++o)
        HalfRowsScalar(out, inp, w + static_cast<size_t>(o) * IC, bias ? bias[o] : 0.0f, N, IC, OC, o);
    }
    return;
  }
  // Many rows: compute bound. Each block of weight rows is widened to fp32 once and multiplied by sgemm.
#pragma omp parallel
  {
    std::vector<float> wf(static_cast<size_t>(kOutChunk) * IC);
#pragma omp for schedule(static)
    for (int c = 0; c < chunks; ++c) {
      const int lo = c * kOutChunk, len = std::min(kOutChunk, OC - lo);
      F16ToFloatN(w + static_cast<size_t>(lo) * IC, wf.data(), static_cast<size_t>(len) * IC);
      float beta = 0.0f;
      if (bias) {
        for (int n = 0; n < N; ++n) std::memcpy(out + static_cast<size_t>(n) * OC + lo, bias + lo, len * sizeof(float));
        beta = 1.0f;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, len, IC, 1.0f, inp, IC, wf.data(), IC, beta, out + lo,
                  OC);
    }
  }
}

}  // namespace keel::cpu
