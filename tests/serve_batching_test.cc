// serve_batching_test.cc: `keel serve`'s continuous batching under load — concurrent requests equal their
// sequential results, a full queue answers 429, a client disconnect cancels its generation and frees the slot,
// and SIGTERM drains in-flight requests (or cancels them at the deadline) and exits 0.
#include <gtest/gtest.h>

#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#include <atomic>
#include <future>
#include <thread>

#include "serve_test_util.h"

namespace keel::testing {
namespace {

std::vector<int> GreedyTokens(const ServerProcess& s, const std::string& prompt, int max_tokens, bool stream,
                              std::string* text = nullptr) {
  json req = {{"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", 0}, {"return_tokens", true},
              {"stream", stream}};
  std::vector<int> out;
  if (stream) {
    SseResult r = PostSse(s, "/v1/completions", req.dump());
    EXPECT_EQ(r.status, 200);
    EXPECT_FALSE(r.events.empty());
    if (!r.events.empty()) {
      EXPECT_EQ(r.events.back(), "[DONE]");
    }
    for (const auto& e : r.events) {
      if (e == "[DONE]") continue;
      json j = json::parse(e);
      if (j["choices"].empty() || !j["choices"][0].contains("tokens")) continue;
      for (const auto& t : j["choices"][0]["tokens"]) out.push_back(t.get<int>());
    }
    if (text) *text = StreamText(r);
    return out;
  }
  auto r = s.Client()->Post("/v1/completions", req.dump(), "application/json");
  if (!r) {
    ADD_FAILURE() << "no response";
    return out;
  }
  EXPECT_EQ(r->status, 200) << r->body;
  json j = json::parse(r->body);
  for (const auto& t : j["choices"][0]["tokens"]) out.push_back(t.get<int>());
  if (text) *text = j["choices"][0]["text"];
  return out;
}

TEST(ServeBatching, ConcurrentRequestsEqualSequential) {
  ServerProcess s;
  ASSERT_TRUE(s.Start("--parallel 4 --prefill-chunk 8")) << s.log();
  const std::vector<std::string> prompts = {"the quick",   "lazy dog 1", "fox",         "the lazy dog 2",
                                            "jumps over ", "brown",      "1999\nthe q", "quick brown fox"};
  std::vector<std::vector<int>> seq;
  std::vector<std::string> seq_text;
  for (const auto& p : prompts) {
    std::string t;
    seq.push_back(GreedyTokens(s, p, 12, false, &t));
    seq_text.push_back(t);
    ASSERT_EQ(seq.back().size(), 12u) << p;
  }
  // All 8 at once against 4 slots (half streaming): the engine batches them, queues the rest, and every result
  // equals its sequential one token for token.
  for (int round = 0; round < 2; ++round) {
    std::vector<std::future<std::pair<std::vector<int>, std::string>>> futs;
    for (size_t i = 0; i < prompts.size(); ++i)
      futs.push_back(std::async(std::launch::async, [&, i] {
        std::string t;
        auto toks = GreedyTokens(s, prompts[i], 12, (i + round) % 2 == 0, &t);
        return std::make_pair(toks, t);
      }));
    for (size_t i = 0; i < prompts.size(); ++i) {
      auto [toks, text] = futs[i].get();
      EXPECT_EQ(toks, seq[i]) << "prompt '" << prompts[i] << "' round " << round;
      EXPECT_EQ(text, seq_text[i]) << "prompt '" << prompts[i] << "' round " << round;
    }
  }
  // The engine updates its gauges after handing out a step's tokens, so a client can finish first.
  EXPECT_TRUE(WaitForMetrics(s, [](const std::string& m) { return MetricValue(m, "keel_active_slots") == 0; }));
  std::string m = Metrics(s);
  EXPECT_EQ(MetricValue(m, "keel_active_slots"), 0) << m;
  EXPECT_EQ(MetricValue(m, "keel_queue_depth"), 0) << m;
  EXPECT_EQ(MetricValue(m, "keel_generation_tokens_total"), 12 * 8 * 3) << m;
  EXPECT_EQ(MetricValue(m, "keel_requests_cancelled_total"), 0) << m;
  // The engine's profile counters: every prompt token not taken from the prompt cache is one row, and every
  // generated token after a request's first is one decode row (the first comes from the prompt's last row); the
  // batched rounds put several rows in a step. The rounds repeat the sequential prompts, so the cache is used.
  const double rows = MetricValue(m, "keel_engine_step_rows_total"), steps = MetricValue(m, "keel_engine_steps_total");
  const double cached = MetricValue(m, "keel_prompt_tokens_cached_total");
  EXPECT_GT(cached, 0) << m;
  EXPECT_EQ(rows, MetricValue(m, "keel_prompt_tokens_total") - cached + 8 * 3 * (12 - 1)) << m;
  EXPECT_LT(steps, rows) << m;
  EXPECT_GT(MetricValue(m, "keel_engine_forward_seconds_total"), 0) << m;
  EXPECT_GT(MetricValue(m, "keel_engine_sampling_seconds_total"), 0) << m;
}

TEST(ServeBatching, FullQueueAnswers429) {
  ServerProcess s;
  // One slot, one queue place; each step takes >= 40 ms, so a 25-token request runs for a second.
  ASSERT_TRUE(s.Start("--parallel 1 --queue 1 --debug-step-delay-ms 40")) << s.log();
  const std::string body = R"({"prompt": "the", "max_tokens": 25, "temperature": 0})";
  auto a = std::async(std::launch::async, [&] { return s.Client()->Post("/v1/completions", body, "application/json"); });
  ASSERT_TRUE(WaitForMetrics(s, [](const std::string& m) { return MetricValue(m, "keel_active_slots") == 1; }));
  auto b = std::async(std::launch::async, [&] { return s.Client()->Post("/v1/completions", body, "application/json"); });
  ASSERT_TRUE(WaitForMetrics(s, [](const std::string& m) { return MetricValue(m, "keel_queue_depth") == 1; }));
  auto c = s.Client()->Post("/v1/completions", body, "application/json");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->status, 429) << c->body;
  json e = json::parse(c->body);
  EXPECT_EQ(e["error"]["type"], "rate_limit_error");
  EXPECT_EQ(e["error"]["code"], "queue_full");
  // A refused client is asked to close its connection (kept alive it would hold an HTTP worker).
  EXPECT_EQ(c->get_header_value("Connection"), "close");
  auto ra = a.get();
  auto rb = b.get();
  ASSERT_TRUE(ra && rb);
  EXPECT_EQ(ra->status, 200);
  EXPECT_EQ(rb->status, 200);
  EXPECT_EQ(json::parse(ra->body)["choices"][0]["text"], json::parse(rb->body)["choices"][0]["text"]);
  std::string m = Metrics(s);
  EXPECT_EQ(MetricValue(m, "keel_requests_rejected_total{reason=\"queue_full\"}"), 1) << m;
  EXPECT_EQ(MetricValue(m, "keel_requests_total{endpoint=\"/v1/completions\",status=\"429\"}"), 1) << m;
}

TEST(ServeBatching, ClientDisconnectCancelsAndFreesSlot) {
  ServerProcess s;
  ASSERT_TRUE(s.Start("--parallel 2 --debug-step-delay-ms 40")) << s.log();
  // Streaming: the client reads the first event and hangs up.
  SseResult r = PostSse(s, "/v1/completions", R"({"prompt": "the", "max_tokens": 25, "stream": true})", 1);
  EXPECT_EQ(r.status, 200);
  ASSERT_TRUE(WaitForMetrics(s, [](const std::string& m) {
    return MetricValue(m, "keel_requests_cancelled_total") == 1 && MetricValue(m, "keel_active_slots") == 0;
  })) << Metrics(s);
  // Non-streaming: send the request on a raw socket and close it while the generation runs.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(s.port()));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const std::string body = R"({"prompt": "the", "max_tokens": 25})";
  const std::string req = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  ASSERT_EQ(write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
  ASSERT_TRUE(WaitForMetrics(s, [](const std::string& m) { return MetricValue(m, "keel_active_slots") == 1; }));
  close(fd);
  ASSERT_TRUE(WaitForMetrics(s, [](const std::string& m) {
    return MetricValue(m, "keel_requests_cancelled_total") == 2 && MetricValue(m, "keel_active_slots") == 0;
  })) << Metrics(s);
  std::string m = Metrics(s);
  // Neither generation ran to its 25 tokens.
  EXPECT_LT(MetricValue(m, "keel_generation_tokens_total"), 40) << m;
  // The freed slots serve new requests.
  auto ok = s.Client()->Post("/v1/completions", R"({"prompt": "the", "max_tokens": 2})", "application/json");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200);
}

TEST(ServeBatching, SigtermDrainsInFlightAndExitsZero) {
  ServerProcess s;
  ASSERT_TRUE(s.Start("--parallel 2 --debug-step-delay-ms 30")) << s.log();
  std::atomic<int> first_events{0};
  auto run = [&] {
    // Streams ~20 tokens over ~0.6 s.
    return PostSse(s, "/v1/completions", R"({"prompt": "the", "max_tokens": 20, "temperature": 0, "stream": true})");
  };
  auto a = std::async(std::launch::async, run);
  auto b = std::async(std::launch::async, [&] {
    auto r = s.Client()->Post("/v1/completions", R"({"prompt": "fox", "max_tokens": 20})", "application/json");
    return r ? std::make_pair(r->status, r->body) : std::make_pair(-1, std::string());
  });
  ASSERT_TRUE(WaitForMetrics(s, [](const std::string& m) { return MetricValue(m, "keel_active_slots") == 2; }));
  s.Signal(SIGTERM);
  // Draining: new work is refused with 503 while the two requests finish.
  bool saw_503 = false;
  for (int i = 0; i < 50 && !saw_503; ++i) {
    auto r = s.Client()->Post("/v1/completions", R"({"prompt": "x", "max_tokens": 2})", "application/json");
    if (r && r->status == 503) {
      saw_503 = true;
      EXPECT_EQ(json::parse(r->body)["error"]["type"], "server_error");
      // The refusal is counted (it used to leave the rejected counter at 0 while draining).
      EXPECT_GE(MetricValue(Metrics(s), "keel_requests_rejected_total{reason=\"shutting_down\"}"), 1);
    }
    if (!r) break;  // already stopped listening
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(saw_503);
  SseResult ra = a.get();
  auto rb = b.get();
  EXPECT_EQ(ra.status, 200);
  ASSERT_GE(ra.events.size(), 2u) << ra.raw;
  EXPECT_EQ(ra.events.back(), "[DONE]");
  EXPECT_EQ(json::parse(ra.events[ra.events.size() - 2])["choices"][0]["finish_reason"], "length") << ra.raw;
  EXPECT_EQ(rb.first, 200) << rb.second;
  EXPECT_EQ(json::parse(rb.second)["usage"]["completion_tokens"], 20);
  EXPECT_EQ(s.Wait(std::chrono::seconds(15)), 0) << s.log();
}

TEST(ServeBatching, SigtermDeadlineCancelsAndExitsZero) {
  ServerProcess s;
  // 25 tokens at >= 100 ms a step outlast the 0.3 s drain deadline.
  ASSERT_TRUE(s.Start("--parallel 1 --debug-step-delay-ms 100 --drain-timeout 0.3")) << s.log();
  auto a = std::async(std::launch::async, [&] {
    return PostSse(s, "/v1/completions", R"({"prompt": "the", "max_tokens": 25, "stream": true})");
  });
  auto b = std::async(std::launch::async, [&] {
    auto r = s.Client()->Post("/v1/completions", R"({"prompt": "the", "max_tokens": 25})", "application/json");
    return r ? std::make_pair(r->status, r->body) : std::make_pair(-1, std::string());
  });
  ASSERT_TRUE(WaitForMetrics(s, [](const std::string& m) {
    return MetricValue(m, "keel_active_slots") == 1 && MetricValue(m, "keel_queue_depth") == 1;
  }));
  const auto t0 = std::chrono::steady_clock::now();
  s.Signal(SIGTERM);
  EXPECT_EQ(s.Wait(std::chrono::seconds(15)), 0) << s.log();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(6));
  SseResult ra = a.get();
  auto rb = b.get();
  // The streamed request ends with an error event and [DONE]; the queued one gets a 503.
  ASSERT_GE(ra.events.size(), 2u) << ra.raw;
  EXPECT_EQ(ra.events.back(), "[DONE]");
  json err = json::parse(ra.events[ra.events.size() - 2]);
  EXPECT_TRUE(err.contains("error")) << ra.raw;
  EXPECT_EQ(rb.first, 503) << rb.second;
}

// A client that sends its request one byte a second (each byte restarts the server's read timeout) holds an HTTP
// worker that Stop() would wait for without bound; after SIGTERM the server still exits 0, a few seconds after the
// drain, and says why.
TEST(ServeBatching, SigtermExitsDespiteAClientDrippingItsRequest) {
  ServerProcess s;
  ASSERT_TRUE(s.Start("--drain-timeout 0.5")) << s.log();
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(s.port()));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  const std::string head =
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{";
  ASSERT_EQ(::send(fd, head.data(), head.size(), MSG_NOSIGNAL), static_cast<ssize_t>(head.size()));
  std::atomic<bool> stop{false};
  std::thread drip([&] {
    while (!stop.load()) {
      (void)::send(fd, " ", 1, MSG_NOSIGNAL);
      for (int i = 0; i < 10 && !stop.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const auto t0 = std::chrono::steady_clock::now();
  s.Signal(SIGTERM);
  const int code = s.Wait(std::chrono::seconds(30));
  const auto took = std::chrono::steady_clock::now() - t0;
  stop = true;
  drip.join();
  ::close(fd);
  EXPECT_EQ(code, 0) << s.log();
  EXPECT_LT(took, std::chrono::seconds(15)) << s.log();
  EXPECT_NE(s.log().find("still open after the drain"), std::string::npos) << s.log();
}

}  // namespace
}  // namespace keel::testing
