// ops_test_util.h: helpers shared by the op and model tests (ops_gradcheck_test.cc, thread_invariance_test.cc; the
// device buffers also backend_conformance_test.cc): random inputs, device buffers, double finite differences, the
// error measure, bit comparison, and the OpsTest and ModelTest fixtures. Error measure: rel = max_i |got_i - want_i| /
// max(max_i |want_i|, floor), the worst absolute error scaled by the largest reference magnitude.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "backend/backend.h"
#include "core/hash.h"
#include "model/gpt.h"
#include "backend/cpu/vec_math.h"
#include "model/gpt_config.h"
#include "ops_reference.h"
#include "train/exact_sum.h"

namespace keel::optest {

using ref::ToDouble;
using ref::Vec;

// Tolerances (see the error measure above). Float kernels land at ~1e-7..1e-6 on these shapes; a wrong term,
// index or scale gives O(1e-1..1).
constexpr double kFwdTol = 1e-5;     // forward output vs double reference, floor 1
constexpr double kGradTol = 1e-4;    // float analytic gradient vs double finite differences, floor kGradFloor
constexpr double kGradFloor = 1e-2;
constexpr double kAccumTol = 1e-5;   // second backward call vs 2x the first (row sums restart from g)
constexpr double kFdStep = 1e-5;     // central-difference step for the double references
const float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---------------------------------------------------------------------------------------------------------
// Helpers

inline std::vector<float> RandN(Rng& rng, size_t n, float scale = 1.0f, float offset = 0.0f) {
  std::vector<float> v(n);
  for (auto& x : v) x = offset + scale * rng.Normal();
  return v;
}

inline std::vector<int32_t> RandInt(Rng& rng, size_t n, int hi) {
  std::vector<int32_t> v(n);
  for (auto& x : v) x = static_cast<int32_t>(rng.Below(static_cast<uint64_t>(hi)));
  return v;
}

// A float buffer on the backend's device (host memory on CPU), moved through Upload/Download only. kGuard floats
// of a sentinel follow the n the op may use, and Host() checks they are unchanged: a kernel writing past a
// tensor's end (a last-block bug) is caught even where the allocator rounds the size up.
class Dev {
 public:
  static constexpr size_t kGuard = 64;
  static constexpr float kSentinel = -12345.678f;
  Dev(Backend* be, size_t n) : be_(be), n_(n) {
    auto r = be->Alloc(n + kGuard);
    if (!r.ok()) throw std::runtime_error(r.status().ToString());
    p_ = r.value();
    const std::vector<float> guard(kGuard, kSentinel);
    be_->Upload(p_ + n_, guard.data(), kGuard);
  }
  Dev(Backend* be, const std::vector<float>& host) : Dev(be, host.size()) { Set(host); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  ~Dev() { be_->Free(p_); }
  operator float*() const { return p_; }  // NOLINT: implicit, for readable op calls
  size_t size() const { return n_; }
  void Set(const std::vector<float>& host) { be_->Upload(p_, host.data(), n_); }
  void Fill(float v) { Set(std::vector<float>(n_, v)); }
  void Poison() { Fill(std::numeric_limits<float>::quiet_NaN()); }  // outputs must be written, never read
  std::vector<float> Host() const {
    std::vector<float> h(n_ + kGuard);
    const Status s = be_->Sync();
    EXPECT_TRUE(s.ok()) << s.ToString();
    be_->Download(h.data(), p_, n_ + kGuard);
    for (size_t i = n_; i < n_ + kGuard; ++i)
      if (!(h[i] == kSentinel)) {
        ADD_FAILURE() << "written past the end of a " << n_ << "-float buffer (at +" << i - n_ << ")";
        break;
      }
    h.resize(n_);
    return h;
  }

 private:
  Backend* be_;
  size_t n_;
  float* p_ = nullptr;
};

class DevInt {
 public:
  DevInt(Backend* be, const std::vector<int32_t>& host) : be_(be) {
    auto r = be->AllocInt(std::max<size_t>(host.size(), 1));
    if (!r.ok()) throw std::runtime_error(r.status().ToString());
    p_ = r.value();
    if (!host.empty()) be->UploadInt(p_, host.data(), host.size());
  }
  DevInt(const DevInt&) = delete;
  DevInt& operator=(const DevInt&) = delete;
  ~DevInt() { be_->FreeInt(p_); }
  operator int32_t*() const { return p_; }  // NOLINT

 private:
  Backend* be_;
  int32_t* p_ = nullptr;
};

// sum_i a_i * r_i in double.
inline double Dot(const Vec& a, const std::vector<float>& r) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * r[i];
  return s;
}

// Central differences of f at x, one coordinate at a time.
inline Vec NumGrad(Vec x, const std::function<double(const Vec&)>& f, double h = kFdStep) {
  Vec g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f(x);
    x[i] = x0 - h;
    const double fm = f(x);
    x[i] = x0;
    g[i] = (fp - fm) / (2.0 * h);
  }
  return g;
}

// rel = max |got - want| / max(max |want|, floor); infinity if anything is not finite.
inline double RelErr(const std::vector<float>& got, const Vec& want, double floor, size_t* worst = nullptr) {
  if (got.size() != want.size()) return INFINITY;
  double max_err = 0.0, scale = floor;
  size_t w = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(want[i])) {
      if (worst) *worst = i;
      return INFINITY;
    }
    const double e = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (e > max_err) max_err = e, w = i;
    scale = std::max(scale, std::fabs(want[i]));
  }
  if (worst) *worst = w;
  return max_err / scale;
}

// Checks got against want (rel < tol) and prints the measured rel so the margins show in the log.
inline void CheckClose(const std::string& what, const std::vector<float>& got, const Vec& want, double tol,
                       double floor) {
  size_t worst = 0;
  const double rel = RelErr(got, want, floor, &worst);
  std::printf("  [check] %-44s rel %.2e  (tol %.0e)\n", what.c_str(), rel, tol);
  EXPECT_LT(rel, tol) << what << ": worst at index " << worst << ": got "
                      << (worst < got.size() ? got[worst] : NAN) << ", want "
                      << (worst < want.size() ? want[worst] : NAN);
}

// The accumulate contract: a second backward call on the same buffers adds the same gradient again.
inline void CheckAccumulated(const std::string& what, const std::vector<float>& once,
                             const std::vector<float>& twice) {
  Vec want(once.size());
  for (size_t i = 0; i < once.size(); ++i) want[i] = 2.0 * once[i];
  CheckClose(what + " (accumulates)", twice, want, kAccumTol, 1e-30);
}

inline bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Index and magnitude of the first difference, for failure messages.
inline std::string FirstDiff(const std::vector<float>& a, const std::vector<float>& b) {
  size_t count = 0, first = a.size();
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      if (first == a.size()) first = i;
      ++count;
    }
  if (first == a.size()) return "sizes differ or equal";
  char buf[160];
  std::snprintf(buf, sizeof(buf), "%zu of %zu entries differ; first at %zu: %.9g vs %.9g", count, a.size(), first,
                a[first], b[first]);
  return buf;
}

// AdamW hyper-parameters for the optimizer tests (t = 1, a gradient scale as the trainer passes it).
inline AdamWParams TestAdamW() {
  AdamWParams p;
  p.lr = 1e-2f;
  p.beta1 = 0.9f;
  p.beta2 = 0.95f;
  p.eps = 1e-8f;
  p.weight_decay = 0.1f;
  p.t = 1;
  p.grad_scale = 0.5f;
  return p;
}

class OpsTest : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be_ = MakeCpuBackend(1);
  Backend* be() { return be_.get(); }
  Rng rng_{0x6b65656c};
};

// ---------------------------------------------------------------------------------------------------------
// The whole model

class ModelTest : public ::testing::Test {
 protected:
  static constexpr int kB = 2, kT = 5;  // T < ctx: the last position row gets no gradient

  void SetUp() override {
    cfg_.layers = 2;
    cfg_.heads = 2;
    cfg_.dim = 8;
    cfg_.ctx = 6;
    cfg_.vocab = 13;
    auto m = GptModel::Create(cfg_, be_.get(), kB, kT);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    model_ = std::move(m).value();
    model_->InitWeights(20240607);
    // GPT-2's init (std 0.02, unit gains, zero biases) leaves attention almost uniform and most gradients tiny;
    // noise of std 0.3 on every parameter makes every path carry a gradient well above finite-difference noise.
    Rng rng(99);
    auto p = model_->ParamsToHost();
    for (auto& v : p) v += 0.3f * rng.Normal();
    model_->SetParamsFromHost(p);
    params_ = p;
    tokens_ = RandInt(rng, kB * kT, cfg_.vocab);
    targets_ = RandInt(rng, kB * kT, cfg_.vocab);
  }

  double RefLoss(const Vec& params, Vec* losses = nullptr) const {
    return ref::GptLoss(cfg_, params, tokens_.data(), targets_.data(), kB, kT, losses);
  }
  // Zeroed gradients, one Forward + Backward: d(mean loss)/d(params) on the host.
  std::vector<float> Gradient(float* loss = nullptr, const std::function<void(int)>& on_group_ready = nullptr) {
    model_->ZeroGrads();
    float l = model_->Forward(tokens_.data(), targets_.data(), kB, kT);
    if (loss) *loss = l;
    model_->Backward(on_group_ready);
    return model_->GradsToHost();
  }

  GptConfig cfg_;
  std::unique_ptr<Backend> be_ = MakeCpuBackend(1);
  std::unique_ptr<GptModel> model_;
  std::vector<float> params_;
  std::vector<int32_t> tokens_, targets_;
};

}  // namespace keel::optest
