// vec_math.h: exp and tanh written as branch-free polynomials so loops over them auto-vectorise (libm's
// expf/tanhf are scalar calls unless the whole program is built with -ffast-math). Max relative error about
// 2e-7 (a couple of ulp); NaN in gives NaN out, large inputs saturate like libm.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace keel::cpu {

inline float VecExp(float x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  float xc = x > 88.3762626647949f ? 88.3762626647949f : x;
  xc = xc < -87.3365447504f ? -87.3365447504f : xc;
  float fx = xc * kLog2e + 0.5f;
  float fl = static_cast<float>(static_cast<int32_t>(fx));
  fl = fl > fx ? fl - 1.0f : fl;  // floor
  float r = xc - fl * kLn2Hi - fl * kLn2Lo;
  float r2 = r * r;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * r2 + r + 1.0f;
  int32_t e = (static_cast<int32_t>(fl) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  float out = y * scale;
  out = x < -87.3365447504f ? 0.0f : out;
  return x != x ? x : out;
}

inline float VecTanh(float x) {
  // tanh(x) = sign(x) * (1 - 2 / (exp(2|x|) + 1)); for small |x| a series avoids cancellation.
  float ax = x < 0.0f ? -x : x;
  float e = VecExp(2.0f * (ax > 9.0f ? 9.0f : ax));
  float t = 1.0f - 2.0f / (e + 1.0f);
  float x2 = x * x;
  float small = ax * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * -0.0539682540f)));
  t = ax < 0.0625f ? small : t;
  t = ax > 9.0f ? 1.0f : t;
  float r = x < 0.0f ? -t : t;
  return x != x ? x : r;
}

}  // namespace keel::cpu

namespace keel::cpu {

// Vector versions of VecExp/VecTanh (GCC vector extensions: 16 lanes with AVX-512, else 8, one AVX2 register).
// They perform exactly the scalar functions' operations lane by lane (keel builds with -ffp-contract=off, so no
// FMA contraction on either side), hence return bit-identical results: the scalar functions above stay the readable reference and serve
// the loop tails. GCC does not vectorise the scalar loops itself (the selects stay branches under trapping math).
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float VecF __attribute__((vector_size(4 * kLanes)));
typedef int32_t VecI __attribute__((vector_size(4 * kLanes)));
#define KEEL_VINLINE inline __attribute__((always_inline))

KEEL_VINLINE VecF Splat(float x) { return VecF{} + x; }
KEEL_VINLINE VecF LoadV(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
KEEL_VINLINE void StoreV(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }
KEEL_VINLINE VecF Select(VecI mask, VecF a, VecF b) { return mask ? a : b; }

KEEL_VINLINE VecF VecExp(VecF x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const VecF hi = Splat(88.3762626647949f), lo = Splat(-87.3365447504f);
  VecF xc = Select(x > hi, hi, x);
  xc = Select(xc < lo, lo, xc);
  VecF fx = xc * kLog2e + 0.5f;
  VecI fi = __builtin_convertvector(fx, VecI);  // truncation, as static_cast<int32_t>
  VecF fl = __builtin_convertvector(fi, VecF);
  fl = Select(fl > fx, fl - 1.0f, fl);
  VecF r = xc - fl * kLn2Hi - fl * kLn2Lo;
  VecF r2 = r * r;
  VecF y = Splat(1.9875691500E-4f);
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * r2 + r + 1.0f;
  VecI e = (__builtin_convertvector(fl, VecI) + 127) << 23;
  VecF scale;
  std::memcpy(&scale, &e, sizeof scale);
  VecF out = y * scale;
  out = Select(x < lo, Splat(0.0f), out);
  return Select(x != x, x, out);
}

KEEL_VINLINE VecF VecTanh(VecF x) {
  const VecF zero = Splat(0.0f), nine = Splat(9.0f);
  VecF ax = Select(x < zero, -x, x);
  VecF e = VecExp(2.0f * Select(ax > nine, nine, ax));
  VecF t = 1.0f - 2.0f / (e + 1.0f);
  VecF x2 = x * x;
  VecF small = ax * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * -0.0539682540f)));
  t = Select(ax < Splat(0.0625f), small, t);
  t = Select(ax > nine, Splat(1.0f), t);
  VecF r = Select(x < zero, -t, t);
  return Select(x != x, x, r);
}

// Lane-wise IEEE square root (correctly rounded, as std::sqrt).
KEEL_VINLINE VecF VecSqrt(VecF x) {
#if defined(__AVX512F__)
  // The zero-masked form with every lane selected: the same vsqrtps, without _mm512_sqrt_ps's
  // _mm512_undefined_ps() pass-through, which GCC 12 reports as maybe-uninitialized (GCC PR 105593).
  return reinterpret_cast<VecF>(_mm512_maskz_sqrt_ps(static_cast<__mmask16>(0xFFFF), reinterpret_cast<__m512>(x)));
#elif defined(__AVX__)
  return reinterpret_cast<VecF>(_mm256_sqrt_ps(reinterpret_cast<__m256>(x)));
#else
  for (int i = 0; i < kLanes; ++i) x[i] = __builtin_sqrtf(x[i]);
  return x;
#endif
}

// Lane-wise max and sum over the lanes, folded in a fixed order (the result depends on the data only).
KEEL_VINLINE float HMax(VecF v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
KEEL_VINLINE float HSum(VecF v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

}  // namespace keel::cpu
