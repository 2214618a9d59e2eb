// dist_gloo_test.cc: the Gloo communicator on loopback — every collective for 2-4 members (threads as
// members), sticky errors, timeouts, Abort() from another thread, a SIGKILLed member process, forming a group
// that someone never joins, a bad bind address, and a new generation after a failure.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <functional>
#include <thread>

#include "dist/gloo_communicator.h"
#include "dist/store.h"
#include "dist_test_util.h"

namespace keel::testing {
namespace {

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

GlooOptions Loopback(double timeout_s) {
  GlooOptions g;
  g.hostname = "127.0.0.1";
  g.timeout_s = timeout_s;
  return g;
}

// Runs body(rank, comm) on `size` threads, each with its own communicator of generation `gen`.
void RunGroup(std::shared_ptr<Store> store, int size, double timeout_s,
              const std::function<void(int, Communicator*)>& body, const std::string& gen = "gen/0") {
  std::vector<std::thread> th;
  for (int r = 0; r < size; ++r)
    th.emplace_back([&, r] {
      auto c = ConnectGlooCommunicator(MakePrefixStore(store, gen), r, size, Loopback(timeout_s));
      ASSERT_TRUE(c.ok()) << c.status().message();
      EXPECT_EQ((*c)->rank(), r);
      EXPECT_EQ((*c)->size(), size);
      body(r, c->get());
    });
  for (auto& t : th) t.join();
}

class GlooCollectives : public ::testing::TestWithParam<int> {};

TEST_P(GlooCollectives, AllOpsAreCorrect) {
  const int size = GetParam();
  TempDir t;
  auto store = Must(OpenFileStore(t / "job"));
  RunGroup(store, size, 20, [&](int r, Communicator* c) {
    // int64 sum, exact on large values (the trainer's fixed-point gradients), including a multi-chunk buffer.
    const size_t n = 300000;
    std::vector<int64_t> a(n);
    for (size_t i = 0; i < n; ++i) a[i] = (int64_t{1} << 40) * (r + 1) + static_cast<int64_t>(i) - 7 * r;
    ASSERT_TRUE(c->AllreduceSum(a.data(), n).ok());
    const int64_t s = size * (size + 1) / 2;
    for (size_t i = 0; i < n; i += 9973)
      ASSERT_EQ(a[i], (int64_t{1} << 40) * s + size * static_cast<int64_t>(i) - 7 * (size * (size - 1) / 2));

    std::vector<float> f = {1.0f * r, 2.5f, -1.0f};
    ASSERT_TRUE(c->AllreduceSum(f.data(), f.size()).ok());
    EXPECT_EQ(f[0], static_cast<float>(size * (size - 1) / 2));
    EXPECT_EQ(f[1], 2.5f * size);
    EXPECT_EQ(f[2], -1.0f * size);

    double d[2] = {0.25 * r, 1.0};
    ASSERT_TRUE(c->AllreduceSum(d, 2).ok());
    EXPECT_EQ(d[0], 0.25 * size * (size - 1) / 2);
    EXPECT_EQ(d[1], size);

    double m[3] = {static_cast<double>(r), -static_cast<double>(r), r == 1 ? 1e300 : 0.0};
    ASSERT_TRUE(c->AllreduceMax(m, 3).ok());
    EXPECT_EQ(m[0], size - 1);
    EXPECT_EQ(m[1], 0);
    EXPECT_EQ(m[2], size > 1 ? 1e300 : 0.0);

    const int root = size - 1;
    std::string msg = r == root ? "hello from the root!" : std::string(20, '?');
    ASSERT_TRUE(c->Broadcast(msg.data(), msg.size(), root).ok());
    EXPECT_EQ(msg, "hello from the root!");

    uint64_t mine = 1000 + r;
    std::vector<uint64_t> all(size);
    ASSERT_TRUE(c->Allgather(&mine, all.data(), sizeof(mine)).ok());
    for (int i = 0; i < size; ++i) EXPECT_EQ(all[i], 1000u + i);

    ASSERT_TRUE(c->Barrier().ok());
    ASSERT_TRUE(c->AllreduceSum(static_cast<int64_t*>(nullptr), 0).ok());
    ASSERT_TRUE(c->Broadcast(nullptr, 0, 0).ok());
    EXPECT_FALSE(c->Broadcast(msg.data(), 1, size).ok());  // bad root: an argument error
  });
}

INSTANTIATE_TEST_SUITE_P(Sizes, GlooCollectives, ::testing::Values(1, 2, 3, 4));

TEST(Gloo, TimeoutIsBoundedAndSticky) {
  TempDir t;
  auto store = Must(OpenFileStore(t / "job"));
  RunGroup(store, 2, 1.0, [&](int r, Communicator* c) {
    if (r == 1) {  // never joins the allreduce; waits until rank 0 gave up (with room for a loaded machine)
      std::this_thread::sleep_for(std::chrono::milliseconds(4000));
      return;
    }
    int64_t x = 1;
    auto t0 = std::chrono::steady_clock::now();
    Status s = c->AllreduceSum(&x, 1);
    EXPECT_EQ(s.code(), Code::kTimeout) << s.message();
    EXPECT_NE(s.message().find("--comm-timeout"), std::string::npos) << s.message();
    EXPECT_LT(Since(t0), 3.5);
    EXPECT_GT(Since(t0), 0.5);
    t0 = std::chrono::steady_clock::now();
    EXPECT_FALSE(c->Barrier().ok());  // sticky: fails at once, not after another 1 s timeout
    // Bounds with room for a loaded 2-core machine (this binary failed once under ctest -j2, not reproduced in 20
    // runs; 0.1 s here and 2.5 s above were the tightest bounds in it): still far from a second timeout.
    EXPECT_LT(Since(t0), 0.5);
  });
}

TEST(Gloo, AbortWakesAnInFlightOperation) {
  TempDir t;
  auto store = Must(OpenFileStore(t / "job"));
  std::atomic<bool> aborted{false};
  RunGroup(store, 2, 20, [&](int r, Communicator* c) {
    if (r == 1) {
      while (!aborted.load()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      // The peer aborted: our next operation fails fast (its sockets are shut down), not at the 20 s timeout.
      auto t0 = std::chrono::steady_clock::now();
      int64_t x = 1;
      Status s = c->AllreduceSum(&x, 1);
      EXPECT_FALSE(s.ok());
      EXPECT_LT(Since(t0), 5.0) << s.message();
      return;
    }
    std::thread watchdog([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      c->Abort();
      aborted = true;
    });
    int64_t x = 1;
    auto t0 = std::chrono::steady_clock::now();
    Status s = c->AllreduceSum(&x, 1);
    watchdog.join();
    EXPECT_EQ(s.code(), Code::kAborted) << s.message();
    EXPECT_LT(Since(t0), 3.0);
    EXPECT_EQ(c->Barrier().code(), Code::kAborted);
  });
}

// A peer that left (its communicator destroyed, its sockets closed) fails our next operation before it starts,
// whatever Gloo's pair state: the check looks at the group's sockets, not at Gloo's bookkeeping.
TEST(Gloo, APeerThatLeftFailsTheNextOperationAtOnce) {
  TempDir t;
  auto store = Must(OpenFileStore(t / "job"));
  std::atomic<bool> left{false};
  std::thread zero([&] {
    auto c = ConnectGlooCommunicator(MakePrefixStore(store, "gen/0"), 0, 2, Loopback(20));
    ASSERT_TRUE(c.ok()) << c.status().message();
    EXPECT_TRUE((*c)->Barrier().ok());
    c->reset();
    left = true;
  });
  auto c = ConnectGlooCommunicator(MakePrefixStore(store, "gen/0"), 1, 2, Loopback(20));
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_TRUE((*c)->Barrier().ok());
  zero.join();
  ASSERT_TRUE(left.load());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the FIN crosses loopback
  auto t0 = std::chrono::steady_clock::now();
  int64_t x = 1;
  Status s = (*c)->AllreduceSum(&x, 1);
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.message();
  EXPECT_NE(s.message().find("closed before this operation"), std::string::npos) << s.message();
  EXPECT_LT(Since(t0), 1.0);
}

TEST(Gloo, FormingAGroupNobodyJoinsTimesOut) {
  TempDir t;
  auto store = Must(OpenFileStore(t / "job"));
  auto t0 = std::chrono::steady_clock::now();
  auto c = ConnectGlooCommunicator(MakePrefixStore(store, "gen/0"), 0, 2, Loopback(0.5));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Code::kTimeout) << c.status().message();
  EXPECT_NE(c.status().message().find("has not joined"), std::string::npos) << c.status().message();
  EXPECT_LT(Since(t0), 3.0);

  std::atomic<bool> abort{true};
  auto a = ConnectGlooCommunicator(MakePrefixStore(store, "gen/1"), 0, 2, Loopback(30), &abort);
  EXPECT_EQ(a.status().code(), Code::kAborted) << a.status().message();
}

TEST(Gloo, BadBindAddressNamesIt) {
  // Gloo 0.5 leaks its getaddrinfo/getifaddrs results when binding fails; run the failing calls in a child that
  // leaves with _exit, so leak checkers (ASan builds) judge keel's code, not that.
  TempDir t;
  pid_t pid = fork();
  if (pid == 0) {
    auto store = OpenFileStore(t / "job");
    if (!store.ok()) _exit(2);
    GlooOptions g = Loopback(1);
    g.hostname = "192.0.2.1";  // TEST-NET-1: not an address of this machine
    auto c = ConnectGlooCommunicator(*store, 0, 2, g);
    WriteText(t / "host", c.ok() ? "ok" : c.status().message());
    g = Loopback(1);
    g.hostname = "";
    g.iface = "no-such-iface0";
    c = ConnectGlooCommunicator(*store, 0, 2, g);
    WriteText(t / "iface", c.ok() ? "ok" : c.status().message());
    _exit(0);
  }
  int st = 0;
  ASSERT_EQ(waitpid(pid, &st, 0), pid);
  ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  std::string host = ReadFileText(t / "host"), iface = ReadFileText(t / "iface");
  EXPECT_NE(host.find("cannot bind to 192.0.2.1"), std::string::npos) << host;
  EXPECT_NE(iface.find("no-such-iface0"), std::string::npos) << iface;
}

TEST(Gloo, InterfaceAddress) {
  TempDir t;
  auto store = Must(OpenFileStore(t / "job"));
  std::vector<std::thread> th;
  for (int r = 0; r < 2; ++r)
    th.emplace_back([&, r] {
      GlooOptions g;
      g.iface = "lo";
      g.timeout_s = 10;
      auto c = ConnectGlooCommunicator(store, r, 2, g);
      ASSERT_TRUE(c.ok()) << c.status().message();
      int64_t x = r + 1;
      ASSERT_TRUE((*c)->AllreduceSum(&x, 1).ok());
      EXPECT_EQ(x, 3);
    });
  for (auto& x : th) x.join();
}

// A member that writes to a peer that just died must get an error, not SIGPIPE: Gloo sends with writev(), so
// with SIGPIPE at its default the write itself would kill the survivor (seen in CI: a survivor of the test below
// died of signal 13). Checked directly in a child whose SIGPIPE is at SIG_DFL: after forming a group, a write to
// a pipe with no reader returns EPIPE. A handler the program installed itself is left alone.
TEST(Gloo, WritingToADeadPeerIsAnErrorNotSigpipe) {
  TempDir t;
  pid_t pid = fork();
  if (pid == 0) {
    signal(SIGPIPE, SIG_DFL);
    auto store = OpenFileStore(t / "job");
    if (!store.ok()) _exit(2);
    auto c = ConnectGlooCommunicator(MakePrefixStore(*store, "gen/0"), 0, 1, Loopback(5));
    if (!c.ok()) _exit(3);
    int fds[2];
    if (pipe(fds) != 0) _exit(4);
    close(fds[0]);
    char byte = 1;
    ssize_t n = write(fds[1], &byte, 1);
    _exit(n == -1 && errno == EPIPE ? 0 : 5);
  }
  int st = 0;
  ASSERT_EQ(waitpid(pid, &st, 0), pid);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0)
      << (WIFSIGNALED(st) ? "killed by signal " + std::to_string(WTERMSIG(st)) : "exit " + std::to_string(st));

  pid = fork();
  if (pid == 0) {
    signal(SIGPIPE, [](int) {});
    auto store = OpenFileStore(t / "job2");
    if (!store.ok()) _exit(2);
    auto c = ConnectGlooCommunicator(MakePrefixStore(*store, "gen/0"), 0, 1, Loopback(5));
    if (!c.ok()) _exit(3);
    struct sigaction now {};
    sigaction(SIGPIPE, nullptr, &now);
    _exit(now.sa_handler != SIG_IGN && now.sa_handler != SIG_DFL ? 0 : 6);
  }
  ASSERT_EQ(waitpid(pid, &st, 0), pid);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "status " << st;
}

// Three processes; one SIGKILLs itself mid-training. The survivors' next collective fails with a clear
// error well within the communicator timeout (their peer's sockets closed), and they can form generation 1.
TEST(Gloo, KilledMemberFailsSurvivorsWithinTimeoutAndTheyRegroup) {
  TempDir t;
  auto store = Must(OpenFileStore(t / "job"));
  const double timeout_s = 5;
  std::vector<pid_t> pids;
  for (int r = 0; r < 3; ++r) {
    pid_t pid = fork();
    if (pid == 0) {
      auto c = ConnectGlooCommunicator(MakePrefixStore(store, "gen/0"), r, 3, Loopback(timeout_s));
      if (!c.ok()) _exit(10);
      for (int step = 0; step < 1000; ++step) {
        if (r == 2 && step == 20) raise(SIGKILL);
        std::vector<int64_t> g(1000, r);
        auto t0 = std::chrono::steady_clock::now();
        Status s = (*c)->AllreduceSum(g.data(), g.size());
        if (!s.ok()) {
          WriteText(t / ("err" + std::to_string(r)), s.message());
          if (Since(t0) > timeout_s + 2) _exit(11);
          // Survivors regroup under a new generation and carry on. A survivor not directly connected to the
          // dead rank only notices at its receive timeout, so the regroup waits longer than one timeout.
          auto c1 = ConnectGlooCommunicator(MakePrefixStore(store, "gen/1"), r, 2, Loopback(3 * timeout_s));
          if (!c1.ok()) _exit(12);
          int64_t one = 1;
          if (!(*c1)->AllreduceSum(&one, 1).ok() || one != 2) _exit(13);
          _exit(0);
        }
        if (g[0] != 3) _exit(14);
      }
      _exit(15);  // the kill was never noticed
    }
    pids.push_back(pid);
  }
  auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < 3; ++r) {
    int st = 0;
    ASSERT_EQ(waitpid(pids[r], &st, 0), pids[r]);
    if (r == 2) {
      EXPECT_TRUE(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    } else {
      EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "rank " << r << " status " << st;
      std::string err = ReadFileText(t / ("err" + std::to_string(r)));
      EXPECT_NE(err.find("allreduce(int64) (rank " + std::to_string(r) + " of 3)"), std::string::npos) << err;
    }
  }
  EXPECT_LT(Since(t0), 4 * timeout_s + 5);
}

}  // namespace
}  // namespace keel::testing
