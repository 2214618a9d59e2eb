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
  if (p.top_k < 0) return InvalidArgument("--top-k must be >= 0 (0: off)");
  return Status::Ok();
}

// Sampling cost matters at a real vocabulary (GPT-2: 50257): sorting every logit (the API's default, top-k off)
// took 21 ms per token, longer than a decode step, on the engine thread that serves every sequence. So: top-k
// selects only its k; without top-k, top-p sorts a growing prefix (64, 256, ... tokens) until it holds the
// nucleus; with neither, no sort at all (the draw walks the tokens in id order): 1.4 ms, the exps.
int32_t SampleToken(const float* logits, int V, const SamplingParams& p, Rng& rng) {
  if (p.temperature <= 0.0f) {
    int32_t best = 0;
    for (int i = 1; i < V; ++i)
      if (logits[i] > logits[best]) best = i;
    return best;
  }
  const double u = static_cast<double>(rng.Next() >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
  float mx = logits[0];
  for (int i = 1; i < V; ++i) mx = logits[i] > mx ? logits[i] : mx;
  auto weight = [&](int32_t i) { return std::exp(static_cast<double>(logits[i] - mx) / p.temperature); };
  // Draws token i with probability w_i / sum(w) from `cand` (in order): the first where the running sum passes u.
  auto draw = [&](const std::vector<int32_t>& cand, const std::vector<double>& w, double sum) {
    double r = u * sum;
    for (size_t i = 0; i < cand.size(); ++i) {
      r -= w[i];
      if (r < 0) return cand[i];
    }
    return cand.back();
  };
  const bool top_k = p.top_k > 0 && p.top_k < V;
  if (!top_k && p.top_p >= 1.0f) {  // the full distribution: no order needed
    std::vector<int32_t> all(static_cast<size_t>(V));
    std::iota(all.begin(), all.end(), 0);
    std::vector<double> w(all.size());
    double sum = 0;
    for (int i = 0; i < V; ++i) sum += (w[static_cast<size_t>(i)] = weight(i));
    return draw(all, w, sum);
  }
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::vector<int32_t> idx(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  // The candidate set: the top k, or (no top-k) every token, of which only a sorted prefix is materialised.
  const size_t k = top_k ? static_cast<size_t>(p.top_k) : static_cast<size_t>(V);
  double total = 0;  // sum of the weights of the whole candidate set
  if (top_k) {
    // A small k: a heap of k (partial_sort) beats nth_element's passes over all V (0.4 vs 1.8 ms at k = 40).
    if (k <= 256) std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(k), idx.end(), by_logit);
    else std::nth_element(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(k), idx.end(), by_logit);
    for (size_t i = 0; i < k; ++i) total += weight(idx[i]);
  } else {
    for (int i = 0; i < V; ++i) total += weight(i);
  }
  size_t sorted = std::min<size_t>(k, top_k ? k : 64);
  for (;;) {
    if (!top_k && sorted < k)
      std::nth_element(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(sorted), idx.end(), by_logit);
    std::sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(sorted), by_logit);
    std::vector<double> w(sorted);
    double cum = 0;
    size_t keep = 0;
    for (size_t i = 0; i < sorted; ++i) {
      w[i] = weight(idx[i]);
      cum += w[i];
      if (p.top_p < 1.0f && cum / total >= p.top_p) {
        keep = i + 1;
        break;
      }
    }
    if (keep == 0 && sorted == k) keep = k;  // top-p never reached within the candidates (or top-p off)
    if (keep > 0) {
      idx.resize(keep);
      w.resize(keep);
      double sum = 0;
      for (double x : w) sum += x;
      return draw(idx, w, sum);
    }
    sorted = std::min(k, sorted * 4);  // the nucleus is larger than the sorted prefix: widen it
  }
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
