// vec_math.h: exp and tanh written as branch-free polynomials so loops over them auto-vectorise (libm's
// expf/tanhf are scalar calls unless the whole program is built with -ffast-math). Max relative error about
// 2e-7 (a couple of ulp); NaN in gives NaN out, large inputs saturate like libm.
#pragma once
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
