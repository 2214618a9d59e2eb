// backend_conformance_test.cc: every op of every available backend against the CPU reference backend (one
// thread), on fresh random inputs each run, and the whole GptModel (loss, every gradient, an AdamW step, logits,
// KV-cached decode) on each backend against the same model on the reference.
//
// Backends under test (one instantiation each, same test body):
//  - cpu_2threads: the CPU backend with 2 threads. Every output, the model's included, is required to be
//    BIT-IDENTICAL to the 1-thread reference (the determinism that lets N workers reproduce one; the CPU GEMMs are
//    tiled by shape, so they are thread-count invariant too).
//  - cuda, cuda-tf32, cuda-bf16: the CUDA backend with fp32 GEMMs, and with cuBLAS rounding GEMM inputs to
//    TF32 / bf16 (CudaBackendOptions::matmul; buffers stay fp32). Skipped with "no CUDA device: ..." when
//    MakeBackend("cuda") fails (no GPU, no driver, or a build without CUDA).
//
// Inputs: a fresh seed per run (printed; KEEL_CONFORMANCE_SEED=<n> repeats a run). Outputs are poisoned with NaN
// before every op that overwrites them (a missed element shows as NaN); outputs that accumulate start from random
// values (the += contract). Backward ops are fed the reference's forward results, so each op is checked alone.
//
// Error measure: rel = max_i |got_i - want_i| / max(max_i |want_i|, 1e-6) per output tensor; any non-finite value
// where the reference is finite fails. Bounds (per op class and GEMM precision) are in Tol(); a few outputs are
// required to be bit-identical on every backend (pure adds and fixed-order scatter-adds: encoder, residual).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/hash.h"
#include "model/gpt.h"
#include "model/gpt_config.h"
#include "train/exact_sum.h"
#include "ops_test_util.h"
#ifdef KEEL_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

namespace keel {
namespace {

const float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---------------------------------------------------------------------------------------------------------
// Tolerances

enum class Prec { kFp32, kTf32, kBf16 };
// Output classes: kOwn = keel's own kernels (elementwise, row reductions); kGemm = computed through GEMMs (matmul,
// attention); kExact = bit-identical everywhere; kModel* = the whole model.
enum class Cls { kExact, kOwn, kGemm, kModelLoss, kModelGrad };

double Tol(Cls c, Prec p) {
  switch (c) {
    case Cls::kExact: return 0.0;
    case Cls::kOwn: return 2e-5;  // float kernels with different summation order / FMA / libm: ~1e-7..1e-6
    case Cls::kGemm: return p == Prec::kFp32 ? 1e-4 : p == Prec::kTf32 ? 5e-3 : 3e-2;
    case Cls::kModelLoss: return p == Prec::kFp32 ? 5e-5 : p == Prec::kTf32 ? 2e-3 : 2e-2;
    case Cls::kModelGrad: return p == Prec::kFp32 ? 1e-3 : p == Prec::kTf32 ? 3e-2 : 1.5e-1;
  }
  return 0.0;
}

// ---------------------------------------------------------------------------------------------------------
// Candidates

struct Candidate {
  const char* name;
  Prec prec;
  bool cpu;  // the CPU backend with 2 threads (bitwise expectations)
};

Result<std::unique_ptr<Backend>> MakeCandidate(const Candidate& c) {
  if (c.cpu) return MakeCpuBackend(2);
#ifdef KEEL_HAVE_CUDA
  // Every precision set here, fp32 included: KEEL_CUDA_MATMUL in the environment must not turn the fp32
  // candidate into a tf32 one (a false failure against fp32 tolerances).
  CudaBackendOptions o;
  auto env = CudaBackendOptionsFromEnv();
  if (env.ok()) o.device = env->device;
  o.matmul = c.prec == Prec::kFp32   ? CudaMatmulPrecision::kFp32
             : c.prec == Prec::kTf32 ? CudaMatmulPrecision::kTf32
                                     : CudaMatmulPrecision::kBf16;
  return MakeCudaBackend(o);
#else
  return MakeBackend("cuda", 1);  // the "built without CUDA support" error
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Device buffers moved through Upload/Download only (host memory on CPU).

using optest::Dev;
using optest::DevInt;

// A device byte buffer (AdamW's decay mask), carried in an int32 allocation.
class DevBytes {
 public:
  DevBytes(Backend* be, const std::vector<uint8_t>& host) {
    std::vector<int32_t> packed((host.size() + 3) / 4 + 1, 0);
    std::memcpy(packed.data(), host.data(), host.size());
    ints_ = std::make_unique<DevInt>(be, packed);
  }
  operator const uint8_t*() const { return reinterpret_cast<const uint8_t*>(static_cast<int32_t*>(*ints_)); }  // NOLINT

 private:
  std::unique_ptr<DevInt> ints_;
};

// ---------------------------------------------------------------------------------------------------------
// Outputs and comparison

struct Out {
  std::string name;
  std::vector<float> v;
  Cls cls;
};
using Outs = std::vector<Out>;

struct Stats {
  int checked = 0, bitwise = 0, failed = 0;
};

double RelErr(const std::vector<float>& got, const std::vector<float>& want, size_t* worst) {
  double max_err = 0.0, scale = 1e-6;
  *worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const bool wf = std::isfinite(want[i]), gf = std::isfinite(got[i]);
    if (wf != gf || (!wf && std::memcmp(&got[i], &want[i], sizeof(float)) != 0 && !(std::isnan(got[i]) && std::isnan(want[i])))) {
      *worst = i;
      return INFINITY;
    }
    if (!wf) continue;
    const double e = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (e > max_err) max_err = e, *worst = i;
    scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
  }
  return max_err / scale;
}

void Compare(const std::string& what, const Outs& want, const Outs& got, const Candidate& c, Stats* st) {
  ASSERT_EQ(want.size(), got.size()) << what;
  for (size_t k = 0; k < want.size(); ++k) {
    const Out& w = want[k];
    const Out& g = got[k];
    const std::string label = what + " " + w.name;
    ASSERT_EQ(w.v.size(), g.v.size()) << label;
    ++st->checked;
    const bool same = std::memcmp(w.v.data(), g.v.data(), w.v.size() * sizeof(float)) == 0;
    if (same) ++st->bitwise;
    size_t worst = 0;
    const double rel = same ? 0.0 : RelErr(g.v, w.v, &worst);
    // What is required: bitwise for kExact everywhere and for every output on the 2-thread CPU; a tolerance
    // otherwise.
    const bool need_bitwise = w.cls == Cls::kExact || c.cpu;
    const double tol = Tol(w.cls == Cls::kExact ? Cls::kOwn : w.cls, c.prec);
    const bool ok = need_bitwise ? same : rel < tol;
    std::printf("  %-4s %-58s %s rel %.2e (%s %.0e)\n", ok ? "ok" : "FAIL", label.c_str(),
                same ? "bit-identical" : "differs      ", rel, need_bitwise ? "need bitwise; tol" : "tol", tol);
    if (!ok) {
      ++st->failed;
      ADD_FAILURE() << c.name << ": " << label << ": rel " << rel << " (tol " << tol << ", "
                    << (need_bitwise ? "bit-identical required" : "tolerance") << "); worst at " << worst
                    << ": got " << (worst < g.v.size() ? g.v[worst] : NAN) << ", want "
                    << (worst < w.v.size() ? w.v[worst] : NAN);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Random inputs

struct Gen {
  Rng rng;
  std::vector<float> N(size_t n, float scale = 1.0f, float offset = 0.0f) {
    std::vector<float> v(n);
    for (auto& x : v) x = offset + scale * rng.Normal();
    return v;
  }
  std::vector<int32_t> Int(size_t n, int hi) {
    std::vector<int32_t> v(n);
    for (auto& x : v) x = static_cast<int32_t>(rng.Below(static_cast<uint64_t>(hi)));
    return v;
  }
};

uint64_t RunSeed() {
  if (const char* s = std::getenv("KEEL_CONFORMANCE_SEED"); s && *s) return std::strtoull(s, nullptr, 0);
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

size_t Sz(long long a, long long b = 1, long long c = 1, long long d = 1) {
  return static_cast<size_t>(a) * static_cast<size_t>(b) * static_cast<size_t>(c) * static_cast<size_t>(d);
}

// ---------------------------------------------------------------------------------------------------------
// The test

class Conformance : public ::testing::TestWithParam<Candidate> {
 protected:
  void SetUp() override {
    cand_ = GetParam();
    auto r = MakeCandidate(cand_);
    if (!r.ok()) {
      if (cand_.cpu) FAIL() << r.status().ToString();
      GTEST_SKIP() << "no CUDA device: " << r.status().ToString();
    }
    be_ = std::move(r).value();
    ref_ = MakeCpuBackend(1);
    seed_ = RunSeed();
    std::printf("backend %s (%s), reference cpu (1 thread); seed %llu (KEEL_CONFORMANCE_SEED=%llu repeats it)\n",
                cand_.name, be_->Name().c_str(), static_cast<unsigned long long>(seed_),
                static_cast<unsigned long long>(seed_));
    gen_.rng.Seed(seed_);
  }

  // Runs f on the reference and on the candidate (each with its thread count) and compares.
  void Check(const std::string& what, const std::function<Outs(Backend*)>& f) {
    SCOPED_TRACE(what);
    ref_->SetThreads(1);
    Outs want;
    try {
      want = f(ref_.get());
    } catch (const std::exception& e) {
      FAIL() << what << " (reference): " << e.what();
    }
    be_->SetThreads(2);
    Outs got;
    try {
      got = f(be_.get());
    } catch (const std::exception& e) {
      FAIL() << what << " (" << cand_.name << "): " << e.what();
    }
    ref_->SetThreads(1);
    Compare(what, want, got, cand_, &stats_);
  }

  void RunOps();
  void RunModel();

  Candidate cand_{};
  std::unique_ptr<Backend> be_, ref_;
  uint64_t seed_ = 0;
  Gen gen_;
  Stats stats_;
};

std::string Shape(std::initializer_list<std::pair<const char*, long long>> dims) {
  std::string s = "(";
  for (auto& [k, v] : dims) s += std::string(s.size() > 1 ? " " : "") + k + "=" + std::to_string(v);
  return s + ")";
}

void Conformance::RunOps() {
  Gen& g = gen_;
  // ---- encoder -------------------------------------------------------------------------------------------
  for (auto [B, T, C, V] : std::vector<std::array<int, 4>>{{2, 5, 8, 11}, {4, 64, 67, 100}, {8, 128, 768, 1000}}) {
    const int N = B * T, maxT = T + 3;
    auto tokens = g.Int(N, V);
    if (N > 7) tokens[7] = tokens[0];  // a repeated token for sure
    auto positions = g.Int(N, maxT);
    const auto wte = g.N(Sz(V, C)), wpe = g.N(Sz(maxT, C)), dout = g.N(Sz(N, C)), gte0 = g.N(Sz(V, C)),
               gpe0 = g.N(Sz(maxT, C));
    Check("encoder" + Shape({{"B", B}, {"T", T}, {"C", C}, {"V", V}}), [&](Backend* be) {
      DevInt dtok(be, tokens), dpos(be, positions);
      Dev dwte(be, wte), dwpe(be, wpe), out(be, Sz(N, C)), out2(be, Sz(N, C)), d(be, dout), gte(be, gte0),
          gpe(be, gpe0);
      out.Poison();
      out2.Poison();
      be->EncoderForward(out, dtok, nullptr, dwte, dwpe, B, T, C);
      be->EncoderForward(out2, dtok, dpos, dwte, dwpe, B, T, C);
      be->EncoderBackward(gte, gpe, d, dtok, B, T, C);
      return Outs{{"forward", out.Host(), Cls::kExact},
                  {"forward (positions)", out2.Host(), Cls::kExact},
                  {"dwte", gte.Host(), Cls::kExact},
                  {"dwpe", gpe.Host(), Cls::kExact}};
    });
  }
  // ---- layernorm -----------------------------------------------------------------------------------------
  for (auto [N, C] : std::vector<std::array<int, 2>>{{1, 8}, {10, 67}, {1000, 33}, {300, 768}}) {
    const auto x = g.N(Sz(N, C), 2.0f, 0.3f), w = g.N(C, 0.3f, 1.0f), b = g.N(C, 0.3f), dout = g.N(Sz(N, C)),
               gx0 = g.N(Sz(N, C)), gw0 = g.N(C), gb0 = g.N(C);
    // The reference's mean/rstd feed the backward on every backend.
    std::vector<float> mean_ref, rstd_ref;
    {
      Dev dx(ref_.get(), x), dw(ref_.get(), w), db(ref_.get(), b), out(ref_.get(), Sz(N, C)), m(ref_.get(), N),
          r(ref_.get(), N);
      ref_->LayerNormForward(out, m, r, dx, dw, db, N, C);
      mean_ref = m.Host();
      rstd_ref = r.Host();
    }
    Check("layernorm" + Shape({{"N", N}, {"C", C}}), [&](Backend* be) {
      Dev dx(be, x), dw(be, w), db(be, b), out(be, Sz(N, C)), m(be, N), r(be, N), d(be, dout), gx(be, gx0),
          gw(be, gw0), gb(be, gb0), mr(be, mean_ref), rr(be, rstd_ref);
      out.Poison();
      m.Poison();
      r.Poison();
      be->LayerNormForward(out, m, r, dx, dw, db, N, C);
      be->LayerNormBackward(gx, gw, gb, d, dx, dw, mr, rr, N, C);
      return Outs{{"forward", out.Host(), Cls::kOwn}, {"mean", m.Host(), Cls::kOwn}, {"rstd", r.Host(), Cls::kOwn},
                  {"dinp", gx.Host(), Cls::kOwn},     {"dw", gw.Host(), Cls::kOwn},   {"db", gb.Host(), Cls::kOwn}};
    });
  }
  // ---- matmul --------------------------------------------------------------------------------------------
  for (auto [N, IC, OC] :
       std::vector<std::array<int, 3>>{{1, 64, 96}, {7, 13, 17}, {64, 64, 192}, {300, 100, 333}, {256, 768, 2304}}) {
    const auto x = g.N(Sz(N, IC)), w = g.N(Sz(OC, IC), 0.1f), b = g.N(OC), dout = g.N(Sz(N, OC)), gx0 = g.N(Sz(N, IC)),
               gw0 = g.N(Sz(OC, IC)), gb0 = g.N(OC);
    Check("matmul" + Shape({{"N", N}, {"IC", IC}, {"OC", OC}}), [&](Backend* be) {
      Dev dx(be, x), dw(be, w), db(be, b), out(be, Sz(N, OC)), out_nb(be, Sz(N, OC)), d(be, dout), gx(be, gx0),
          gw(be, gw0), gb(be, gb0), gw2(be, gw0);
      out.Poison();
      out_nb.Poison();
      be->MatmulForward(out, dx, dw, db, N, IC, OC);
      be->MatmulForward(out_nb, dx, dw, nullptr, N, IC, OC);
      be->MatmulBackward(gx, gw, gb, d, dx, dw, N, IC, OC);
      be->MatmulBackward(nullptr, gw2, nullptr, d, dx, dw, N, IC, OC);  // no dinp, no bias
      return Outs{{"forward", out.Host(), Cls::kGemm},
                  {"forward (no bias)", out_nb.Host(), Cls::kGemm},
                  {"dinp", gx.Host(), Cls::kGemm},
                  {"dw", gw.Host(), Cls::kGemm},
                  {"dbias", gb.Host(), Cls::kOwn},
                  {"dw (no dinp)", gw2.Host(), Cls::kGemm}};
    });
  }
  // ---- attention (training) ------------------------------------------------------------------------------
  for (auto [B, T, C, NH] :
       std::vector<std::array<int, 4>>{{1, 1, 8, 2}, {2, 5, 8, 2}, {2, 64, 64, 4}, {1, 257, 96, 3}, {1, 1024, 768, 12}}) {
    const size_t nqkv = Sz(B, T, 3 * C), nout = Sz(B, T, C), natt = Sz(B, NH, T, T);
    const auto qkv = g.N(nqkv), dout = g.N(nout), gq0 = g.N(nqkv);
    std::vector<float> att_ref;
    {
      Dev dq(ref_.get(), qkv), out(ref_.get(), nout), att(ref_.get(), natt);
      ref_->AttentionForward(out, att, dq, B, T, C, NH);
      att_ref = att.Host();
    }
    Check("attention" + Shape({{"B", B}, {"T", T}, {"C", C}, {"NH", NH}}), [&](Backend* be) {
      Dev dq(be, qkv), out(be, nout), att(be, natt), d(be, dout), gq(be, gq0), datt(be, natt), ar(be, att_ref);
      out.Poison();
      att.Poison();
      datt.Poison();
      be->AttentionForward(out, att, dq, B, T, C, NH);
      be->AttentionBackward(gq, datt, d, dq, ar, B, T, C, NH);
      return Outs{{"forward", out.Host(), Cls::kGemm}, {"probabilities", att.Host(), Cls::kGemm},
                  {"dqkv", gq.Host(), Cls::kGemm}};
    });
  }
  // ---- attention decode (KV cache) -----------------------------------------------------------------------
  for (auto [B, maxT, C, NH] : std::vector<std::array<int, 4>>{{2, 6, 8, 2}, {3, 64, 64, 4}, {4, 1024, 768, 12}}) {
    const auto q = g.N(Sz(B, C)), kc = g.N(Sz(B, maxT, C)), vc = g.N(Sz(B, maxT, C));
    auto pos = g.Int(B, maxT);
    pos[0] = 0;
    pos[B - 1] = maxT - 1;
    Check("attention_decode" + Shape({{"B", B}, {"maxT", maxT}, {"C", C}, {"NH", NH}}), [&](Backend* be) {
      Dev dq(be, q), dk(be, kc), dv(be, vc), out(be, Sz(B, C)), scratch(be, Sz(B, NH, maxT));
      DevInt dpos(be, pos);
      out.Poison();
      scratch.Poison();
      be->AttentionDecode(out, dq, dk, dv, dpos, scratch, B, maxT, C, NH);
      return Outs{{"out", out.Host(), Cls::kOwn}};
    });
  }
  // Rows reading arbitrary KV-cache slots (several rows per slot), the slot list on the host.
  for (auto [S, maxT, C, NH] : std::vector<std::array<int, 4>>{{3, 6, 8, 2}, {4, 256, 768, 12}}) {
    const std::vector<int32_t> slots = {2, 0, 2, 1, S - 1, 2};
    const int R = static_cast<int>(slots.size());
    const auto q = g.N(Sz(R, C)), kc = g.N(Sz(S, maxT, C)), vc = g.N(Sz(S, maxT, C));
    auto pos = g.Int(R, maxT);
    pos[1] = 0;
    Check("attention_decode_slots" + Shape({{"rows", R}, {"slots", S}, {"maxT", maxT}, {"C", C}, {"NH", NH}}),
          [&](Backend* be) {
            Dev dq(be, q), dk(be, kc), dv(be, vc), out(be, Sz(R, C)), scratch(be, Sz(R, NH, maxT));
            DevInt dpos(be, pos);
            out.Poison();
            scratch.Poison();
            be->AttentionDecodeSlots(out, dq, dk, dv, dpos, slots.data(), scratch, R, maxT, C, NH);
            return Outs{{"out", out.Host(), Cls::kOwn}};
          });
  }
  // ---- GELU, residual ------------------------------------------------------------------------------------
  for (size_t n : {size_t{1}, size_t{1000}, (size_t{1} << 20) + 3}) {
    const auto x = g.N(n, 3.0f), y = g.N(n), dout = g.N(n), gx0 = g.N(n);
    Check("gelu/residual" + Shape({{"n", static_cast<long long>(n)}}), [&](Backend* be) {
      Dev dx(be, x), dy(be, y), out(be, n), d(be, dout), gx(be, gx0), res(be, n), inplace(be, x);
      out.Poison();
      res.Poison();
      be->GeluForward(out, dx, n);
      be->GeluBackward(gx, dx, d, n);
      be->ResidualForward(res, dx, dy, n);
      be->ResidualForward(inplace, inplace, dy, n);  // in place, as decode uses it
      return Outs{{"gelu forward", out.Host(), Cls::kOwn},
                  {"gelu backward", gx.Host(), Cls::kOwn},
                  {"residual", res.Host(), Cls::kExact},
                  {"residual (in place)", inplace.Host(), Cls::kExact}};
    });
  }
  // ---- softmax + cross-entropy ---------------------------------------------------------------------------
  for (auto [N, V, Vp] : std::vector<std::array<int, 3>>{{1, 5, 8}, {64, 1000, 1008}, {16, 50257, 50304}}) {
    const auto logits = g.N(Sz(N, Vp), 3.0f);
    const auto targets = g.Int(N, V);
    const float dloss = 1.0f / static_cast<float>(N);
    std::vector<float> probs_ref;
    {
      Dev l(ref_.get(), logits), p(ref_.get(), Sz(N, Vp)), loss(ref_.get(), N);
      DevInt t(ref_.get(), targets);
      ref_->SoftmaxCrossEntropyForward(loss, p, l, t, N, V, Vp);
      probs_ref = p.Host();
    }
    Check("softmax_xent" + Shape({{"N", N}, {"V", V}, {"Vp", Vp}}), [&](Backend* be) {
      Dev l(be, logits), p(be, Sz(N, Vp)), loss(be, N), inplace(be, logits), loss2(be, N), sm(be, Sz(N, Vp)),
          pr(be, probs_ref), dl(be, Sz(N, Vp)), dl_inplace(be, probs_ref);
      DevInt t(be, targets);
      p.Poison();
      loss.Poison();
      loss2.Poison();
      sm.Poison();
      dl.Poison();
      be->SoftmaxCrossEntropyForward(loss, p, l, t, N, V, Vp);
      be->SoftmaxCrossEntropyForward(loss2, inplace, inplace, t, N, V, Vp);  // probs == logits, as the model runs it
      be->SoftmaxCrossEntropyForward(nullptr, sm, l, nullptr, N, V, Vp);   // Op::kSoftmaxForward
      be->SoftmaxCrossEntropyBackward(dl, pr, t, dloss, N, V, Vp);
      be->SoftmaxCrossEntropyBackward(dl_inplace, dl_inplace, t, dloss, N, V, Vp);  // dlogits == probs
      return Outs{{"losses", loss.Host(), Cls::kOwn},
                  {"probs", p.Host(), Cls::kOwn},
                  {"losses (in place)", loss2.Host(), Cls::kOwn},
                  {"probs (in place)", inplace.Host(), Cls::kOwn},
                  {"softmax only", sm.Host(), Cls::kOwn},
                  {"dlogits", dl.Host(), Cls::kOwn},
                  {"dlogits (in place)", dl_inplace.Host(), Cls::kOwn}};
    });
  }
  // ---- AdamW, sum of squares -----------------------------------------------------------------------------
  for (size_t n : {size_t{1}, size_t{100003}}) {
    const auto params = g.N(n), grads = g.N(n), m0 = g.N(n, 0.1f);
    auto v0 = g.N(n, 0.1f);
    for (auto& v : v0) v = v * v;
    std::vector<uint8_t> mask(n);
    for (size_t i = 0; i < n; ++i) mask[i] = static_cast<uint8_t>((i / 7) % 2);
    AdamWParams ap{3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, 0.5f};
    Check("adamw" + Shape({{"n", static_cast<long long>(n)}}), [&](Backend* be) {
      Dev p(be, params), gr(be, grads), m(be, m0), v(be, v0), p2(be, params), m2(be, m0), v2(be, v0);
      DevBytes dmask(be, mask);
      be->AdamW(p, gr, m, v, dmask, n, ap);
      AdamWParams first = ap;
      first.t = 1;
      be->AdamW(p2, gr, m2, v2, nullptr, n, first);
      // The updates themselves, at their own scale (lr x O(1)): against max|params| a few-percent error in how
      // the moments, bias corrections and weight decay combine would pass.
      auto delta = [&](std::vector<float> after) {
        for (size_t i = 0; i < n; ++i) after[i] -= params[i];
        return after;
      };
      return Outs{{"params", p.Host(), Cls::kOwn},          {"m", m.Host(), Cls::kOwn},
                  {"v", v.Host(), Cls::kOwn},               {"params (no mask, t=1)", p2.Host(), Cls::kOwn},
                  {"m (no mask, t=1)", m2.Host(), Cls::kOwn}, {"v (no mask, t=1)", v2.Host(), Cls::kOwn},
                  {"update", delta(p.Host()), Cls::kOwn},   {"update (no mask, t=1)", delta(p2.Host()), Cls::kOwn}};
    });
  }
  for (size_t n : {size_t{0}, size_t{1}, size_t{65536}, size_t{65537}, (size_t{1} << 20) + 5}) {
    const auto x = g.N(std::max<size_t>(n, 1), 2.0f);
    // A double result: bitwise on the CPU, 1e-10 relative elsewhere (fixed-order double sums).
    Dev rx(ref_.get(), x), cx(be_.get(), x);
    ref_->SetThreads(1);
    const double want = ref_->SumSquares(rx, n);
    be_->SetThreads(2);
    const double got = be_->SumSquares(cx, n);
    ref_->SetThreads(1);
    const double rel = want == 0 ? std::fabs(got) : std::fabs(got - want) / want;
    const bool ok = cand_.cpu ? got == want : rel < 1e-10;
    std::printf("  %-4s %-58s %s rel %.2e (%s)\n", ok ? "ok" : "FAIL", ("sum_squares(n=" + std::to_string(n) + ")").c_str(),
                got == want ? "bit-identical" : "differs      ", rel, cand_.cpu ? "need bitwise" : "tol 1e-10");
    ++stats_.checked;
    if (got == want) ++stats_.bitwise;
    if (!ok) ++stats_.failed;
    if (cand_.cpu) EXPECT_EQ(got, want) << "sum_squares n=" << n;
    else EXPECT_LT(rel, 1e-10) << "sum_squares n=" << n;
  }
  // ---- round_through_fixed_point (device backends; the reference is train/exact_sum.h on the host) ----------
  for (size_t n : {size_t{1}, size_t{1000}, (size_t{1} << 20) + 3}) {
    // Magnitudes from 1e-15 (below the 2^-40 resolution) to 1e6 (past the 2^16 clamp), both signs, ties
    // (odd multiples of 2^-41), -0.0, and non-finite values that must be counted and left alone.
    std::vector<float> x = g.N(n);
    for (size_t i = 0; i < n; ++i) x[i] *= std::pow(10.0f, static_cast<float>(static_cast<int>(g.rng.Below(22)) - 15));
    const float special[] = {std::ldexp(3.0f, -41), -std::ldexp(5.0f, -41), -0.0f, -3e-13f, 7e4f, -1e9f,
                             std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                             -std::numeric_limits<float>::infinity()};
    for (size_t k = 0; k < std::size(special) && k < n; ++k) x[(k * 7919) % n] = special[k];
    Check("round_through_fixed_point" + Shape({{"n", static_cast<long long>(n)}}), [&](Backend* be) {
      Dev d(be, x);
      size_t bad = 0;
      if (be->SupportsOp(Op::kRoundThroughFixedPoint)) {
        auto r = be->RoundThroughFixedPoint(d, n);
        if (!r.ok()) throw std::runtime_error(r.status().ToString());
        bad = r.value();
      } else {
        if (!be->host_memory()) throw std::runtime_error(be->Name() + ": no round_through_fixed_point");
        bad = RoundThroughFixedPoint(d, n);  // host memory: the host function is the op
      }
      return Outs{{"rounded", d.Host(), Cls::kExact}, {"non-finite count", {static_cast<float>(bad)}, Cls::kExact}};
    });
  }
}

void Conformance::RunModel() {
  GptConfig cfg;
  cfg.layers = 2;
  cfg.heads = 4;
  cfg.dim = 64;
  cfg.ctx = 64;
  cfg.vocab = 301;
  const int B = 3, T = 37;
  Gen& g = gen_;
  const auto tokens = g.Int(Sz(B, T), cfg.vocab), targets = g.Int(Sz(B, T), cfg.vocab);
  const uint64_t init_seed = g.rng.Next();
  // GPT-2 init plus noise: attention far from uniform, every path carries a gradient.
  std::vector<float> params;
  {
    auto m = GptModel::Create(cfg, ref_.get(), B, T);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    (*m)->InitWeights(init_seed);
    params = (*m)->ParamsToHost();
    for (auto& p : params) p += 0.1f * g.rng.Normal();
  }
  const auto layout = ParamLayout(cfg);
  // Decode: 2 sequences fed 6 positions each (different tokens per sequence).
  const int DB = 2, steps = 6;
  const auto dec_tokens = g.Int(Sz(DB, steps), cfg.vocab);

  auto run = [&](Backend* be) -> Outs {
    auto mr = GptModel::Create(cfg, be, B, T);
    if (!mr.ok()) throw std::runtime_error(mr.status().ToString());
    auto model = std::move(mr).value();
    model->SetParamsFromHost(params);
    model->ZeroGrads();
    const float loss = model->Forward(tokens.data(), targets.data(), B, T);
    Outs outs;
    outs.push_back({"loss", {loss}, Cls::kModelLoss});
    outs.push_back({"per-position losses", model->LastLosses(), Cls::kModelLoss});
    model->Backward();
    const auto grads = model->GradsToHost();
    for (const auto& t : layout)
      outs.push_back({"grad " + t.name, std::vector<float>(grads.begin() + static_cast<long>(t.offset),
                                                           grads.begin() + static_cast<long>(t.offset + t.size)),
                      Cls::kModelGrad});
    model->SetParamsFromHost(params);
    model->Forward(tokens.data(), nullptr, B, T);
    outs.push_back({"logits", model->LastLogits(), Cls::kGemm});
    // KV-cached decode, step by step.
    auto ds = DecodeState::Create(model.get(), DB, cfg.ctx);
    if (!ds.ok()) throw std::runtime_error(ds.status().ToString());
    for (int s = 0; s < steps; ++s) {
      std::vector<int32_t> tok(DB), pos(DB, s);
      for (int b = 0; b < DB; ++b) tok[static_cast<size_t>(b)] = dec_tokens[Sz(b, steps) + static_cast<size_t>(s)];
      const auto& logits = (*ds)->Step(tok.data(), pos.data(), DB);
      outs.push_back({"decode logits step " + std::to_string(s), logits, Cls::kGemm});
    }
    const Status st = be->Sync();
    if (!st.ok()) throw std::runtime_error(st.ToString());
    return outs;
  };
  Check("model" + Shape({{"L", cfg.layers}, {"NH", cfg.heads}, {"C", cfg.dim}, {"V", cfg.vocab}, {"B", B}, {"T", T}}),
        run);
}

TEST_P(Conformance, EveryOpAndModelMatchCpuReference) {
  RunOps();
  RunModel();
  std::printf("%s: %d outputs checked, %d bit-identical to the reference, %d failed\n", cand_.name, stats_.checked,
              stats_.bitwise, stats_.failed);
}

INSTANTIATE_TEST_SUITE_P(Backends, Conformance,
                         ::testing::Values(Candidate{"cpu_2threads", Prec::kFp32, true},
                                           Candidate{"cuda", Prec::kFp32, false},
                                           Candidate{"cuda_tf32", Prec::kTf32, false},
                                           Candidate{"cuda_bf16", Prec::kBf16, false}),
                         [](const ::testing::TestParamInfo<Candidate>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace keel
