// decode_half_test.cc: the decode-path products (few rows; fp32 and f16 weights) and decoding from f16 weight
// copies (`--dtype f16`). The f16 matmul must equal the fp32 matmul
// on the f16-rounded weights (up to summation order) for every row-count path, and a DecodeState with f16 weights
// must give the logits of the fp32 model whose matrices were rounded to f16. `--dtype bf16` (which also rounds
// the products' inputs, so it has no such exact reference) and `--kv-dtype f16` must stay close to the fp32
// logits; the f16 cache's prefix copy (the server's prompt cache) must equal a recomputation bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "backend/backend.h"
#include "core/hash.h"
#include "formats/half.h"
#include "model/gpt.h"

namespace keel {
namespace {

double RelErr(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, std::fabs(double(a[i]) - b[i]) / (1.0 + std::fabs(double(b[i]))));
  return worst;
}

TEST(DecodeHalf, MatmulMatchesFp32OnRoundedWeights) {
  auto be = MakeCpuBackend(2);
  ASSERT_TRUE(be->SupportsOp(Op::kMatmulForwardHalf));
  Rng rng(5);
  // IC not a multiple of 8 or 32 and OC not a multiple of the 64-row output chunk exercise the tails.
  for (int IC : {37, 64, 200}) {
    const int OC = 131;
    std::vector<float> w(static_cast<size_t>(OC) * IC), bias(OC);
    for (auto& x : w) x = rng.Normal();
    for (auto& x : bias) x = rng.Normal();
    std::vector<uint16_t> w16(w.size());
    FloatToF16N(w.data(), w16.data(), w.size());
    std::vector<float> wr(w.size());
    F16ToFloatN(w16.data(), wr.data(), w.size());
    for (int N : {1, 2, 3, 4, 5, 16, 17, 40}) {
      std::vector<float> inp(static_cast<size_t>(N) * IC);
      for (auto& x : inp) x = rng.Normal();
      std::vector<float> out(static_cast<size_t>(N) * OC), ref(out.size());
      be->MatmulForwardHalf(out.data(), inp.data(), w16.data(), bias.data(), N, IC, OC);
      be->MatmulForward(ref.data(), inp.data(), wr.data(), bias.data(), N, IC, OC);
      EXPECT_LT(RelErr(out, ref), 1e-5) << "N=" << N << " IC=" << IC;
      // Without bias too.
      be->MatmulForwardHalf(out.data(), inp.data(), w16.data(), nullptr, N, IC, OC);
      be->MatmulForward(ref.data(), inp.data(), wr.data(), nullptr, N, IC, OC);
      EXPECT_LT(RelErr(out, ref), 1e-5) << "N=" << N << " IC=" << IC << " (no bias)";
    }
  }
}

// The few-row fp32 and f16 paths (batched decode steps) against a plain double-precision product, so the two
// are not only checked against each other.
TEST(DecodeHalf, FewRowProductsMatchADoubleReference) {
  auto be = MakeCpuBackend(2);
  Rng rng(11);
  for (int IC : {29, 96, 200}) {
    const int OC = 133;
    std::vector<float> w(static_cast<size_t>(OC) * IC), bias(OC);
    for (auto& x : w) x = F16ToFloat(FloatToF16(rng.Normal()));  // f16-exact, so both paths share the reference
    for (auto& x : bias) x = rng.Normal();
    std::vector<uint16_t> w16(w.size());
    FloatToF16N(w.data(), w16.data(), w.size());
    for (int N : {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17}) {
      std::vector<float> inp(static_cast<size_t>(N) * IC);
      for (auto& x : inp) x = rng.Normal();
      std::vector<float> ref(static_cast<size_t>(N) * OC), out(ref.size()), out16(ref.size());
      for (int n = 0; n < N; ++n)
        for (int o = 0; o < OC; ++o) {
          double s = bias[o];
          for (int i = 0; i < IC; ++i) s += double(inp[size_t(n) * IC + i]) * w[size_t(o) * IC + i];
          ref[size_t(n) * OC + o] = static_cast<float>(s);
        }
      be->MatmulForward(out.data(), inp.data(), w.data(), bias.data(), N, IC, OC);
      be->MatmulForwardHalf(out16.data(), inp.data(), w16.data(), bias.data(), N, IC, OC);
      EXPECT_LT(RelErr(out, ref), 1e-5) << "fp32 N=" << N << " IC=" << IC;
      EXPECT_LT(RelErr(out16, ref), 1e-5) << "f16 N=" << N << " IC=" << IC;
    }
  }
}

TEST(DecodeHalf, ThreadCountDoesNotChangeResults) {
  Rng rng(9);
  const int IC = 96, OC = 300;
  std::vector<float> w(static_cast<size_t>(OC) * IC);
  for (auto& x : w) x = rng.Normal();
  std::vector<uint16_t> w16(w.size());
  FloatToF16N(w.data(), w16.data(), w.size());
  for (int N : {1, 3, 8, 13, 16, 33}) {
    std::vector<float> inp(static_cast<size_t>(N) * IC);
    for (auto& x : inp) x = rng.Normal();
    std::vector<float> a(static_cast<size_t>(N) * OC), b(a.size());
    MakeCpuBackend(1)->MatmulForwardHalf(a.data(), inp.data(), w16.data(), nullptr, N, IC, OC);
    MakeCpuBackend(2)->MatmulForwardHalf(b.data(), inp.data(), w16.data(), nullptr, N, IC, OC);
    EXPECT_EQ(a, b) << "f16 N=" << N;
    std::vector<float> wf(w.size());
    F16ToFloatN(w16.data(), wf.data(), w.size());
    MakeCpuBackend(1)->MatmulForward(a.data(), inp.data(), wf.data(), nullptr, N, IC, OC);
    MakeCpuBackend(2)->MatmulForward(b.data(), inp.data(), wf.data(), nullptr, N, IC, OC);
    EXPECT_EQ(a, b) << "fp32 N=" << N;
  }
}

TEST(DecodeHalf, DecodeStateMatchesModelWithRoundedMatrices) {
  GptConfig c{.layers = 2, .heads = 2, .dim = 32, .ctx = 12, .vocab = 41};
  auto be = MakeCpuBackend(2);
  auto model = GptModel::Create(c, be.get(), 1, c.ctx);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  (*model)->InitWeights(3);
  auto p = (*model)->ParamsToHost();
  Rng rng(4);
  for (auto& x : p) x += 0.1f * rng.Normal();
  // The token embedding is both the input embedding (read in fp32) and the tied LM head (read in f16): make it
  // f16-representable so the rounded reference below differs from this model only where the f16 path rounds.
  for (size_t i = 0; i < (*model)->tensors()[0].size; ++i) p[i] = F16ToFloat(FloatToF16(p[i]));
  (*model)->SetParamsFromHost(p);
  auto half_state = DecodeState::Create(model->get(), 2, c.ctx, 8, WeightDtype::kF16);
  ASSERT_TRUE(half_state.ok()) << half_state.status().ToString();

  // The reference: the same model with its matrices (and the tied embedding) rounded to f16, decoded in fp32.
  std::vector<float> rounded = p;
  const auto& tensors = (*model)->tensors();
  // Every 2-D tensor but the position embedding (tensor 1): the token embedding and the four matrices per layer.
  std::vector<size_t> mats;
  for (size_t t = 0; t < tensors.size(); ++t)
    if (tensors[t].shape.size() == 2 && t != 1) mats.push_back(t);
  ASSERT_EQ(mats.size(), static_cast<size_t>(1 + 4 * c.layers));
  for (size_t t : mats) {
    float* x = rounded.data() + tensors[t].offset;
    for (size_t i = 0; i < tensors[t].size; ++i) x[i] = F16ToFloat(FloatToF16(x[i]));
  }
  auto ref_model = GptModel::Create(c, be.get(), 1, c.ctx);
  ASSERT_TRUE(ref_model.ok());
  (*ref_model)->SetParamsFromHost(rounded);
  auto ref_state = DecodeState::Create(ref_model->get(), 2, c.ctx, 8);
  ASSERT_TRUE(ref_state.ok());

  // Two sequences, one row each per step, then a 5-row prompt chunk into slot 1.
  double worst = 0, moved = 0;
  for (int t = 0; t < 6; ++t) {
    int32_t tok[2] = {static_cast<int32_t>(rng.Below(c.vocab)), static_cast<int32_t>(rng.Below(c.vocab))};
    int32_t pos[2] = {t, t};
    std::vector<float> a = (*half_state)->Step(tok, pos, 2);
    std::vector<float> r = (*ref_state)->Step(tok, pos, 2);
    worst = std::max(worst, RelErr(a, r));
  }
  // The f16 path is not the fp32 path: the unrounded model's logits differ (so the test could fail).
  auto fp32_state = DecodeState::Create(model->get(), 2, c.ctx, 8);
  ASSERT_TRUE(fp32_state.ok());
  int32_t tok[2] = {1, 2}, pos[2] = {0, 0};
  std::vector<float> a = (*half_state)->Step(tok, pos, 2);  // overwrites position 0 of both slots
  std::vector<float> f = (*fp32_state)->Step(tok, pos, 2);
  moved = RelErr(a, f);
  EXPECT_LT(worst, 1e-4);
  EXPECT_GT(moved, 1e-6);
}

// bf16 decoding of a model with fp32-scale weights: the logits stay within bf16's rounding (8 significant bits on
// both operands of every product) of the fp32 decode's, over prompt chunks and single rows, and the greedy token
// agrees where fp32's top two logits are well apart. Where the backend cannot pack (repack = false) it is refused.
TEST(DecodeHalf, Bf16DecodeStaysCloseToFp32) {
  GptConfig c{.layers = 2, .heads = 4, .dim = 64, .ctx = 24, .vocab = 97};
  auto be = MakeCpuBackend(2);
  if (!be->SupportsOp(Op::kMatmulForwardPackedBf16)) GTEST_SKIP() << "this CPU lacks AVX2/FMA/F16C";
  auto model = GptModel::Create(c, be.get(), 1, c.ctx);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  (*model)->InitWeights(9);
  auto p = (*model)->ParamsToHost();
  Rng rng(10);
  for (auto& x : p) x += 0.05f * rng.Normal();  // away from the initialisation's zeros and ones
  (*model)->SetParamsFromHost(p);
  auto bf = DecodeState::Create(model->get(), 2, c.ctx, 8, WeightDtype::kBF16);
  ASSERT_TRUE(bf.ok()) << bf.status().ToString();
  auto fp = DecodeState::Create(model->get(), 2, c.ctx, 8);
  ASSERT_TRUE(fp.ok());
  double worst = 0, moved = 0;
  int agree = 0, compared = 0;
  auto compare = [&](const std::vector<float>& a, const std::vector<float>& f, int rows) {
    for (int r = 0; r < rows; ++r) {
      double scale = 0;
      for (int v = 0; v < c.vocab; ++v) scale = std::max(scale, std::fabs(double(f[size_t(r) * c.vocab + v])));
      int best_a = 0, best_f = 0;
      for (int v = 0; v < c.vocab; ++v) {
        const double d = std::fabs(double(a[size_t(r) * c.vocab + v]) - f[size_t(r) * c.vocab + v]) / (1.0 + scale);
        worst = std::max(worst, d);
        moved = std::max(moved, d);
        if (a[size_t(r) * c.vocab + v] > a[size_t(r) * c.vocab + best_a]) best_a = v;
        if (f[size_t(r) * c.vocab + v] > f[size_t(r) * c.vocab + best_f]) best_f = v;
      }
      float second = -1e30f;  // fp32's runner-up: only a clear winner must survive bf16's rounding
      for (int v = 0; v < c.vocab; ++v)
        if (v != best_f) second = std::max(second, f[size_t(r) * c.vocab + v]);
      if (f[size_t(r) * c.vocab + best_f] - second > 0.05 * (1.0 + scale)) {
        ++compared;
        agree += best_a == best_f;
      }
    }
  };
  // A 6-token prompt chunk into slot 0, then both slots one row per step.
  int32_t tok[6] = {3, 14, 15, 92, 65, 35}, pos[6] = {0, 1, 2, 3, 4, 5}, slot0[6] = {0, 0, 0, 0, 0, 0}, last = 5;
  compare((*bf)->StepRows(tok, pos, slot0, 6, &last, 1), (*fp)->StepRows(tok, pos, slot0, 6, &last, 1), 1);
  for (int t = 0; t < 12; ++t) {
    int32_t tk[2] = {static_cast<int32_t>(rng.Below(c.vocab)), static_cast<int32_t>(rng.Below(c.vocab))};
    int32_t ps[2] = {6 + t, t}, sl[2] = {0, 1}, rows[2] = {0, 1};
    compare((*bf)->StepRows(tk, ps, sl, 2, rows, 2), (*fp)->StepRows(tk, ps, sl, 2, rows, 2), 2);
  }
  EXPECT_LT(worst, 2e-2) << "bf16 logits drifted beyond its rounding";
  EXPECT_GT(moved, 1e-5) << "bf16 decode gave fp32's logits: the inputs or weights were not rounded";
  EXPECT_GT(compared, 5);
  EXPECT_EQ(agree, compared);
  auto refused = DecodeState::Create(model->get(), 2, c.ctx, 8, WeightDtype::kBF16, /*repack=*/false);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("bf16 weights are not supported"), std::string::npos)
      << refused.status().ToString();
}

// An f16 KV cache: logits within f16's rounding of the keys and values (11 significant bits) of the fp32 cache's,
// but not equal to them (the cache is really f16); and CopyPositions copies the f16 values: a slot that copied a
// prefix and then fed one more token gives exactly the logits of the slot that computed the whole prompt.
TEST(DecodeHalf, HalfKvCacheStaysCloseAndCopiesExactly) {
  GptConfig c{.layers = 2, .heads = 2, .dim = 64, .ctx = 20, .vocab = 61};
  auto be = MakeCpuBackend(2);
  if (!be->SupportsOp(Op::kAttentionDecodeHalfKv)) GTEST_SKIP() << "no f16 KV cache on this backend";
  auto model = GptModel::Create(c, be.get(), 1, c.ctx);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  (*model)->InitWeights(12);
  auto p = (*model)->ParamsToHost();
  Rng rng(13);
  for (auto& x : p) x += 0.05f * rng.Normal();
  (*model)->SetParamsFromHost(p);
  auto hkv = DecodeState::Create(model->get(), 2, c.ctx, 8, WeightDtype::kF32, true, /*half_kv=*/true);
  ASSERT_TRUE(hkv.ok()) << hkv.status().ToString();
  auto fp = DecodeState::Create(model->get(), 2, c.ctx, 8);
  ASSERT_TRUE(fp.ok());
  double worst = 0;
  const int32_t prompt[7] = {4, 8, 15, 16, 23, 42, 7};
  int32_t pos[7], slot0[7] = {}, last = 6;
  for (int i = 0; i < 7; ++i) pos[i] = i;
  auto a = (*hkv)->StepRows(prompt, pos, slot0, 7, &last, 1);
  auto f = (*fp)->StepRows(prompt, pos, slot0, 7, &last, 1);
  worst = std::max(worst, RelErr(a, f));
  // Slot 1 takes slot 0's first 6 positions and feeds the 7th token itself: the same logits as slot 0's last row.
  (*hkv)->CopyPositions(0, 1, 6);
  int32_t one = 1, p6 = 6, zero = 0;
  auto copied = (*hkv)->StepRows(&prompt[6], &p6, &one, 1, &zero, 1);
  EXPECT_EQ(copied, a) << "the copied f16 prefix differs from the computed one";
  (*fp)->CopyPositions(0, 1, 7);  // the fp32 reference's slot 1 gets the same 7 positions
  for (int t = 7; t < 15; ++t) {  // both slots on, one row each, different tokens
    int32_t tk[2] = {static_cast<int32_t>(rng.Below(c.vocab)), static_cast<int32_t>(rng.Below(c.vocab))};
    int32_t ps[2] = {t, t}, sl[2] = {0, 1}, rows[2] = {0, 1};
    auto h = (*hkv)->StepRows(tk, ps, sl, 2, rows, 2);
    auto r = (*fp)->StepRows(tk, ps, sl, 2, rows, 2);
    worst = std::max(worst, RelErr(h, r));
  }
  EXPECT_LT(worst, 2e-3) << "f16 KV cache drifted beyond its rounding";
  EXPECT_GT(worst, 1e-7) << "the f16 KV cache gave fp32's logits: its values were not rounded";
  auto odd = GptModel::Create(GptConfig{.layers = 1, .heads = 1, .dim = 7, .ctx = 4, .vocab = 5}, be.get(), 1, 4);
  ASSERT_TRUE(odd.ok());
  auto refused = DecodeState::Create(odd->get(), 1, 4, 0, WeightDtype::kF32, true, true);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("even model width"), std::string::npos) << refused.status().ToString();
}

}  // namespace
}  // namespace keel
