// attention.cc: causal multi-head self-attention. Training forward/backward run per (batch, head) pair as
// sgemm calls on strided views of the qkv buffer, block by block below the diagonal (each pair single-threaded,
// pairs spread over threads);
// decode attends one new position per sequence against a KV cache.
#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/vec_math.h"
#include "formats/half.h"

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

// Causal blocking: rows are processed in blocks of kAttBlock positions, and each product skips the blocks above
// the diagonal (whose probabilities are zero): about 5/8 of the full T x T work at T = 256. The blocks depend on
// T only, and every output element is still produced by one single-threaded sgemm call.
constexpr int kAttBlock = 64;

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
    float* o = out + static_cast<size_t>(b) * T * C + h * hs;
    for (int r0 = 0; r0 < T; r0 += kAttBlock) {
      const int r1 = std::min(T, r0 + kAttBlock), rb = r1 - r0;
      float* pr = p + static_cast<size_t>(r0) * T;
      // S[r0:r1, 0:r1] = scale Q[r0:r1] K[0:r1]^T, then the causal softmax of each row (zeros beyond t).
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rb, r1, hs, scale, q + static_cast<size_t>(r0) * C3,
                  C3, k, C3, 0.0f, pr, T);
      for (int t = r0; t < r1; ++t) SoftmaxCausalRow(p + static_cast<size_t>(t) * T, t + 1, T);
      // O[r0:r1] = P[r0:r1, 0:r1] V[0:r1]
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rb, hs, r1, 1.0f, pr, T, v, C3, 0.0f,
                  o + static_cast<size_t>(r0) * C, C);
    }
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
    for (int r0 = 0; r0 < T; r0 += kAttBlock) {
      const int r1 = std::min(T, r0 + kAttBlock), rb = r1 - r0;
      // dP[r0:r1, 0:r1] = dO[r0:r1] V[0:r1]^T, then the softmax backward: dS = P * (dP - sum_j P dP) on the causal
      // entries of each row, zeros beyond.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rb, r1, hs, 1.0f, dO + static_cast<size_t>(r0) * C, C,
                  v, C3, 0.0f, dp + static_cast<size_t>(r0) * T, T);
      for (int t = r0; t < r1; ++t)
        SoftmaxBackwardRow(p + static_cast<size_t>(t) * T, dp + static_cast<size_t>(t) * T, t + 1, T);
      // dQ[r0:r1] += scale dS[r0:r1, 0:r1] K[0:r1]
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rb, hs, r1, scale, dp + static_cast<size_t>(r0) * T, T,
                  k, C3, 1.0f, dq + static_cast<size_t>(r0) * C3, C3);
    }
    // Column blocks (key positions c0:c1 receive from query rows c0:T): dV += P^T dO, dK += scale dS^T Q.
    for (int c0 = 0; c0 < T; c0 += kAttBlock) {
      const int c1 = std::min(T, c0 + kAttBlock), cb = c1 - c0, rows = T - c0;
      const size_t pc = static_cast<size_t>(c0) * T + c0;
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, cb, hs, rows, 1.0f, p + pc, T,
                  dO + static_cast<size_t>(c0) * C, C, 1.0f, dv + static_cast<size_t>(c0) * C3, C3);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, cb, hs, rows, scale, dp + pc, T,
                  q + static_cast<size_t>(c0) * C3, C3, 1.0f, dk + static_cast<size_t>(c0) * C3, C3);
    }
  }
}

namespace {

// One (sequence, head) of decode attention: o[0..hs) = softmax(scale q K^T) V over the first len cache rows (row
// stride C). s: len floats of scratch. Every value is computed with the same operations in the same order as the
// scalar reference loop this replaced (each score: kLanes partial sums folded lane 0 first, times scale; exps
// lane by lane, bit-identical to the scalar VecExp; the normaliser summed key by key; each output lane
// accumulated key by key), so results do not depend on which path ran. NV = hs / kLanes when that is 2, 4 or 8:
// the output is then held in NV registers across the keys (the generic path reloads and stores o per key), and
// scores are taken four keys at a time so each query load serves four keys.
// KV: float, or uint16_t for an IEEE f16 cache (each value converted exactly to fp32 as it is read).
KEEL_VINLINE VecF LoadKv(const float* p) { return LoadV(p); }
KEEL_VINLINE VecF LoadKv(const uint16_t* p) {
#if defined(__AVX512F__)
  // The maskz form: GCC 12 warns about the unmasked one's undefined pass-through source.
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return reinterpret_cast<VecF>(_mm512_maskz_cvtph_ps(0xffff, h));
#elif defined(__F16C__)
  return reinterpret_cast<VecF>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else  // a build without -march=native (the sanitizer build): the same exact conversion, lane by lane
  VecF v;
  for (int i = 0; i < kLanes; ++i) v[i] = F16ToFloat(p[i]);
  return v;
#endif
}
inline float KvAt(const float* p, int i) { return p[i]; }
inline float KvAt(const uint16_t* p, int i) { return F16ToFloat(p[i]); }

template <int NV, typename KV>
void AttendHead(float* o, const float* qv, const KV* kc, const KV* vc, float* s, int len, int C, int hs,
                float scale) {
  float mx = -INFINITY;
  int j = 0;
  if constexpr (NV > 0) {
    for (; j + 4 <= len; j += 4) {
      const KV* k0 = kc + static_cast<size_t>(j) * C;
      const KV* k1 = k0 + C;
      const KV* k2 = k1 + C;
      const KV* k3 = k2 + C;
      VecF q = LoadV(qv);
      VecF a0 = q * LoadKv(k0), a1 = q * LoadKv(k1), a2 = q * LoadKv(k2), a3 = q * LoadKv(k3);
#pragma GCC unroll 8
      for (int v = 1; v < NV; ++v) {
        q = LoadV(qv + v * kLanes);
        a0 += q * LoadKv(k0 + v * kLanes);
        a1 += q * LoadKv(k1 + v * kLanes);
        a2 += q * LoadKv(k2 + v * kLanes);
        a3 += q * LoadKv(k3 + v * kLanes);
      }
      s[j] = HSum(a0) * scale;
      s[j + 1] = HSum(a1) * scale;
      s[j + 2] = HSum(a2) * scale;
      s[j + 3] = HSum(a3) * scale;
      for (int t = j; t < j + 4; ++t) mx = s[t] > mx ? s[t] : mx;
    }
  }
  for (; j < len; ++j) {
    const KV* kr = kc + static_cast<size_t>(j) * C;
    float d = 0.0f;
    int i = 0;
    if (hs >= kLanes) {
      VecF acc = LoadV(qv) * LoadKv(kr);
      for (i = kLanes; i + kLanes <= hs; i += kLanes) acc += LoadV(qv + i) * LoadKv(kr + i);
      d = HSum(acc);
    }
    for (; i < hs; ++i) d += qv[i] * KvAt(kr, i);
    s[j] = d * scale;
    mx = s[j] > mx ? s[j] : mx;
  }
  const VecF vmx = Splat(mx);
  for (j = 0; j + kLanes <= len; j += kLanes) StoreV(s + j, VecExp(LoadV(s + j) - vmx));
  for (; j < len; ++j) s[j] = VecExp(s[j] - mx);
  float sum = 0.0f;
  for (j = 0; j < len; ++j) sum += s[j];
  const float inv = 1.0f / sum;
  if constexpr (NV > 0) {
    VecF acc[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = Splat(0.0f);
    for (j = 0; j < len; ++j) {
      const KV* vr = vc + static_cast<size_t>(j) * C;
      const VecF w = Splat(s[j] * inv);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] += w * LoadKv(vr + v * kLanes);
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) StoreV(o + v * kLanes, acc[v]);
  } else {
    for (int i = 0; i < hs; ++i) o[i] = 0.0f;
    for (j = 0; j < len; ++j) {
      const KV* vr = vc + static_cast<size_t>(j) * C;
      const float w = s[j] * inv;
      int i = 0;  // whole vectors, then the tail: the same multiply and add per element either way
      for (; i + kLanes <= hs; i += kLanes) StoreV(o + i, LoadV(o + i) + Splat(w) * LoadKv(vr + i));
      for (; i < hs; ++i) o[i] += w * KvAt(vr, i);
    }
  }
}

template <typename KV>
void AttentionDecodeAny(float* out, const float* q, const KV* k_cache, const KV* v_cache, const int32_t* pos,
                        float* scratch, int B, int maxT, int C, int NH, const int32_t* slots) {
  const int hs = C / NH;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  const int nv = hs % kLanes == 0 ? hs / kLanes : 0;
  auto* attend = nv == 2   ? &AttendHead<2, KV>
                 : nv == 4 ? &AttendHead<4, KV>
                 : nv == 8 ? &AttendHead<8, KV>
                           : &AttendHead<0, KV>;
  // Dynamic: rows sit at different positions (a server's sequences), and the VM's two vCPUs run at unequal speeds.
#pragma omp parallel for schedule(dynamic)
  for (int bh = 0; bh < B * NH; ++bh) {
    const int b = bh / NH, h = bh % NH;
    const size_t slot = static_cast<size_t>(slots ? slots[b] : b);
    attend(out + static_cast<size_t>(b) * C + h * hs, q + static_cast<size_t>(b) * C + h * hs,
           k_cache + slot * maxT * C + h * hs, v_cache + slot * maxT * C + h * hs,
           scratch + static_cast<size_t>(bh) * maxT, pos[b] + 1, C, hs, scale);
  }
}

}  // namespace

void AttentionDecode(float* out, const float* q, const float* k_cache, const float* v_cache, const int32_t* pos,
                     float* scratch, int B, int maxT, int C, int NH, const int32_t* slots) {
  AttentionDecodeAny(out, q, k_cache, v_cache, pos, scratch, B, maxT, C, NH, slots);
}

void AttentionDecodeHalfKv(float* out, const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                           const int32_t* pos, float* scratch, int B, int maxT, int C, int NH, const int32_t* slots) {
  AttentionDecodeAny(out, q, k_cache, v_cache, pos, scratch, B, maxT, C, NH, slots);
}

}  // namespace keel::cpu
