// dist_test_util.h: helpers for the distributed tests — a throwaway redis-server on a free loopback port, and
// background processes (the keel binary) that a test can signal and wait for with a deadline.
#pragma once
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/status.h"
#include "test_util.h"

namespace keel::testing {

// The value of a Result (a test failure and a default value when it holds an error).
template <typename T>
T Must(Result<T> r) {
  if (!r.ok()) {
    ADD_FAILURE() << r.status().message();
    return T{};
  }
  return std::move(r).value();
}

// A TCP port on 127.0.0.1 that was free a moment ago.
inline int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  int port = ntohs(a.sin_port);
  close(fd);
  return port;
}

inline std::string ReadFileText(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The JSON objects of a JSONL file (events.jsonl, metrics.jsonl); lines that do not parse are skipped.
inline std::vector<nlohmann::json> JsonLines(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::string text = ReadFileText(path);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    auto j = nlohmann::json::parse(text.substr(pos, nl - pos), nullptr, false);
    if (j.is_object()) out.push_back(j);
    pos = nl + 1;
  }
  return out;
}

inline bool HaveRedis() { return RunCommand("command -v redis-server && command -v redis-cli").exit_code == 0; }

// redis-server on a free loopback port, no persistence; stopped (shutdown nosave) on destruction.
class RedisServer {
 public:
  explicit RedisServer(const std::string& password = "") : password_(password) {
    for (int attempt = 0; attempt < 3 && !ok_; ++attempt) {
      port_ = FreePort();
      std::string cmd = "redis-server --port " + std::to_string(port_) + " --bind 127.0.0.1 --save '' " +
                        "--appendonly no --daemonize yes --dir " + dir_.path() + " --logfile " + (dir_ / "log") +
                        " --pidfile " + (dir_ / "pid");
      if (!password.empty()) cmd += " --requirepass " + password;
      if (RunCommand(cmd).exit_code != 0) continue;
      for (int i = 0; i < 100; ++i) {
        auto r = RunCommand(Cli() + " ping");
        if (r.output.find("PONG") != std::string::npos) {
          ok_ = true;
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
      }
    }
  }
  ~RedisServer() {
    if (ok_) RunCommand(Cli() + " shutdown nosave");
  }
  bool ok() const { return ok_; }
  int port() const { return port_; }
  std::string Cli() const {
    return "redis-cli -p " + std::to_string(port_) + (password_.empty() ? "" : " --no-auth-warning -a " + password_);
  }
  std::string Url(const std::string& job) const {
    return "redis://" + (password_.empty() ? "" : ":" + password_ + "@") + "127.0.0.1:" + std::to_string(port_) +
           "/" + job;
  }

 private:
  TempDir dir_;
  std::string password_;
  int port_ = 0;
  bool ok_ = false;
};

// A child process running `keel ARGS...` with stdout+stderr to a file.
class Background {
 public:
  Background(const std::vector<std::string>& args, const std::string& log_path,
             const std::vector<std::string>& env = {})
      : log_(log_path) {
    std::vector<std::string> argv_s = {KEEL_BINARY};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    pid_ = fork();
    if (pid_ == 0) {
      int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      for (const auto& e : env) putenv(const_cast<char*>(e.c_str()));
      std::vector<char*> argv;
      for (auto& a : argv_s) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
  }
  ~Background() {
    if (pid_ > 0 && !done_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  pid_t pid() const { return pid_; }
  // The exit code (128 + signal when killed), or -1 if still running after timeout_s.
  int Wait(double timeout_s) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    while (!done_) {
      int st = 0;
      pid_t r = waitpid(pid_, &st, WNOHANG);
      if (r == pid_) {
        done_ = true;
        code_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        break;
      }
      if (std::chrono::steady_clock::now() > deadline) return -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return code_;
  }
  std::string Output() const { return ReadFileText(log_); }

 private:
  std::string log_;
  pid_t pid_ = -1;
  bool done_ = false;
  int code_ = -1;
};

// Two files that must be byte for byte the same, and exist (two missing files read as equal empty strings).
inline void ExpectSameFile(const std::string& a, const std::string& b, const std::string& context = "") {
  const std::string x = ReadFileText(a), y = ReadFileText(b);
  EXPECT_FALSE(x.empty()) << a << " is missing or empty\n" << context;
  EXPECT_FALSE(y.empty()) << b << " is missing or empty\n" << context;
  EXPECT_TRUE(x == y) << a << " differs from " << b << "\n" << context;
}

// Polls pred every 20 ms until it holds or timeout_s passes.
template <typename Pred>
bool WaitUntil(Pred pred, double timeout_s) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return pred();
}

}  // namespace keel::testing
