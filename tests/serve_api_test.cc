// serve_api_test.cc: `keel serve` end to end over HTTP — every endpoint, streaming and not, greedy and seeded
// completions equal to `keel sample`, chat, stop strings, and every bad-input case answering an OpenAI-shaped
// JSON error (never a crash).
#include <gtest/gtest.h>

#include "serve_test_util.h"

namespace keel::testing {
namespace {

class ServeApi : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess();
    ASSERT_TRUE(server_->Start("--parallel 4 --model-name tiny --max-body 65536")) << server_->log();
  }
  static void TearDownTestSuite() {
    server_->Signal(SIGTERM);
    EXPECT_EQ(server_->Wait(std::chrono::seconds(20)), 0) << server_->log();
    delete server_;
  }
  static json PostJson(const std::string& path, const std::string& body, int* status,
                       const httplib::Headers& h = {}) {
    auto r = server_->Client()->Post(path.c_str(), h, body, "application/json");
    if (!r) {
      ADD_FAILURE() << "no response for " << body;
      return json();
    }
    *status = r->status;
    EXPECT_EQ(r->get_header_value("Content-Type"), "application/json") << r->body;
    json j = json::parse(r->body, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << r->body;
    return j;
  }
  static std::vector<int> Tokens(const json& j) {
    std::vector<int> t;
    for (const auto& v : j["choices"][0]["tokens"]) t.push_back(v.get<int>());
    return t;
  }
  static ServerProcess* server_;
};
ServerProcess* ServeApi::server_ = nullptr;

// An OpenAI error: {"error": {"message": str, "type": str, "param": str|null, "code": str|null}}.
void ExpectError(const json& j, const std::string& type, const std::string& param = "") {
  ASSERT_TRUE(j.is_object() && j.contains("error")) << j.dump();
  const json& e = j["error"];
  ASSERT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty()) << j.dump();
  EXPECT_EQ(e["type"], type) << j.dump();
  ASSERT_TRUE(e.contains("param") && e.contains("code")) << j.dump();
  if (!param.empty()) {
    EXPECT_EQ(e["param"], param) << j.dump();
  }
}

TEST_F(ServeApi, HealthModelsMetricsPage) {
  auto c = server_->Client();
  auto h = c->Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  EXPECT_EQ(json::parse(h->body)["status"], "ok");
  EXPECT_EQ(json::parse(h->body)["slots"], 4);

  auto m = c->Get("/v1/models");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->status, 200);
  json mj = json::parse(m->body);
  EXPECT_EQ(mj["object"], "list");
  ASSERT_EQ(mj["data"].size(), 1u);
  EXPECT_EQ(mj["data"][0]["id"], "tiny");
  EXPECT_EQ(mj["data"][0]["meta"]["ctx"], kTinyCtx);

  auto p = c->Get("/?prompt=x");
  ASSERT_TRUE(p);
  EXPECT_EQ(p->status, 200);
  EXPECT_NE(p->get_header_value("Content-Type").find("text/html"), std::string::npos);
  EXPECT_NE(p->body.find("getReader()"), std::string::npos);
  EXPECT_EQ(p->body.find("http://"), std::string::npos) << "the page must not load external resources";
  EXPECT_EQ(p->body.find("https://"), std::string::npos);

  int st = 0;
  PostJson("/v1/completions", R"({"prompt": "the", "max_tokens": 3})", &st);
  EXPECT_EQ(st, 200);
  // Requests are counted once their response is written, which may trail the client's read a little.
  ASSERT_TRUE(WaitForMetrics(*server_, [](const std::string& m) {
    return MetricValue(m, "keel_requests_total{endpoint=\"/v1/completions\",status=\"200\"}") >= 1;
  }));
  auto mt = c->Get("/metrics");
  ASSERT_TRUE(mt);
  EXPECT_EQ(mt->status, 200);
  EXPECT_NE(mt->get_header_value("Content-Type").find("text/plain"), std::string::npos);
  const std::string& t = mt->body;
  for (const char* name : {"# TYPE keel_requests_total counter", "# TYPE keel_prompt_tokens_total counter",
                           "# TYPE keel_generation_tokens_total counter", "# TYPE keel_requests_cancelled_total counter",
                           "# TYPE keel_generation_tokens_per_second gauge", "# TYPE keel_queue_depth gauge",
                           "# TYPE keel_active_slots gauge", "# TYPE keel_time_to_first_token_seconds histogram",
                           "# TYPE keel_request_duration_seconds histogram",
                           "keel_time_to_first_token_seconds_bucket{le=\"+Inf\"}"})
    EXPECT_NE(t.find(name), std::string::npos) << name << "\n" << t;
  EXPECT_GE(MetricValue(t, "keel_requests_total{endpoint=\"/health\",status=\"200\"}"), 1);
  EXPECT_GE(MetricValue(t, "keel_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"), 1);
  EXPECT_GE(MetricValue(t, "keel_generation_tokens_total"), 3);
  EXPECT_GE(MetricValue(t, "keel_prompt_tokens_total"), 3);
  EXPECT_GE(MetricValue(t, "keel_request_duration_seconds_count"), 1);
  EXPECT_EQ(MetricValue(t, "keel_slots"), 4);
}

TEST_F(ServeApi, GreedyCompletionEqualsKeelSample) {
  for (const std::string prompt : {"the quick", "lazy dog 1", "fox"}) {
    int st = 0;
    json j = PostJson("/v1/completions",
                      json{{"prompt", prompt}, {"max_tokens", 15}, {"temperature", 0}, {"return_tokens", true}}.dump(),
                      &st);
    ASSERT_EQ(st, 200) << j.dump();
    EXPECT_EQ(j["object"], "text_completion");
    EXPECT_EQ(j["model"], "tiny");
    EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
    EXPECT_EQ(j["usage"]["prompt_tokens"], prompt.size());
    EXPECT_EQ(j["usage"]["completion_tokens"], 15);
    EXPECT_EQ(j["usage"]["total_tokens"], prompt.size() + 15);
    std::vector<int> want = SampleBytes(prompt, 15, "--temperature 0");
    EXPECT_EQ(Tokens(j), want) << prompt;
    EXPECT_EQ(j["choices"][0]["text"].get<std::string>(), std::string(want.begin(), want.end()));
  }
}

TEST_F(ServeApi, SeededSamplingEqualsKeelSample) {
  int st = 0;
  const std::string body = json{{"prompt", "the quick"}, {"max_tokens", 12}, {"temperature", 0.8}, {"top_k", 40},
                                {"top_p", 0.95}, {"seed", 7}, {"return_tokens", true}}.dump();
  json a = PostJson("/v1/completions", body, &st);
  ASSERT_EQ(st, 200);
  json b = PostJson("/v1/completions", body, &st);
  ASSERT_EQ(st, 200);
  EXPECT_EQ(Tokens(a), Tokens(b)) << "the same seed must reproduce the same completion";
  EXPECT_EQ(Tokens(a), SampleBytes("the quick", 12, "--temperature 0.8 --top-k 40 --top-p 0.95 --seed 7"));
}

TEST_F(ServeApi, TokenPromptAndContextLimit) {
  int st = 0;
  // Prompt as token ids ("the" = 116 104 101); generation stops at the end of the context.
  json j = PostJson("/v1/completions", R"({"prompt": [116, 104, 101], "max_tokens": 1000, "temperature": 0})", &st);
  ASSERT_EQ(st, 200) << j.dump();
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["completion_tokens"], kTinyCtx - 3);
  json k = PostJson("/v1/completions", R"({"prompt": "the", "max_tokens": 1000, "temperature": 0})", &st);
  EXPECT_EQ(j["choices"][0]["text"], k["choices"][0]["text"]);
  // max_tokens 0: nothing generated.
  json z = PostJson("/v1/completions", R"({"prompt": "the", "max_tokens": 0})", &st);
  ASSERT_EQ(st, 200);
  EXPECT_EQ(z["choices"][0]["text"], "");
  EXPECT_EQ(z["usage"]["completion_tokens"], 0);
}

TEST_F(ServeApi, StreamingEqualsNonStreaming) {
  int st = 0;
  json j = PostJson("/v1/completions", R"({"prompt": "the quick", "max_tokens": 20, "temperature": 0})", &st);
  ASSERT_EQ(st, 200);
  SseResult s = PostSse(*server_, "/v1/completions",
                        R"({"prompt": "the quick", "max_tokens": 20, "temperature": 0, "stream": true,
                            "stream_options": {"include_usage": true}})");
  ASSERT_TRUE(s.transport_ok);
  EXPECT_EQ(s.status, 200);
  EXPECT_EQ(s.content_type, "text/event-stream");
  ASSERT_GE(s.events.size(), 3u) << s.raw;
  EXPECT_EQ(s.events.back(), "[DONE]");
  EXPECT_EQ(StreamText(s), j["choices"][0]["text"].get<std::string>());
  // The chunk before the usage chunk carries the finish reason; the usage chunk has no choices.
  json usage = json::parse(s.events[s.events.size() - 2]);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["completion_tokens"], 20);
  json fin = json::parse(s.events[s.events.size() - 3]);
  EXPECT_EQ(fin["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(fin["object"], "text_completion");
  for (size_t i = 0; i + 3 < s.events.size(); ++i)
    EXPECT_TRUE(json::parse(s.events[i])["choices"][0]["finish_reason"].is_null()) << s.events[i];
}

TEST_F(ServeApi, ChatCompletions) {
  int st = 0;
  const std::string msgs = R"([{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "the quick"}]}])";
  json j = PostJson("/v1/chat/completions",
                    R"({"model": "tiny", "max_tokens": 10, "temperature": 0, "messages": )" + msgs + "}", &st);
  ASSERT_EQ(st, 200) << j.dump();
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  const std::string content = j["choices"][0]["message"]["content"];
  // The documented template: "System: ...\nUser: ...\nAssistant:".
  const std::string prompt = "System: Be brief.\nUser: the quick\nAssistant:";
  EXPECT_EQ(j["usage"]["prompt_tokens"], prompt.size());
  std::vector<int> raw = SampleBytes(prompt, 10, "--temperature 0");
  std::string want(raw.begin(), raw.end());
  for (const char* stop : {"\nUser:", "\nSystem:"}) {
    size_t at = want.find(stop);
    if (at != std::string::npos) want.resize(at);
  }
  if (!want.empty() && want[0] == ' ') want.erase(0, 1);
  EXPECT_EQ(content, want);

  SseResult s = PostSse(*server_, "/v1/chat/completions",
                        R"({"max_tokens": 10, "temperature": 0, "stream": true, "messages": )" + msgs + "}");
  ASSERT_TRUE(s.transport_ok);
  ASSERT_GE(s.events.size(), 3u) << s.raw;
  json first = json::parse(s.events[0]);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(s.events.back(), "[DONE]");
  EXPECT_FALSE(json::parse(s.events[s.events.size() - 2])["choices"][0]["finish_reason"].is_null());
  EXPECT_EQ(StreamText(s), content);
}

TEST_F(ServeApi, StopStrings) {
  int st = 0;
  json full = PostJson("/v1/completions", R"({"prompt": "the quick", "max_tokens": 20, "temperature": 0})", &st);
  const std::string text = full["choices"][0]["text"];
  ASSERT_GE(text.size(), 8u);
  // Stop at a substring that first occurs a few bytes in: the text ends right before it.
  const std::string stop = text.substr(4, 2);
  const size_t at = text.find(stop);
  for (bool stream : {false, true}) {
    json req = {{"prompt", "the quick"}, {"max_tokens", 20}, {"temperature", 0}, {"stop", {"zzz", stop}},
                {"stream", stream}};
    std::string got, reason;
    if (stream) {
      SseResult s = PostSse(*server_, "/v1/completions", req.dump());
      got = StreamText(s);
      reason = json::parse(s.events[s.events.size() - 2])["choices"][0]["finish_reason"];
    } else {
      json j = PostJson("/v1/completions", req.dump(), &st);
      got = j["choices"][0]["text"];
      reason = j["choices"][0]["finish_reason"];
    }
    EXPECT_EQ(got, text.substr(0, at)) << "stop '" << stop << "' stream " << stream;
    EXPECT_EQ(reason, "stop");
  }
}

TEST_F(ServeApi, BadRequestsAnswerOpenAiErrors) {
  struct Case {
    const char* path;
    std::string body;
    int status;
    const char* param;
  };
  const std::string c = "/v1/completions", ch = "/v1/chat/completions";
  const std::vector<Case> cases = {
      {c.c_str(), "{\"prompt\": ", 400, ""},
      {c.c_str(), "[1, 2]", 400, ""},
      {c.c_str(), "", 400, ""},
      {c.c_str(), "\xff\xfe{}", 400, ""},
      {c.c_str(), "{}", 400, "prompt"},
      {c.c_str(), R"({"prompt": 5})", 400, "prompt"},
      {c.c_str(), R"({"prompt": ["a", "b"]})", 400, "prompt"},
      {c.c_str(), R"({"prompt": [1, 999999]})", 400, "prompt"},
      {c.c_str(), R"({"prompt": [1, -1]})", 400, "prompt"},
      {c.c_str(), R"({"prompt": ""})", 400, "prompt"},
      {c.c_str(), R"({"prompt": "x", "temperature": "hot"})", 400, "temperature"},
      {c.c_str(), R"({"prompt": "x", "temperature": 2.5})", 400, "temperature"},
      {c.c_str(), R"({"prompt": "x", "temperature": -0.1})", 400, "temperature"},
      {c.c_str(), R"({"prompt": "x", "top_p": 0})", 400, "top_p"},
      {c.c_str(), R"({"prompt": "x", "top_p": 1.5})", 400, "top_p"},
      {c.c_str(), R"({"prompt": "x", "top_k": -1})", 400, "top_k"},
      {c.c_str(), R"({"prompt": "x", "top_k": 2.5})", 400, "top_k"},
      {c.c_str(), R"({"prompt": "x", "max_tokens": -1})", 400, "max_tokens"},
      {c.c_str(), R"({"prompt": "x", "max_tokens": "10"})", 400, "max_tokens"},
      {c.c_str(), R"({"prompt": "x", "max_tokens": 1e30})", 400, "max_tokens"},
      {c.c_str(), R"({"prompt": "x", "stop": 5})", 400, "stop"},
      {c.c_str(), R"({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]})", 400, "stop"},
      {c.c_str(), R"({"prompt": "x", "stop": [""]})", 400, "stop"},
      {c.c_str(), R"({"prompt": "x", "seed": "abc"})", 400, "seed"},
      {c.c_str(), R"({"prompt": "x", "n": 2})", 400, "n"},
      {c.c_str(), R"({"prompt": "x", "stream": "yes"})", 400, "stream"},
      {c.c_str(), R"({"prompt": "x", "model": 3})", 400, "model"},
      {c.c_str(), R"({"prompt": "x", "model": "gpt-4"})", 404, "model"},
      {c.c_str(), R"({"prompt": ")" + std::string(kTinyCtx + 6, 'a') + "\"}", 400, "prompt"},
      {ch.c_str(), R"({"messages": []})", 400, "messages"},
      {ch.c_str(), R"({"messages": "hi"})", 400, "messages"},
      {ch.c_str(), R"({"messages": [{"role": "robot", "content": "hi"}]})", 400, "messages[0].role"},
      {ch.c_str(), R"({"messages": [{"role": "user"}]})", 400, "messages[0].content"},
      {ch.c_str(), R"({"messages": [{"role": "user", "content": 7}]})", 400, "messages[0].content"},
      {ch.c_str(), R"({"messages": [{"role": "user", "content": "x"}], "n": 3})", 400, "n"},
      {ch.c_str(), R"({"messages": [{"role": "user", "content": ")" + std::string(kTinyCtx + 6, 'a') + "\"}]}", 400,
       "messages"},
  };
  for (const auto& k : cases) {
    int st = 0;
    json j = PostJson(k.path, k.body, &st);
    EXPECT_EQ(st, k.status) << k.path << " " << k.body << " -> " << j.dump();
    ExpectError(j, "invalid_request_error", k.param);
  }
  int st = 0;
  json j = PostJson(c, R"({"prompt": ")" + std::string(kTinyCtx + 6, 'a') + "\"}", &st);
  EXPECT_EQ(j["error"]["code"], "context_length_exceeded");
  j = PostJson(c, R"({"prompt": "x", "model": "gpt-4"})", &st);
  EXPECT_EQ(j["error"]["code"], "model_not_found");
  // A token id out of range says so (it used to read "'prompt' must be at most 255").
  j = PostJson(c, R"({"prompt": [1, 999999]})", &st);
  EXPECT_NE(j["error"]["message"].get<std::string>().find("token id 999999 in 'prompt' is outside the vocabulary"),
            std::string::npos) << j.dump();

  // Over --max-body: 413; an unknown route: 404; a wrong method: 405 — all JSON errors.
  auto cli = server_->Client();
  auto big = cli->Post("/v1/completions", "{\"prompt\": \"" + std::string(100000, 'a') + "\"}", "application/json");
  ASSERT_TRUE(big);
  EXPECT_EQ(big->status, 413);
  ExpectError(json::parse(big->body), "invalid_request_error");
  auto nf = cli->Get("/v1/nothing");
  ASSERT_TRUE(nf);
  EXPECT_EQ(nf->status, 404);
  ExpectError(json::parse(nf->body), "invalid_request_error");
  auto wm = cli->Get("/v1/completions");
  ASSERT_TRUE(wm);
  EXPECT_EQ(wm->status, 405);
  ExpectError(json::parse(wm->body), "invalid_request_error");

  // The server is still healthy and serving.
  json ok = PostJson(c, R"({"prompt": "x", "max_tokens": 2})", &st);
  EXPECT_EQ(st, 200) << ok.dump();
  auto h = cli->Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
}

// --max-body holds for every body: httplib limits only Content-Length bodies, so a chunked or unframed body is
// refused (411) and a compressed one (415) before it is read, and the connection closes after the answer (the
// unread body must not be parsed as the next request). A wrong method on a known path is a 405 with Allow.
TEST_F(ServeApi, BodyFramingAndMethods) {
  const std::string json_body = R"({"prompt": "x", "max_tokens": 2})";
  struct Case {
    std::string name, request;
    int status;
    std::string code;
  };
  const std::string big_chunk(100000, 'a');
  char size_hex[16];
  std::snprintf(size_hex, sizeof size_hex, "%zx", big_chunk.size());
  const std::vector<Case> cases = {
      {"chunked", "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n" + [&] {
                    char h[16];
                    std::snprintf(h, sizeof h, "%zx", json_body.size());
                    return std::string(h);
                  }() + "\r\n" + json_body + "\r\n0\r\n\r\n",
       411, "length_required"},
      // A chunk over the limit that never ends: answered at once, nothing of it read.
      {"endless chunked", "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
                              std::string(size_hex) + "\r\n" + big_chunk,
       411, "length_required"},
      {"gzip", "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\n"
               "\x1f\x8b\x08\x00",
       415, "unsupported_media_type"},
      {"no length", "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + json_body, 411,
       "length_required"},
      {"PUT", "PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + std::to_string(json_body.size()) +
                  "\r\n\r\n" + json_body,
       405, "method_not_allowed"},
      {"POST /health", "POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405,
       "method_not_allowed"},
      {"DELETE /v1/models", "DELETE /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405,
       "method_not_allowed"},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    bool closed = false;
    const std::string resp = RawHttp(server_->port(), k.request, &closed);
    ASSERT_EQ(resp.rfind("HTTP/1.1 " + std::to_string(k.status) + " ", 0), 0u) << resp;
    EXPECT_TRUE(closed) << "the connection stayed open: " << resp;
    const size_t body_at = resp.find("\r\n\r\n");
    ASSERT_NE(body_at, std::string::npos) << resp;
    const json j = json::parse(resp.substr(body_at + 4), nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << resp;
    ExpectError(j, "invalid_request_error");
    EXPECT_EQ(j["error"]["code"], k.code) << resp;
    if (k.status == 405) {
      EXPECT_NE(resp.find("Allow: "), std::string::npos) << resp;
    }
  }
  // HEAD on a GET route is fine; the server still serves.
  auto h = server_->Client()->Head("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  int st = 0;
  json ok = PostJson("/v1/completions", json_body, &st);
  EXPECT_EQ(st, 200) << ok.dump();
}

TEST(ServeAuth, ApiKeyRequiredOnV1) {
  ServerProcess s;
  ASSERT_TRUE(s.Start("--api-key sekrit")) << s.log();
  auto c = s.Client();
  const std::string body = R"({"prompt": "the", "max_tokens": 2})";
  for (const httplib::Headers& h : {httplib::Headers{}, httplib::Headers{{"Authorization", "Bearer wrong"}},
                                    httplib::Headers{{"Authorization", "sekrit"}},
                                    httplib::Headers{{"Authorization", "Bearer sekrit2"}}}) {
    auto r = c->Post("/v1/completions", h, body, "application/json");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 401);
    json j = json::parse(r->body);
    EXPECT_EQ(j["error"]["type"], "authentication_error");
    EXPECT_EQ(j["error"]["code"], "invalid_api_key");
  }
  auto m = c->Get("/v1/models");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->status, 401);
  // The scheme name is case-insensitive; the key is not.
  for (const char* auth : {"Bearer sekrit", "bearer sekrit", "BEARER sekrit"}) {
    auto ok = c->Post("/v1/completions", {{"Authorization", auth}}, body, "application/json");
    ASSERT_TRUE(ok);
    EXPECT_EQ(ok->status, 200) << auth << ": " << ok->body;
  }
  auto wrong_case = c->Post("/v1/completions", {{"Authorization", "Bearer SEKRIT"}}, body, "application/json");
  ASSERT_TRUE(wrong_case);
  EXPECT_EQ(wrong_case->status, 401);
  auto h = c->Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  s.Signal(SIGTERM);
  EXPECT_EQ(s.Wait(std::chrono::seconds(20)), 0) << s.log();
}

// A device that fails (injected: the engine's device check reports an error from step 3 on) fails the request in
// flight with 503 device_failed, turns /health to 503 "failed", and the server exits non-zero by itself, so that
// a supervisor restarts it. It used to answer 500 "no finite logit" to every request for ever, healthy.
TEST(ServeCli, ADeviceFailureMakesTheServerUnhealthyAndExit) {
  ServerProcess s;
  ASSERT_TRUE(s.Start("--inject device-fail:step=3 --debug-step-delay-ms 50", TinyModelDir(),
                      "KEEL_ALLOW_FAULT_INJECTION=1"))
      << s.log();
  auto c = s.Client();
  auto h0 = c->Get("/health");
  ASSERT_TRUE(h0);
  EXPECT_EQ(h0->status, 200);
  auto r = c->Post("/v1/completions", R"({"prompt": "the", "max_tokens": 20})", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 503) << r->body;
  EXPECT_EQ(json::parse(r->body)["error"]["code"], "device_failed") << r->body;
  EXPECT_NE(r->body.find("injected device failure"), std::string::npos) << r->body;
  // /health says failed until the server is gone (it may already be gone: then the request fails).
  if (auto h = s.Client()->Get("/health"); h) {
    EXPECT_EQ(h->status, 503) << h->body;
    EXPECT_EQ(json::parse(h->body)["status"], "failed") << h->body;
  }
  EXPECT_EQ(s.Wait(std::chrono::seconds(30)), 1) << s.log();
  EXPECT_NE(s.log().find("the model's device failed"), std::string::npos) << s.log();
}

TEST(ServeCli, ServesItsGgufExport) {
  TempDir d;
  auto e = RunKeel("export " + TinyModelDir() + " --format gguf --out " + d / "tiny.gguf");
  ASSERT_EQ(e.exit_code, 0) << e.output;
  ServerProcess s;
  ASSERT_TRUE(s.Start("", d / "tiny.gguf")) << s.log();
  auto m = s.Client()->Get("/v1/models");
  ASSERT_TRUE(m);
  EXPECT_EQ(json::parse(m->body)["data"][0]["id"], "tiny");
  auto r = s.Client()->Post("/v1/completions",
                            R"({"prompt": "the quick", "max_tokens": 12, "temperature": 0, "return_tokens": true})",
                            "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json j = json::parse(r->body);
  std::vector<int> got;
  for (const auto& t : j["choices"][0]["tokens"]) got.push_back(t.get<int>());
  EXPECT_EQ(got, SampleBytes("the quick", 12, "--temperature 0"));
}

TEST(ServeCli, BadArgumentsFailWithOneLine) {
  auto r = RunKeel("serve /nonexistent/run --port 0");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("keel serve: error:"), std::string::npos) << r.output;
  // (--port 0 and a timeout: were the value accepted, the server would run, not hang the test on port 8080.)
  r = RunCommand("timeout 20 " + std::string(KEEL_BINARY) + " serve " + TinyModelDir() + " --port 0 --ctx 999");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("--ctx"), std::string::npos) << r.output;
  r = RunCommand("timeout 20 " + std::string(KEEL_BINARY) + " serve " + TinyModelDir() + " --port 0 --parallel 0");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("--parallel must be in"), std::string::npos) << r.output;
  // Values that would overflow the server's sums, or a queue longer than its HTTP threads could hold.
  for (const std::string& bad : {std::string("--queue 2147483647"), std::string("--queue 1010"),
                                 std::string("--prefill-chunk 2147483647"), std::string("--drain-timeout inf"),
                                 std::string("--parallel 100000"), std::string("--threads 100000"),
                                 std::string("--api-key ''"), std::string("--ctx 1"), std::string("--ctx -1")}) {
    // (timeout: were the value accepted, the server would run.)
    r = RunCommand("timeout 20 " + std::string(KEEL_BINARY) + " serve " + TinyModelDir() + " --port 0 " + bad);
    EXPECT_EQ(r.exit_code, 1) << bad << ": " << r.output;
    EXPECT_NE(r.output.find(bad.substr(0, bad.find(' '))), std::string::npos) << bad << ": " << r.output;
    EXPECT_EQ(r.output.find('\n'), r.output.size() - 1) << bad << ": one line, got: " << r.output;
  }
  // Binding a port that is in use fails cleanly.
  ServerProcess a;
  ASSERT_TRUE(a.Start("")) << a.log();
  r = RunCommand("timeout 20 " + std::string(KEEL_BINARY) + " serve " + TinyModelDir() + " --port " +
                 std::to_string(a.port()));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("cannot bind"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace keel::testing
