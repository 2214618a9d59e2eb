// sampling.cc: temperature / top-k / top-p sampling and the single-sequence generation loop.
#include "serve/sampling.h"

#include <algorithm>
#include <cfloat>
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
int32_t SampleToken(const float* logits_in, int V, const SamplingParams& p, Rng& rng) {
  // Non-finite logits (a diverged model, f16 weights out of range): NaN would make the sorts below undefined
  // behaviour (NaN is "equal" to everything) and every weight NaN. NaN counts as -inf (never drawn), +inf as the
  // largest float (drawn before anything finite); with no finite logit at all there is nothing to sample.
  std::vector<float> clean;
  const float* logits = logits_in;
  bool all_finite = true;
  for (int i = 0; i < V; ++i) all_finite &= std::isfinite(logits_in[i]);
  if (!all_finite) {
    clean.assign(logits_in, logits_in + V);
    bool any_usable = false;
    for (float& x : clean) {
      if (std::isnan(x) || x == -HUGE_VALF) x = -FLT_MAX;
      else if (x == HUGE_VALF) x = FLT_MAX, any_usable = true;
      else any_usable = true;
    }
    if (!any_usable) return -1;
    logits = clean.data();
  }
  if (p.temperature <= 0.0f) {
    int32_t best = 0;
    for (int i = 1; i < V; ++i)
      if (logits[i] > logits[best]) best = i;
    return best;
  }
  const double u = static_cast<double>(rng.Next() >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
  float mx = logits[0];
  for (int i = 1; i < V; ++i) mx = logits[i] > mx ? logits[i] : mx;
  // In double: with -FLT_MAX stand-ins the float difference would overflow to -inf (whose exp is 0 anyway).
  auto weight = [&](int32_t i) {
    return std::exp((static_cast<double>(logits[i]) - static_cast<double>(mx)) / p.temperature);
  };
  // Draws token i with probability w_i / sum(w) from `cand` (in order): the first where the running sum passes u.
  auto draw = [&](const std::vector<int32_t>& cand, const std::vector<double>& w, double sum) {
    double r = u * sum;
    int32_t last = cand.front();  // rounding can leave r >= 0 at the end: the last candidate with weight
    for (size_t i = 0; i < cand.size(); ++i) {
      r -= w[i];
      if (r < 0) return cand[i];
      if (w[i] > 0) last = cand[i];
    }
    return last;
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
  size_t emitted = 0;  // text[0, emitted) went to on_piece; the rest may still turn out to start a stop string
  bool go_on = true;
  while (go_on && static_cast<int>(out.size()) < o.max_new_tokens && pos < maxT) {
    int32_t next = SampleToken(logits->data(), V, o.sampling, rng);
    if (next < 0) return Internal("the model produced no finite logit (its weights are not usable)");
    if (next == tok.eos_id() && !o.ignore_eos) break;
    out.push_back(next);
    const size_t before = text.size();
    text += tok.DecodePiece(next);
    // The earliest stop string that ends in the new text: generation ends before it (what precedes it is
    // emitted, the stop string itself is not).
    size_t cut = std::string::npos;
    for (const auto& s : o.stop) {
      if (s.empty()) continue;
      const size_t from = before >= s.size() ? before - s.size() + 1 : 0;
      const size_t at = text.find(s, from);
      if (at != std::string::npos) cut = std::min(cut, at);
    }
    if (cut != std::string::npos) {
      if (on_piece && cut > emitted) on_piece(text.substr(emitted, cut - emitted));
      emitted = text.size();
      break;
    }
    // Hold back the longest tail that could be the start of a stop string.
    size_t hold = 0;
    for (const auto& s : o.stop)
      for (size_t k = s.empty() ? 0 : std::min(s.size() - 1, text.size() - emitted); k > hold; --k)
        if (text.compare(text.size() - k, k, s, 0, k) == 0) {
          hold = k;
          break;
        }
    if (on_piece && text.size() - hold > emitted) {
      go_on = on_piece(text.substr(emitted, text.size() - hold - emitted));
      emitted = text.size() - hold;
    }
    if (!go_on || pos >= maxT) break;
    logits = &state.Step(&next, &pos, 1);
    ++pos;
  }
  if (on_piece && go_on && emitted < text.size()) on_piece(text.substr(emitted));  // a held tail that never stopped
  return out;
}

}  // namespace keel
