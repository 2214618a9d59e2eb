// diloco_train_test.cc: slow-link training through the keel binary (docs/diloco.md) — the H = 1 equivalence
// of diloco and data-parallel training (bit-exact with one worker; within float rounding with two workers and
// the linear SGD inner optimizer, against a clearly larger difference for H = 2), resume of a diloco run,
// --compress int8 training with two processes (loss decreases, bytes on the wire), a worker SIGKILLed in the
// middle of an inner phase (the survivors keep their pseudo-gradients and finish; the restarted worker gets
// the outer state from a peer), a worker slowed 3x getting a proportional share (ddp and diloco), and the
// rounds against an independent float64 PyTorch re-computation (tests/diloco_reference.py).
#include <gtest/gtest.h>

#include <cmath>
#include <regex>
#include <set>

#include <nlohmann/json.hpp>

#include "dist_test_util.h"
#include "train/checkpoint_io.h"

namespace keel::testing {
namespace {

std::vector<float> Params(const std::string& run) {
  std::vector<std::string> warnings;
  auto s = LoadSnapshot(run, false, &warnings);
  if (!s.ok()) {
    ADD_FAILURE() << run << ": " << s.status().message();
    return {};
  }
  return s->params;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size() || a.empty()) return INFINITY;
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

std::set<std::string> FinalHashes(const std::string& log) {
  std::set<std::string> out;
  std::regex re(R"(final state: step \d+, hash ([0-9a-f]+))");
  for (auto it = std::sregex_iterator(log.begin(), log.end(), re); it != std::sregex_iterator(); ++it)
    out.insert((*it)[1]);
  return out;
}

std::vector<std::string> InjectEnv() { return {"KEEL_ALLOW_FAULT_INJECTION=1"}; }

class DilocoTrain : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    std::string text;
    const char* words[] = {"alpha", "beta", "gamma", "delta", "keel", "ship", "sea", "wind", "sail", "north"};
    uint64_t x = 99;
    for (int line = 0; line < 600; ++line)
      for (int w = 0; w < 10; ++w) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        text += words[(x >> 33) % 10];
        text += w == 9 ? "\n" : " ";
      }
    WriteText(*dir_ / "corpus.txt", text);
    auto r = RunKeel("prepare --input " + (*dir_ / "corpus.txt") + " --out " + Data() + " --tokenizer byte");
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string Data() { return *dir_ / "data"; }
  static std::string Args(const std::string& out, int steps, int accum = 6) {
    return "train --data " + Data() + " --out " + out + " --layers 2 --heads 2 --dim 32 --ctx 32 --batch 2 " +
           "--grad-accum " + std::to_string(accum) + " --steps " + std::to_string(steps) +
           " --threads 1 --no-progress --checkpoint-every 1000 --eval-every 1000";
  }
  static TempDir* dir_;
};
TempDir* DilocoTrain::dir_ = nullptr;

// H = 1, outer lr 1, no momentum: one outer round is one optimizer step. With one worker the outer step lands
// exactly on the inner step's parameters, so the weights equal data-parallel training's bit for bit.
TEST_F(DilocoTrain, H1WithOneWorkerIsBitIdenticalToDdp) {
  TempDir t;
  const int steps = 12;
  ASSERT_EQ(RunKeel(Args(t / "ddp", steps)).exit_code, 0);
  auto r = RunKeel(Args(t / "diloco", steps) + " --sync diloco --inner-steps 1 --outer-lr 1 --outer-momentum 0");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string f = "/ckpt-00000012/model.safetensors";
  ASSERT_FALSE(ReadFileText(t / "ddp" + f).empty());
  EXPECT_TRUE(ReadFileText(t / "ddp" + f) == ReadFileText(t / "diloco" + f)) << r.output;
  // The comparison can fail: a different outer step does not give the same weights.
  ASSERT_EQ(RunKeel(Args(t / "other", steps) + " --sync diloco --inner-steps 1 --outer-lr 0.9 --outer-momentum 0")
                .exit_code, 0);
  EXPECT_FALSE(ReadFileText(t / "ddp" + f) == ReadFileText(t / "other" + f));
}

// Two workers: the average of two SGD updates is the SGD update of the averaged gradient, so diloco with H = 1
// equals ddp up to float rounding (the pseudo-gradients travel as floats; ddp sums in fixed point). H = 2
// is a different algorithm: its difference must be far larger.
TEST_F(DilocoTrain, H1WithTwoWorkersAndSgdMatchesDdp) {
  TempDir t;
  const int steps = 10;
  const std::string sgd = " --nproc 2 --optimizer sgd --lr 0.5 --warmup 0 --grad-clip 0 --weight-decay 0";
  auto a = RunKeel(Args(t / "ddp", steps) + sgd);
  ASSERT_EQ(a.exit_code, 0) << a.output;
  auto b = RunKeel(Args(t / "h1", steps) + sgd + " --sync diloco --inner-steps 1 --outer-lr 1 --outer-momentum 0");
  ASSERT_EQ(b.exit_code, 0) << b.output;
  auto c = RunKeel(Args(t / "h2", steps) + sgd + " --sync diloco --inner-steps 2 --outer-lr 1 --outer-momentum 0");
  ASSERT_EQ(c.exit_code, 0) << c.output;
  const auto p_ddp = Params(t / "ddp"), p_h1 = Params(t / "h1"), p_h2 = Params(t / "h2");
  const auto p0 = [&] {  // how far training moved the weights
    TempDir u;
    (void)RunKeel(Args(u / "r", 1) + " --optimizer sgd --lr 1e-30 --warmup 0");
    return Params(u / "r");
  }();
  const double moved = MaxAbsDiff(p_ddp, p0), d1 = MaxAbsDiff(p_ddp, p_h1), d2 = MaxAbsDiff(p_ddp, p_h2);
  std::printf("max |ddp - initial| %.3g, |ddp - diloco H=1| %.3g, |ddp - diloco H=2| %.3g\n", moved, d1, d2);
  EXPECT_GT(moved, 1e-2);
  EXPECT_LT(d1, 1e-5 * std::max(1.0, moved));
  EXPECT_GT(d2, 100 * d1);
}

// keel's DiLoCo against an independent float64 PyTorch re-computation (tests/diloco_reference.py: keel's data
// sampling, AdamW, LR schedule and the outer Nesterov step written from the documentation, the model from
// bench/torch_gpt.py): three workers with AdamW inner steps and the published outer settings, resumed from a ddp
// checkpoint (so the inner moments start equal and known), rounds of 3, 3 and a last one of 1 step. The final
// parameters (every tensor on its own) and outer momentum must agree to float rounding: 1e-4 relative (measured:
// <= 1e-5; an outer lr off by 1.4 % gives 1.4e-2).
TEST_F(DilocoTrain, MatchesAnIndependentPyTorchReference) {
  if (RunCommand("/usr/bin/python3 -c 'import torch, numpy'").exit_code != 0)
    KEEL_SKIP_UNLESS_REQUIRED("/usr/bin/python3 cannot import torch and numpy");
  TempDir t;
  const std::string lr = " --lr 3e-3 --warmup 2";
  auto a = RunKeel(Args(t / "run", 1, 3) + lr + " --checkpoint-every 1");
  ASSERT_EQ(a.exit_code, 0) << a.output;
  std::filesystem::copy(t / "run/ckpt-00000001", t / "start", std::filesystem::copy_options::recursive);
  // --even-shares: one micro-batch per worker, as the reference assumes, however loaded the machine; a worker
  // slowed 6x shows it (speed-aware shares would give it none and the others more, which changes the result).
  Background job(Split(Args(t / "run", 8, 3) + lr + " --resume --nproc 3 --sync diloco --inner-steps 3 "
                       "--even-shares --inject slow:rank=2,step=1,factor=6"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(120), 0) << job.Output();
  EXPECT_EQ(job.Output().find("micro-batches per member"), std::string::npos) << job.Output();
  auto r = RunCommand("/usr/bin/python3 " KEEL_SOURCE_DIR "/tests/diloco_reference.py " + Data() + " " + t / "start" +
                      " " + t / "run/ckpt-00000008" + " --workers 3 --inner-steps 3 --steps 8");
  std::printf("%s", r.output.c_str());
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

// A diloco run stopped after two rounds and resumed ends where the uninterrupted run ends, bit for bit (outer
// momentum and the inner moments come back from the checkpoint).
TEST_F(DilocoTrain, ResumeIsBitExact) {
  TempDir t;
  const std::string d = " --sync diloco --inner-steps 4";
  ASSERT_EQ(RunKeel(Args(t / "straight", 16) + d).exit_code, 0);
  auto first = RunKeel(Args(t / "run", 16) + d + " --stop-after 2");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_TRUE(std::filesystem::exists(t / "run/ckpt-00000008")) << first.output;
  auto second = RunKeel(Args(t / "run", 16) + d + " --resume");
  ASSERT_EQ(second.exit_code, 0) << second.output;
  for (const char* f : {"/ckpt-00000016/model.safetensors", "/ckpt-00000016/optim.safetensors"})
    EXPECT_TRUE(ReadFileText(t / "straight" + f) == ReadFileText(t / "run" + f)) << f << "\n" << second.output;
  EXPECT_NE(ReadFileText(t / "run/ckpt-00000016/optim.safetensors").find("outer.momentum"), std::string::npos);
}

// --compress int8 with two processes trains (the loss falls), and the metered bytes are a fraction of the
// uncompressed exchange's; one worker behind an emulated link reports its delays.
TEST_F(DilocoTrain, Int8CompressionTrainsWithTwoProcesses) {
  TempDir t;
  const int steps = 40;
  auto a = RunKeel(Args(t / "none", steps) + " --nproc 2 --lr 3e-3");
  ASSERT_EQ(a.exit_code, 0) << a.output;
  Background job(Split(Args(t / "int8", steps) + " --nproc 2 --lr 3e-3 --compress int8 --inject "
                       "link:rank=1,mbit=1000,latency_ms=1"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(120), 0) << job.Output();
  const auto m = JsonLines(t / "int8/metrics.jsonl"), n = JsonLines(t / "none/metrics.jsonl");
  ASSERT_EQ(m.size(), static_cast<size_t>(steps));
  double first = 0, last = 0;
  for (int i = 0; i < 5; ++i) first += m[static_cast<size_t>(i)]["loss"].get<double>() / 5;
  for (int i = steps - 5; i < steps; ++i) last += m[static_cast<size_t>(i)]["loss"].get<double>() / 5;
  EXPECT_LT(last, first - 0.3) << "int8 training should learn";
  // Against the uncompressed run: close losses, far fewer bytes (int64 fixed point: 8 bytes per value vs ~1).
  const double none_bytes = n.back()["wire_bytes_total"].get<double>(), int8_bytes = m.back()["wire_bytes_total"].get<double>();
  std::printf("bytes sent by the leader in %d steps: %.0f uncompressed, %.0f int8 (%.1fx fewer)\n", steps, none_bytes,
              int8_bytes, none_bytes / int8_bytes);
  EXPECT_GT(int8_bytes, 0);
  EXPECT_LT(int8_bytes, none_bytes / 4);
  EXPECT_NEAR(m.back()["loss"].get<double>(), n.back()["loss"].get<double>(), 0.25);
  EXPECT_NE(job.Output().find("link emulation 1000 Mbit/s"), std::string::npos) << job.Output();
}

// A worker SIGKILLed in the middle of an inner phase: the survivors' exchange fails, they re-form and commit
// the round with their own pseudo-gradients (not redoing their inner steps); the launcher restarts the worker
// and it receives the outer state from a peer; everyone ends with the same state.
TEST_F(DilocoTrain, AWorkerKilledDuringTheInnerPhaseLosesOnlyItsOwnWork) {
  TempDir t;
  // 120 steps (24 rounds): long enough for the restarted worker to start and join. The steps alone take ~1 s on a
  // fast machine, less than a worker's start, so rank 0's link gets 60 ms of latency per exchange (a time that
  // does not shrink with the machine's speed): the rounds after the crash take several seconds.
  Background job(Split(Args(t / "run", 120) + " --nproc 3 --elastic --max-restarts 1 --sync diloco --inner-steps 5 "
                       "--compress int8 --inject crash:rank=1,step=7;link:rank=0,mbit=1000,latency_ms=60"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(120), 0) << job.Output();
  const std::string log = job.Output();
  EXPECT_NE(log.find("attempt failed"), std::string::npos) << log;
  EXPECT_NE(log.find("reuses this member's pseudo-gradient (inner steps not redone)"), std::string::npos) << log;
  EXPECT_NE(log.find("received the training state"), std::string::npos) << "the restarted worker rejoined: " << log;
  EXPECT_EQ(FinalHashes(log).size(), 1u) << log;
  EXPECT_TRUE(std::filesystem::exists(t / "run/ckpt-00000120/model.safetensors")) << log;
  // The round that lost the worker committed once, as the 10th step, after a redone attempt.
  // Its tokens are the survivors' (the lost worker's micro-batches are not counted), fewer than a full round's.
  bool redone = false;
  double lost_round_tokens = -1, full_round_tokens = 0;
  for (const auto& e : JsonLines(t / "run/metrics.jsonl")) {
    if (e["step"].get<int>() == 9) {
      redone = e.value("attempts", 1) > 1;
      lost_round_tokens = e.value("tokens", -1.0);
    } else if (e.value("inner_steps", 0) == 5) {
      full_round_tokens = std::max(full_round_tokens, e.value("tokens", 0.0));
    }
  }
  EXPECT_TRUE(redone) << ReadFileText(t / "run/metrics.jsonl");
  EXPECT_GT(lost_round_tokens, 0) << ReadFileText(t / "run/metrics.jsonl");
  EXPECT_LT(lost_round_tokens, full_round_tokens) << ReadFileText(t / "run/metrics.jsonl");
}

// The same, with the survivors' inner phase slowed so that the restarted worker is back before they notice the
// loss (x150: a worker takes ~0.6 s to start, which does not shrink with faster compute): it joins the generation
// that redoes the round, receives the outer state from a peer, contributes nothing to that round (weight 0) and
// takes its share from the next one.
TEST_F(DilocoTrain, AWorkerRestartedDuringTheRoundJoinsTheRedoneRound) {
  TempDir t;
  Background job(Split(Args(t / "run", 40) + " --nproc 3 --elastic --max-restarts 1 --sync diloco --inner-steps 10 "
                       "--inject crash:rank=1,step=3;slow:rank=0,step=0,factor=150,steps=10;"
                       "slow:rank=2,step=0,factor=150,steps=10"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(120), 0) << job.Output();
  const std::string log = job.Output();
  EXPECT_NE(log.find("reuses this member's pseudo-gradient (inner steps not redone)"), std::string::npos) << log;
  EXPECT_NE(log.find("[rank 1] received the training state (step 0)"), std::string::npos) << log;
  EXPECT_EQ(FinalHashes(log).size(), 1u) << log;
  int finished = 0;
  for (size_t p = log.find("final state: step 40"); p != std::string::npos; p = log.find("final state: step 40", p + 1))
    ++finished;
  EXPECT_EQ(finished, 3) << log;
}

// A worker frozen (SIGSTOP, 4 s) in the middle of an inner phase: the others reach the round's exchange, the watchdog
// evicts the silent member (--hang-timeout 2 s) and the survivors commit the round with their own pseudo-gradients.
// When it wakes it finds itself evicted, rejoins as a new member, receives the outer state and trains on; every
// member ends with the same state.
TEST_F(DilocoTrain, AWorkerFrozenDuringTheInnerPhaseIsEvictedAndRejoins) {
  TempDir t;
  Background job(Split(Args(t / "run", 120) + " --nproc 3 --elastic --sync diloco --inner-steps 5 --compress int8 "
                       "--inject hang:rank=1,step=7,secs=4;link:rank=0,mbit=1000,latency_ms=60"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(150), 0) << job.Output();
  const std::string log = job.Output();
  EXPECT_NE(log.find("[rank 1] evicted: generation"), std::string::npos) << log;
  EXPECT_NE(log.find("reuses this member's pseudo-gradient (inner steps not redone)"), std::string::npos) << log;
  EXPECT_NE(log.find("[rank 1] received the training state"), std::string::npos) << log;
  EXPECT_EQ(log.find("restarting it"), std::string::npos) << "a frozen worker is not restarted: " << log;
  EXPECT_EQ(FinalHashes(log).size(), 1u) << log;
  int finished = 0;
  for (size_t p = log.find("final state: step 120"); p != std::string::npos; p = log.find("final state: step 120", p + 1))
    ++finished;
  EXPECT_EQ(finished, 3) << log;
}

// A NaN in one worker's inner phase fails the vote (non-finite pseudo-gradient); the round is redone with the
// other worker's pseudo-gradient only (no inner steps redone), and the run ends finite on both, in step.
TEST_F(DilocoTrain, ANonFinitePseudoGradientIsNotApplied) {
  TempDir t;
  Background job(Split(Args(t / "run", 20) + " --nproc 2 --elastic --sync diloco --inner-steps 4 "
                       "--inject nan:rank=1,step=6"),
                 t / "log", InjectEnv());
  ASSERT_EQ(job.Wait(120), 0) << job.Output();
  const std::string log = job.Output();
  EXPECT_NE(log.find("non-finite loss or gradient"), std::string::npos) << log;
  EXPECT_NE(log.find("reuses this member's pseudo-gradient"), std::string::npos) << log;
  EXPECT_EQ(FinalHashes(log).size(), 1u) << log;
  for (float x : Params(t / "run")) ASSERT_TRUE(std::isfinite(x));
}

// bf16 compression in both modes trains.
TEST_F(DilocoTrain, Bf16CompressionTrainsInBothModes) {
  for (const std::string sync : {"ddp", "diloco --inner-steps 5"}) {
    TempDir t;
    auto r = RunKeel(Args(t / "run", 30) + " --nproc 2 --lr 3e-3 --compress bf16 --sync " + sync);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const auto m = JsonLines(t / "run/metrics.jsonl");
    ASSERT_FALSE(m.empty());
    EXPECT_LT(m.back()["loss"].get<double>(), m.front()["loss"].get<double>() - 0.3) << sync << "\n" << r.output;
  }
}

// A worker slowed 3x gets about a quarter of each step's micro-batches (shares in proportion to measured speed),
// in ddp (of the global batch) and in diloco (of each inner step's micro-batches, so both finish a round
// together).
TEST_F(DilocoTrain, AWorkerSlowed3xConvergesToAProportionalShare) {
  for (const std::string mode : {"ddp", "diloco"}) {
    TempDir t;
    const std::string extra = mode == "ddp" ? " --sync ddp" : " --sync diloco --inner-steps 3";
    Background job(Split(Args(t / "run", 24, 8) + " --nproc 2 --elastic" + extra +
                         " --inject slow:rank=1,step=0,factor=3"),
                   t / "log", InjectEnv());
    ASSERT_EQ(job.Wait(120), 0) << job.Output();
    const std::string log = job.Output();
    std::smatch m;
    ASSERT_TRUE(std::regex_search(log, m, std::regex(R"(\[rank 1\] generation 0: members \S+, this is member (\d+))")))
        << log;
    const int64_t slow_uid = std::stoll(m[1]);
    nlohmann::json last;
    for (const auto& e : JsonLines(t / "run/events.jsonl"))
      if (e.value("event", "") == "shares") last = e;
    ASSERT_TRUE(last.is_object()) << mode << ": no shares event\n" << log;
    const auto members = last["members"].get<std::vector<int64_t>>();
    const auto counts = last["micro_batches"].get<std::vector<int>>();
    ASSERT_EQ(counts.size(), 2u);
    ASSERT_TRUE(members[0] == slow_uid || members[1] == slow_uid) << mode << ": " << last.dump();
    const int slow = members[0] == slow_uid ? counts[0] : counts[1], fast = members[0] == slow_uid ? counts[1] : counts[0];
    const auto shares = last["shares"].get<std::vector<double>>();
    const double slow_share = members[0] == slow_uid ? shares[0] : shares[1];
    std::printf("%s: micro-batches per step fast:slow = %d:%d, measured relative speed of the slow one %.2f\n",
                mode.c_str(), fast, slow, slow_share);
    // 3x slower: relative speed 1/3 and a 6:2 split on an idle machine. On a loaded one (CI runs tests side by
    // side) the injected sleep, proportional to the slow worker's own contended compute time, is partly hidden
    // by the fast worker's contention: the measured speed drifts up (0.46 seen at load 6 on 2 cores); a
    // contention spike during the slow worker's own compute, which the injected sleep then triples, drifts it down
    // (0.083 seen under ctest -j2, 0.23-0.26 alone). So: the slowdown must be seen (shares apply to members more
    // than 1.5x slower), and the split must be the proportional one for the speed measured.
    EXPECT_EQ(fast + slow, 8);
    EXPECT_GT(slow_share, 0.05) << mode << ": " << last.dump();
    EXPECT_LT(slow_share, 1.0 / 1.5) << mode << ": " << last.dump();  // shares apply below 1/1.5 (MakePlan)
    const double proportional = 8.0 * slow_share / (1.0 + slow_share);
    EXPECT_LE(std::abs(slow - proportional), 1.0) << mode << ": " << last.dump();
    EXPECT_GT(fast, slow) << mode << ": " << last.dump();
    EXPECT_GE(slow, 1) << mode << ": " << last.dump();
  }
}

}  // namespace
}  // namespace keel::testing
