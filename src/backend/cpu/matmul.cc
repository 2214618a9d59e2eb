// matmul.cc: the linear layer (out = inp @ W^T + b) and its backward, through OpenBLAS sgemm.
#include <cblas.h>

#include "backend/cpu/cpu_ops.h"

namespace keel::cpu {

void MatmulForward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC) {
  float beta = 0.0f;
  if (bias) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      float* o = out + static_cast<size_t>(n) * OC;
      for (int c = 0; c < OC; ++c) o[c] = bias[c];
    }
    beta = 1.0f;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, IC, 1.0f, inp, IC, w, IC, beta, out, OC);
}

void MatmulBackward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w, int N,
                    int IC, int OC) {
  if (dinp) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IC, OC, 1.0f, dout, OC, w, IC, 1.0f, dinp, IC);
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dw, IC);
  if (dbias) AccumulateColumnSums(dbias, dout, N, OC);
}

}  // namespace keel::cpu
