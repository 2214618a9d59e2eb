// sampling.cc: temperature / top-k / top-p sampling and the single-sequence generation loop.
#include "serve/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "data/tokenizer.h"
#include "model/gpt.h"

namespace keel {

Status ValidateSampling(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature) || p.temperature > 100.0f)
    return InvalidArgument("--temperature must be in [0, 100]");
  if (!(p.top_p > 0.0f) || p.top_p > 1.0f) return InvalidArgument("--top-p must be in (0, 1]");
  return Status::Ok();
}

int32_t SampleToken(const float* logits, int V, const SamplingParams& p, Rng& rng) {
  if (p.temperature <= 0.0f) {
    int32_t best = 0;
    for (int i = 1; i < V; ++i)
      if (logits[i] > logits[best]) best = i;
    return best;
  }
  std::vector<int32_t> idx(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  size_t k = (p.top_k > 0 && p.top_k < V) ? static_cast<size_t>(p.top_k) : static_cast<size_t>(V);
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(k), idx.end(), by_logit);
  idx.resize(k);
  const float mx = logits[idx[0]];
  std::vector<double> w(k);
  double sum = 0;
  for (size_t i = 0; i < k; ++i) {
    w[i] = std::exp(static_cast<double>(logits[idx[i]] - mx) / p.temperature);
    sum += w[i];
  }
  if (p.top_p < 1.0f) {
    double cum = 0;
    size_t keep = k;
    for (size_t i = 0; i < k; ++i) {
      cum += w[i] / sum;
      if (cum >= p.top_p) {
        keep = i + 1;
        break;
      }
    }
    w.resize(keep);
    idx.resize(keep);
    sum = std::accumulate(w.begin(), w.end(), 0.0);
  }
  double r = static_cast<double>(rng.Next() >> 11) * (1.0 / 9007199254740992.0) * sum;
  for (size_t i = 0; i < w.size(); ++i) {
    r -= w[i];
    if (r < 0) return idx[i];
  }
  return idx.back();
}

Result<std::vector<int32_t>> Generate(DecodeState& state, const Tokenizer& tok, const std::vector<int32_t>& prompt,
                                      const GenerateOptions& o, const std::function<bool(const std::string&)>& on_piece) {
  KEEL_RETURN_IF_ERROR(ValidateSampling(o.sampling));
  if (prompt.empty()) return InvalidArgument("prompt must hold at least one token");
  const int maxT = state.max_positions();
  if (static_cast<int>(prompt.size()) >= maxT)
    return InvalidArgument("prompt is " + std::to_string(prompt.size()) + " tokens; the context holds " +
                           std::to_string(maxT));
  Rng rng(o.sampling.seed);
  const std::vector<float>* logits = nullptr;
  int32_t pos = 0;
  for (int32_t t : prompt) {
    logits = &state.Step(&t, &pos, 1);
    ++pos;
  }
  // A padded model (--vocab larger than the tokenizer's) never emits the unused ids.
  const int V = std::min(static_cast<int>(logits->size()), tok.vocab_size());
  std::vector<int32_t> out;
  std::string text;
  while (static_cast<int>(out.size()) < o.max_new_tokens && pos < maxT) {
    int32_t next = SampleToken(logits->data(), V, o.sampling, rng);
    if (next == tok.eos_id() && !o.ignore_eos) break;
    out.push_back(next);
    std::string piece = tok.DecodePiece(next);
    text += piece;
    bool stopped = false;
    for (const auto& s : o.stop) {
      // Only a match that ends inside the new piece is new; search from just before it.
      size_t from = text.size() > piece.size() + s.size() ? text.size() - piece.size() - s.size() : 0;
      if (!s.empty() && text.find(s, from) != std::string::npos) stopped = true;
    }
    if (stopped) break;
    if (on_piece && !on_piece(piece)) break;
    if (pos >= maxT) break;
    logits = &state.Step(&next, &pos, 1);
    ++pos;
  }
  return out;
}

}  // namespace keel
