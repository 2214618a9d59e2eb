// elastic_train_test.cc: fault-tolerant training through the keel binary with real processes — SIGKILL and
// SIGSTOP of workers mid-run, NaN and bit-flip injection, quarantine, a worker joining through the same
// rendezvous (and a late "machine" on Redis) with live state transfer, the quorum floor, and kill -9 of every
// worker during a checkpoint write followed by --resume. Every run must end with weights bit-identical to a
// failure-free one-process run (docs/step-protocol.md).
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <regex>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "dist_test_util.h"

namespace keel::testing {
namespace {

double WallNow() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

int MetricsLines(const std::string& run) {
  std::string m = ReadFileText(run + "/metrics.jsonl");
  return static_cast<int>(std::count(m.begin(), m.end(), '\n'));
}

std::vector<nlohmann::json> Events(const std::string& run) { return JsonLines(run + "/events.jsonl"); }

int CountEvents(const std::vector<nlohmann::json>& ev, const std::string& name) {
  int n = 0;
  for (const auto& e : ev) n += e.value("event", "") == name;
  return n;
}

// pid of launch rank r from the launcher's "started" line (or a later "restarting it (..., pid N)").
pid_t PidOf(const std::string& log, int rank) {
  std::smatch m;
  if (std::regex_search(log, m, std::regex("rank " + std::to_string(rank) + " pid (\\d+)"))) return std::stoi(m[1]);
  return -1;
}

// "final state: step N, hash H" lines of every member that finished.
std::set<std::string> FinalHashes(const std::string& log) {
  std::set<std::string> out;
  std::regex re(R"(final state: step \d+, hash ([0-9a-f]+))");
  for (auto it = std::sregex_iterator(log.begin(), log.end(), re); it != std::sregex_iterator(); ++it)
    out.insert((*it)[1]);
  return out;
}

constexpr int kSteps = 200;

class ElasticTrain : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    std::string text;
    const char* words[] = {"alpha", "beta", "gamma", "delta", "keel", "ship", "sea", "wind", "sail", "north"};
    uint64_t x = 4242;
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
    auto s = RunKeel(Args(Straight()));
    ASSERT_EQ(s.exit_code, 0) << s.output;
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string Data() { return *dir_ / "data"; }
  static std::string Straight() { return *dir_ / "straight"; }
  static std::string Args(const std::string& out, int steps = kSteps) {
    return "train --data " + Data() + " --out " + out + " --layers 2 --heads 2 --dim 32 --ctx 32 --batch 2 " +
           "--grad-accum 6 --steps " + std::to_string(steps) + " --threads 1 --no-progress --checkpoint-every 50 " +
           "--eval-every 100";
  }
  static void ExpectSameAsStraight(const std::string& run, int step = kSteps) {
    char name[32];
    std::snprintf(name, sizeof(name), "/ckpt-%08d/", step);
    for (const char* f : {"model.safetensors", "optim.safetensors"}) {
      std::string a = ReadFileText(Straight() + name + f), b = ReadFileText(run + name + f);
      ASSERT_FALSE(a.empty());
      ASSERT_FALSE(b.empty()) << run << name << f << " missing";
      EXPECT_TRUE(a == b) << run << name << f << " differs from the failure-free one-process run";
    }
  }
  static TempDir* dir_;
};
TempDir* ElasticTrain::dir_ = nullptr;

std::vector<std::string> InjectEnv() { return {"KEEL_ALLOW_FAULT_INJECTION=1"}; }

// SIGKILL of a worker mid-run: the survivors re-form without it and redo the step (no restart, no reload);
// the launcher restarts it and it rejoins with the state from a peer; the weights end bit-identical.
TEST_F(ElasticTrain, SigkillOfAWorkerMidRunIsSurvivedBitIdentically) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 3 --max-restarts 2"), t / "log");
  ASSERT_TRUE(WaitUntil([&] { return MetricsLines(out) >= 40; }, 120)) << job.Output();
  const std::string log0 = job.Output();
  const pid_t victim = PidOf(log0, 1), s0 = PidOf(log0, 0), s2 = PidOf(log0, 2);
  ASSERT_GT(victim, 0) << log0;
  const double t_kill = WallNow();
  ASSERT_EQ(kill(victim, SIGKILL), 0);
  const int code = job.Wait(180);
  ASSERT_EQ(code, 0) << job.Output();
  const std::string log = job.Output();
  ExpectSameAsStraight(out);
  EXPECT_NE(log.find("worker rank 1 (pid " + std::to_string(victim) + ") was killed by signal 9 (SIGKILL); restarting"),
            std::string::npos) << log;
  EXPECT_EQ(log.find("restarting it", log.find("restarting it") + 1), std::string::npos) << "only one restart: " << log;
  // Survivors were never restarted: their pids finished the job.
  auto ev = Events(out);
  std::set<int64_t> exited_ok;
  for (const auto& e : ev)
    if (e.value("event", "") == "worker_exit" && e.value("status", -1) == 0) exited_ok.insert(e.value("pid", 0));
  EXPECT_TRUE(exited_ok.count(s0) && exited_ok.count(s2)) << log;
  EXPECT_NE(log.find("received the training state"), std::string::npos) << "the restarted worker rejoined: " << log;
  // Crash -> next committed step.
  double recovered = -1;
  for (const auto& e : ev)
    if (e.value("event", "") == "commit" && e.value("t", 0.0) > t_kill && e.value("recovered", false)) {
      recovered = e.value("t", 0.0) - t_kill;
      break;
    }
  ASSERT_GT(recovered, 0) << "no recovered commit after the kill";
  std::printf("crash -> next committed step: %.3f s\n", recovered);
  EXPECT_LT(recovered, 5.0);
  const auto hashes = FinalHashes(log);
  EXPECT_EQ(hashes.size(), 1u) << "every member ends with the same state: " << log;
}

// SIGSTOP of a worker: its heartbeats stop; the watchdog detects it within --hang-timeout (2 s), aborts the
// collective the others wait in, and they re-form without it. When it wakes up it finds itself evicted and
// rejoins as a new member, receiving the current state; the weights end bit-identical.
TEST_F(ElasticTrain, SigstopOfAWorkerIsDetectedEvictedAndItRejoinsOnWaking) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 3 --elastic"), t / "log");
  ASSERT_TRUE(WaitUntil([&] { return MetricsLines(out) >= 40; }, 120)) << job.Output();
  const pid_t victim = PidOf(job.Output(), 2);
  ASSERT_GT(victim, 0);
  const double t_stop = WallNow();
  ASSERT_EQ(kill(victim, SIGSTOP), 0);
  // Wake it once the others have evicted it (detected within 2 s), while the job still runs.
  ASSERT_TRUE(WaitUntil([&] { return job.Output().find("silent for") != std::string::npos; }, 10)) << job.Output();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ASSERT_EQ(kill(victim, SIGCONT), 0);
  const int code = job.Wait(180);
  ASSERT_EQ(code, 0) << job.Output();
  const std::string log = job.Output();
  ExpectSameAsStraight(out);
  double detected = -1;
  for (const auto& e : Events(out))
    if (e.value("event", "") == "detect" && e.value("how", "") == "hang" && e.value("t", 0.0) > t_stop) {
      detected = e.value("t", 0.0) - t_stop;
      break;
    }
  ASSERT_GT(detected, 0) << log;
  std::printf("hang detected after %.3f s\n", detected);
  EXPECT_LT(detected, 2.0 + 0.5) << "--hang-timeout 2 (0.5 s slack for a loaded machine)";
  EXPECT_NE(log.find("[rank 2] evicted: generation"), std::string::npos) << log;
  EXPECT_NE(log.find("rejoining as member"), std::string::npos) << log;
  EXPECT_NE(log.find("[rank 2] received the training state"), std::string::npos) << log;
  EXPECT_EQ(FinalHashes(log).size(), 1u) << log;
}

// A worker stopped and never woken: the others evict it and finish the job. The launcher then wakes it (SIGCONT;
// it finds the job finished and exits) instead of waiting for it forever, and exits 0 itself.
TEST_F(ElasticTrain, AWorkerLeftStoppedDoesNotKeepTheLauncherFromExiting) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 2 --elastic"), t / "log");
  ASSERT_TRUE(WaitUntil([&] { return MetricsLines(out) >= 20; }, 120)) << job.Output();
  const pid_t victim = PidOf(job.Output(), 1);
  ASSERT_GT(victim, 0);
  ASSERT_EQ(kill(victim, SIGSTOP), 0);
  ASSERT_EQ(job.Wait(120), 0) << job.Output();
  ExpectSameAsStraight(out);
  EXPECT_NE(kill(victim, 0), 0) << "the stopped worker is gone (reaped)";
}

// A worker stopped just after its heartbeat thread read its clock (`freeze`) must not, on waking, take its live
// peer for dead: it used to stamp the peer's fresh heartbeat with that pre-stop time, see the peer "silent for"
// the length of its own stop, form a generation alone and commit the steps the peer was committing too (a fork;
// chaos run G, 2026-11-27). Now it waits to be admitted: every step is committed once, by one lineage.
TEST_F(ElasticTrain, AWorkerWokenFromAStopDoesNotTakeItsLivePeerForDead) {
  TempDir t;
  const std::string out = t / "run";
  // Rank 0, alone while rank 1 is stopped, is slowed to ~0.5 s steps: the job still runs when rank 1 wakes
  // (this small model trains 200 steps in 2 s), and its status changes only with its heartbeats (every 0.2 s),
  // as a large model's would: a stale stamp then stays stale until the woken member decides.
  Background job(Split(Args(out) + " --nproc 2 --elastic --inject freeze:rank=1,step=15,secs=3;"
                                   "slow:rank=0,step=14,factor=100,steps=14"),
                 t / "log", InjectEnv());
  const int code = job.Wait(180);
  ASSERT_EQ(code, 0) << job.Output();
  const std::string log = job.Output();
  ExpectSameAsStraight(out);
  EXPECT_NE(log.find("[rank 1] evicted: generation"), std::string::npos) << log;
  EXPECT_NE(log.find("[rank 1] received the training state"), std::string::npos) << log;
  std::map<int64_t, int> commits;
  for (const auto& e : Events(out))
    if (e.value("event", "") == "commit") ++commits[e.value("step", int64_t{-1})];
  EXPECT_EQ(commits.size(), static_cast<size_t>(kSteps)) << log;
  for (const auto& [step, n] : commits) EXPECT_EQ(n, 1) << "step " << step << " committed " << n << " times\n" << log;
  EXPECT_EQ(FinalHashes(log).size(), 1u) << log;
}

// A collective that never returns while every process keeps heartbeating (injected: a member enters the reduce
// but sends nothing): the watchdogs see every member blocked in the same collective for longer than the
// allowance (H + payload / 100 MB/s), abort it, and the step is redone.
TEST_F(ElasticTrain, ACollectiveThatNeverReturnsIsAbortedByTheWatchdog) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 3 --elastic --inject stall:rank=1,step=30,secs=120"), t / "log",
                 InjectEnv());
  const int code = job.Wait(180);
  ASSERT_EQ(code, 0) << job.Output();
  const std::string log = job.Output();
  ExpectSameAsStraight(out);
  auto ev = Events(out);
  double t_inject = 0, t_detect = 0;
  for (const auto& e : ev) {
    if (e.value("event", "") == "inject") t_inject = e.value("t", 0.0);
    if (e.value("event", "") == "detect" && e.value("how", "") == "stuck" && t_detect == 0) t_detect = e.value("t", 0.0);
  }
  ASSERT_GT(t_inject, 0) << log;
  ASSERT_GT(t_detect, t_inject) << log;
  std::printf("stuck collective detected after %.3f s\n", t_detect - t_inject);
  EXPECT_LT(t_detect - t_inject, 3.0) << "allowance 2 s + payload 0.2 MB / 100 MB/s + ticks: " << log;
  EXPECT_NE(log.find("a collective that does not return"), std::string::npos) << log;
}

// A collective that Communicator::Abort cannot wake (injected: the communication thread blocks for 60 s): once
// the watchdog has aborted the group, the training thread gives up waiting on it, leaves the blocked operation
// its communicator and buffers, and re-forms — the job does not sit out the 60 s.
TEST_F(ElasticTrain, ACollectiveDeafToAbortIsGivenUp) {
  TempDir t;
  const std::string out = t / "run";
  const auto t0 = std::chrono::steady_clock::now();
  Background job(Split(Args(out) + " --nproc 3 --elastic --inject deaf:rank=1,step=30,secs=60"), t / "log",
                 InjectEnv());
  const int code = job.Wait(180);
  ASSERT_EQ(code, 0) << job.Output();
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ExpectSameAsStraight(out);
  const std::string log = job.Output();
  EXPECT_NE(log.find("gave up on a collective that did not return"), std::string::npos) << log;
  double t_inject = 0, t_recovered = 0;
  for (const auto& e : Events(out)) {
    if (e.value("event", "") == "inject") t_inject = e.value("t", 0.0);
    if (t_inject > 0 && t_recovered == 0 && e.value("event", "") == "commit" && e.value("recovered", false))
      t_recovered = e.value("t", 0.0);
  }
  ASSERT_GT(t_recovered, t_inject) << log;
  std::printf("deaf collective: next committed step %.3f s after the fault (job %.1f s)\n", t_recovered - t_inject,
              took);
  EXPECT_LT(t_recovered - t_inject, 10.0) << log;
}

// NaN in a gradient: the vote fails, the step is redone elsewhere and leaves no trace; a flipped parameter bit is
// found by the per-step parameter hash and repaired from the majority.
TEST_F(ElasticTrain, NanAndBitflipAreCaughtRepairedAndLeaveNoTrace) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 3 --elastic --inject nan:rank=1,step=20;bitflip:rank=2,step=60"),
                 t / "log", InjectEnv());
  const int code = job.Wait(180);
  ASSERT_EQ(code, 0) << job.Output();
  const std::string log = job.Output();
  ExpectSameAsStraight(out);
  auto ev = Events(out);
  EXPECT_EQ(CountEvents(ev, "inject"), 2) << log;
  EXPECT_GE(CountEvents(ev, "nan"), 1) << log;
  EXPECT_GE(CountEvents(ev, "sdc"), 1) << log;
  EXPECT_NE(log.find("non-finite loss or gradient in micro-batch"), std::string::npos) << log;
  EXPECT_NE(log.find("(silent data corruption): repairing it from member"), std::string::npos) << log;
  EXPECT_NE(log.find("[rank 2] received the training state (step 60)"), std::string::npos) << log;
  EXPECT_EQ(FinalHashes(log).size(), 1u) << log;
}

// A flipped parameter bit in a group of two: no majority, but the corrupted member's parameters no longer match
// the hash it recorded at its last commit, so it is repaired from the other member — no rollback, no step redone
// beyond the one in flight.
TEST_F(ElasticTrain, BitflipInAGroupOfTwoIsRepairedWithoutARollback) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 2 --elastic --inject bitflip:rank=1,step=33"), t / "log", InjectEnv());
  const int code = job.Wait(180);
  ASSERT_EQ(code, 0) << job.Output();
  const std::string log = job.Output();
  ExpectSameAsStraight(out);
  EXPECT_NE(log.find("changed since this member's last commit"), std::string::npos) << log;
  EXPECT_EQ(log.find("rolling back"), std::string::npos) << log;
  EXPECT_EQ(log.find("rolled back"), std::string::npos) << log;
  auto ev = Events(out);
  EXPECT_GE(CountEvents(ev, "sdc"), 1) << log;
  EXPECT_EQ(FinalHashes(log).size(), 1u) << log;
}

// The same worker producing non-finite values twice is quarantined (exit status 3, never restarted); the others
// finish without it.
TEST_F(ElasticTrain, RepeatedNanQuarantinesTheWorker) {
  TempDir t;
  const std::string out = t / "run";
  Background job(
      Split(Args(out) + " --nproc 3 --max-restarts 2 --inject nan:rank=0,step=15;nan:rank=0,step=25"),
      t / "log", InjectEnv());
  const int code = job.Wait(180);
  ASSERT_EQ(code, 0) << job.Output();
  const std::string log = job.Output();
  ExpectSameAsStraight(out);
  EXPECT_NE(log.find("[rank 0] this worker is quarantined after repeated faults"), std::string::npos) << log;
  EXPECT_NE(log.find("worker rank 0"), std::string::npos) << log;
  EXPECT_NE(log.find("quarantined after repeated faults; not restarted"), std::string::npos) << log;
  EXPECT_GE(CountEvents(Events(out), "quarantine"), 1);
}

// In a group of two the same fault twice does not quarantine the worker (--quarantine-floor 2): one member alone
// could not detect silent corruption. Both faults are caught and recomputed, and both workers finish.
TEST_F(ElasticTrain, RepeatedNanInAGroupOfTwoKeepsTheWorker) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 2 --max-restarts 2 --inject nan:rank=0,step=15;nan:rank=0,step=25"),
                 t / "log", InjectEnv());
  const int code = job.Wait(180);
  ASSERT_EQ(code, 0) << job.Output();
  const std::string log = job.Output();
  ExpectSameAsStraight(out);
  EXPECT_NE(log.find("repeated faults, but kept"), std::string::npos) << log;
  EXPECT_EQ(log.find("this worker is quarantined"), std::string::npos) << log;
  EXPECT_EQ(CountEvents(Events(out), "quarantine"), 0);
  EXPECT_GE(CountEvents(Events(out), "nan"), 2);
  EXPECT_EQ(FinalHashes(log).size(), 1u) << log;
}

// Below --min-workers the job waits (it does not fail); a worker started by hand joins through the same
// rendezvous, receives the state, and the job finishes bit-identically with the joiner's state equal to the
// others'.
TEST_F(ElasticTrain, BelowQuorumTheJobWaitsUntilAWorkerJoinsThroughTheRendezvous) {
  TempDir t;
  const std::string out = t / "run", rdzv = "file://" + (t / "rdzv");
  Background job(Split(Args(out) + " --nproc 2 --min-workers 2 --rdzv " + rdzv + " --host 127.0.0.1"), t / "log");
  ASSERT_TRUE(WaitUntil([&] { return MetricsLines(out) >= 30; }, 120)) << job.Output();
  const pid_t victim = PidOf(job.Output(), 1);
  ASSERT_EQ(kill(victim, SIGKILL), 0);
  ASSERT_TRUE(WaitUntil([&] { return job.Output().find("was killed by signal 9") != std::string::npos; }, 20));
  const int lines = MetricsLines(out);
  std::this_thread::sleep_for(std::chrono::seconds(3));
  EXPECT_LE(MetricsLines(out), lines + 1) << "one worker trained alone below --min-workers 2";
  EXPECT_EQ(job.Wait(0.1), -1) << "the job must wait, not fail: " << job.Output();
  // A replacement (as a new machine's worker would) through the same rendezvous.
  Background joiner(Split(Args(out) + " --elastic --min-workers 2 --rdzv " + rdzv + " --host 127.0.0.1"),
                    t / "joiner.log", {"KEEL_RANK=1", "KEEL_WORLD_SIZE=2"});
  ASSERT_EQ(joiner.Wait(180), 0) << joiner.Output() << "\n----\n" << job.Output();
  ASSERT_EQ(job.Wait(60), 0) << job.Output();
  ExpectSameAsStraight(out);
  const std::string jl = joiner.Output();
  EXPECT_NE(jl.find("received the training state"), std::string::npos) << jl;
  auto hashes = FinalHashes(jl + job.Output());
  EXPECT_EQ(FinalHashes(jl).size(), 1u) << "the joiner reports its own final state: " << jl;
  EXPECT_EQ(hashes.size(), 1u) << "the joiner's state equals the others': " << jl << "\n----\n" << job.Output();
}

// A joiner that its peers cannot connect to (here it advertises an address that is not this machine's) used to
// make the group re-form and fail forever. After three failed generations it is left out and told why, and the
// others go on and finish bit-identically.
TEST_F(ElasticTrain, AJoinerNobodyCanReachIsLeftOutAndTheJobGoesOn) {
  TempDir t;
  const std::string out = t / "run", rdzv = "file://" + (t / "rdzv");
  Background job(Split(Args(out) + " --nproc 2 --elastic --rdzv " + rdzv + " --host 127.0.0.1"), t / "log");
  ASSERT_TRUE(WaitUntil([&] { return MetricsLines(out) >= 30; }, 120)) << job.Output();
  Background joiner(Split(Args(out) + " --elastic --rdzv " + rdzv + " --host 192.0.2.1"), t / "joiner.log",
                    {"KEEL_RANK=2", "KEEL_WORLD_SIZE=3"});
  EXPECT_GT(joiner.Wait(120), 0) << joiner.Output();  // refused and exited (-1: still running)
  EXPECT_NE(joiner.Output().find("generations with this worker failed to form"), std::string::npos)
      << joiner.Output();
  ASSERT_EQ(job.Wait(180), 0) << job.Output() << "\n----\n" << joiner.Output();
  EXPECT_NE(job.Output().find("could not form"), std::string::npos) << job.Output();
  ExpectSameAsStraight(out);
}

// A joiner whose step-protocol options differ from the job's (here --compress) is refused with the difference
// named, rather than admitted into steps it would make fail forever; the job finishes unaffected.
TEST_F(ElasticTrain, AJoinerWithDifferentProtocolOptionsIsRefused) {
  TempDir t;
  const std::string out = t / "run", rdzv = "file://" + (t / "rdzv");
  Background job(Split(Args(out) + " --nproc 2 --elastic --rdzv " + rdzv + " --host 127.0.0.1"), t / "log");
  ASSERT_TRUE(WaitUntil([&] { return MetricsLines(out) >= 10; }, 120)) << job.Output();
  Background joiner(Split(Args(out) + " --elastic --compress int8 --rdzv " + rdzv + " --host 127.0.0.1"),
                    t / "joiner.log", {"KEEL_RANK=2", "KEEL_WORLD_SIZE=3"});
  EXPECT_GT(joiner.Wait(120), 0) << joiner.Output();  // refused and exited (-1: still running)
  EXPECT_NE(joiner.Output().find("training options differ: compress: job has none, this worker has int8"),
            std::string::npos)
      << joiner.Output();
  // --min-workers sets the quarantine floor's lower bound, a decision every member takes: it must agree too.
  Background joiner2(Split(Args(out) + " --elastic --min-workers 2 --rdzv " + rdzv + " --host 127.0.0.1"),
                     t / "joiner2.log", {"KEEL_RANK=2", "KEEL_WORLD_SIZE=3"});
  EXPECT_GT(joiner2.Wait(120), 0) << joiner2.Output();  // (-1: still running)
  EXPECT_NE(joiner2.Output().find("min_workers: job has 1, this worker has 2"), std::string::npos) << joiner2.Output();
  ASSERT_EQ(job.Wait(180), 0) << job.Output() << "\n----\n" << joiner.Output();
  ExpectSameAsStraight(out);
}

// Two "machines" on Redis: the second starts later, its worker joins the running job and gets the state.
TEST_F(ElasticTrain, RedisLateMachineJoinsTheRunningJob) {
  if (!HaveRedis()) KEEL_SKIP_UNLESS_REQUIRED("redis-server not installed");
  RedisServer redis;
  ASSERT_TRUE(redis.ok());
  TempDir t;
  const std::string out = t / "run";
  const std::string dist = " --rdzv " + redis.Url("late") + " --nnodes 1:2 --elastic --host 127.0.0.1";
  Background a(Split(Args(out) + dist + " --nproc-per-node 2"), t / "a.log");
  ASSERT_TRUE(WaitUntil([&] { return MetricsLines(out) >= 30; }, 120)) << a.Output();
  Background b(Split(Args(out) + dist + " --nproc-per-node 2"), t / "b.log");
  ASSERT_EQ(a.Wait(180), 0) << a.Output() << "\n----\n" << b.Output();
  ASSERT_EQ(b.Wait(60), 0) << b.Output();
  ExpectSameAsStraight(out);
  const std::string bl = b.Output();
  EXPECT_NE(bl.find("(node 1 of 2): rank 2 pid"), std::string::npos) << bl;
  EXPECT_NE(bl.find("received the training state"), std::string::npos) << bl;
  EXPECT_EQ(FinalHashes(bl).size(), 1u) << "the late machine reports its own final state: " << bl;
  EXPECT_EQ(FinalHashes(a.Output() + bl).size(), 1u) << a.Output() << "\n----\n" << bl;
}

// Whole-job loss: kill -9 of every worker (and the launcher) while a checkpoint write is in flight; --resume
// (with another worker count) falls back past the half-written checkpoint and ends bit-identical.
TEST_F(ElasticTrain, KillNineOfAllWorkersDuringACheckpointWriteThenResume) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 2 --inject truncate-ckpt:step=100,then=hang"), t / "log", InjectEnv());
  // The injection leaves the worst crash point: ckpt-00000100/ renamed into place, its weights cut in half, no
  // COMMITTED marker.
  const std::string half = out + "/ckpt-00000100";
  ASSERT_TRUE(WaitUntil([&] { return std::filesystem::exists(half); }, 120)) << job.Output();
  const std::string log = job.Output();
  for (int r = 0; r < 2; ++r) {
    pid_t p = PidOf(log, r);
    ASSERT_GT(p, 0) << log;
    kill(p, SIGKILL);
  }
  kill(job.pid(), SIGKILL);
  job.Wait(30);
  ASSERT_TRUE(std::filesystem::exists(half));
  ASSERT_FALSE(std::filesystem::exists(half + "/COMMITTED"));
  ASSERT_TRUE(std::filesystem::exists(out + "/ckpt-00000050/COMMITTED"));
  auto r = RunKeel(Args(out) + " --nproc 3 --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("skipping " + half), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("resuming from " + out + "/ckpt-00000050 at step 50"), std::string::npos) << r.output;
  ExpectSameAsStraight(out);
}

// Elastic flags with one process (--max-restarts alone, no --nproc): the launcher runs it and restarts it after a
// crash, and it resumes from the last checkpoint (it used to run as a plain process: a crash ended the job).
TEST_F(ElasticTrain, OneElasticWorkerIsRestartedAndResumes) {
  TempDir t;
  const std::string out = t / "run";
  auto r = RunCommand("KEEL_ALLOW_FAULT_INJECTION=1 " + KeelBinary() + " " + Args(out) +
                      " --max-restarts 1 --inject crash:rank=0,step=90");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("restarting it (restart 1 of 1"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("no live member holds the training state: loading " + out + "/ckpt-00000050"),
            std::string::npos) << r.output;
  ExpectSameAsStraight(out);
}

// A resumed run whose --vocab came from its checkpoint (the flag left out): a worker restarted after a crash
// joins the running job, skips the run-directory inspection, and must still build the group's model (it takes
// the vocabulary run.json recorded) to receive the state.
TEST_F(ElasticTrain, ARestartedWorkerOfAResumedRunBuildsTheGroupsModel) {
  TempDir t;
  const std::string out = t / "run";
  auto r = RunKeel(Args(out, 30) + " --vocab 300 --nproc 2 --elastic --stop-after 10");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = RunCommand("KEEL_ALLOW_FAULT_INJECTION=1 " + KeelBinary() + " " + Args(out, 30) +
                 " --nproc 2 --elastic --max-restarts 1 --resume --inject 'crash:rank=1,step=15;slow:rank=0,step=16,factor=60,steps=4'");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("restarting it (restart 1 of 1"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("received the training state"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("parameters, this worker's"), std::string::npos) << r.output;
  EXPECT_EQ(FinalHashes(r.output).size(), 1u) << r.output;
}

// A finite, silent corruption of one gradient (a flipped mantissa bit) passes every other check; with
// --verify-fraction 1 each micro-batch is recomputed by a second member, the gradient hashes differ, and the step
// is redone. Without the cross-check the same fault changes the final weights (it would have gone unnoticed).
TEST_F(ElasticTrain, VerifyFractionCatchesASilentGradientCorruption) {
  TempDir t;
  const int steps = 40;
  ASSERT_EQ(RunKeel(Args(t / "straight", steps)).exit_code, 0);
  const std::string inject = " --inject corrupt:rank=1,step=20";
  Background checked(Split(Args(t / "checked", steps) + " --nproc 3 --elastic --verify-fraction 1" + inject),
                     t / "checked.log", InjectEnv());
  ASSERT_EQ(checked.Wait(180), 0) << checked.Output();
  Background unchecked(Split(Args(t / "unchecked", steps) + " --nproc 3 --elastic" + inject), t / "unchecked.log",
                       InjectEnv());
  ASSERT_EQ(unchecked.Wait(180), 0) << unchecked.Output();
  const std::string f = "/ckpt-00000040/model.safetensors";
  const std::string ref = ReadFileText(t / "straight" + f);
  ASSERT_FALSE(ref.empty());
  EXPECT_TRUE(ReadFileText(t / "checked" + f) == ref) << checked.Output();
  EXPECT_FALSE(ReadFileText(t / "unchecked" + f) == ref) << "the injected corruption should change the weights";
  EXPECT_NE(checked.Output().find("recomputed gradients differ"), std::string::npos) << checked.Output();
}

// A worker whose every gradient is wrong (a persistently faulty unit: corrupt with steps=N). Its cross-checks
// differ; each disputed micro-batch is recomputed on three members, the third opinion names the faulty one, and
// after its second strike it is quarantined. The other two finish bit-identical to a failure-free run.
TEST_F(ElasticTrain, AThirdOpinionQuarantinesAPersistentlyCorruptingWorker) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 3 --elastic --verify-fraction 1 --inject corrupt:rank=1,step=30,steps=100000"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(240), 0) << job.Output();
  const std::string log = job.Output();
  ExpectSameAsStraight(out);
  EXPECT_NE(log.find("recomputing it with a third opinion"), std::string::npos) << log;
  EXPECT_NE(log.find("differs from two other members'"), std::string::npos) << log;
  EXPECT_NE(log.find("[rank 1] this worker is quarantined after repeated faults"), std::string::npos) << log;
  EXPECT_NE(log.find("quarantined after repeated faults; not restarted"), std::string::npos) << log;
  EXPECT_EQ(log.find("[rank 0] this worker is quarantined"), std::string::npos) << log;
  EXPECT_EQ(log.find("[rank 2] this worker is quarantined"), std::string::npos) << log;
}

// In a group of two nobody can break the tie: after a few attempts the job stops with that reason instead of
// redoing the step forever.
TEST_F(ElasticTrain, APersistentCrossCheckTieInAGroupOfTwoStopsTheJob) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out, 40) + " --nproc 2 --elastic --verify-fraction 1 --inject corrupt:rank=1,step=5,steps=100000"),
                 t / "log", InjectEnv());
  EXPECT_GT(job.Wait(120), 0) << job.Output();  // stopped with an error (-1: still running)
  const std::string log = job.Output();
  EXPECT_NE(log.find("no majority names the faulty member (a group of two has no third opinion)"), std::string::npos)
      << log;
  EXPECT_FALSE(std::filesystem::exists(out + "/ckpt-00000040"));
}

// A worker computing 4x slower gets fewer micro-batches (the global batch is unchanged, so are the weights).
TEST_F(ElasticTrain, ASlowWorkerGetsFewerMicroBatches) {
  TempDir t;
  const int steps = 40;
  ASSERT_EQ(RunKeel(Args(t / "straight", steps)).exit_code, 0);
  Background job(Split(Args(t / "run", steps) + " --nproc 3 --elastic --inject slow:rank=2,step=3,factor=5"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(180), 0) << job.Output();
  const std::string f = "/ckpt-00000040/model.safetensors";
  ExpectSameFile(t / "run" + f, t / "straight" + f);
  // Find the slow member's uid (rank 2) and check it ended with the smallest share.
  const std::string log = job.Output();
  std::smatch m;
  ASSERT_TRUE(std::regex_search(log, m, std::regex(R"(\[rank 2\] generation 0: members \S+, this is member (\d+))")))
      << log;
  const int64_t slow_uid = std::stoll(m[1]);
  nlohmann::json last;
  for (const auto& e : Events(t / "run"))
    if (e.value("event", "") == "shares") last = e;
  ASSERT_TRUE(last.is_object()) << log;
  const auto members = last["members"].get<std::vector<int64_t>>();
  const auto counts = last["micro_batches"].get<std::vector<int>>();
  ASSERT_NE(std::find(members.begin(), members.end(), slow_uid), members.end()) << last.dump() << "\n" << log;
  for (size_t k = 0; k < members.size(); ++k) {
    if (members[k] == slow_uid) {
      for (size_t j = 0; j < members.size(); ++j) EXPECT_LE(counts[k], counts[j]) << last.dump();
    }
  }
  EXPECT_LT(*std::min_element(counts.begin(), counts.end()), 2) << last.dump();  // fair split is 2 each
}

// --straggler-evict in a group of two: the slowed member leaves as a straggler (exit status 3, not restarted)
// and the other finishes alone. (With two members the median used to be the slower one itself, so it never left.)
TEST_F(ElasticTrain, AStragglerInAGroupOfTwoIsEvicted) {
  TempDir t;
  Background job(Split(Args(t / "run", 40) + " --nproc 2 --elastic --straggler-evict 2 "
                       "--inject slow:rank=1,step=2,factor=6,steps=25"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(180), 0) << job.Output();
  const std::string log = job.Output();
  EXPECT_NE(log.find("[rank 1] keel train: quarantined as a straggler"), std::string::npos) << log;
  EXPECT_NE(log.find("exited with status 3"), std::string::npos) << log;
  bool evicted = false;
  for (const auto& e : Events(t / "run"))
    if (e.value("event", "") == "straggler" && e.value("action", "") == "evicted") evicted = true;
  EXPECT_TRUE(evicted) << log;
  EXPECT_TRUE(std::filesystem::exists(t / "run/ckpt-00000040/model.safetensors")) << log;
  // The survivor re-forms as planned at the eviction's step boundary: no failed attempt (it used to find the
  // straggler gone in the next step's collectives, a fault to detect and redo).
  bool after = false;
  for (const auto& e : Events(t / "run")) {
    if (e.value("event", "") == "straggler") after = true;
    if (after) {
      EXPECT_NE(e.value("event", ""), "attempt_failed") << e.dump() << "\n" << log;
    }
  }
}

// A stop request to the one member left waiting below --min-workers (its peer frozen and evicted) ends the whole
// job: the stopped member leaves a "stopped" mark, and the woken peer, which finds itself out of the group, stops
// at it instead of waiting for ever for a quorum that will not come (the launcher took the first exit 0 for the
// end of the job and restarts nobody).
TEST_F(ElasticTrain, AStopBelowQuorumEndsTheWholeJob) {
  TempDir t;
  Background job(Split(Args(t / "run") + " --nproc 2 --min-workers 2 --max-restarts 1 --hang-timeout 1 "
                       "--inject hang:rank=1,step=5,secs=30"),
                 t / "log", InjectEnv());
  ASSERT_TRUE(WaitUntil([&] { return job.Output().find("[rank 0] waiting for a generation") != std::string::npos; },
                        60))
      << job.Output();
  const pid_t rank0 = PidOf(job.Output(), 0);
  ASSERT_GT(rank0, 0) << job.Output();
  ASSERT_EQ(kill(rank0, SIGTERM), 0);
  const int code = job.Wait(60);
  EXPECT_EQ(code, 0) << "(-1: the job still waits)\n" << job.Output();
  EXPECT_NE(job.Output().find("[rank 1] another member stopped the job"), std::string::npos) << job.Output();
}

// A loss spike rolls every member back to the in-memory snapshot and skips the data window that caused it;
// the result is deterministic: one process and three workers end with the same weights.
TEST_F(ElasticTrain, LossSpikeRollsBackAndSkipsTheDataForAnyWorkerCount) {
  TempDir t;
  const int steps = 60;
  const std::string spike = " --spike-factor 4 --check-every 10 --inject spike:rank=0,step=45";
  auto one = RunCommand("KEEL_ALLOW_FAULT_INJECTION=1 " + std::string(KEEL_BINARY) + " " + Args(t / "one", steps) +
                        spike);
  ASSERT_EQ(one.exit_code, 0) << one.output;
  Background three(Split(Args(t / "three", steps) + " --nproc 3 --elastic" + spike), t / "log", InjectEnv());
  ASSERT_EQ(three.Wait(180), 0) << three.Output();
  EXPECT_NE(one.output.find("loss spike"), std::string::npos) << one.output;
  EXPECT_NE(one.output.find("rolled back to step 40 and skipping 6 step(s) of data"), std::string::npos) << one.output;
  EXPECT_NE(three.Output().find("rolled back to step 40"), std::string::npos) << three.Output();
  EXPECT_GE(CountEvents(Events(t / "three"), "spike"), 1);
  const std::string f = "/ckpt-00000060/model.safetensors";
  ExpectSameFile(t / "one" + f, t / "three" + f);
}

// A loss spike soon after a worker rejoined: the rejoined worker holds no snapshot of the step the others roll back
// to (it received the state after it was taken), yet every member must return to the same verified step and skip the
// same data, so the result is still the one-process run's. Worker 2 is killed just after the snapshot of step 50,
// the survivors slowed for a few steps so that its restart rejoins before the spike at step 55.
TEST_F(ElasticTrain, LossSpikeSoonAfterARejoinRollsEveryMemberBackToTheSameSnapshot) {
  TempDir t;
  const int steps = 70;
  const std::string spike = " --spike-factor 4 --check-every 10 --inject spike:rank=";
  auto one = RunCommand("KEEL_ALLOW_FAULT_INJECTION=1 " + std::string(KEEL_BINARY) + " " + Args(t / "one", steps) +
                        spike + "0,step=55");
  ASSERT_EQ(one.exit_code, 0) << one.output;
  ASSERT_NE(one.output.find("rolled back to step 50 and skipping 6 step(s) of data"), std::string::npos) << one.output;
  // The spike comes from the rejoined worker: the slowed survivors may have no micro-batch of step 55 to report it.
  Background three(Split(Args(t / "three", steps) + " --nproc 3 --elastic --max-restarts 1" + spike +
                         "2,step=55;crash:rank=2,step=51;slow:rank=0,step=52,factor=60,steps=3;slow:rank=1,step=52,factor=60,steps=3"),
                   t / "log", InjectEnv());
  ASSERT_EQ(three.Wait(180), 0) << three.Output();
  const std::string log = three.Output();
  const size_t restart = log.find("restarting it");
  ASSERT_NE(restart, std::string::npos) << log;
  const size_t received = log.find("[rank 2] received the training state", restart);
  ASSERT_NE(received, std::string::npos) << log;
  const size_t spiked = log.find("loss spike", received);
  ASSERT_NE(spiked, std::string::npos) << "the restarted worker rejoined only after the spike: " << log;
  EXPECT_NE(log.find("rolled back to step 50", received), std::string::npos) << log;
  const std::string f = "/ckpt-00000070/model.safetensors";
  ExpectSameFile(t / "one" + f, t / "three" + f, log);
  EXPECT_EQ(FinalHashes(log).size(), 1u) << log;
}

// The same after a repair: worker 1 rejoins after the snapshot of step 50 (it holds none), then a bit flip in worker
// 0's parameters is repaired from worker 1. The repaired member keeps its snapshot (a repair stays in the group's
// lineage), so the spike at step 57 still rolls the group back to step 50, as in one process. (Before, the repair
// dropped the group's only snapshot: the rollback found none and the state was reloaded from disk instead.)
TEST_F(ElasticTrain, ARepairedMemberKeepsTheGroupSnapshotForALaterSpike) {
  TempDir t;
  const int steps = 70;
  const std::string spike = " --spike-factor 4 --check-every 10 --inject spike:rank=";
  auto one = RunCommand("KEEL_ALLOW_FAULT_INJECTION=1 " + std::string(KEEL_BINARY) + " " + Args(t / "one", steps) +
                        spike + "0,step=57");
  ASSERT_EQ(one.exit_code, 0) << one.output;
  ASSERT_NE(one.output.find("rolled back to step 50 and skipping 8 step(s) of data"), std::string::npos) << one.output;
  Background two(Split(Args(t / "two", steps) + " --nproc 2 --elastic --max-restarts 1" + spike +
                       "1,step=57;crash:rank=1,step=51;slow:rank=0,step=52,factor=60,steps=3;bitflip:rank=0,step=55"),
                 t / "log", InjectEnv());
  ASSERT_EQ(two.Wait(180), 0) << two.Output();
  const std::string log = two.Output();
  const size_t received = log.find("[rank 1] received the training state");
  ASSERT_NE(received, std::string::npos) << log;
  const size_t repaired = log.find("[rank 0] received the training state", received);
  ASSERT_NE(repaired, std::string::npos) << "the bit flip was repaired from the rejoined member: " << log;
  EXPECT_NE(log.find("[rank 0] step 58: loss spike", repaired), std::string::npos) << log;
  EXPECT_NE(log.find("rolled back to step 50 and skipping 8", repaired), std::string::npos) << log;
  const std::string f = "/ckpt-00000070/model.safetensors";
  ExpectSameFile(t / "one" + f, t / "two" + f, log);
}

// A run that rolled back for a loss spike, stopped with a checkpoint and resumed with another worker count ends
// where the uninterrupted one-process run does: the data position after the skipped window and the loss
// statistics travel in the checkpoint.
TEST_F(ElasticTrain, ResumeAfterALossSpikeRollbackWithAnotherWorkerCountIsExact) {
  TempDir t;
  const int steps = 70;
  const std::string spike = " --spike-factor 4 --check-every 10 --inject spike:rank=0,step=45";
  auto one = RunCommand("KEEL_ALLOW_FAULT_INJECTION=1 " + std::string(KEEL_BINARY) + " " + Args(t / "one", steps) +
                        spike);
  ASSERT_EQ(one.exit_code, 0) << one.output;
  ASSERT_NE(one.output.find("rolled back to step 40 and skipping 6 step(s) of data"), std::string::npos) << one.output;
  const std::string out = t / "two";
  Background first(Split(Args(out, steps) + " --nproc 2 --elastic --stop-after 55" + spike), t / "log1", InjectEnv());
  ASSERT_EQ(first.Wait(180), 0) << first.Output();
  ASSERT_NE(first.Output().find("rolled back to step 40"), std::string::npos) << first.Output();
  ASSERT_FALSE(std::filesystem::exists(out + "/ckpt-00000070")) << first.Output();
  Background second(Split(Args(out, steps) + " --nproc 3 --resume --spike-factor 4 --check-every 10"), t / "log2");
  ASSERT_EQ(second.Wait(180), 0) << second.Output();
  const std::string f = "/ckpt-00000070/model.safetensors";
  ExpectSameFile(t / "one" + f, out + f, first.Output() + "\n----\n" + second.Output());
}

// A spike right after the checkpoint of step 50 rolls back to the snapshot of step 40: ckpt-00000050 now holds the
// abandoned trajectory. There is no older checkpoint, so the leader first writes one of the restored state (step
// 40), then deletes ckpt-00000050; a run stopped a few steps later resumes from its own stop checkpoint
// (not from the newer-numbered stale one, which would redo the spike and skip another window) and ends exactly
// where the uninterrupted run does.
TEST_F(ElasticTrain, CheckpointsAfterARollbackPointAreDroppedSoResumeIsExact) {
  TempDir t;
  const int steps = 70;
  const std::string spike = " --spike-factor 4 --check-every 10 --inject spike:rank=0,step=50";
  auto one = RunCommand("KEEL_ALLOW_FAULT_INJECTION=1 " + std::string(KEEL_BINARY) + " " + Args(t / "one", steps) +
                        spike);
  ASSERT_EQ(one.exit_code, 0) << one.output;
  ASSERT_NE(one.output.find("rolled back to step 40 and skipping 11 step(s) of data"), std::string::npos) << one.output;
  const std::string out = t / "two";
  auto first = RunCommand("KEEL_ALLOW_FAULT_INJECTION=1 " + std::string(KEEL_BINARY) + " " + Args(out, steps) + spike +
                          " --stop-after 55");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  ASSERT_NE(first.output.find("rolled back to step 40"), std::string::npos) << first.output;
  EXPECT_FALSE(std::filesystem::exists(out + "/ckpt-00000050")) << "the abandoned trajectory's checkpoint is gone";
  ASSERT_TRUE(std::filesystem::exists(out + "/ckpt-00000045/COMMITTED")) << first.output;
  Background second(Split(Args(out, steps) + " --nproc 2 --resume --spike-factor 4 --check-every 10"), t / "log2");
  ASSERT_EQ(second.Wait(180), 0) << second.Output();
  EXPECT_NE(second.Output().find("resuming from " + out + "/ckpt-00000045 at step 45"), std::string::npos)
      << second.Output();
  const std::string f = "/ckpt-00000070/model.safetensors";
  ExpectSameFile(t / "one" + f, out + f, first.output + "\n----\n" + second.Output());
}

// The leader (member 0 of the group: it writes checkpoints and metrics) is SIGKILLed in the middle of writing the
// checkpoint of step 100. The survivors go on under a new leader, which writes the later checkpoints and metrics;
// the half-written directory is never taken for a checkpoint, every step has exactly one metrics line, and the
// weights end bit-identical. A --resume after losing the later checkpoints falls back past the half-written one.
TEST_F(ElasticTrain, LeaderKilledWhileWritingACheckpointIsReplacedAndNothingIsLost) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 3 --elastic --max-restarts 1 --inject truncate-ckpt:step=100,then=kill"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(180), 0) << job.Output();
  const std::string log = job.Output();
  // The writer is the leader (member 0 of the group, whichever launch rank that is); it killed itself mid-write.
  EXPECT_NE(log.find("truncate-ckpt of the checkpoint of step 100"), std::string::npos) << log;
  EXPECT_NE(log.find("was killed by signal 9 (SIGKILL); restarting"), std::string::npos) << log;
  ExpectSameAsStraight(out);
  EXPECT_TRUE(std::filesystem::exists(out + "/ckpt-00000150/COMMITTED")) << log;
  EXPECT_FALSE(std::filesystem::exists(out + "/ckpt-00000100/COMMITTED")) << log;
  std::map<int64_t, int> steps;
  for (const auto& m : JsonLines(out + "/metrics.jsonl")) ++steps[m.value("step", int64_t{-1})];
  EXPECT_EQ(steps.size(), static_cast<size_t>(kSteps)) << ReadFileText(out + "/metrics.jsonl");
  for (const auto& [step, n] : steps) EXPECT_EQ(n, 1) << "step " << step << " has " << n << " metrics lines";
  std::filesystem::remove_all(out + "/ckpt-00000200");
  std::filesystem::remove_all(out + "/ckpt-00000150");
  auto r = RunKeel(Args(out) + " --nproc 2 --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resuming from " + out + "/ckpt-00000050 at step 50"), std::string::npos) << r.output;
  ExpectSameAsStraight(out);
}

// The leader freezes (the whole process stopped) in the middle of writing the checkpoint of step 50 and is
// evicted; the others go on without it (and might roll back and delete what they abandon). When it wakes, its
// writer finds that a generation without it exists and does not write the checkpoint: a late write could land a
// checkpoint of an abandoned lineage after the others' cleanup, for --resume to take. (Before, it did: with
// --keep 0, ckpt-50 appeared after the others' later checkpoints.) The job ends bit-identical.
TEST_F(ElasticTrain, ALeaderFrozenMidCheckpointDoesNotWriteItAfterItsEviction) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 3 --elastic --keep 0 --inject truncate-ckpt:step=50,then=freeze,secs=30"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(180), 0) << job.Output();
  const std::string log = job.Output();
  EXPECT_NE(log.find("truncate-ckpt of the checkpoint of step 50"), std::string::npos) << log;
  EXPECT_NE(log.find("evicted"), std::string::npos) << log;
  EXPECT_FALSE(std::filesystem::exists(out + "/ckpt-00000050")) << log;
  EXPECT_TRUE(std::filesystem::exists(out + "/ckpt-00000200/COMMITTED")) << log;
  ExpectSameAsStraight(out);
}

// The same in the FINAL checkpoint's write: the others re-form, their new leader writes the final checkpoint and
// marks the job done; the frozen one, woken, neither writes its copy nor marks the job done itself (it was
// evicted): it re-forms, finds the job done and exits 0.
TEST_F(ElasticTrain, ALeaderFrozenInTheFinalWriteLeavesTheFinishToTheOthers) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 3 --elastic --inject truncate-ckpt:step=200,then=freeze,secs=30"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(180), 0) << job.Output();
  const std::string log = job.Output();
  EXPECT_NE(log.find("truncate-ckpt of the checkpoint of step 200"), std::string::npos) << log;
  EXPECT_NE(log.find("writing the final checkpoint (step 200) in place of the previous leader"), std::string::npos)
      << log;
  EXPECT_TRUE(std::filesystem::exists(out + "/ckpt-00000200/COMMITTED")) << log;
  ExpectSameAsStraight(out);
}

// The leader is SIGKILLed in the middle of writing the FINAL checkpoint. The other workers do not exit until the
// job is marked done (the launcher would take their exit 0 for the end of the job and restart nobody): they see the
// leader go, re-form (with its restarted incarnation), and the new leader writes the final checkpoint and marks the
// job done. The launcher exits 0 with the final checkpoint committed and the weights bit-identical.
TEST_F(ElasticTrain, LeaderKilledWhileWritingTheFinalCheckpointIsReplaced) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 3 --elastic --max-restarts 1 --inject truncate-ckpt:step=" +
                       std::to_string(kSteps) + ",then=kill"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(180), 0) << job.Output();
  const std::string log = job.Output();
  EXPECT_NE(log.find("truncate-ckpt of the checkpoint of step " + std::to_string(kSteps)), std::string::npos) << log;
  EXPECT_NE(log.find("re-forming to finish it"), std::string::npos) << log;
  EXPECT_NE(log.find("writing the final checkpoint (step " + std::to_string(kSteps) + ") in place of the previous leader"),
            std::string::npos)
      << log;
  EXPECT_EQ(log.find("after the job finished; not restarted"), std::string::npos) << log;
  EXPECT_TRUE(std::filesystem::exists(out + "/ckpt-00000200/COMMITTED")) << log;
  ExpectSameAsStraight(out);
}

// The same with --min-workers 2 and no restart left: the one survivor is below quorum, but finishing a trained job
// needs only a member holding the state, so it writes the final checkpoint alone instead of waiting for ever.
TEST_F(ElasticTrain, ASurvivorBelowQuorumStillFinishesTheJob) {
  TempDir t;
  const std::string out = t / "run";
  Background job(Split(Args(out) + " --nproc 2 --elastic --min-workers 2 --max-restarts 0 --inject truncate-ckpt:step=" +
                       std::to_string(kSteps) + ",then=kill"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(180), 0) << job.Output();
  const std::string log = job.Output();
  EXPECT_NE(log.find("writing the final checkpoint (step " + std::to_string(kSteps) + ") in place of the previous leader"),
            std::string::npos)
      << log;
  EXPECT_TRUE(std::filesystem::exists(out + "/ckpt-00000200/COMMITTED")) << log;
  ExpectSameAsStraight(out);
}

// Fault injection cannot be switched on by accident.
TEST_F(ElasticTrain, InjectionNeedsTheEnvironmentSwitch) {
  TempDir t;
  auto r = RunKeel(Args(t / "run", 4) + " --nproc 2 --elastic --inject crash:rank=1,step=2");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("KEEL_ALLOW_FAULT_INJECTION=1"), std::string::npos) << r.output;
  r = RunKeel(Args(t / "run2", 4) + " --nproc 2 --elastic --comm-timeout 5");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--hang-timeout is their one timeout"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace keel::testing
