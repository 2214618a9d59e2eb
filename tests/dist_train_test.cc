// dist_train_test.cc: data-parallel training through the keel binary — bit-identical weights for 1-4 workers,
// resuming with a different worker count, the launcher's signal handling and failure handling, Redis
// rendezvous across "machines" (launchers), refusals, unreachable stores, and workers started by other
// launchers' environments (torchrun / mpirun / srun variables).
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <regex>
#include <algorithm>
#include <set>
#include <thread>

#include "dist_test_util.h"

namespace keel::testing {
namespace {

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int MetricsLines(const std::string& run) {
  std::string m = ReadFileText(run + "/metrics.jsonl");
  return static_cast<int>(std::count(m.begin(), m.end(), '\n'));
}

class DistTrain : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    // A small deterministic corpus (byte tokenizer): ~40 KB of pseudo-random words.
    std::string text;
    const char* words[] = {"alpha", "beta", "gamma", "delta", "keel", "ship", "sea", "wind", "sail", "north"};
    uint64_t x = 12345;
    for (int line = 0; line < 600; ++line) {
      for (int w = 0; w < 10; ++w) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        text += words[(x >> 33) % 10];
        text += w == 9 ? "\n" : " ";
      }
    }
    WriteText(*dir_ / "corpus.txt", text);
    auto r = RunKeel("prepare --input " + (*dir_ / "corpus.txt") + " --out " + Data() + " --tokenizer byte");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    // The reference: one process, straight through.
    auto s = RunKeel(Args(Straight(), 8));
    ASSERT_EQ(s.exit_code, 0) << s.output;
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string Data() { return *dir_ / "data"; }
  static std::string Straight() { return *dir_ / "straight"; }
  static std::string Args(const std::string& out, int steps, const std::string& model = "--dim 32") {
    return "train --data " + Data() + " --out " + out + " --layers 2 --heads 2 " + model + " --ctx 32 --batch 2 " +
           "--grad-accum 4 --steps " + std::to_string(steps) + " --threads 1 --no-progress";
  }
  // model.safetensors and optim.safetensors of run's checkpoint at `step` equal the straight run's.
  static void ExpectSameAsStraight(const std::string& run, int step = 8) {
    char name[32];
    std::snprintf(name, sizeof(name), "/ckpt-%08d/", step);
    for (const char* f : {"model.safetensors", "optim.safetensors"}) {
      std::string a = ReadFileText(Straight() + name + f), b = ReadFileText(run + name + f);
      ASSERT_FALSE(a.empty());
      ASSERT_FALSE(b.empty()) << run << name << f << " missing";
      EXPECT_TRUE(a == b) << run << name << f << " differs from the one-process run";
    }
  }
  static TempDir* dir_;
};
TempDir* DistTrain::dir_ = nullptr;

int CountOf(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

TEST_F(DistTrain, BitIdenticalFor1To4Workers) {
  TempDir t;
  for (int n = 1; n <= 4; ++n) {
    const std::string out = t / ("run" + std::to_string(n));
    auto t0 = std::chrono::steady_clock::now();
    auto r = RunKeel(Args(out, 8) + " --nproc " + std::to_string(n));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_LT(Since(t0), 60);
    ExpectSameAsStraight(out);
    if (n > 1) {
      EXPECT_NE(r.output.find("[rank 0] model:"), std::string::npos) << r.output;
      EXPECT_NE(r.output.find(std::to_string(n) + " worker(s)"), std::string::npos) << r.output;
      EXPECT_NE(r.output.find("[rank 0] done: 8 steps"), std::string::npos) << r.output;
      // Every rank ends in the same state, reached without a repair: a rank that diverged and was healed by the
      // vote's state transfer or rollback would leave the leader's checkpoint identical and go unseen otherwise.
      std::set<std::string> hashes;
      const std::regex re(R"(\[rank \d+\] final state: step 8, hash ([0-9a-f]+))");
      for (std::sregex_iterator it(r.output.begin(), r.output.end(), re), end; it != end; ++it) hashes.insert((*it)[1]);
      EXPECT_EQ(hashes.size(), 1u) << r.output;
      EXPECT_EQ(CountOf(r.output, "final state: step 8"), n) << r.output;
      for (const char* repair : {"not committed", "rolled back", "silent data corruption"})
        EXPECT_EQ(r.output.find(repair), std::string::npos) << repair << "\n" << r.output;
    }
  }
}

TEST_F(DistTrain, ResumeWithAnotherWorkerCountIsBitIdentical) {
  TempDir t;
  const std::string out = t / "run";
  auto a = RunKeel(Args(out, 8) + " --nproc 2 --stop-after 4");
  ASSERT_EQ(a.exit_code, 0) << a.output;
  ASSERT_TRUE(std::filesystem::exists(out + "/ckpt-00000004/COMMITTED")) << a.output;
  ASSERT_FALSE(std::filesystem::exists(out + "/ckpt-00000008"));
  auto b = RunKeel(Args(out, 8) + " --nproc 3 --resume");
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("resuming from"), std::string::npos) << b.output;
  // Every worker reports the bytes it sent (only rank 0 used to).
  for (const char* rank : {"[rank 0] wire: ", "[rank 1] wire: ", "[rank 2] wire: "})
    EXPECT_NE(b.output.find(rank), std::string::npos) << rank << "\n" << b.output;
  ExpectSameAsStraight(out);
}

// A second stop request to the launcher kills the workers at once (SIGKILL), and the job fails.
TEST_F(DistTrain, ASecondSignalToTheLauncherKillsTheWorkers) {
  TempDir t;
  const std::string out = t / "run";
  // Rank 1's steps from step 3 on take ~20000x longer (seconds), so the graceful stop is still waiting when the
  // second signal comes, 1.3 s after the first.
  // (--even-shares: speed-aware shares would move rank 1's micro-batches away after the first slow step.)
  Background job(Split(Args(out, 100000) + " --nproc 2 --checkpoint-every 0 --eval-every 0 --even-shares --inject "
                       "slow:rank=1,step=3,factor=20000,steps=100"),
                 t / "log", {"KEEL_ALLOW_FAULT_INJECTION=1"});
  // (Once rank 1's slow steps began: a stop requested earlier could finish before the second signal.)
  ASSERT_TRUE(WaitUntil([&] { return job.Output().find("inject: slow") != std::string::npos; }, 60)) << job.Output();
  ASSERT_EQ(kill(job.pid(), SIGTERM), 0);
  ASSERT_TRUE(WaitUntil([&] { return job.Output().find("forwarding SIGTERM") != std::string::npos; }, 10));
  // A second request comes a second or more after the first (one sooner is the same request delivered twice).
  std::this_thread::sleep_for(std::chrono::milliseconds(1300));
  ASSERT_EQ(kill(job.pid(), SIGTERM), 0);
  const int code = job.Wait(30);
  EXPECT_GT(code, 0) << job.Output();  // failed (-1: still running)
  EXPECT_NE(job.Output().find("killing the workers (SIGKILL)"), std::string::npos) << job.Output();
}

// SIGTERM to the launcher and to every worker at once, as a batch system's time limit or `pkill keel` sends it,
// and the launcher's again 0.1 s later (GNU timeout signals the process, then its group): each worker gets two
// (its own and the launcher's forward), which must still be one graceful stop with a checkpoint (the second one
// used to kill the workers mid-stop).
TEST_F(DistTrain, LauncherForwardsSigtermAndTheRunResumes) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out, 100000) + " --nproc 2 --checkpoint-every 0 --eval-every 0"), t / "log");
  ASSERT_TRUE(WaitUntil([&] { return MetricsLines(out) >= 3; }, 60)) << job.Output();
  std::smatch pids;
  const std::string started = job.Output();
  ASSERT_TRUE(std::regex_search(started, pids, std::regex(R"(rank 0 pid (\d+); rank 1 pid (\d+))"))) << started;
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(job.pid(), SIGTERM), 0);
  ASSERT_EQ(kill(std::stoi(pids[1]), SIGTERM), 0);
  ASSERT_EQ(kill(std::stoi(pids[2]), SIGTERM), 0);
  // GNU timeout's pattern: the launcher again at once (its process group): the same stop request, not a kill.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_EQ(kill(job.pid(), SIGTERM), 0);
  int code = job.Wait(30);
  ASSERT_EQ(code, 0) << job.Output();
  EXPECT_LT(Since(t0), 30);
  std::string log = job.Output();
  EXPECT_NE(log.find("forwarding SIGTERM"), std::string::npos) << log;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(log, m, std::regex(R"(\[rank 0\] stopping at step (\d+))"))) << log;
  const int stopped = std::stoi(m[1]);
  char ckpt[32];
  std::snprintf(ckpt, sizeof(ckpt), "/ckpt-%08d/COMMITTED", stopped);
  ASSERT_TRUE(std::filesystem::exists(out + ckpt)) << log;
  // The checkpoint continues: two more steps, with the same worker count.
  auto r = RunKeel(Args(out, stopped + 2) + " --nproc 2 --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resuming from"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("done: " + std::to_string(stopped + 2) + " steps"), std::string::npos) << r.output;
}

TEST_F(DistTrain, KilledWorkerFailsTheJobQuickly) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out, 100000) + " --nproc 3 --checkpoint-every 0 --eval-every 0 --comm-timeout 5"),
                 t / "log");
  ASSERT_TRUE(WaitUntil([&] { return MetricsLines(out) >= 2; }, 60)) << job.Output();
  std::smatch m;
  std::string log = job.Output();
  ASSERT_TRUE(std::regex_search(log, m, std::regex(R"(rank 1 pid (\d+))"))) << log;
  const pid_t victim = std::stoi(m[1]);
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(victim, SIGKILL), 0);
  int code = job.Wait(30);
  EXPECT_NE(code, 0);
  EXPECT_NE(code, -1) << "the launcher hung";
  EXPECT_LT(Since(t0), 5 + 5 + 5);  // comm timeout + kill grace + slack
  log = job.Output();
  EXPECT_NE(log.find("worker rank 1 (pid " + std::to_string(victim) + ") was killed by signal 9 (SIGKILL)"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("keel train: error:"), std::string::npos) << log;
}

// A worker that hangs (SIGSTOP: its sockets stay open, nothing is sent) is reported by its peers at the
// communication timeout; the launcher then ends the job (SIGKILL reaches a stopped process).
TEST_F(DistTrain, HungWorkerIsReportedWithinTheCommTimeout) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out, 100000) + " --nproc 3 --checkpoint-every 0 --eval-every 0 --comm-timeout 3"),
                 t / "log");
  ASSERT_TRUE(WaitUntil([&] { return MetricsLines(out) >= 2; }, 60)) << job.Output();
  std::smatch m;
  std::string log = job.Output();
  ASSERT_TRUE(std::regex_search(log, m, std::regex(R"(rank 1 pid (\d+))"))) << log;
  const pid_t victim = std::stoi(m[1]);
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(victim, SIGSTOP), 0);
  int code = job.Wait(40);
  if (code == -1) kill(victim, SIGKILL);
  EXPECT_NE(code, 0);
  EXPECT_NE(code, -1) << "the launcher hung";
  EXPECT_LT(Since(t0), 3 + 5 + 5);  // comm timeout + kill grace + slack
  log = job.Output();
  EXPECT_NE(log.find("no progress within --comm-timeout 3s"), std::string::npos) << log;
  EXPECT_NE(log.find("keel train: error: worker rank"), std::string::npos) << log;
}

TEST_F(DistTrain, RedisTwoMachinesTwoWorkersEachIsBitIdentical) {
  if (!HaveRedis()) KEEL_SKIP_UNLESS_REQUIRED("redis-server not installed");
  RedisServer redis;
  ASSERT_TRUE(redis.ok());
  TempDir t;
  const std::string out = t / "run";
  const std::string dist = " --rdzv " + redis.Url("job-2x2") + " --nnodes 2 --nproc-per-node 2 --host 127.0.0.1";
  Background a(Split(Args(out, 8) + dist), t / "a.log");
  Background b(Split(Args(out, 8) + dist), t / "b.log");
  int ca = a.Wait(90), cb = b.Wait(90);
  ASSERT_EQ(ca, 0) << a.Output() << "\n----\n" << b.Output();
  ASSERT_EQ(cb, 0) << a.Output() << "\n----\n" << b.Output();
  ExpectSameAsStraight(out);
  std::string both = a.Output() + b.Output();
  EXPECT_NE(both.find("4 worker(s)"), std::string::npos) << both;
  EXPECT_NE(both.find("(node 1 of 2): rank 2 pid"), std::string::npos) << both;
  // A clean finish leaves no keys of the job behind.
  auto keys = RunCommand(redis.Cli() + " --scan --pattern 'keel/job-2x2/*'");
  EXPECT_EQ(keys.output, "") << keys.output;
}

TEST_F(DistTrain, RedisRefusesAWorkerWithAnotherModel) {
  if (!HaveRedis()) KEEL_SKIP_UNLESS_REQUIRED("redis-server not installed");
  RedisServer redis;
  ASSERT_TRUE(redis.ok());
  TempDir t;
  const std::string dist = " --rdzv " + redis.Url("mismatch") + " --nnodes 2 --nproc-per-node 1 --host 127.0.0.1";
  Background a(Split(Args(t / "a", 8) + dist), t / "a.log");
  // Let the first launcher become node 0 (rank 0) before the second arrives.
  ASSERT_TRUE(WaitUntil([&] { return RunCommand(redis.Cli() + " get keel/mismatch/node/0").output.size() > 2; }, 20));
  auto t0 = std::chrono::steady_clock::now();
  Background b(Split(Args(t / "b", 8, "--dim 64") + dist), t / "b.log");
  int cb = b.Wait(30), ca = a.Wait(30);
  EXPECT_LT(Since(t0), 20);
  EXPECT_NE(cb, 0);
  EXPECT_NE(ca, 0);
  EXPECT_NE(b.Output().find("refused by job mismatch: model config differs: dim: job has 32, this worker has 64"),
            std::string::npos)
      << b.Output();
  EXPECT_NE(a.Output().find("rank 1"), std::string::npos) << a.Output();
  EXPECT_NE(a.Output().find("was refused"), std::string::npos) << a.Output();
}

TEST_F(DistTrain, RedisWrongPasswordIsAClearErrorFast) {
  if (!HaveRedis()) KEEL_SKIP_UNLESS_REQUIRED("redis-server not installed");
  RedisServer redis("correct-horse");
  ASSERT_TRUE(redis.ok());
  TempDir t;
  auto t0 = std::chrono::steady_clock::now();
  auto r = RunKeel(Args(t / "run", 8) + " --rdzv redis://:battery@127.0.0.1:" + std::to_string(redis.port()) +
                   "/job --nnodes 1 --nproc-per-node 2 --rdzv-timeout 10");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_LT(Since(t0), 10);
  EXPECT_NE(r.output.find("authentication failed"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("battery"), std::string::npos) << "password printed: " << r.output;
  // The right password from the environment (kept off the command line): the job runs.
  r = RunCommand("KEEL_RDZV_PASSWORD=correct-horse " + std::string(KEEL_BINARY) + " " + Args(t / "ok", 8) +
                 " --rdzv redis://127.0.0.1:" + std::to_string(redis.port()) + "/job-ok --nproc-per-node 2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ExpectSameAsStraight(t / "ok");
}

TEST_F(DistTrain, UnreachableOrEmptyRendezvousFailsWithinTheTimeout) {
  TempDir t;
  const int port = FreePort();
  auto t0 = std::chrono::steady_clock::now();
  auto r = RunKeel(Args(t / "run", 8) + " --rdzv redis://127.0.0.1:" + std::to_string(port) +
                   "/job --nnodes 2 --nproc-per-node 1 --rdzv-timeout 3");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_LT(Since(t0), 6);
  EXPECT_NE(r.output.find("cannot reach rendezvous redis://127.0.0.1:" + std::to_string(port) + "/job"),
            std::string::npos)
      << r.output;
  // A reachable store where the other machine never shows up: bounded by --rdzv-timeout.
  t0 = std::chrono::steady_clock::now();
  r = RunKeel(Args(t / "run2", 8) + " --rdzv file://" + (t / "rdzv") + " --nnodes 2 --nproc-per-node 1 " +
              "--rdzv-timeout 1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_LT(Since(t0), 6);
  EXPECT_NE(r.output.find("timed out after 1s waiting for nodes"), std::string::npos) << r.output;
}

TEST_F(DistTrain, WorkersFromTorchrunAndSlurmEnvironments) {
  TempDir t;
  struct Style {
    const char* name;
    std::vector<std::string> env0, env1;
  };
  const Style styles[] = {
      {"torchrun", {"RANK=0", "WORLD_SIZE=2", "LOCAL_RANK=0"}, {"RANK=1", "WORLD_SIZE=2", "LOCAL_RANK=1"}},
      {"mpirun", {"OMPI_COMM_WORLD_RANK=0", "OMPI_COMM_WORLD_SIZE=2"}, {"OMPI_COMM_WORLD_RANK=1", "OMPI_COMM_WORLD_SIZE=2"}},
      {"srun", {"SLURM_PROCID=0", "SLURM_NTASKS=2", "SLURM_LOCALID=0"}, {"SLURM_PROCID=1", "SLURM_NTASKS=2", "SLURM_LOCALID=1"}},
  };
  for (const auto& s : styles) {
    const std::string out = t / s.name;
    const std::string args = Args(out, 8) + " --rdzv file://" + (t / (std::string("rdzv-") + s.name)) +
                             " --host 127.0.0.1";
    Background a(Split(args), t / (std::string(s.name) + "0.log"), s.env0);
    Background b(Split(args), t / (std::string(s.name) + "1.log"), s.env1);
    int ca = a.Wait(60), cb = b.Wait(60);
    ASSERT_EQ(ca, 0) << s.name << ": " << a.Output();
    ASSERT_EQ(cb, 0) << s.name << ": " << b.Output();
    ExpectSameAsStraight(out);
  }
  // Without a store, such a worker says what it needs.
  auto r = RunCommand("RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 " + std::string(KEEL_BINARY) +
                      " " + Args(t / "nostore", 8));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--rdzv"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("MASTER_ADDR/MASTER_PORT alone"), std::string::npos) << r.output;
}

TEST_F(DistTrain, UnbindableHostFailsNamingTheAddress) {
  TempDir t;
  auto t0 = std::chrono::steady_clock::now();
  auto r = RunKeel(Args(t / "run", 8) + " --nproc 2 --host 192.0.2.1 --comm-timeout 5");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_LT(Since(t0), 20);
  EXPECT_NE(r.output.find("cannot bind to 192.0.2.1"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace keel::testing
