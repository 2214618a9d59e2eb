// serve_test_util.h: helpers for the `keel serve` tests — a tiny trained model, a server child process on a free
// port, and small HTTP/SSE client helpers over cpp-httplib.
#pragma once
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "test_util.h"

namespace keel::testing {

using nlohmann::json;

inline std::string ReadFileText(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The test model's context (positions for prompt and completion together).
inline constexpr int kTinyCtx = 64;

// Trains the test model once per process: byte tokenizer, 1 layer, 2 heads, dim 16, ctx 64. Trained long enough
// (40 steps at lr 0.01, well under a second) that greedy output is plain ASCII ("the on on oon ...").
inline const std::string& TinyModelDir() {
  static TempDir* dir = new TempDir();  // lives for the whole test process
  static std::string run = [] {
    std::string corpus;
    for (int i = 1; i <= 2000; ++i) corpus += "the quick brown fox jumps over the lazy dog " + std::to_string(i) + "\n";
    WriteText(*dir / "corpus.txt", corpus);
    auto p = RunKeel("prepare --input " + *dir / "corpus.txt" + " --out " + *dir / "data" + " --tokenizer byte");
    EXPECT_EQ(p.exit_code, 0) << p.output;
    auto t = RunKeel("train --data " + *dir / "data" + " --out " + *dir / "run" +
                     " --layers 1 --heads 2 --dim 16 --ctx 64 --steps 40 --lr 0.01 --warmup 0 --batch 8"
                     " --threads 1 --no-progress --eval-every 0");
    EXPECT_EQ(t.exit_code, 0) << t.output;
    return *dir / "run";
  }();
  return run;
}

// Sends raw bytes to 127.0.0.1:port and reads the answer until the server closes the connection, or until
// `timeout` (then *closed is false). For requests httplib's client cannot send: chunked or compressed bodies,
// odd methods.
inline std::string RawHttp(int port, const std::string& request, bool* closed,
                           std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
  *closed = false;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  std::string out;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    char buf[4096];
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      ssize_t n = read(fd, buf, sizeof buf);
      if (n <= 0) {
        *closed = true;
        break;
      }
      out.append(buf, static_cast<size_t>(n));
    }
  }
  close(fd);
  return out;
}

// A `keel serve` child process. Start() waits for its "listening on" line and parses the port.
class ServerProcess {
 public:
  ServerProcess() = default;
  ServerProcess(const ServerProcess&) = delete;
  ~ServerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  // args: extra flags after `serve MODEL --port 0 --threads 1`.
  // env: "NAME=value ..." set for the server (through env(1)).
  bool Start(const std::string& args, const std::string& model = TinyModelDir(), const std::string& env = "") {
    log_ = dir_ / "serve.log";
    std::string cmd = std::string("exec ") + (env.empty() ? "" : "env " + env + " ") + KEEL_BINARY + " serve " +
                      model + " --port 0 --threads 1 " + args + " > " + log_ + " 2>&1";
    pid_ = fork();
    if (pid_ == 0) {
      execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    const std::regex re("listening on http://[^:]+:([0-9]+)");
    for (int i = 0; i < 400; ++i) {
      std::smatch m;
      std::string text = ReadFileText(log_);
      if (std::regex_search(text, m, re)) {
        port_ = std::stoi(m[1]);
        return true;
      }
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  std::string log() const { return ReadFileText(log_); }

  void Signal(int sig) {
    if (pid_ > 0) kill(pid_, sig);
  }
  // Waits up to timeout for the process to exit; returns its exit code (or -1 on timeout, 128+sig if killed).
  int Wait(std::chrono::milliseconds timeout) {
    auto end = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < end) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        if (WIFEXITED(status)) return WEXITSTATUS(status);
        if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
        return -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }

  std::unique_ptr<httplib::Client> Client() const {
    auto c = std::make_unique<httplib::Client>("127.0.0.1", port_);
    c->set_read_timeout(30, 0);
    c->set_connection_timeout(5, 0);
    return c;
  }

 private:
  TempDir dir_;
  std::string log_;
  pid_t pid_ = -1;
  int port_ = -1;
};

struct SseResult {
  int status = -1;
  std::string content_type;
  std::vector<std::string> events;  // the payload of each "data: " line, in order
  std::string raw;
  bool transport_ok = false;
};

// POSTs body and collects the server-sent events. stop_after > 0: the receiver aborts (closing the connection)
// once that many events arrived.
inline SseResult PostSse(const ServerProcess& s, const std::string& path, const std::string& body,
                         int stop_after = 0, const httplib::Headers& headers = {}) {
  SseResult out;
  auto cli = s.Client();
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.headers = headers;
  req.body = body;
  req.set_header("Content-Type", "application/json");
  std::string buf;
  req.response_handler = [&](const httplib::Response& r) {
    out.status = r.status;
    out.content_type = r.get_header_value("Content-Type");
    return true;
  };
  req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
    out.raw.append(data, len);
    buf.append(data, len);
    size_t i;
    while ((i = buf.find("\n\n")) != std::string::npos) {
      std::string ev = buf.substr(0, i);
      buf.erase(0, i + 2);
      if (ev.rfind("data: ", 0) == 0) out.events.push_back(ev.substr(6));
    }
    return !(stop_after > 0 && static_cast<int>(out.events.size()) >= stop_after);
  };
  auto res = cli->send(req);
  out.transport_ok = static_cast<bool>(res);
  if (res && out.status < 0) out.status = res->status;
  return out;
}

// The text of a streamed completion/chat (choices[0].text or delta.content concatenated).
inline std::string StreamText(const SseResult& r) {
  std::string text;
  for (const auto& e : r.events) {
    if (e == "[DONE]") continue;
    json j = json::parse(e, nullptr, false);
    if (j.is_discarded() || !j.contains("choices") || j["choices"].empty()) continue;
    const json& c = j["choices"][0];
    if (c.contains("text") && c["text"].is_string()) text += c["text"].get<std::string>();
    if (c.contains("delta") && c["delta"].contains("content")) text += c["delta"]["content"].get<std::string>();
  }
  return text;
}

// One sample of a Prometheus metric by its full name with labels, e.g. "keel_active_slots" or
// "keel_requests_total{endpoint=\"/health\",status=\"200\"}"; -1 when absent.
inline double MetricValue(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name + " ", 0) == 0) return std::stod(line.substr(name.size() + 1));
  }
  return -1;
}

inline std::string Metrics(const ServerProcess& s) {
  auto r = s.Client()->Get("/metrics");
  return r ? r->body : "";
}

// Polls the metrics until pred(text) holds or the timeout passes.
template <typename Pred>
bool WaitForMetrics(const ServerProcess& s, Pred pred, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (pred(Metrics(s))) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

// The token ids `keel sample` generates for a prompt (byte tokenizer: the bytes of its output after the prompt,
// before the trailing newline). extra: sampling flags (e.g. "--temperature 0").
inline std::vector<int> SampleBytes(const std::string& prompt, int n, const std::string& extra) {
  // stdout only: RunCommand appends 2>&1, so stderr is discarded inside a group.
  auto r = RunCommand(std::string("{ ") + KEEL_BINARY + " sample --ckpt " + TinyModelDir() + " --prompt '" + prompt +
                      "' -n " + std::to_string(n) + " --threads 1 " + extra + " 2>/dev/null; }");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  std::vector<int> out;
  if (r.output.rfind(prompt, 0) != 0 || r.output.empty() || r.output.back() != '\n') {
    ADD_FAILURE() << "unexpected keel sample output: " << r.output;
    return out;
  }
  for (size_t i = prompt.size(); i + 1 < r.output.size(); ++i) out.push_back(static_cast<unsigned char>(r.output[i]));
  return out;
}

}  // namespace keel::testing
