// train_e2e_test.cc: end-to-end training through the keel binary — validation loss falls on a real corpus,
// an interrupted run (stop, kill -9) resumes bit-identically, and a corrupt newest checkpoint falls back.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "test_util.h"

namespace keel::testing {
namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Byte for byte the same, and present (two missing files would read as equal empty strings).
void ExpectSameFile(const std::string& a, const std::string& b) {
  const std::string x = ReadAll(a), y = ReadAll(b);
  EXPECT_FALSE(x.empty()) << a << " is missing or empty";
  EXPECT_FALSE(y.empty()) << b << " is missing or empty";
  EXPECT_TRUE(x == y) << a << " differs from " << b;
}

// A data dir shared by the tests of this file: the fortunes corpus, byte tokenizer (prepare takes < 1 s).
class TrainE2E : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    auto r = RunKeel("prepare --input /usr/share/games/fortunes --out " + Data() + " --tokenizer byte");
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string Data() { return *dir_ / "data"; }
  static std::string Args(const std::string& out, int steps) {
    return "train --data " + Data() + " --out " + out + " --layers 2 --heads 2 --dim 32 --ctx 32 --batch 4 " +
           "--grad-accum 2 --steps " + std::to_string(steps) + " --warmup 5 --lr 3e-3 --threads 1 --no-progress " +
           "--eval-every 10 --eval-batches 4 --checkpoint-every 5 --keep 3";
  }
  static TempDir* dir_;
};
TempDir* TrainE2E::dir_ = nullptr;

TEST_F(TrainE2E, ValidationLossFallsOnFortunes) {
  TempDir t;
  auto r = RunKeel(Args(t / "run", 60));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::ifstream f(t / "run/metrics.jsonl");
  std::string line;
  std::vector<double> val, lr;
  int lines = 0;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line);
    ++lines;
    if (j.contains("val_loss")) val.push_back(j["val_loss"].get<double>());
    lr.push_back(j["lr"].get<double>());
  }
  EXPECT_EQ(lines, 60);
  // The schedule spans --steps: warmup to 3e-3 over 5 steps, then cosine down to --min-lr-frac (0.1) x 3e-3 at
  // step 60 (it used to decay over a fixed 1000 steps whatever --steps was: 2.98e-3 at the last step).
  ASSERT_EQ(lr.size(), 60u);
  for (int s = 5; s < 60; ++s) {
    const double cosine = 3e-4 + 0.5 * (1 + std::cos(M_PI * (s - 5) / 55.0)) * (3e-3 - 3e-4);
    EXPECT_NEAR(lr[s], cosine, 1e-8) << "step " << s;
  }
  EXPECT_LT(lr[59], 3.1e-4);
  ASSERT_GE(val.size(), 3u);
  // Byte-level loss starts near ln(256) = 5.55; 60 small steps must bring validation well below it.
  EXPECT_LT(val.back(), val.front() - 0.5) << "first " << val.front() << " last " << val.back();
  EXPECT_LT(val.back(), 4.0);
}

TEST_F(TrainE2E, StopAndResumeIsBitIdentical) {
  TempDir t;
  ASSERT_EQ(RunKeel(Args(t / "straight", 40)).exit_code, 0);
  auto a = RunKeel(Args(t / "split", 40) + " --stop-after 20");
  ASSERT_EQ(a.exit_code, 0) << a.output;
  EXPECT_TRUE(std::filesystem::exists(t / "split/ckpt-00000020/COMMITTED"));
  EXPECT_FALSE(std::filesystem::exists(t / "split/ckpt-00000040"));
  auto b = RunKeel(Args(t / "split", 40) + " --resume");
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("resuming from"), std::string::npos) << b.output;
  for (const char* f : {"model.safetensors", "optim.safetensors"}) {
    std::string x = ReadAll(t / "straight/ckpt-00000040/" + f), y = ReadAll(t / "split/ckpt-00000040/" + f);
    ASSERT_FALSE(x.empty());
    EXPECT_TRUE(x == y) << f << " differs after resume";
  }
}

// Spike detection goes on across a resume: the running loss statistics travel in the checkpoint (they used to
// start over, so the resumed run applied the spike that the uninterrupted one rolled back), and a spike after the
// next --check-every snapshot gives the same result either way.
TEST_F(TrainE2E, ResumeKeepsSpikeDetection) {
  TempDir t;
  const std::string spike = " --spike-factor 3 --check-every 10 --inject spike:rank=0,step=35";
  const std::string env = "KEEL_ALLOW_FAULT_INJECTION=1 " + std::string(KEEL_BINARY) + " ";
  auto straight = RunCommand(env + Args(t / "straight", 40) + spike);
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  EXPECT_NE(straight.output.find("rolled back to step 30"), std::string::npos) << straight.output;
  ASSERT_EQ(RunCommand(env + Args(t / "split", 40) + spike + " --stop-after 22").exit_code, 0);
  auto resumed = RunCommand(env + Args(t / "split", 40) + spike + " --resume");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("rolled back to step 30"), std::string::npos) << resumed.output;
  for (const char* f : {"model.safetensors", "optim.safetensors"})
    ExpectSameFile(t / "straight/ckpt-00000040/" + f, t / "split/ckpt-00000040/" + f);
}

// Two spikes before the snapshot is renewed (a resume snapshots its own step, here not a --check-every step, so
// the replay after the first spike takes no new one): the second rollback skips on from where the first one
// left the data, so neither spike's window is trained on again (the data offset is the sum of both skips).
TEST_F(TrainE2E, ASecondSpikeKeepsTheFirstSkip) {
  TempDir t;
  const std::string env = "KEEL_ALLOW_FAULT_INJECTION=1 " + std::string(KEEL_BINARY) + " ";
  ASSERT_EQ(RunCommand(env + Args(t / "run", 40) + " --spike-factor 3 --check-every 10 --stop-after 22").exit_code, 0);
  auto r = RunCommand(env + Args(t / "run", 40) +
                      " --spike-factor 3 --check-every 10 --inject 'spike:rank=0,step=25;spike:rank=0,step=27' --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  int64_t skipped = 0, spikes = 0;
  for (size_t at = r.output.find("and skipping "); at != std::string::npos; at = r.output.find("and skipping ", at + 1)) {
    skipped += std::stoll(r.output.substr(at + 13));
    ++spikes;
  }
  ASSERT_EQ(spikes, 2) << r.output;
  EXPECT_NE(r.output.find("rolled back to step 22"), std::string::npos) << r.output;
  const auto state = nlohmann::json::parse(ReadAll(t / "run/ckpt-00000040/state.json"));
  EXPECT_EQ(state["data_offset"].get<int64_t>(), skipped) << r.output;
}

TEST_F(TrainE2E, KillNineThenResumeIsBitIdentical) {
  TempDir t;
  ASSERT_EQ(RunKeel(Args(t / "straight", 40)).exit_code, 0);
  // Start a run in the background and SIGKILL it once a checkpoint is committed.
  pid_t pid = fork();
  if (pid == 0) {
    std::string cmd = std::string(KEEL_BINARY) + " " + Args(t / "killed", 40) + " >/dev/null 2>&1";
    execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  bool killed = false;
  while (std::chrono::steady_clock::now() < deadline) {
    if (std::filesystem::exists(t / "killed/ckpt-00000010/COMMITTED")) {
      kill(pid, SIGKILL);
      killed = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  int st = 0;
  waitpid(pid, &st, 0);
  ASSERT_TRUE(killed) << "the run never wrote a checkpoint";
  ASSERT_TRUE(WIFSIGNALED(st));
  ASSERT_FALSE(std::filesystem::exists(t / "killed/ckpt-00000040")) << "the kill came after the end of the run";
  auto r = RunKeel(Args(t / "killed", 40) + " --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resuming from " + t / "killed/ckpt-000000"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("resuming from " + t / "killed/ckpt-00000040"), std::string::npos) << r.output;
  ExpectSameFile(t / "straight/ckpt-00000040/model.safetensors", t / "killed/ckpt-00000040/model.safetensors");
}

TEST_F(TrainE2E, CorruptNewestCheckpointFallsBackWithWarning) {
  TempDir t;
  ASSERT_EQ(RunKeel(Args(t / "straight", 30)).exit_code, 0);
  ASSERT_EQ(RunKeel(Args(t / "run", 30) + " --stop-after 20").exit_code, 0);
  // Flip one byte in the middle of the newest checkpoint's weights.
  std::string p = t / "run/ckpt-00000020/model.safetensors";
  {
    std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(std::filesystem::file_size(p) / 2));
    char c = 0;
    f.read(&c, 1);
    f.seekp(static_cast<std::streamoff>(std::filesystem::file_size(p) / 2));
    c ^= 0x10;
    f.write(&c, 1);
  }
  auto r = RunKeel(Args(t / "run", 30) + " --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("warning: skipping"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("ckpt-00000015"), std::string::npos) << r.output;
  // Deterministic training: redoing steps 15..30 from the older checkpoint lands on the same weights.
  ExpectSameFile(t / "straight/ckpt-00000030/model.safetensors", t / "run/ckpt-00000030/model.safetensors");
}

// A crash between a first checkpoint's rename and its COMMITTED marker leaves nothing committed: --resume starts
// the run afresh (as a crash a moment earlier, with only the .tmp, would), instead of refusing for ever. A resume
// with another --lr goes on but says so.
TEST_F(TrainE2E, UncommittedFirstCheckpointStartsAfreshAndAChangedLrWarns) {
  TempDir t;
  ASSERT_EQ(RunKeel(Args(t / "straight", 10)).exit_code, 0);
  ASSERT_EQ(RunKeel(Args(t / "run", 10) + " --stop-after 5").exit_code, 0);
  ASSERT_TRUE(std::filesystem::remove(t / "run/ckpt-00000005/COMMITTED"));
  auto r = RunKeel(Args(t / "run", 10) + " --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("holds no committed checkpoint yet: starting a new run"), std::string::npos) << r.output;
  ExpectSameFile(t / "straight/ckpt-00000010/model.safetensors", t / "run/ckpt-00000010/model.safetensors");
  std::string args = Args(t / "run", 12) + " --resume";
  args.replace(args.find("--lr 3e-3"), 9, "--lr 1e-3");
  r = RunKeel(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("warning: --lr 0.001 differs from the run's 0.003"), std::string::npos) << r.output;
}

// A checkpoint from a run on other data (copied into the run directory) is refused by --resume, naming it:
// byte-tokenizer data sets share their tokenizer, so only the checkpoint's data fingerprint tells them apart.
TEST_F(TrainE2E, ACheckpointFromOtherDataIsRefused) {
  TempDir t;
  auto r = RunKeel("prepare --input /usr/share/games/fortunes/computers --out " + (t / "other-data") +
                   " --tokenizer byte");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::string other = Args(t / "other", 10);
  other.replace(other.find(Data()), Data().size(), t / "other-data");
  ASSERT_EQ(RunKeel(other).exit_code, 0);
  ASSERT_EQ(RunKeel(Args(t / "run", 10) + " --stop-after 5").exit_code, 0);
  std::filesystem::copy(t / "other/ckpt-00000010", t / "run/ckpt-00000010");
  r = RunKeel(Args(t / "run", 10) + " --resume");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("ckpt-00000010: trained on different data"), std::string::npos) << r.output;
}

// A job that died before its first commit (an elastic job's workers log events before run.json exists) left
// only keel's logs: --resume takes the directory over instead of refusing it for ever (a plain start is refused:
// a live job waiting for its workers looks the same). Anything else is not taken over.
TEST_F(TrainE2E, ADirectoryHoldingOnlyKeelsLogsIsTakenOver) {
  TempDir t;
  std::filesystem::create_directories(t / "run");
  { std::ofstream(t / "run/events.jsonl") << "{\"event\":\"start\"}\n"; }
  auto r = RunKeel(Args(t / "run", 5));  // a plain start: it could be a live job still waiting for its workers
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("holds only the logs of a job that has not committed a step"), std::string::npos)
      << r.output;
  r = RunKeel(Args(t / "run", 5) + " --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(std::filesystem::exists(t / "run/ckpt-00000005/model.safetensors"));
  std::filesystem::create_directories(t / "other");
  { std::ofstream(t / "other/notes.txt") << "mine"; }
  r = RunKeel(Args(t / "other", 5));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("is not empty and is not a keel run directory"), std::string::npos) << r.output;
}

TEST_F(TrainE2E, SampleFromRunWithKvCacheIsDeterministic) {
  TempDir t;
  ASSERT_EQ(RunKeel(Args(t / "run", 10)).exit_code, 0);
  auto a = RunKeel("sample --ckpt " + t / "run" + " --prompt 'The ' -n 20 --seed 7 --threads 1");
  auto b = RunKeel("sample --ckpt " + t / "run" + " --prompt 'The ' -n 20 --seed 7 --threads 1");
  ASSERT_EQ(a.exit_code, 0) << a.output;
  EXPECT_EQ(a.output, b.output);
  EXPECT_EQ(a.output.rfind("The ", 0), 0u) << a.output;
  EXPECT_GT(a.output.size(), 8u);
}

// --ignore-eos generates exactly -n tokens (context permitting: ctx 32 here) and --timings reports the decode rate.
TEST_F(TrainE2E, SampleTimingsAndIgnoreEos) {
  TempDir t;
  ASSERT_EQ(RunKeel(Args(t / "run", 10)).exit_code, 0);
  auto r = RunKeel("sample --ckpt " + t / "run" + " --prompt 'The ' -n 20 --temperature 0 --ignore-eos --timings --threads 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("timings: prompt "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("decode 19 tokens in "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(" tokens/s"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace keel::testing
