// export_test_util.h: helpers shared by the export tests: tiny random-init models with a byte or BPE tokenizer,
// and their logits on keel's CPU backend.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "data/tokenizer.h"
#include "model/gpt.h"
#include "train/checkpoint_io.h"

namespace keel::testing {

inline std::string BpeTrainingText() {
  std::string text;
  const char* lines[] = {"the quick brown fox jumps over the lazy dog.",
                         "a stitch in time saves nine; all that glitters is not gold.",
                         "keel trains small language models on the cpu and exports them.",
                         "to be or not to be, that is the question: whether 'tis nobler in the mind.",
                         "Numbers 0123456789 and punctuation !?()[]{} appear here too."};
  for (int r = 0; r < 40; ++r)
    for (const char* l : lines) text += std::string(l) + (r % 3 ? " " : "\n");
  return text;
}

// A snapshot with random GPT-2 init weights. tokenizer: "byte" or "bpe"; extra_vocab padding rows beyond the
// tokenizer's vocabulary.
inline TrainingSnapshot MakeSnapshot(const std::string& tokenizer, GptConfig c, int extra_vocab, uint64_t seed) {
  TrainingSnapshot s;
  if (tokenizer == "byte") {
    s.tokenizer = ByteTokenizer().Serialize();
    c.vocab = 256 + extra_vocab;
  } else {
    auto tok = TrainBpeTokenizer(BpeTrainingText(), 400);
    EXPECT_TRUE(tok.ok()) << tok.status().ToString();
    s.tokenizer = (*tok)->Serialize();
    c.vocab = (*tok)->vocab_size() + extra_vocab;
  }
  s.config = c;
  auto backend = MakeBackend("cpu", 1);
  EXPECT_TRUE(backend.ok());
  auto model = GptModel::Create(c, backend->get(), 1, 1);
  EXPECT_TRUE(model.ok()) << model.status().ToString();
  (*model)->InitWeights(seed);
  s.params = (*model)->ParamsToHost();
  // Non-zero biases and LayerNorm parameters, so a mix-up of any tensor shows in the logits.
  uint64_t st = seed * 2654435761u + 1;
  for (const auto& t : ParamLayout(c)) {
    if (t.shape.size() != 1) continue;
    for (size_t i = 0; i < t.size; ++i) {
      st = st * 6364136223846793005ull + 1442695040888963407ull;
      const float u = static_cast<float>((st >> 40) & 0xFFFF) / 65536.0f - 0.5f;
      s.params[t.offset + i] += 0.2f * u;
    }
  }
  s.state = {{"step", 7}};
  return s;
}

inline std::vector<int32_t> TestTokens(int T, int vocab) {
  std::vector<int32_t> t(T);
  for (int i = 0; i < T; ++i) t[i] = static_cast<int32_t>((i * 37 + 11) % std::min(vocab, 256));
  return t;
}

// Logits [T, V] of one sequence.
inline std::vector<float> Logits(const TrainingSnapshot& s, const std::vector<int32_t>& tokens) {
  auto backend = MakeBackend("cpu", 1);
  EXPECT_TRUE(backend.ok());
  const int T = static_cast<int>(tokens.size());
  auto model = GptModel::Create(s.config, backend->get(), 1, T);
  EXPECT_TRUE(model.ok()) << model.status().ToString();
  (*model)->SetParamsFromHost(s.params);
  (*model)->Forward(tokens.data(), nullptr, 1, T);
  return (*model)->LastLogits();
}

// max |a - b| / max |b|.
inline double RelError(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double e = 0, m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    e = std::max(e, std::fabs(double(a[i]) - double(b[i])));
    m = std::max(m, std::fabs(double(b[i])));
  }
  return e / std::max(m, 1e-30);
}

}  // namespace keel::testing
