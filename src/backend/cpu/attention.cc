// attention.cc: causal multi-head self-attention. Training forward/backward run per (batch, head) pair as
// sgemm calls on strided views of the qkv buffer (each pair single-threaded, pairs spread over threads);
// decode attends one new position per sequence against a KV cache.
#include <cblas.h>

#include <cmath>

#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/vec_math.h"

namespace keel::cpu {

namespace {

// row[0..len) = softmax(row[0..len)), row[len..T) = 0. kLanes (8 or 16) at a time (vec_math.h); the max is exact
// in any order and the sum's order depends on len only.
void SoftmaxCausalRow(float* row, int len, int T) {
  int j = 0;
  float mx = row[0];
  if (len >= kLanes) {
    VecF m = LoadV(row);
    for (j = kLanes; j + kLanes <= len; j += kLanes) {
      const VecF x = LoadV(row + j);
      m = Select(x > m, x, m);
    }
    mx = HMax(m);
  } else {
    j = 1;
  }
  for (; j < len; ++j) mx = row[j] > mx ? row[j] : mx;
  const VecF vmx = Splat(mx);
  VecF acc = {};
  for (j = 0; j + kLanes <= len; j += kLanes) {
    const VecF e = VecExp(LoadV(row + j) - vmx);
    StoreV(row + j, e);
    acc += e;
  }
  float sum = HSum(acc);
  for (; j < len; ++j) {
    row[j] = VecExp(row[j] - mx);
    sum += row[j];
  }
  const float inv = 1.0f / sum;
  for (j = 0; j + kLanes <= len; j += kLanes) StoreV(row + j, LoadV(row + j) * inv);
  for (; j < len; ++j) row[j] *= inv;
  for (j = len; j < T; ++j) row[j] = 0.0f;
}

// Softmax backward on one causal row: drow = prow * (drow - sum_j prow drow) over [0, len), 0 beyond.
void SoftmaxBackwardRow(const float* prow, float* drow, int len, int T) {
  VecF acc = {};
  int j = 0;
  for (; j + kLanes <= len; j += kLanes) acc += LoadV(prow + j) * LoadV(drow + j);
  float dot = HSum(acc);
  for (; j < len; ++j) dot += prow[j] * drow[j];
  const VecF vdot = Splat(dot);
  for (j = 0; j + kLanes <= len; j += kLanes) StoreV(drow + j, LoadV(prow + j) * (LoadV(drow + j) - vdot));
  for (; j < len; ++j) drow[j] = prow[j] * (drow[j] - dot);
  for (j = len; j < T; ++j) drow[j] = 0.0f;
}

}  // namespace

void AttentionForward(float* out, float* att, const float* qkv, int B, int T, int C, int NH) {
  const int hs = C / NH;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  const int C3 = 3 * C;
#pragma omp parallel for schedule(static)
  for (int bh = 0; bh < B * NH; ++bh) {
    int b = bh / NH, h = bh % NH;
    const float* q = qkv + static_cast<size_t>(b) * T * C3 + h * hs;
    const float* k = q + C;
    const float* v = q + 2 * C;
    float* p = att + static_cast<size_t>(bh) * T * T;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, scale, q, C3, k, C3, 0.0f, p, T);
    for (int t = 0; t < T; ++t) SoftmaxCausalRow(p + static_cast<size_t>(t) * T, t + 1, T);
    float* o = out + static_cast<size_t>(b) * T * C + h * hs;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, p, T, v, C3, 0.0f, o, C);
  }
}

void AttentionBackward(float* dqkv, float* datt, const float* dout, const float* qkv, const float* att, int B, int T,
                       int C, int NH) {
  const int hs = C / NH;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  const int C3 = 3 * C;
#pragma omp parallel for schedule(static)
  for (int bh = 0; bh < B * NH; ++bh) {
    int b = bh / NH, h = bh % NH;
    const float* q = qkv + static_cast<size_t>(b) * T * C3 + h * hs;
    const float* k = q + C;
    const float* v = q + 2 * C;
    float* dq = dqkv + static_cast<size_t>(b) * T * C3 + h * hs;
    float* dk = dq + C;
    float* dv = dq + 2 * C;
    const float* p = att + static_cast<size_t>(bh) * T * T;
    float* dp = datt + static_cast<size_t>(bh) * T * T;
    const float* dO = dout + static_cast<size_t>(b) * T * C + h * hs;
    // dP = dO V^T ; dV += P^T dO
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, 1.0f, dO, C, v, C3, 0.0f, dp, T);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, p, T, dO, C, 1.0f, dv, C3);
    // Softmax backward: dS = P * (dP - sum_j P dP), causal entries only.
    for (int t = 0; t < T; ++t)
      SoftmaxBackwardRow(p + static_cast<size_t>(t) * T, dp + static_cast<size_t>(t) * T, t + 1, T);
    // dQ += scale dS K ; dK += scale dS^T Q
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, scale, dp, T, k, C3, 1.0f, dq, C3);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, scale, dp, T, q, C3, 1.0f, dk, C3);
  }
}

void AttentionDecode(float* out, const float* q, const float* k_cache, const float* v_cache, const int32_t* pos,
                     float* scratch, int B, int maxT, int C, int NH, const int32_t* slots) {
  const int hs = C / NH;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
#pragma omp parallel for schedule(static)
  for (int bh = 0; bh < B * NH; ++bh) {
    int b = bh / NH, h = bh % NH;
    int len = pos[b] + 1;
    const float* qv = q + static_cast<size_t>(b) * C + h * hs;
    const size_t slot = static_cast<size_t>(slots ? slots[b] : b);
    const float* kc = k_cache + slot * maxT * C + h * hs;
    const float* vc = v_cache + slot * maxT * C + h * hs;
    float* s = scratch + static_cast<size_t>(bh) * maxT;
    float mx = -INFINITY;
    for (int j = 0; j < len; ++j) {
      const float* kr = kc + static_cast<size_t>(j) * C;
      float d = 0.0f;
      for (int i = 0; i < hs; ++i) d += qv[i] * kr[i];
      s[j] = d * scale;
      mx = s[j] > mx ? s[j] : mx;
    }
    float sum = 0.0f;
    for (int j = 0; j < len; ++j) {
      s[j] = VecExp(s[j] - mx);
      sum += s[j];
    }
    float inv = 1.0f / sum;
    float* o = out + static_cast<size_t>(b) * C + h * hs;
    for (int i = 0; i < hs; ++i) o[i] = 0.0f;
    for (int j = 0; j < len; ++j) {
      const float* vr = vc + static_cast<size_t>(j) * C;
      float w = s[j] * inv;
      for (int i = 0; i < hs; ++i) o[i] += w * vr[i];
    }
  }
}

}  // namespace keel::cpu
