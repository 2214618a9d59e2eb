// serve_page_test.cc: the page at / in headless Chromium — opened with ?autorun=1, it streams a completion from
// /v1/completions (fetch + ReadableStream) into the DOM. The test talks to Chromium over --remote-debugging-pipe
// (the DevTools protocol: NUL-terminated JSON messages on fds 3 and 4) and polls the DOM while the completion
// streams, so it sees the text grow piece by piece, then checks the final text against the API's.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <poll.h>

#include <filesystem>
#include <set>

#include "serve_test_util.h"

namespace keel::testing {
namespace {

constexpr char kChromium[] = "/usr/bin/chromium";

// A headless Chromium driven through the DevTools protocol on a pipe.
class Chromium {
 public:
  bool Start(const std::string& profile_dir) {
    int to[2], from[2];
    if (pipe(to) != 0 || pipe(from) != 0) return false;
    pid_ = fork();
    if (pid_ == 0) {
      // fds 3 and 4 must be the pipe ends; move them out of the way first.
      int in = fcntl(to[0], F_DUPFD, 10), out = fcntl(from[1], F_DUPFD, 10);
      dup2(in, 3);
      dup2(out, 4);
      int devnull = open("/dev/null", O_RDWR);
      dup2(devnull, 0);
      dup2(devnull, 1);
      dup2(devnull, 2);
      for (int fd = 5; fd < 1024; ++fd) close(fd);
      const std::string udd = "--user-data-dir=" + profile_dir;
      execl(kChromium, kChromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--remote-debugging-pipe", udd.c_str(), "about:blank",
            static_cast<char*>(nullptr));
      _exit(127);
    }
    close(to[0]);
    close(from[1]);
    wfd_ = to[1];
    rfd_ = from[0];
    return pid_ > 0;
  }
  ~Chromium() {
    if (pid_ > 0) {
      Call("Browser.close", json::object(), "", std::chrono::seconds(5));
      for (int i = 0; i < 100; ++i) {
        if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
          pid_ = -1;
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      if (pid_ > 0) {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
      }
    }
    if (wfd_ >= 0) close(wfd_);
    if (rfd_ >= 0) close(rfd_);
  }

  // Sends a command and returns its "result" (or a null json on error/timeout; *error gets the reason).
  json Call(const std::string& method, const json& params, const std::string& session = "",
            std::chrono::milliseconds timeout = std::chrono::seconds(30), std::string* error = nullptr) {
    const int id = ++next_id_;
    json msg = {{"id", id}, {"method", method}, {"params", params}};
    if (!session.empty()) msg["sessionId"] = session;
    std::string wire = msg.dump();
    wire.push_back('\0');
    if (write(wfd_, wire.data(), wire.size()) != static_cast<ssize_t>(wire.size())) {
      if (error) *error = "write to chromium failed";
      return json();
    }
    const auto end = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      size_t nul;
      while ((nul = buf_.find('\0')) != std::string::npos) {
        json m = json::parse(buf_.substr(0, nul), nullptr, false);
        buf_.erase(0, nul + 1);
        if (m.is_object() && m.contains("id") && m["id"] == id) {
          if (m.contains("error")) {
            if (error) *error = m["error"].dump();
            return json();
          }
          return m["result"];
        }
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
      if (left.count() <= 0) break;
      pollfd p{rfd_, POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
      char tmp[65536];
      ssize_t n = read(rfd_, tmp, sizeof tmp);
      if (n <= 0) break;
      buf_.append(tmp, static_cast<size_t>(n));
    }
    if (error) *error = "no answer from chromium to " + method;
    return json();
  }

 private:
  pid_t pid_ = -1;
  int wfd_ = -1, rfd_ = -1;
  int next_id_ = 0;
  std::string buf_;
};

TEST(ServePage, StreamsIntoTheDomInHeadlessChromium) {
  if (!std::filesystem::exists(kChromium))
    KEEL_SKIP_UNLESS_REQUIRED(std::string(kChromium) + " is not installed (scripts/setup installs the chromium package)");
  ServerProcess s;
  // A delay per step so the completion streams over about a second, in many events.
  ASSERT_TRUE(s.Start("--parallel 2 --debug-step-delay-ms 40")) << s.log();
  auto api = s.Client()->Post("/v1/completions", R"({"prompt": "the quick", "max_tokens": 24, "temperature": 0})",
                              "application/json");
  ASSERT_TRUE(api);
  ASSERT_EQ(api->status, 200);
  const std::string want = json::parse(api->body)["choices"][0]["text"];
  ASSERT_GE(want.size(), 10u);

  TempDir profile;
  Chromium chrome;
  ASSERT_TRUE(chrome.Start(profile.path()));
  std::string err;
  json target = chrome.Call("Target.createTarget",
                            {{"url", "http://127.0.0.1:" + std::to_string(s.port()) +
                                         "/?prompt=the%20quick&temperature=0&top_k=0&top_p=1&max_tokens=24"
                                         "&autorun=1"}},
                            "", std::chrono::seconds(40), &err);
  ASSERT_TRUE(target.contains("targetId")) << err;
  json attached = chrome.Call("Target.attachToTarget", {{"targetId", target["targetId"]}, {"flatten", true}}, "",
                              std::chrono::seconds(30), &err);
  ASSERT_TRUE(attached.contains("sessionId")) << err;
  const std::string session = attached["sessionId"];

  const std::string probe =
      "JSON.stringify((() => { const g = document.getElementById('generated'), st = document.getElementById('status');"
      " return g && st ? {state: st.dataset.state, status: st.textContent, text: g.textContent,"
      " echo: document.getElementById('prompt_echo').textContent} : {state: 'loading'}; })())";
  json state;
  std::set<size_t> lengths_seen;
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(40);
  while (std::chrono::steady_clock::now() < end) {
    json r = chrome.Call("Runtime.evaluate", {{"expression", probe}, {"returnByValue", true}}, session,
                         std::chrono::seconds(10), &err);
    if (r.contains("result") && r["result"].contains("value")) {
      state = json::parse(r["result"]["value"].get<std::string>(), nullptr, false);
      if (state.is_object() && state.contains("text")) lengths_seen.insert(state["text"].get<std::string>().size());
      if (state.is_object() && state["state"] != "loading" && state["state"] != "idle" && state["state"] != "running")
        break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(15));
  }
  ASSERT_TRUE(state.is_object()) << err;
  EXPECT_EQ(state["state"], "done") << state.dump();
  EXPECT_EQ(state["text"], want);
  EXPECT_EQ(state["echo"], "the quick");
  // The DOM showed partial text on the way: the completion streamed in, it did not arrive as one body.
  size_t partial = 0;
  for (size_t n : lengths_seen)
    if (n > 0 && n < want.size()) ++partial;
  EXPECT_GE(partial, 2u) << "text lengths seen while streaming: " << ::testing::PrintToString(lengths_seen);
  std::string m = Metrics(s);
  EXPECT_EQ(MetricValue(m, "keel_requests_total{endpoint=\"/\",status=\"200\"}"), 1) << m;
}

// With --api-key, the page needs the key for /v1/models too: once one is typed, the model's name appears (without
// it the name stayed empty), and the Generate button streams a completion with the default settings.
TEST(ServePage, ApiKeyTypedIntoThePageIsSentToo) {
  if (!std::filesystem::exists(kChromium))
    KEEL_SKIP_UNLESS_REQUIRED(std::string(kChromium) + " is not installed (scripts/setup installs the chromium package)");
  ServerProcess s;
  ASSERT_TRUE(s.Start("--api-key sesame")) << s.log();
  auto models = s.Client()->Get("/v1/models", httplib::Headers{{"Authorization", "Bearer sesame"}});
  ASSERT_TRUE(models);
  ASSERT_EQ(models->status, 200);
  const std::string name = json::parse(models->body)["data"][0]["id"];
  TempDir profile;
  Chromium chrome;
  ASSERT_TRUE(chrome.Start(profile.path()));
  std::string err;
  json target = chrome.Call("Target.createTarget",
                            {{"url", "http://127.0.0.1:" + std::to_string(s.port()) + "/?prompt=the&max_tokens=4"}},
                            "", std::chrono::seconds(40), &err);
  ASSERT_TRUE(target.contains("targetId")) << err;
  json attached = chrome.Call("Target.attachToTarget", {{"targetId", target["targetId"]}, {"flatten", true}}, "",
                              std::chrono::seconds(30), &err);
  ASSERT_TRUE(attached.contains("sessionId")) << err;
  const std::string session = attached["sessionId"];
  auto eval = [&](const std::string& js) -> std::string {
    json r = chrome.Call("Runtime.evaluate", {{"expression", js}, {"returnByValue", true}}, session,
                         std::chrono::seconds(10), &err);
    // A failed call (a DevTools timeout) is not the empty string the checks below expect for "nothing".
    return r.contains("result") && r["result"].contains("value") && r["result"]["value"].is_string()
               ? r["result"]["value"].get<std::string>()
               : "<eval failed: " + err + ">";
  };
  const std::string model_js = "(() => { const m = document.getElementById('model'); return m ? m.textContent : ''; })()";
  auto wait_for = [&](const std::string& js, const std::string& want) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    std::string got;
    while (std::chrono::steady_clock::now() < end && (got = eval(js)) != want)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return got;
  };
  // Loaded, no key yet: the page's first /v1/models got 401, so no name.
  ASSERT_EQ(wait_for("document.readyState", "complete"), "complete");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(eval(model_js), "");
  // Typing the key (retried: on a loaded machine one DevTools call can time out, and a lost call used to leave
  // the page without a key, failing both checks below).
  ASSERT_EQ(wait_for("(() => { const k = document.getElementById('api_key'); if (k.value !== 'sesame') {"
                     " k.value = 'sesame'; k.dispatchEvent(new Event('change')); } return k.value; })()",
                     "sesame"),
            "sesame");
  EXPECT_EQ(wait_for(model_js, name), name);
  // The form as served is valid, so the Generate button submits it (top_p's default 0.95 used to be off its
  // input's step grid, and the browser refused to submit).
  EXPECT_EQ(eval("Array.from(document.querySelectorAll('input')).filter(e => !e.checkValidity())"
                 ".map(e => e.id + '=' + e.value).join(',')"),
            "");
  eval("(() => { document.getElementById('run').click(); return 'ok'; })()");  // the Generate button
  EXPECT_EQ(wait_for("(() => { const st = document.getElementById('status'); return st ? st.dataset.state : ''; })()",
                     "done"),
            "done");
}

}  // namespace
}  // namespace keel::testing
