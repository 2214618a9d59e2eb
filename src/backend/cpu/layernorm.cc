// layernorm.cc: LayerNorm forward/backward (eps 1e-5, biased variance, as GPT-2 and PyTorch).
#include <omp.h>

#include <cmath>
#include <vector>

#include "backend/cpu/cpu_ops.h"

namespace keel::cpu {

void AccumulateColumnSums(float* acc, const float* x, int N, int C) {
#pragma omp parallel
  {
    int nt = omp_get_num_threads(), id = omp_get_thread_num();
    int c0 = static_cast<int>(static_cast<int64_t>(C) * id / nt), c1 = static_cast<int>(static_cast<int64_t>(C) * (id + 1) / nt);
    for (int n = 0; n < N; ++n) {
      const float* row = x + static_cast<size_t>(n) * C;
      for (int c = c0; c < c1; ++c) acc[c] += row[c];
    }
  }
}

void LayerNormForward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b, int N,
                      int C) {
  const float eps = 1e-5f;
  // A decode step's few rows: one thread (a fork/join costs more than normalising them).
#pragma omp parallel for schedule(static) if (static_cast<size_t>(N) * C >= 32768)
  for (int n = 0; n < N; ++n) {
    const float* x = inp + static_cast<size_t>(n) * C;
    float m = 0.0f;
    for (int c = 0; c < C; ++c) m += x[c];
    m /= C;
    float v = 0.0f;
    for (int c = 0; c < C; ++c) {
      float d = x[c] - m;
      v += d * d;
    }
    v /= C;
    float s = 1.0f / std::sqrt(v + eps);
    float* o = out + static_cast<size_t>(n) * C;
    for (int c = 0; c < C; ++c) o[c] = (x[c] - m) * s * w[c] + b[c];
    mean[n] = m;
    rstd[n] = s;
  }
}

void LayerNormBackward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                       const float* mean, const float* rstd, int N, int C) {
  // dinp: rows are independent.
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* x = inp + static_cast<size_t>(n) * C;
    const float* d = dout + static_cast<size_t>(n) * C;
    float m = mean[n], s = rstd[n];
    float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
    for (int c = 0; c < C; ++c) {
      float norm = (x[c] - m) * s;
      float dnorm = w[c] * d[c];
      dnorm_mean += dnorm;
      dnorm_norm_mean += dnorm * norm;
    }
    dnorm_mean /= C;
    dnorm_norm_mean /= C;
    float* di = dinp + static_cast<size_t>(n) * C;
    for (int c = 0; c < C; ++c) {
      float norm = (x[c] - m) * s;
      float dnorm = w[c] * d[c];
      di[c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
    }
  }
  // dw, db: reductions over rows, partitioned by channel.
#pragma omp parallel
  {
    int nt = omp_get_num_threads(), id = omp_get_thread_num();
    int c0 = static_cast<int>(static_cast<int64_t>(C) * id / nt), c1 = static_cast<int>(static_cast<int64_t>(C) * (id + 1) / nt);
    for (int n = 0; n < N; ++n) {
      const float* x = inp + static_cast<size_t>(n) * C;
      const float* d = dout + static_cast<size_t>(n) * C;
      float m = mean[n], s = rstd[n];
      for (int c = c0; c < c1; ++c) {
        dw[c] += (x[c] - m) * s * d[c];
        db[c] += d[c];
      }
    }
  }
}

}  // namespace keel::cpu
