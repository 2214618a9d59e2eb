// thread_invariance_test.cc: bit-identical results with 1 and 2 threads, op by op (shapes large enough for keel's
// tiled GEMMs in matmul.cc and most parallel loops to split; the encoder, LayerNorm forward and residual stay below
// their 32768-element threshold here and run serially — backend_conformance_test splits them) and for the whole
// model. Multi-worker
// determinism rests on this (backend.h, "Determinism"): every member of a group must compute the same bits
// whatever its --threads.
#include <gtest/gtest.h>
#include <omp.h>

#include "ops_test_util.h"

namespace keel::optest {
namespace {

using Outputs = std::vector<std::pair<std::string, std::vector<float>>>;

// Runs f with 1 and then 2 threads on the same backend and asserts that every output is bit-identical.
void ExpectThreadInvariant(Backend* be, const std::function<Outputs()>& f) {
  be->SetThreads(1);
  const Outputs one = f();
  be->SetThreads(2);
  // The OpenMP build of OpenBLAS resets OpenMP's thread count in openblas_set_num_threads: make sure the second
  // run really has two threads (it once silently had one, and this comparison compared nothing).
  EXPECT_EQ(omp_get_max_threads(), 2) << "SetThreads(2) left OpenMP with another thread count";
  const Outputs two = f();
  be->SetThreads(1);
  ASSERT_EQ(one.size(), two.size());
  for (size_t i = 0; i < one.size(); ++i) {
    const bool same = BitEqual(one[i].second, two[i].second);
    const std::string diff = same ? "bit-identical" : FirstDiff(one[i].second, two[i].second);
    std::printf("  [threads] %-38s %s\n", one[i].first.c_str(), diff.c_str());
    if (!same) ADD_FAILURE() << one[i].first << " differs between 1 and 2 threads: " << diff;
  }
}

TEST_F(OpsTest, ThreadInvarianceEncoderLayerNormPointwise) {
  const int B = 4, T = 64, C = 67, V = 100, N = B * T;
  const auto tokens = RandInt(rng_, N, V);
  const auto wte = RandN(rng_, V * C), wpe = RandN(rng_, T * C), x = RandN(rng_, N * C, 2.0f, 0.3f),
             w = RandN(rng_, C, 0.3f, 1.0f), b = RandN(rng_, C, 0.3f), R = RandN(rng_, N * C),
             y = RandN(rng_, N * C);
  ExpectThreadInvariant(be(), [&] {
    DevInt dtok(be(), tokens);
    Dev dwte(be(), wte), dwpe(be(), wpe), dx(be(), x), dw_(be(), w), db_(be(), b), dout(be(), R), dy(be(), y);
    Dev enc(be(), N * C), gte(be(), V * C), gpe(be(), T * C);
    be()->EncoderForward(enc, dtok, nullptr, dwte, dwpe, B, T, C);
    be()->EncoderBackward(gte, gpe, dout, dtok, B, T, C);
    Dev ln(be(), N * C), mean(be(), N), rstd(be(), N), gx(be(), N * C), gw(be(), C), gb(be(), C);
    be()->LayerNormForward(ln, mean, rstd, dx, dw_, db_, N, C);
    be()->LayerNormBackward(gx, gw, gb, dout, dx, dw_, mean, rstd, N, C);
    Dev ge(be(), N * C), gg(be(), N * C), res(be(), N * C);
    be()->GeluForward(ge, dx, static_cast<size_t>(N) * C);
    be()->GeluBackward(gg, dx, dout, static_cast<size_t>(N) * C);
    be()->ResidualForward(res, dx, dy, static_cast<size_t>(N) * C);
    return Outputs{{"encoder forward", enc.Host()},  {"encoder dwte", gte.Host()},   {"encoder dwpe", gpe.Host()},
                   {"layernorm forward", ln.Host()}, {"layernorm mean", mean.Host()}, {"layernorm rstd", rstd.Host()},
                   {"layernorm dinp", gx.Host()},    {"layernorm dw", gw.Host()},     {"layernorm db", gb.Host()},
                   {"gelu forward", ge.Host()},      {"gelu backward", gg.Host()},    {"residual", res.Host()}};
  });
}

TEST_F(OpsTest, ThreadInvarianceAttentionLossOptimizer) {
  const int B = 2, T = 64, C = 64, NH = 4, maxT = 64, V = 1000, Vp = 1008, NL = 64;
  const size_t nqkv = static_cast<size_t>(B) * T * 3 * C, nout = static_cast<size_t>(B) * T * C;
  const auto qkv = RandN(rng_, nqkv), R = RandN(rng_, nout), q = RandN(rng_, B * C), kc = RandN(rng_, B * maxT * C),
             vc = RandN(rng_, B * maxT * C), logits = RandN(rng_, static_cast<size_t>(NL) * Vp, 3.0f);
  const std::vector<int32_t> pos = {37, 63};
  const auto targets = RandInt(rng_, NL, V);
  const size_t np = 100003;
  const auto params = RandN(rng_, np), grads = RandN(rng_, np), m0 = RandN(rng_, np, 0.1f);
  std::vector<float> v0 = RandN(rng_, np, 0.1f);
  for (auto& v : v0) v = v * v;
  std::vector<uint8_t> mask(np);
  for (size_t i = 0; i < np; ++i) mask[i] = (i / 7) % 2;
  AdamWParams ap = TestAdamW();
  ap.t = 3;
  ExpectThreadInvariant(be(), [&] {
    Dev dqkv(be(), qkv), dout(be(), R), out(be(), nout), att(be(), static_cast<size_t>(B) * NH * T * T),
        gq(be(), nqkv), datt(be(), static_cast<size_t>(B) * NH * T * T);
    be()->AttentionForward(out, att, dqkv, B, T, C, NH);
    be()->AttentionBackward(gq, datt, dout, dqkv, att, B, T, C, NH);
    Dev dq(be(), q), dk(be(), kc), dv(be(), vc), dec(be(), B * C), scratch(be(), B * NH * maxT);
    DevInt dpos(be(), pos);
    be()->AttentionDecode(dec, dq, dk, dv, dpos, scratch, B, maxT, C, NH);
    Dev dl(be(), logits), losses(be(), NL), probs(be(), static_cast<size_t>(NL) * Vp),
        dlog(be(), static_cast<size_t>(NL) * Vp);
    DevInt dt(be(), targets);
    be()->SoftmaxCrossEntropyForward(losses, probs, dl, dt, NL, V, Vp);
    be()->SoftmaxCrossEntropyBackward(dlog, probs, dt, 1.0f / NL, NL, V, Vp);
    Dev p(be(), params), g(be(), grads), m(be(), m0), v(be(), v0);
    be()->AdamW(p, g, m, v, mask.data(), np, ap);
    const double ss = be()->SumSquares(g, np);
    return Outputs{{"attention forward", out.Host()},
                   {"attention probabilities", att.Host()},
                   {"attention dqkv", gq.Host()},
                   {"attention decode", dec.Host()},
                   {"softmax-xent losses", losses.Host()},
                   {"softmax-xent probs", probs.Host()},
                   {"softmax-xent dlogits", dlog.Host()},
                   {"adamw params", p.Host()},
                   {"adamw m", m.Host()},
                   {"adamw v", v.Host()},
                   {"sum of squares (as 2 floats)", {static_cast<float>(ss), static_cast<float>(ss - static_cast<float>(ss))}}};
  });
}

// The linear layer: large enough for keel's tiled GEMM (matmul.cc) to spread its output tiles over both threads.
// (OpenBLAS's own threaded sgemm rounds differently with 1 and 2 threads, which is why keel tiles GEMMs itself.)
TEST_F(OpsTest, ThreadInvarianceMatmul) {
  struct Case {
    int N, IC, OC;
  };
  for (const Case& k : {Case{512, 64, 192}, Case{300, 100, 333}, Case{256, 256, 768}}) {
    const int N = k.N, IC = k.IC, OC = k.OC;
    const std::string tag = "N=" + std::to_string(N) + " IC=" + std::to_string(IC) + " OC=" + std::to_string(OC);
    SCOPED_TRACE(tag);
    std::printf(" Matmul %s\n", tag.c_str());
    const auto x = RandN(rng_, static_cast<size_t>(N) * IC), w = RandN(rng_, static_cast<size_t>(OC) * IC, 0.1f),
               b = RandN(rng_, OC), R = RandN(rng_, static_cast<size_t>(N) * OC);
    ExpectThreadInvariant(be(), [&] {
      Dev dx(be(), x), dw_(be(), w), db_(be(), b), dout(be(), R), out(be(), static_cast<size_t>(N) * OC),
          gx(be(), static_cast<size_t>(N) * IC), gw(be(), static_cast<size_t>(OC) * IC), gb(be(), OC);
      be()->MatmulForward(out, dx, dw_, db_, N, IC, OC);
      be()->MatmulBackward(gx, gw, gb, dout, dx, dw_, N, IC, OC);
      return Outputs{{"matmul forward", out.Host()},
                     {"matmul dinp", gx.Host()},
                     {"matmul dw", gw.Host()},
                     {"matmul dbias", gb.Host()}};
    });
  }
}

// The tiny model of ModelTest, and below a small one whose GEMMs are split over both threads.
TEST_F(ModelTest, ThreadInvariance) {
  ExpectThreadInvariant(be_.get(), [&] {
    float loss = 0.0f;
    auto g = Gradient(&loss);
    return Outputs{{"tiny model loss", {loss}}, {"tiny model gradient", g}};
  });
}

// A small model whose GEMMs are split over both threads (the qkv GEMM is 256 x 64 x 192).
TEST(ModelThreads, ThreadInvarianceThreadedGemms) {
  GptConfig cfg;
  cfg.layers = 2;
  cfg.heads = 4;
  cfg.dim = 64;
  cfg.ctx = 64;
  cfg.vocab = 256;
  const int B = 4, T = 64;
  auto be = MakeCpuBackend(1);
  auto m = GptModel::Create(cfg, be.get(), B, T);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  auto model = std::move(m).value();
  model->InitWeights(5);
  Rng rng(11);
  const auto tokens = RandInt(rng, B * T, cfg.vocab), targets = RandInt(rng, B * T, cfg.vocab);
  ExpectThreadInvariant(be.get(), [&] {
    model->ZeroGrads();
    const float loss = model->Forward(tokens.data(), targets.data(), B, T);
    model->Backward();
    return Outputs{{"small model loss", {loss}}, {"small model gradient", model->GradsToHost()}};
  });
}

}  // namespace
}  // namespace keel::optest
