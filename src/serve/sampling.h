// sampling.h: choosing the next token from logits (llama.cpp-style knobs: temperature, top-k, top-p, seed) and
// a small text-generation loop over a KV-cached DecodeState.
// Thread safety: functions are pure apart from the Rng passed in.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/hash.h"
#include "core/status.h"

namespace keel {

class DecodeState;
class Tokenizer;

struct SamplingParams {
  float temperature = 0.8f;  // 0 = greedy (argmax)
  int top_k = 40;            // <= 0: off
  float top_p = 0.95f;       // >= 1: off
  uint64_t seed = 0;
};
Status ValidateSampling(const SamplingParams& p);

// Samples one token id from logits[0..V). Greedy ties resolve to the lowest id. NaN logits are never drawn,
// +inf ones before any finite one; -1 when no logit is finite or +inf (nothing can be sampled). Top-p is taken
// over the temperature-scaled distribution (Hugging Face's order; llama.cpp applies the temperature last).
int32_t SampleToken(const float* logits, int V, const SamplingParams& p, Rng& rng);

struct GenerateOptions {
  SamplingParams sampling;
  int max_new_tokens = 200;
  std::vector<std::string> stop;  // stop strings (generation ends before them)
  bool ignore_eos = false;        // go on past the end-of-text token (benchmarks)
};

// Feeds `prompt` (at least one token) through the state's sequence slot 0, then generates. on_piece receives
// each new token's text as soon as it is chosen; return false from it to cancel. Returns the new token ids.
Result<std::vector<int32_t>> Generate(DecodeState& state, const Tokenizer& tok, const std::vector<int32_t>& prompt,
                                      const GenerateOptions& o,
                                      const std::function<bool(const std::string&)>& on_piece = nullptr);

}  // namespace keel
