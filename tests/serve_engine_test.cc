// serve_engine_test.cc: the serving pieces in process — DecodeState::StepRows (arbitrary slots, chunked prefill,
// selected logit rows) against Step(), the continuous-batching Engine against the single-sequence Generate(),
// stop strings and UTF-8 hold-back, cancellation, the queue bound, and ParseCompletionRequest / the chat template.
#include <gtest/gtest.h>

#include <atomic>

#include <algorithm>
#include <numeric>
#include <cmath>

#include "backend/backend.h"
#include "core/hash.h"
#include "data/tokenizer.h"
#include "model/gpt.h"
#include "serve/engine.h"
#include "serve/http_api.h"
#include "serve/metrics.h"
#include "serve/sampling.h"

namespace keel {
namespace {

struct TestModel {
  std::unique_ptr<Backend> be = MakeCpuBackend(1);
  std::unique_ptr<GptModel> model;
  explicit TestModel(GptConfig c, float noise = 0.3f) {
    auto m = GptModel::Create(c, be.get(), 1, 1);
    EXPECT_TRUE(m.ok());
    model = std::move(m.value());
    model->InitWeights(11);
    // Larger weights than the GPT-2 init: peaked, far-from-uniform logits (no near-ties for greedy decoding).
    auto p = model->ParamsToHost();
    Rng rng(5);
    for (auto& x : p) x += noise * rng.Normal();
    model->SetParamsFromHost(p);
  }
};

GptConfig ByteConfig() { return GptConfig{.layers = 2, .heads = 2, .dim = 16, .ctx = 40, .vocab = 256}; }

TEST(DecodeRows, ChunkedPrefillAndSlotsMatchStep) {
  GptConfig c{.layers = 2, .heads = 2, .dim = 16, .ctx = 16, .vocab = 37};
  TestModel tm(c);
  Rng rng(9);
  std::vector<int32_t> s0, s1;
  for (int t = 0; t < 10; ++t) s0.push_back(static_cast<int32_t>(rng.Below(c.vocab)));
  for (int t = 0; t < 7; ++t) s1.push_back(static_cast<int32_t>(rng.Below(c.vocab)));
  // Reference: one sequence at a time, one position per Step.
  auto ref = [&](const std::vector<int32_t>& s) {
    auto st = DecodeState::Create(tm.model.get(), 1, c.ctx);
    std::vector<std::vector<float>> out;
    for (int t = 0; t < static_cast<int>(s.size()); ++t) out.push_back((*st)->Step(&s[t], &t, 1));
    return out;
  };
  auto r0 = ref(s0), r1 = ref(s1);
  // Slots 2 and 0 of a 3-slot state; step 1 feeds s0[0..6) and s1[0..4) as chunks (10 rows) and asks for the
  // logits of each chunk's last row; step 2 feeds the rest.
  auto st = DecodeState::Create(tm.model.get(), 3, c.ctx, 12);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ((*st)->max_rows(), 12);
  auto check = [&](const float* got, const std::vector<float>& want) {
    for (int v = 0; v < c.vocab; ++v) EXPECT_NEAR(got[v], want[static_cast<size_t>(v)], 1e-4);
  };
  {
    std::vector<int32_t> tok, pos, slot;
    for (int t = 0; t < 6; ++t) tok.push_back(s0[t]), pos.push_back(t), slot.push_back(2);
    for (int t = 0; t < 4; ++t) tok.push_back(s1[t]), pos.push_back(t), slot.push_back(0);
    int32_t want_rows[2] = {9, 5};  // s1's last row first: logits come back in the order asked
    const auto& lg = (*st)->StepRows(tok.data(), pos.data(), slot.data(), 10, want_rows, 2);
    ASSERT_EQ(lg.size(), 2u * c.vocab);
    check(lg.data(), r1[3]);
    check(lg.data() + c.vocab, r0[5]);
  }
  {
    std::vector<int32_t> tok, pos, slot;
    for (int t = 4; t < 7; ++t) tok.push_back(s1[t]), pos.push_back(t), slot.push_back(0);
    for (int t = 6; t < 10; ++t) tok.push_back(s0[t]), pos.push_back(t), slot.push_back(2);
    int32_t want_rows[2] = {2, 6};
    const auto& lg = (*st)->StepRows(tok.data(), pos.data(), slot.data(), 7, want_rows, 2);
    check(lg.data(), r1[6]);
    check(lg.data() + c.vocab, r0[9]);
  }
  // No logits at all is allowed (a step of prompt chunks that all continue next step).
  int32_t t0 = 1, p0 = 0, sl = 1;
  EXPECT_TRUE((*st)->StepRows(&t0, &p0, &sl, 1, nullptr, 0).empty());
}

// The prompt cache's copy (DecodeState::CopyPositions) against feeding the same prefix again: with the repacked
// matrices (the CPU with AVX2/FMA/F16C) a row's result does not depend on its step's other rows, so the logits
// after a copied prefix must equal a recomputation bit for bit; elsewhere within float rounding.
TEST(DecodeRows, CopiedPrefixEqualsRecomputation) {
  GptConfig c{.layers = 2, .heads = 2, .dim = 16, .ctx = 16, .vocab = 37};
  TestModel tm(c);
  const bool exact = tm.be->SupportsOp(Op::kMatmulForwardPacked);
  Rng rng(21);
  std::vector<int32_t> a, b;
  for (int t = 0; t < 12; ++t) a.push_back(static_cast<int32_t>(rng.Below(c.vocab)));
  b.assign(a.begin(), a.begin() + 7);  // b shares a's first 7 tokens, then differs
  for (int t = 0; t < 5; ++t) b.push_back(static_cast<int32_t>((a[7 + t] + 1 + t) % c.vocab));
  auto st = DecodeState::Create(tm.model.get(), 3, c.ctx, 16);
  ASSERT_TRUE(st.ok());
  auto feed = [&](const std::vector<int32_t>& s, int from, int slot) {
    std::vector<int32_t> tok, pos, sl;
    for (int t = from; t < static_cast<int>(s.size()); ++t) tok.push_back(s[t]), pos.push_back(t), sl.push_back(slot);
    int32_t last = static_cast<int32_t>(tok.size()) - 1;
    return (*st)->StepRows(tok.data(), pos.data(), sl.data(), static_cast<int>(tok.size()), &last, 1);
  };
  feed(a, 0, 0);                                     // slot 0 holds a
  const std::vector<float> want = feed(b, 0, 2);     // slot 2: b from scratch, in one chunk of 12 rows
  (*st)->CopyPositions(0, 1, 7);                     // slot 1: a's first 7 positions, then b's last 5 fed
  const std::vector<float> got = feed(b, 7, 1);
  ASSERT_EQ(got.size(), want.size());
  for (size_t v = 0; v < want.size(); ++v) {
    if (exact) EXPECT_EQ(got[v], want[v]) << v;
    else EXPECT_NEAR(got[v], want[v], 1e-4) << v;
  }
  // A wrong prefix (a's positions 0..8, two of which b does not share) changes the result: the copy is used.
  (*st)->CopyPositions(0, 1, 9);
  const std::vector<float> wrong = feed(b, 9, 1);
  bool differs = false;
  for (size_t v = 0; v < want.size(); ++v) differs |= wrong[v] != want[v];
  EXPECT_TRUE(differs);
}

std::vector<int32_t> ReferenceGenerate(GptModel* m, const Tokenizer& tok, const std::vector<int32_t>& prompt,
                                       const SamplingParams& sp, int max_tokens, int ctx) {
  auto st = DecodeState::Create(m, 1, ctx);
  GenerateOptions o;
  o.sampling = sp;
  o.max_new_tokens = max_tokens;
  auto out = Generate(**st, tok, prompt, o);
  EXPECT_TRUE(out.ok());
  return out.ok() ? *out : std::vector<int32_t>{};
}

struct Collected {
  std::string text;
  std::vector<int32_t> tokens;
  std::vector<std::string> pieces;
  Generation::Update last;
};

Collected Collect(Generation& g) {
  Collected c;
  for (;;) {
    auto u = g.Wait(std::chrono::milliseconds(1000));
    if (!u.text.empty()) c.pieces.push_back(u.text);
    c.text += u.text;
    c.tokens.insert(c.tokens.end(), u.tokens.begin(), u.tokens.end());
    if (u.finished) {
      c.last = u;
      return c;
    }
  }
}

TEST(Engine, BatchedGenerationsEqualGenerate) {
  TestModel tm(ByteConfig());
  ByteTokenizer tok;
  ServeMetrics metrics;
  // 3 slots, a 5-token prefill budget per step: 7 requests queue, join as slots free up, and prefill in chunks.
  auto eng = Engine::Create(tm.model.get(), &tok, EngineOptions{.parallel = 3, .ctx = 40, .queue = 16,
                                                                 .prefill_chunk = 5, .threads = 1},
                            &metrics);
  ASSERT_TRUE(eng.ok()) << eng.status().ToString();
  const std::vector<std::string> prompts = {"hello", "a", "the quick brown fox", "xyz xyz", "0123456789", "Q", "mm"};
  std::vector<std::shared_ptr<Generation>> gens;
  std::vector<GenerationRequest> reqs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerationRequest r;
    r.prompt = tok.Encode(prompts[i]);
    r.sampling = SamplingParams{.temperature = i % 2 ? 0.9f : 0.0f, .top_k = 20, .top_p = 0.9f, .seed = 100 + i};
    r.max_tokens = 8 + static_cast<int>(i) * 3;
    reqs.push_back(r);
    SubmitStatus ss;
    gens.push_back((*eng)->Submit(r, &ss, nullptr));
    ASSERT_EQ(ss, SubmitStatus::kOk);
  }
  int64_t total = 0;
  for (size_t i = 0; i < gens.size(); ++i) {
    Collected c = Collect(*gens[i]);
    auto want = ReferenceGenerate(tm.model.get(), tok, reqs[i].prompt, reqs[i].sampling, reqs[i].max_tokens, 40);
    EXPECT_EQ(c.tokens, want) << prompts[i];
    // The published pieces concatenate to exactly the generated bytes (UTF-8 hold-back loses nothing).
    EXPECT_EQ(c.text, tok.Decode(want)) << prompts[i];
    EXPECT_EQ(c.last.reason, want.size() == static_cast<size_t>(reqs[i].max_tokens) ? FinishReason::kLength
                                                                                     : FinishReason::kStop);
    EXPECT_EQ(c.last.prompt_tokens, static_cast<int>(reqs[i].prompt.size()));
    EXPECT_EQ(c.last.completion_tokens, static_cast<int>(want.size()));
    // No piece but the last may end inside a UTF-8 sequence that later bytes complete.
    for (size_t p = 0; p + 1 < c.pieces.size(); ++p) {
      const std::string& s = c.pieces[p];
      const auto b = static_cast<unsigned char>(s.back());
      const auto n = static_cast<unsigned char>(c.pieces[p + 1][0]);
      EXPECT_FALSE(b >= 0xC2 && b <= 0xF4 && (n & 0xC0) == 0x80) << "a piece split a UTF-8 sequence";
    }
    total += static_cast<int64_t>(want.size());
  }
  EXPECT_EQ(metrics.generated_tokens(), total);
  EXPECT_EQ((*eng)->active(), 0);
}

// The prompt cache: a prompt sharing a prefix with a slot's kept tokens (an earlier prompt and its generated
// tokens) feeds only the rest, from the same slot when it is free or copied from a busy one, and every result
// equals the uncached reference.
TEST(Engine, PromptCacheReusesPrefixesWithUnchangedResults) {
  TestModel tm(ByteConfig());
  ByteTokenizer tok;  // byte ids, no end-of-sequence token: every generation runs to max_tokens
  ServeMetrics metrics;
  auto eng = Engine::Create(tm.model.get(), &tok, EngineOptions{.parallel = 2, .ctx = 40, .threads = 1,
                                                                 .step_delay_ms = 5},
                            &metrics);
  ASSERT_TRUE(eng.ok());
  struct Run {
    std::shared_ptr<Generation> gen;
    GenerationRequest req;
  };
  auto submit = [&](const std::string& prompt, float temperature, int max_tokens) {
    Run r;
    r.req.prompt = tok.Encode(prompt);
    r.req.sampling = SamplingParams{.temperature = temperature, .top_k = 20, .seed = 7};
    r.req.max_tokens = max_tokens;
    SubmitStatus ss;
    r.gen = (*eng)->Submit(r.req, &ss, nullptr);
    EXPECT_EQ(ss, SubmitStatus::kOk);
    return r;
  };
  auto reference = [&](const Run& r) {
    return ReferenceGenerate(tm.model.get(), tok, r.req.prompt, r.req.sampling, r.req.max_tokens, 40);
  };
  const std::string fox = "the quick brown fox";  // 19 bytes
  Run a = submit(fox, 0, 6);
  const std::vector<int32_t> a_out = Collect(*a.gen).tokens;
  EXPECT_EQ(a_out, reference(a));
  EXPECT_EQ(metrics.cached_prompt_tokens(), 0);
  // The same prompt again: all but its last token come from the cache (slot 0, free again).
  Run again = submit(fox, 0, 6);
  EXPECT_EQ(Collect(*again.gen).tokens, a_out);
  EXPECT_EQ(metrics.cached_prompt_tokens(), 18);
  // A follow-up turn (the previous prompt, the generated text, more): the slot kept the prompt and the generated
  // tokens but the last (sampled, never fed), so 19 + 5 positions are reused.
  Run turn = submit(fox + tok.Decode(a_out) + " more", 0.9f, 4);
  EXPECT_EQ(Collect(*turn.gen).tokens, reference(turn));
  EXPECT_EQ(metrics.cached_prompt_tokens(), 18 + 24);
  // While a long generation holds slot 0 ("the quick brown cat" reuses the 16 bytes it shares with slot 0), a
  // prompt sharing 17 bytes with it goes to slot 1 and copies them from the busy slot.
  Run busy = submit("the quick brown cat", 0, 12);
  std::vector<int32_t> busy_out;
  while (busy_out.empty()) {  // its prompt is fed once a token comes out
    auto u = busy.gen->Wait(std::chrono::milliseconds(1000));
    busy_out.insert(busy_out.end(), u.tokens.begin(), u.tokens.end());
    ASSERT_FALSE(u.finished && busy_out.empty());
  }
  Run copy = submit("the quick brown cow!", 0.9f, 5);
  EXPECT_EQ(Collect(*copy.gen).tokens, reference(copy));
  const std::vector<int32_t> rest = Collect(*busy.gen).tokens;
  busy_out.insert(busy_out.end(), rest.begin(), rest.end());
  EXPECT_EQ(busy_out, reference(busy));
  EXPECT_EQ(metrics.cached_prompt_tokens(), 18 + 24 + 16 + 17);
}

// --no-prompt-cache: every prompt is fed in full.
TEST(Engine, PromptCacheOff) {
  TestModel tm(ByteConfig());
  ByteTokenizer tok;
  ServeMetrics metrics;
  auto eng = Engine::Create(tm.model.get(), &tok, EngineOptions{.parallel = 2, .ctx = 40, .threads = 1,
                                                                 .prompt_cache = false},
                            &metrics);
  ASSERT_TRUE(eng.ok());
  GenerationRequest r;
  r.prompt = tok.Encode("hello hello");
  r.sampling.temperature = 0;
  r.max_tokens = 5;
  for (int i = 0; i < 3; ++i) {
    SubmitStatus ss;
    EXPECT_EQ(Collect(*(*eng)->Submit(r, &ss, nullptr)).tokens,
              ReferenceGenerate(tm.model.get(), tok, r.prompt, r.sampling, 5, 40));
  }
  EXPECT_EQ(metrics.cached_prompt_tokens(), 0);
}

TEST(Engine, ContextLimitAndStopStrings) {
  TestModel tm(ByteConfig());
  ByteTokenizer tok;
  auto eng = Engine::Create(tm.model.get(), &tok, EngineOptions{.parallel = 2, .ctx = 24, .threads = 1}, nullptr);
  ASSERT_TRUE(eng.ok());
  GenerationRequest r;
  r.prompt = tok.Encode("abcd");
  r.sampling.temperature = 0;
  r.max_tokens = 1000;
  SubmitStatus ss;
  Collected full = Collect(*(*eng)->Submit(r, &ss, nullptr));
  EXPECT_EQ(full.last.reason, FinishReason::kLength);
  EXPECT_EQ(full.tokens.size(), 24u - 4u);  // the context ends the generation
  EXPECT_EQ(full.tokens, ReferenceGenerate(tm.model.get(), tok, r.prompt, r.sampling, 1000, 24));
  // A stop string three bytes in: the text ends before it and nothing of it was ever published.
  const std::string stop = full.text.substr(3, 2);
  r.stop = {stop};
  Collected cut = Collect(*(*eng)->Submit(r, &ss, nullptr));
  EXPECT_EQ(cut.last.reason, FinishReason::kStop);
  EXPECT_EQ(cut.text, full.text.substr(0, full.text.find(stop)));
  {  // Generate() (keel sample's loop) cuts at the same place: what precedes the stop string is emitted, across
     // the token boundary the stop string spans, and nothing of the stop string.
    auto st = DecodeState::Create(tm.model.get(), 1, 24);
    ASSERT_TRUE(st.ok());
    GenerateOptions o;
    o.sampling = r.sampling;
    o.max_new_tokens = 1000;
    o.stop = {stop};
    std::string streamed;
    auto out = Generate(**st, tok, r.prompt, o, [&](const std::string& piece) {
      streamed += piece;
      return true;
    });
    ASSERT_TRUE(out.ok());
    EXPECT_EQ(streamed, full.text.substr(0, full.text.find(stop)));
  }
  // Invalid sampling parameters are refused by the engine itself (library callers have no HTTP parser).
  {
    GenerationRequest bad = r;
    bad.stop.clear();
    bad.sampling.temperature = std::nanf("");
    EXPECT_EQ((*eng)->Submit(bad, &ss, nullptr), nullptr);
    EXPECT_EQ(ss, SubmitStatus::kInvalid);
  }
  // Too long a prompt, or an empty one, is refused.
  r.prompt.assign(24, 'a');
  EXPECT_EQ((*eng)->Submit(r, &ss, nullptr), nullptr);
  EXPECT_EQ(ss, SubmitStatus::kInvalid);
  r.prompt.clear();
  EXPECT_EQ((*eng)->Submit(r, &ss, nullptr), nullptr);
  EXPECT_EQ(ss, SubmitStatus::kInvalid);
  // An empty stop string would match at once: refused by the engine itself, not only by the HTTP parser.
  r.prompt = tok.Encode("abcd");
  r.stop = {"x", ""};
  EXPECT_EQ((*eng)->Submit(r, &ss, nullptr), nullptr);
  EXPECT_EQ(ss, SubmitStatus::kInvalid);
}

TEST(Engine, CancelQueueBoundAndShutdown) {
  TestModel tm(ByteConfig());
  ByteTokenizer tok;
  ServeMetrics metrics;
  auto eng = Engine::Create(
      tm.model.get(), &tok, EngineOptions{.parallel = 1, .ctx = 40, .queue = 1, .threads = 1, .step_delay_ms = 20},
      &metrics);
  ASSERT_TRUE(eng.ok());
  GenerationRequest r;
  r.prompt = tok.Encode("go");
  r.max_tokens = 30;
  SubmitStatus ss;
  auto a = (*eng)->Submit(r, &ss, nullptr);
  ASSERT_EQ(ss, SubmitStatus::kOk);
  while ((*eng)->active() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  auto b = (*eng)->Submit(r, &ss, nullptr);
  ASSERT_EQ(ss, SubmitStatus::kOk);
  std::string why;
  EXPECT_EQ((*eng)->Submit(r, &ss, &why), nullptr);
  EXPECT_EQ(ss, SubmitStatus::kQueueFull) << why;
  // Cancelling the running one frees the slot for the queued one.
  a->Cancel();
  Collected ca = Collect(*a);
  EXPECT_EQ(ca.last.reason, FinishReason::kCancelled);
  EXPECT_TRUE(ca.last.error.ok());
  EXPECT_LT(ca.last.completion_tokens, 30);
  // Shutdown with a deadline in the past: the running generation is cancelled with an error.
  while ((*eng)->active() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  (*eng)->Shutdown(std::chrono::steady_clock::now());
  Collected cb = Collect(*b);
  EXPECT_EQ(cb.last.reason, FinishReason::kCancelled);
  EXPECT_FALSE(cb.last.error.ok());
  EXPECT_EQ((*eng)->Submit(r, &ss, nullptr), nullptr);
  EXPECT_EQ(ss, SubmitStatus::kShuttingDown);
  EXPECT_EQ(metrics.cancelled(), 2);
}

// A device that fails mid-generation (a lost GPU: the CUDA backend's error is sticky) ends the running and the
// queued generations with its error, refuses new ones (kFailed) and reports the engine unhealthy for good. Before,
// every later request failed one by one with "no finite logit" while the server looked healthy.
TEST(Engine, ADeviceFailureEndsEverythingAndMarksTheEngineFailed) {
  TestModel tm(ByteConfig());
  ByteTokenizer tok;
  ServeMetrics metrics;
  std::atomic<int> steps{0};
  EngineOptions o{.parallel = 1, .ctx = 40, .queue = 4, .threads = 1, .step_delay_ms = 5};
  o.device_check = [&steps]() -> Status {
    return ++steps >= 4 ? Status(Code::kIo, "cuda: an illegal memory access was encountered") : Status::Ok();
  };
  auto eng = Engine::Create(tm.model.get(), &tok, o, &metrics);
  ASSERT_TRUE(eng.ok());
  EXPECT_TRUE((*eng)->health().ok());
  GenerationRequest r;
  r.prompt = tok.Encode("go");
  r.max_tokens = 30;
  SubmitStatus ss;
  auto a = (*eng)->Submit(r, &ss, nullptr);
  ASSERT_EQ(ss, SubmitStatus::kOk);
  auto b = (*eng)->Submit(r, &ss, nullptr);  // waits for the one slot
  ASSERT_EQ(ss, SubmitStatus::kOk);
  Collected ca = Collect(*a), cb = Collect(*b);
  for (const Collected* c : {&ca, &cb}) {
    EXPECT_EQ(c->last.reason, FinishReason::kCancelled);
    EXPECT_EQ(c->last.error.code(), Code::kAborted);
    EXPECT_NE(c->last.error.message().find("illegal memory access"), std::string::npos) << c->last.error.message();
  }
  EXPECT_LT(ca.last.completion_tokens, 30);
  EXPECT_FALSE((*eng)->health().ok());
  std::string why;
  EXPECT_EQ((*eng)->Submit(r, &ss, &why), nullptr);
  EXPECT_EQ(ss, SubmitStatus::kFailed);
  EXPECT_NE(why.find("device failed"), std::string::npos) << why;
  EXPECT_EQ(metrics.failed(), 2);
  EXPECT_EQ(metrics.cancelled(), 0);
  const std::string text = metrics.Render();
  EXPECT_NE(text.find("keel_requests_rejected_total{reason=\"device_failed\"} 1"), std::string::npos) << text;
  EXPECT_NE(text.find("keel_requests_failed_total 2"), std::string::npos) << text;
}

TEST(ParseRequest, DefaultsAndFields) {
  ParseOptions o{"m", 256};
  auto r = ParseCompletionRequest(R"({"prompt": "hi"})", ApiEndpoint::kCompletions, o);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->prompt, "hi");
  EXPECT_EQ(r->sampling.temperature, 1.0f);
  EXPECT_EQ(r->sampling.top_p, 1.0f);
  EXPECT_EQ(r->sampling.top_k, 0);
  EXPECT_EQ(r->max_tokens, -1);
  EXPECT_FALSE(r->stream);
  EXPECT_FALSE(r->seed_given);
  r = ParseCompletionRequest(
      R"({"model": "m", "prompt": ["x"], "temperature": 0, "top_p": 0.5, "top_k": 3, "max_tokens": 7.0,
          "stop": "\n", "seed": -1, "n": 1, "stream": true, "stream_options": {"include_usage": true},
          "user": "ignored", "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": null, "echo": false,
          "logit_bias": {}, "repeat_penalty": 1, "response_format": {"type": "text"}})",
      ApiEndpoint::kCompletions, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->prompt, "x");
  EXPECT_EQ(r->sampling.temperature, 0.0f);
  EXPECT_EQ(r->sampling.top_k, 3);
  EXPECT_EQ(r->max_tokens, 7);
  EXPECT_EQ(r->stop, std::vector<std::string>{"\n"});
  EXPECT_EQ(r->sampling.seed, ~0ull);
  EXPECT_TRUE(r->stream && r->include_usage && r->seed_given);
  r = ParseCompletionRequest(R"({"prompt": [1, 2, 255]})", ApiEndpoint::kCompletions, o);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->prompt_is_tokens);
  EXPECT_EQ(r->prompt_tokens, (std::vector<int32_t>{1, 2, 255}));
}

TEST(ParseRequest, ErrorsNameTheParam) {
  ParseOptions o{"m", 256};
  std::string param;
  auto r = ParseCompletionRequest(R"({"prompt": "x", "top_k": "many"})", ApiEndpoint::kCompletions, o, &param);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_EQ(param, "top_k");
  r = ParseCompletionRequest(R"({"prompt": "x", "model": "other"})", ApiEndpoint::kCompletions, o, &param);
  EXPECT_EQ(r.status().code(), Code::kNotFound);
  EXPECT_EQ(param, "model");
  r = ParseCompletionRequest(R"({"prompt": [256]})", ApiEndpoint::kCompletions, o, &param);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(param, "prompt");
  r = ParseCompletionRequest(R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
                             ApiEndpoint::kChatCompletions, o, &param);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(param, "messages[0].content");
  r = ParseCompletionRequest("[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]", ApiEndpoint::kCompletions, o, &param);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(param, "");
  std::string deep(100000, '[');
  EXPECT_FALSE(ParseCompletionRequest(deep, ApiEndpoint::kCompletions, o).ok());
  // Fields keel does not implement are refused when they would change the answer (never silently ignored).
  for (const char* f : {R"("logprobs": 3)", R"("logprobs": true)", R"("top_logprobs": 2)", R"("echo": true)",
                        R"("suffix": "end")", R"("logit_bias": {"50256": -100})", R"("presence_penalty": 0.5)",
                        R"("frequency_penalty": -1)", R"("repeat_penalty": 1.1)", R"("min_p": 0.05)",
                        R"("tools": [{"type": "function"}])", R"("response_format": {"type": "json_object"})"}) {
    SCOPED_TRACE(f);
    r = ParseCompletionRequest(std::string(R"({"prompt": "x", )") + f + "}", ApiEndpoint::kCompletions, o, &param);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
    const std::string name = std::string(f).substr(1, std::string(f).find('"', 1) - 1);
    EXPECT_EQ(param, name);
    EXPECT_NE(r.status().message().find("'" + name + "' is not supported by keel serve"), std::string::npos)
        << r.status().message();
  }
}

TEST(ParseRequest, ChatTemplate) {
  ParseOptions o{"", 256};
  auto r = ParseCompletionRequest(
      R"({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                       {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}],
          "max_completion_tokens": 5})",
      ApiEndpoint::kChatCompletions, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->prompt, "System: S\nUser: U1\nAssistant: A1\nUser: U2\nAssistant:");
  EXPECT_EQ(r->max_tokens, 5);
  auto stops = ChatStops({"x"});
  EXPECT_EQ(stops, (std::vector<std::string>{"x", "\nUser:", "\nSystem:"}));
  // Responses serialise invalid UTF-8 as U+FFFD instead of throwing.
  EXPECT_EQ(DumpJson(nlohmann::json(std::string("a\xff"))), "\"a\xef\xbf\xbd\"");
}

// SampleToken against a plain reference (sort every token, keep the top k, then the top-p nucleus, draw along the
// sorted order) for the same random draw: greedy, top-k only, top-p only (the widening sorted prefix, at GPT-2's
// vocabulary with flat logits so the nucleus holds most tokens), both, and neither (id order, same distribution).
int32_t ReferenceSample(const std::vector<float>& logits, const SamplingParams& p, uint64_t draw) {
  const int V = static_cast<int>(logits.size());
  const double u = static_cast<double>(draw >> 11) * (1.0 / 9007199254740992.0);
  float mx = *std::max_element(logits.begin(), logits.end());
  std::vector<int32_t> idx(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  const size_t k = p.top_k > 0 && p.top_k < V ? static_cast<size_t>(p.top_k) : static_cast<size_t>(V);
  idx.resize(k);
  auto weight = [&](int32_t i) { return std::exp(static_cast<double>(logits[i] - mx) / p.temperature); };
  double total = 0;
  if (k == static_cast<size_t>(V)) {
    for (int i = 0; i < V; ++i) total += weight(i);
  } else {
    for (int32_t i : idx) total += weight(i);
  }
  size_t keep = k;
  if (p.top_p < 1.0f) {
    double cum = 0;
    for (size_t i = 0; i < k; ++i) {
      cum += weight(idx[i]);
      if (cum / total >= p.top_p) {
        keep = i + 1;
        break;
      }
    }
  } else if (k == static_cast<size_t>(V)) {
    std::iota(idx.begin(), idx.end(), 0);  // no order needed without truncation: id order
  }
  idx.resize(keep);
  double sum = 0;
  for (int32_t i : idx) sum += weight(i);
  double r = u * sum;
  for (int32_t i : idx) {
    r -= weight(i);
    if (r < 0) return i;
  }
  return idx.back();
}

TEST(Sampling, MatchesAFullSortReference) {
  Rng gen(3);
  for (int V : {5, 300, 50257}) {
    for (float spread : {0.05f, 3.0f}) {  // nearly flat (a huge nucleus) and peaked
      std::vector<float> logits(static_cast<size_t>(V));
      for (auto& x : logits) x = spread * gen.Normal();
      for (SamplingParams p : {SamplingParams{0.0f, 0, 1.0f, 0}, SamplingParams{0.9f, 40, 1.0f, 0},
                               SamplingParams{0.9f, 0, 0.95f, 0}, SamplingParams{1.3f, 200, 0.5f, 0},
                               SamplingParams{1.0f, 0, 1.0f, 0}}) {
        for (uint64_t seed = 1; seed <= 20; ++seed) {
          Rng a(seed), b(seed);
          const int32_t got = SampleToken(logits.data(), V, p, a);
          if (p.temperature <= 0.0f) {
            EXPECT_EQ(got, std::max_element(logits.begin(), logits.end()) - logits.begin());
            continue;
          }
          EXPECT_EQ(got, ReferenceSample(logits, p, b.Next()))
              << "V=" << V << " spread=" << spread << " top_k=" << p.top_k << " top_p=" << p.top_p << " seed=" << seed;
        }
      }
    }
  }
}

TEST(Sampling, FrequenciesFollowTheTruncatedSoftmax) {
  // probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  auto freq = [&](SamplingParams p) {
    std::vector<double> f(4, 0.0);
    Rng rng(17);
    const int n = 40000;
    for (int i = 0; i < n; ++i) f[static_cast<size_t>(SampleToken(logits.data(), 4, p, rng))] += 1.0 / n;
    return f;
  };
  auto all = freq(SamplingParams{1.0f, 0, 1.0f, 0});
  EXPECT_NEAR(all[0], 0.5, 0.01);
  EXPECT_NEAR(all[3], 0.05, 0.01);
  auto nucleus = freq(SamplingParams{1.0f, 0, 0.7f, 0});  // 0.5 < 0.7 <= 0.8: tokens 0 and 1 only, 5:3
  EXPECT_NEAR(nucleus[0], 0.625, 0.01);
  EXPECT_EQ(nucleus[2] + nucleus[3], 0.0);
  auto top1 = freq(SamplingParams{1.0f, 1, 1.0f, 0});
  EXPECT_NEAR(top1[0], 1.0, 1e-9);  // a sum of 40000 x 1/40000
}

// Non-finite logits (a diverged model; f16 weights out of range): NaN is never drawn (and must not reach the sorts,
// where it is undefined behaviour), +inf wins, and with nothing finite there is nothing to sample (-1).
TEST(Sampling, NonFiniteLogits) {
  const float nan = std::nanf(""), inf = HUGE_VALF;
  for (SamplingParams p : {SamplingParams{0.0f, 0, 1.0f, 0}, SamplingParams{1.0f, 0, 1.0f, 0},
                           SamplingParams{1.0f, 2, 1.0f, 0}, SamplingParams{1.0f, 0, 0.9f, 0}}) {
    Rng rng(3);
    std::vector<float> a = {nan, 0.5f, nan, 0.2f, nan};
    for (int i = 0; i < 200; ++i) {
      const int32_t t = SampleToken(a.data(), 5, p, rng);
      ASSERT_TRUE(t == 1 || t == 3) << t;
    }
    std::vector<float> b = {0.1f, inf, nan, 3.0f};
    for (int i = 0; i < 50; ++i) ASSERT_EQ(SampleToken(b.data(), 4, p, rng), 1);
    std::vector<float> c = {nan, -inf, nan};
    EXPECT_EQ(SampleToken(c.data(), 3, p, rng), -1);
  }
}

}  // namespace
}  // namespace keel
