// model_decode_test.cc: KV-cached decoding reproduces the full forward pass position by position, for several
// sequences advanced in one batched step, including rows at different positions.
#include <gtest/gtest.h>

#include <cmath>

#include "backend/backend.h"
#include "core/hash.h"
#include "model/gpt.h"

namespace keel {
namespace {

TEST(ModelDecode, KvCacheMatchesFullForward) {
  GptConfig c{.layers = 2, .heads = 2, .dim = 16, .ctx = 12, .vocab = 29};
  auto be = MakeCpuBackend(1);
  auto model = GptModel::Create(c, be.get(), 2, c.ctx);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  (*model)->InitWeights(7);
  // Make the weights less uniform than the GPT-2 init so attention is far from flat.
  auto p = (*model)->ParamsToHost();
  Rng rng(3);
  for (auto& x : p) x += 0.2f * rng.Normal();
  (*model)->SetParamsFromHost(p);

  const int T = 10;
  std::vector<int32_t> seqs[2] = {{}, {}};
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < T; ++t) seqs[b].push_back(static_cast<int32_t>(rng.Below(c.vocab)));
  // Reference: full forward over each sequence separately.
  std::vector<std::vector<float>> ref(2);
  for (int b = 0; b < 2; ++b) {
    (*model)->Forward(seqs[b].data(), nullptr, 1, T);
    ref[b] = (*model)->LastLogits();
  }
  double worst = 0;
  // Row b holds sequence b; both rows advance in one batched step.
  auto state2 = DecodeState::Create(model->get(), 2, c.ctx);
  ASSERT_TRUE(state2.ok());
  for (int t = 0; t < T; ++t) {
    int32_t tok[2] = {seqs[0][t], seqs[1][t]};
    int32_t pos[2] = {t, t};
    const auto& logits = (*state2)->Step(tok, pos, 2);
    for (int b = 0; b < 2; ++b)
      for (int v = 0; v < c.vocab; ++v) {
        double a = logits[static_cast<size_t>(b) * c.vocab + v], r = ref[b][static_cast<size_t>(t) * c.vocab + v];
        worst = std::max(worst, std::fabs(a - r) / (1.0 + std::fabs(r)));
      }
  }
  EXPECT_LT(worst, 1e-5);
}

TEST(ModelDecode, RowsAtDifferentPositions) {
  // Row 0 decodes positions 0..5 while row 1 is fed only from step 2 on: row 1 must match its own full forward.
  GptConfig c{.layers = 1, .heads = 2, .dim = 8, .ctx = 8, .vocab = 11};
  auto be = MakeCpuBackend(1);
  auto model = GptModel::Create(c, be.get(), 1, c.ctx);
  ASSERT_TRUE(model.ok());
  (*model)->InitWeights(1);
  std::vector<int32_t> s0 = {1, 2, 3, 4, 5, 6}, s1 = {7, 8, 9, 10};
  (*model)->Forward(s1.data(), nullptr, 1, 4);
  auto ref1 = (*model)->LastLogits();
  auto st = DecodeState::Create(model->get(), 2, c.ctx);
  ASSERT_TRUE(st.ok());
  for (int step = 0; step < 6; ++step) {
    int32_t tok[2] = {s0[step], step >= 2 ? s1[step - 2] : 0};
    int32_t pos[2] = {step, step >= 2 ? step - 2 : 0};
    // Before row 1 starts, only row 0 is stepped (n = 1).
    const auto& logits = (*st)->Step(tok, pos, step >= 2 ? 2 : 1);
    if (step >= 2) {
      for (int v = 0; v < c.vocab; ++v)
        EXPECT_NEAR(logits[c.vocab + v], ref1[static_cast<size_t>(step - 2) * c.vocab + v], 1e-5);
    }
  }
}

// A caller that breaks StepRows' preconditions (a position at the context's end, a slot or token out of range)
// stops the process with one line instead of writing past the KV cache (the asserts that guarded it vanished in
// release builds).
TEST(ModelDecodeDeathTest, OutOfRangeRowsStopInsteadOfWritingPastTheCache) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  GptConfig c{.layers = 1, .heads = 2, .dim = 8, .ctx = 8, .vocab = 11};
  auto be = MakeCpuBackend(1);
  auto model = GptModel::Create(c, be.get(), 1, c.ctx);
  ASSERT_TRUE(model.ok());
  (*model)->InitWeights(1);
  auto st = DecodeState::Create(model->get(), 2, c.ctx);
  ASSERT_TRUE(st.ok());
  int32_t tok = 1, pos = c.ctx, slot = 0, row = 0;
  EXPECT_DEATH((*st)->StepRows(&tok, &pos, &slot, 1, &row, 1), "slot, position or token is out of range");
  pos = 0;
  slot = 2;
  EXPECT_DEATH((*st)->StepRows(&tok, &pos, &slot, 1, &row, 1), "slot, position or token is out of range");
  slot = 0;
  tok = c.vocab;
  EXPECT_DEATH((*st)->StepRows(&tok, &pos, &slot, 1, &row, 1), "slot, position or token is out of range");
  tok = 1;
  EXPECT_EQ((*st)->StepRows(&tok, &pos, &slot, 1, &row, 1).size(), static_cast<size_t>(c.vocab));
}

}  // namespace
}  // namespace keel
