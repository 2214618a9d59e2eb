// formats_training_state_test.cc: what a checkpoint's checksums cannot vouch for. A file edited by hand and
// re-signed (MANIFEST and COMMITTED rewritten, as WriteCheckpoint does here) passes every checksum; keel must still
// refuse a state.json of the wrong types or ranges and non-finite weights or moments, with one line naming the
// file, in LoadSnapshot, `keel info` and `keel train --resume` (which used to abort on a non-numeric "step").
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "export_test_util.h"
#include "formats/checkpoint.h"
#include "test_util.h"
#include "train/checkpoint_io.h"

namespace keel {
namespace {

using testing::RunKeel;
using testing::TempDir;

nlohmann::json GoodState() {
  return {{"step", 7},        {"seed", 1},          {"data_fingerprint", "abc"}, {"keel_version", "0.1.0"},
          {"deterministic", true}, {"batch", 2},    {"grad_accum", 1},           {"steps", 10},
          {"lr", 1e-3},       {"warmup", 0},        {"sync", "ddp"},             {"compress", "none"},
          {"optimizer", "adamw"}, {"data_offset", 3},
          {"loss_stats", {{"loss_mean", 2.5}, {"loss_var", 0.1}, {"loss_n", 7}}},
          {"diloco", {{"inner_steps", 5}, {"outer_lr", 0.7}, {"outer_momentum", 0.9}}}};
}

TEST(TrainingState, KeelsOwnFieldsPassAndWrongTypesOrRangesAreNamed) {
  EXPECT_TRUE(ValidateTrainingState(GoodState(), "s.json").ok());
  EXPECT_TRUE(ValidateTrainingState({{"step", 0}}, "s.json").ok());  // older checkpoints hold little more
  struct Case {
    const char* key;
    nlohmann::json value;
    const char* want;
  };
  const std::vector<Case> cases = {
      {"step", "two", "'step' must be an integer"},
      {"step", -5, "'step' must be an integer in [0, 2^53] (got -5)"},
      {"step", 1e30, "'step' must be an integer"},
      {"step", nlohmann::json::array({1}), "'step' must be an integer"},
      {"step", 12.5, "'step' must be an integer"},
      {"batch", "x", "'batch' must be an integer in [1, 2^53]"},
      {"grad_accum", 0, "'grad_accum' must be an integer in [1, 2^53]"},
      {"data_offset", -1, "'data_offset' must be an integer"},
      {"seed", -1, "'seed' must be a non-negative integer"},
      {"seed", "x", "'seed' must be a non-negative integer"},
      {"data_fingerprint", 5, "'data_fingerprint' must be a string"},
      {"sync", "bogus", "'sync' must be one of ddp, diloco"},
      {"compress", "zip", "'compress' must be one of none, bf16, int8"},
      {"optimizer", 1, "'optimizer' must be a string"},
      {"deterministic", "yes", "'deterministic' must be true or false"},
      {"lr", "x", "'lr' must be a finite number"},
      {"loss_stats", "bad", "'loss_stats' must be an object"},
      {"diloco", nlohmann::json::array(), "'diloco' must be an object"},
  };
  for (const auto& c : cases) {
    nlohmann::json s = GoodState();
    s[c.key] = c.value;
    // Through text, as from a file: a non-negative literal then parses as an unsigned number (in memory the C++
    // int 0 is a signed one, and "grad_accum": 0 from a file used to pass).
    s = nlohmann::json::parse(s.dump());
    Status st = ValidateTrainingState(s, "ck/state.json");
    EXPECT_EQ(st.code(), Code::kCorrupt) << c.key << " = " << c.value.dump();
    EXPECT_EQ(st.message().rfind("ck/state.json: ", 0), 0u) << st.message();
    EXPECT_NE(st.message().find(c.want), std::string::npos) << st.message();
    EXPECT_EQ(st.message().find('\n'), std::string::npos) << st.message();
  }
  nlohmann::json s = GoodState();
  s.erase("step");
  EXPECT_NE(ValidateTrainingState(s, "x").message().find("'step' is missing"), std::string::npos);
  s = GoodState();
  s["loss_stats"]["loss_n"] = -1;
  EXPECT_NE(ValidateTrainingState(s, "x").message().find("'loss_stats.loss_n' must be a non-negative integer"),
            std::string::npos);
  s = GoodState();
  s["diloco"]["outer_lr"] = "fast";
  EXPECT_NE(ValidateTrainingState(s, "x").message().find("'diloco.outer_lr' must be a finite number"),
            std::string::npos);
}

// A checkpoint written with valid checksums around bad contents.
std::string WriteSigned(const std::string& run, const TrainingSnapshot& s) {
  SnapshotView v;
  v.config = s.config;
  v.params = s.params.data();
  v.adam_m = s.adam_m.empty() ? nullptr : s.adam_m.data();
  v.adam_v = s.adam_v.empty() ? nullptr : s.adam_v.data();
  v.state = s.state;
  v.tokenizer = s.tokenizer;
  auto files = EncodeSnapshot(v);
  EXPECT_TRUE(files.ok()) << files.status().ToString();
  EXPECT_TRUE(WriteCheckpoint(run, 7, *files, 0).ok());
  return run + "/ckpt-00000007";
}

TEST(TrainingState, LoadSnapshotRefusesWhatTheChecksumsCannotSee) {
  GptConfig c;
  c.layers = 1;
  c.heads = 2;
  c.dim = 16;
  c.ctx = 16;
  TrainingSnapshot good = testing::MakeSnapshot("byte", c, 0, 3);
  good.adam_m.assign(good.params.size(), 0.0f);
  good.adam_v.assign(good.params.size(), 0.0f);
  {
    TempDir t;
    const std::string dir = WriteSigned(t / "run", good);
    ASSERT_TRUE(VerifyCheckpoint(dir).ok());
    EXPECT_TRUE(LoadSnapshot(dir, true, nullptr).ok());
  }
  auto expect_refused = [&](const TrainingSnapshot& s, const std::string& file, const std::string& what) {
    TempDir t;
    const std::string dir = WriteSigned(t / "run", s);
    ASSERT_TRUE(VerifyCheckpoint(dir).ok()) << "the checksums pass";
    auto r = LoadSnapshot(dir, true, nullptr);
    ASSERT_FALSE(r.ok()) << what;
    EXPECT_EQ(r.status().code(), Code::kCorrupt) << r.status().ToString();
    EXPECT_EQ(r.status().message().rfind(dir + "/" + file + ": ", 0), 0u) << r.status().message();
    EXPECT_NE(r.status().message().find(what), std::string::npos) << r.status().message();
    // keel info says INVALID with the reason, and exits 1.
    auto info = RunKeel("info " + dir);
    EXPECT_EQ(info.exit_code, 1) << info.output;
    EXPECT_NE(info.output.find("checkpoint " + dir + ": INVALID: " + dir + "/" + file), std::string::npos)
        << info.output;
    EXPECT_EQ(info.output.find("valid\n"), std::string::npos) << info.output;
  };
  TrainingSnapshot s = good;
  s.state["step"] = "two";
  expect_refused(s, "state.json", "'step' must be an integer");
  s = good;
  s.params[5] = std::numeric_limits<float>::quiet_NaN();
  expect_refused(s, "model.safetensors", "tensor 'wte' has a non-finite value (nan at element 5)");
  s = good;
  s.adam_v[9] = std::numeric_limits<float>::infinity();
  expect_refused(s, "optim.safetensors", "tensor 'adam.v' has a non-finite value at element 9");
}

// `keel train --resume` on a run whose newest checkpoint has a non-numeric step: one line, exit 1 (it aborted with
// an uncaught nlohmann::json exception before).
TEST(TrainingState, ResumeFromABadStateIsAOneLineError) {
  TempDir t;
  std::string text;
  for (int i = 0; i < 300; ++i) text += "line " + std::to_string(i) + " of a small corpus\n";
  testing::WriteText(t / "c.txt", text);
  ASSERT_EQ(RunKeel("prepare --input " + t / "c.txt" + " --out " + t / "data" + " --tokenizer byte").exit_code, 0);
  const std::string train = "train --data " + t / "data" + " --out " + t / "run" +
                            " --layers 1 --heads 2 --dim 16 --ctx 16 --batch 2 --steps 2 --threads 1 --no-progress";
  auto first = RunKeel(train);
  ASSERT_EQ(first.exit_code, 0) << first.output;
  auto files = ReadCheckpoint(t / "run" + "/ckpt-00000002");
  ASSERT_TRUE(files.ok()) << files.status().ToString();
  auto state = nlohmann::json::parse((*files)["state.json"]);
  state["step"] = "two";
  std::vector<CheckpointFile> out;
  for (auto& [name, data] : *files) out.push_back({name, name == "state.json" ? state.dump() : data});
  ASSERT_TRUE(WriteCheckpoint(t / "run", 2, out, 0).ok());
  auto r = RunKeel(train + " --steps 3 --resume");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  std::string o = r.output;
  while (!o.empty() && o.back() == '\n') o.pop_back();
  EXPECT_EQ(o.find('\n'), std::string::npos) << r.output;
  EXPECT_NE(o.find("state.json: 'step' must be an integer"), std::string::npos) << r.output;
  EXPECT_EQ(o.find("terminate called"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(t / "run" + "/ckpt-00000003"));
}

}  // namespace
}  // namespace keel
