// launcher_test.cc: the worker launcher's supervision rules that need no trainer: restart backoff for a worker
// that keeps failing at start-up, and a pending restart cancelled when the job finishes. The workers are /bin/sh.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <vector>

#include "train/launcher.h"

namespace keel {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// A worker that fails at once, every time: the first restart is immediate, then 1 s, then 2 s between them.
TEST(Launcher, AWorkerFailingAtStartIsRestartedWithBackoff) {
  LaunchOptions o;
  o.exe = "/bin/sh";
  o.args = {"-c", "exit 1"};
  o.elastic = true;
  o.max_restarts = 3;
  o.prefix_output = true;
  std::vector<Clock::time_point> exits, restarts;
  o.on_exit = [&](int, int, int) { exits.push_back(Clock::now()); };
  o.on_restart = [&](int rank, int, int restart, const std::string& why) {
    EXPECT_EQ(rank, 0);
    EXPECT_EQ(restart, static_cast<int>(restarts.size()) + 1);
    EXPECT_NE(why.find("exited with status 1"), std::string::npos) << why;
    restarts.push_back(Clock::now());
  };
  auto r = LaunchWorkers(o);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->exit_code, 1);  // no worker finished the job
  ASSERT_EQ(exits.size(), 4u);
  ASSERT_EQ(restarts.size(), 3u);
  EXPECT_LT(Seconds(exits[0], restarts[0]), 0.5);  // the first restart: at once
  EXPECT_GE(Seconds(exits[1], restarts[1]), 0.95);
  EXPECT_LT(Seconds(exits[1], restarts[1]), 1.8);
  EXPECT_GE(Seconds(exits[2], restarts[2]), 1.95);
  EXPECT_LT(Seconds(exits[2], restarts[2]), 3.0);
}

// Rank 1 keeps failing; rank 0 finishes the job while rank 1's restart waits out its backoff: that restart is not
// made, and the launch succeeds.
TEST(Launcher, APendingRestartIsCancelledWhenTheJobFinishes) {
  LaunchOptions o;
  o.exe = "/bin/sh";
  o.args = {"-c", "if [ \"$KEEL_RANK\" = 1 ]; then exit 1; fi; sleep 2; exit 0"};
  o.nproc = 2;
  o.elastic = true;
  o.max_restarts = 10;
  int restarts = 0;
  o.on_restart = [&](int rank, int, int, const std::string&) {
    EXPECT_EQ(rank, 1);
    ++restarts;
  };
  const auto t0 = Clock::now();
  auto r = LaunchWorkers(o);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->exit_code, 0) << r->message;
  // Immediate, +1 s, +2 s (due at ~3 s, after rank 0 finished at ~2 s): two or three, never ten.
  EXPECT_GE(restarts, 2);
  EXPECT_LE(restarts, 3);
  EXPECT_LT(Seconds(t0, Clock::now()), 8.0);  // nothing waited for the cancelled restart
}

// A launcher started with SIGCHLD ignored (SIG_IGN is inherited across exec) must still see its workers exit: the
// kernel would reap them itself and waitpid() would never report them, so the launcher waited for ever.
TEST(Launcher, AnInheritedIgnoredSigchldDoesNotHideTheWorkersExits) {
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    alarm(20);  // a hang ends the child with SIGALRM
    signal(SIGCHLD, SIG_IGN);
    LaunchOptions o;
    o.exe = "/bin/sh";
    o.args = {"-c", "exit 0"};
    o.nproc = 2;
    auto r = LaunchWorkers(o);
    _exit(r.ok() && r->exit_code == 0 ? 0 : 1);
  }
  int st = 0;
  ASSERT_EQ(waitpid(child, &st, 0), child);
  ASSERT_TRUE(WIFEXITED(st)) << "the launcher hung (signal " << (WIFSIGNALED(st) ? WTERMSIG(st) : 0) << ")";
  EXPECT_EQ(WEXITSTATUS(st), 0);
}

}  // namespace
}  // namespace keel
