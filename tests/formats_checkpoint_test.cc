// formats_checkpoint_test.cc: tests of crash-safe checkpoint directories (formats/checkpoint.h).
// Round trip, listing, pruning, detection of incomplete/truncated/corrupt checkpoints with fallback,
// stale .tmp cleanup, same-step replacement, and fault injection at every mutating file-system call; also
// WriteFileAtomic's temporaries, and the model-file errors and config range checks of train/checkpoint_io.h.
#include <gtest/gtest.h>
#include <unistd.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <thread>

#include "core/env.h"
#include "core/hash.h"
#include "formats/checkpoint.h"
#include "formats/safetensors.h"
#include "model/gpt_config.h"
#include "test_util.h"
#include "train/checkpoint_io.h"

namespace keel {
namespace {

namespace fs = std::filesystem;
using keel::testing::DirEntries;
using keel::testing::TempDir;
using keel::testing::WriteText;

std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

bool Contains(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

std::vector<CheckpointFile> Files(const std::string& tag, size_t model_bytes = 3000) {
  std::string model(model_bytes, '\0');
  Rng rng(Hash64(tag.data(), tag.size()));
  for (char& c : model) c = static_cast<char>(rng.Next());
  return {{"model.bin", model}, {"optim.bin", "optimizer state " + tag}, {"empty", ""},
          {"trainer.json", "{\"tag\":\"" + tag + "\"}"}};
}

std::map<std::string, std::string> AsMap(const std::vector<CheckpointFile>& files) {
  std::map<std::string, std::string> m;
  for (const auto& f : files) m[f.name] = f.data;
  return m;
}

// A short printable summary of a file map (name:size:hash per file), for readable failure messages.
std::string Digest(const std::map<std::string, std::string>& m) {
  std::string out;
  for (const auto& [name, data] : m) {
    out += name + ":" + std::to_string(data.size()) + ":" + HashHex(Hash64(data.data(), data.size())) + " ";
  }
  return out;
}
std::string Digest(const std::vector<CheckpointFile>& files) { return Digest(AsMap(files)); }
std::string DigestOf(const std::string& dir) {
  Result<std::map<std::string, std::string>> r = ReadCheckpoint(dir);
  return r.ok() ? Digest(r.value()) : "<invalid: " + r.status().message() + ">";
}

std::vector<int64_t> Steps(const std::string& run_dir) {
  std::vector<int64_t> out;
  Result<std::vector<CheckpointInfo>> list = ListCheckpoints(run_dir);
  EXPECT_TRUE(list.ok()) << list.status().message();
  if (!list.ok()) return out;
  for (const CheckpointInfo& c : list.value()) out.push_back(c.step);
  return out;
}

TEST(CheckpointTest, DirName) {
  EXPECT_EQ(CheckpointDirName(40), "ckpt-00000040");
  EXPECT_EQ(CheckpointDirName(0), "ckpt-00000000");
  EXPECT_EQ(CheckpointDirName(123456789), "ckpt-123456789");
}

TEST(CheckpointTest, WriteListVerifyReadRoundTrip) {
  TempDir tmp;
  const std::string run = tmp / "runs/x";  // created on demand
  // A real safetensors payload too, to show the layer is content-agnostic.
  float w[3] = {1, 2, 3};
  std::vector<CheckpointFile> files = Files("a");
  files.push_back({"model.safetensors", EncodeSafetensors({{"w", "F32", {3}, w, 12}}, {}).value()});
  ASSERT_TRUE(WriteCheckpoint(run, 40, files, 3).ok());

  const std::string dir = run + "/ckpt-00000040";
  Result<std::vector<CheckpointInfo>> list = ListCheckpoints(run);
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ(list->at(0).dir, dir);
  EXPECT_EQ(list->at(0).step, 40);
  EXPECT_TRUE(IsCheckpointDir(dir));
  EXPECT_FALSE(IsCheckpointDir(run));
  EXPECT_TRUE(VerifyCheckpoint(dir).ok());
  Result<std::map<std::string, std::string>> read = ReadCheckpoint(dir);
  ASSERT_TRUE(read.ok()) << read.status().message();
  EXPECT_EQ(Digest(read.value()), Digest(files));

  // On-disk protocol details: the marker holds the manifest's hash; nothing temporary is left.
  const std::string manifest = ReadAll(dir + "/MANIFEST.json");
  EXPECT_TRUE(Contains(manifest, "\"model.bin\""));
  EXPECT_TRUE(Contains(manifest, HashHex(Hash64(files[0].data.data(), files[0].data.size()))));
  std::string marker = ReadAll(dir + "/COMMITTED");
  while (!marker.empty() && marker.back() == '\n') marker.pop_back();
  EXPECT_EQ(marker, HashHex(Hash64(manifest.data(), manifest.size())));
  EXPECT_EQ(DirEntries(run), std::vector<std::string>{"ckpt-00000040"});

  std::vector<std::string> warnings;
  Result<CheckpointInfo> latest = FindLatestValidCheckpoint(run, &warnings);
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(latest->dir, dir);
  EXPECT_TRUE(warnings.empty());
}

TEST(CheckpointTest, EmptyAndMissingRunDir) {
  TempDir tmp;
  EXPECT_TRUE(ListCheckpoints(tmp / "nope").value().empty());
  Result<CheckpointInfo> r = FindLatestValidCheckpoint(tmp / "nope", nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
  EXPECT_EQ(VerifyCheckpoint(tmp / "nope").code(), Code::kNotFound);
  EXPECT_FALSE(ReadCheckpoint(tmp / "nope").ok());
}

TEST(CheckpointTest, RejectsBadArguments) {
  TempDir tmp;
  EXPECT_EQ(WriteCheckpoint(tmp.path(), -1, Files("a"), 0).code(), Code::kInvalidArgument);
  for (const char* bad : {"", ".", "..", "a/b", "MANIFEST.json", "COMMITTED"}) {
    EXPECT_EQ(WriteCheckpoint(tmp.path(), 1, {{bad, "x"}}, 0).code(), Code::kInvalidArgument) << bad;
  }
  EXPECT_EQ(WriteCheckpoint(tmp.path(), 1, {{"a", "x"}, {"a", "y"}}, 0).code(), Code::kInvalidArgument);
  EXPECT_TRUE(DirEntries(tmp.path()).empty());
  // No files at all is a valid (if useless) checkpoint.
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 2, {}, 0).ok());
  EXPECT_TRUE(ReadCheckpoint(tmp / "ckpt-00000002").value().empty());
}

TEST(CheckpointTest, ListsNewestFirstAndIgnoresOtherEntries) {
  TempDir tmp;
  for (int64_t s : {5, 20, 10, 100000000}) ASSERT_TRUE(WriteCheckpoint(tmp.path(), s, Files("x"), 0).ok());
  fs::create_directories(tmp / "ckpt-00000030.tmp");
  fs::create_directories(tmp / "ckpt-abc");
  fs::create_directories(tmp / "ckpt-");
  fs::create_directories(tmp / "logs");
  WriteText(tmp / "ckpt-00000099", "a file, not a directory");
  EXPECT_EQ(Steps(tmp.path()), (std::vector<int64_t>{100000000, 20, 10, 5}));
}

TEST(CheckpointTest, KeepLastPrunesOldest) {
  TempDir tmp;
  for (int64_t s = 1; s <= 5; ++s) ASSERT_TRUE(WriteCheckpoint(tmp.path(), s * 10, Files("k"), 2).ok());
  EXPECT_EQ(Steps(tmp.path()), (std::vector<int64_t>{50, 40}));
  EXPECT_EQ(DirEntries(tmp.path()), (std::vector<std::string>{"ckpt-00000040", "ckpt-00000050"}));

  TempDir all;
  for (int64_t s = 1; s <= 4; ++s) ASSERT_TRUE(WriteCheckpoint(all.path(), s, Files("k"), 0).ok());
  EXPECT_EQ(Steps(all.path()), (std::vector<int64_t>{4, 3, 2, 1}));
  // keep_last = 1 now prunes down to the new one.
  ASSERT_TRUE(WriteCheckpoint(all.path(), 5, Files("k"), 1).ok());
  EXPECT_EQ(Steps(all.path()), (std::vector<int64_t>{5}));
}

TEST(CheckpointTest, PruningCountsOnlyValidAndKeepsJustWritten) {
  TempDir tmp;
  for (int64_t s : {10, 20, 30}) ASSERT_TRUE(WriteCheckpoint(tmp.path(), s, Files("p"), 0).ok());
  fs::remove(tmp / "ckpt-00000030/COMMITTED");  // 30 is now invalid
  // keep_last=2: newest valid are 40 (new) and 20; 30 is newer than the cut so it stays; 10 goes.
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 40, Files("p"), 2).ok());
  EXPECT_EQ(Steps(tmp.path()), (std::vector<int64_t>{40, 30, 20}));

  // Resumed from an older step while newer valid ones exist: the new one survives even beyond keep_last.
  TempDir back;
  for (int64_t s : {50, 60}) ASSERT_TRUE(WriteCheckpoint(back.path(), s, Files("p"), 0).ok());
  ASSERT_TRUE(WriteCheckpoint(back.path(), 41, Files("p"), 1).ok());
  EXPECT_EQ(Steps(back.path()), (std::vector<int64_t>{60, 41}));
}

// Writes checkpoints 10 and 20, then lets `damage` break 20; FindLatestValidCheckpoint must fall back to
// 10 with one warning naming 20 and containing `why`.
void ExpectFallback(const std::function<void(const std::string&)>& damage, const std::string& why) {
  TempDir tmp;
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 10, Files("ten"), 0).ok());
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 20, Files("twenty"), 0).ok());
  const std::string d20 = tmp / "ckpt-00000020";
  damage(d20);
  Status v = VerifyCheckpoint(d20);
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.code(), Code::kCorrupt);
  EXPECT_EQ(v.message().rfind(d20, 0), 0u) << v.message();
  EXPECT_TRUE(Contains(v.message(), why)) << v.message();
  EXPECT_FALSE(ReadCheckpoint(d20).ok());
  std::vector<std::string> warnings;
  Result<CheckpointInfo> latest = FindLatestValidCheckpoint(tmp.path(), &warnings);
  ASSERT_TRUE(latest.ok()) << latest.status().message();
  EXPECT_EQ(latest->step, 10);
  EXPECT_EQ(DigestOf(latest->dir), Digest(Files("ten")));
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_EQ(warnings[0].rfind("skipping " + d20, 0), 0u) << warnings[0];
  EXPECT_TRUE(Contains(warnings[0], why)) << warnings[0];
}

TEST(CheckpointTest, MissingCommittedIsInvalid) {
  ExpectFallback([](const std::string& d) { fs::remove(d + "/COMMITTED"); }, "incomplete (no COMMITTED marker)");
}

TEST(CheckpointTest, TruncatedFileIsInvalid) {
  ExpectFallback([](const std::string& d) { fs::resize_file(d + "/model.bin", 1000); },
                 "model.bin: size 1000, manifest says 3000 (truncated)");
}

TEST(CheckpointTest, GrownFileIsInvalid) {
  ExpectFallback([](const std::string& d) { std::ofstream(d + "/optim.bin", std::ios::app) << "x"; },
                 "optim.bin: size");
}

TEST(CheckpointTest, BitFlippedFileIsInvalid) {
  ExpectFallback(
      [](const std::string& d) {
        std::string b = ReadAll(d + "/model.bin");
        b[1234] = static_cast<char>(b[1234] ^ 0x04);
        WriteText(d + "/model.bin", b);
      },
      "model.bin: checksum mismatch (file corrupt)");
}

TEST(CheckpointTest, MissingFileIsInvalid) {
  ExpectFallback([](const std::string& d) { fs::remove(d + "/optim.bin"); }, "optim.bin: missing");
}

TEST(CheckpointTest, TamperedManifestIsInvalid) {
  ExpectFallback(
      [](const std::string& d) {
        std::string m = ReadAll(d + "/MANIFEST.json");
        m.replace(m.find("3000"), 4, "1000");
        WriteText(d + "/MANIFEST.json", m);
      },
      "COMMITTED marker does not match MANIFEST.json");
  ExpectFallback([](const std::string& d) { fs::remove(d + "/MANIFEST.json"); }, "no MANIFEST.json");
}

TEST(CheckpointTest, HostileManifestCannotEscapeTheDirectory) {
  TempDir tmp;
  WriteText(tmp / "secret", "x");
  const std::string d = tmp / "ckpt-00000001";
  fs::create_directories(d);
  const std::string m = R"({"format":"keel-checkpoint","version":1,"step":1,"files":[{"name":"../secret","size":1,"hash":")" +
                        HashHex(Hash64("x", 1)) + "\"}]}";
  WriteText(d + "/MANIFEST.json", m);
  WriteText(d + "/COMMITTED", HashHex(Hash64(m.data(), m.size())));
  Status s = VerifyCheckpoint(d);
  EXPECT_EQ(s.code(), Code::kCorrupt);
  EXPECT_TRUE(Contains(s.message(), "invalid file name")) << s.message();
}

TEST(CheckpointTest, AllInvalidIsNotFoundWithWarnings) {
  TempDir tmp;
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 1, Files("a"), 0).ok());
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 2, Files("a"), 0).ok());
  fs::remove(tmp / "ckpt-00000001/COMMITTED");
  fs::remove(tmp / "ckpt-00000002/COMMITTED");
  std::vector<std::string> warnings;
  Result<CheckpointInfo> r = FindLatestValidCheckpoint(tmp.path(), &warnings);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
  EXPECT_EQ(warnings.size(), 2u);
}

TEST(CheckpointTest, StaleTmpIsIgnoredAndCleaned) {
  TempDir tmp;
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 10, Files("ten"), 0).ok());
  // A crash while writing step 30 left a complete-looking .tmp (even with a marker).
  const std::string stale = tmp / "ckpt-00000030.tmp";
  fs::create_directories(stale);
  fs::copy(tmp / "ckpt-00000010", stale, fs::copy_options::recursive);
  fs::create_directories(tmp / "ckpt-00000005.del.tmp");
  EXPECT_EQ(Steps(tmp.path()), std::vector<int64_t>{10});
  EXPECT_EQ(FindLatestValidCheckpoint(tmp.path(), nullptr)->step, 10);
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 20, Files("twenty"), 0).ok());
  EXPECT_EQ(DirEntries(tmp.path()), (std::vector<std::string>{"ckpt-00000010", "ckpt-00000020"}));
  // This process's own failed attempt at the very step being written (the writer's name pattern,
  // ckpt-N.<pid>-<nonce>.tmp) is not merged into the new checkpoint, and is removed.
  const std::string mine = tmp / ("ckpt-00000030." + std::to_string(::getpid()) + "-7.tmp");
  fs::create_directories(mine);
  WriteText(mine + "/junk", "junk");
  WriteText(mine + "/model.safetensors", "half of it");
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 30, Files("thirty"), 0).ok());
  EXPECT_FALSE(fs::exists(tmp / "ckpt-00000030/junk"));
  EXPECT_FALSE(fs::exists(mine));
  EXPECT_EQ(DigestOf(tmp / "ckpt-00000030"), Digest(Files("thirty")));
}

// Each writer builds in a temp directory of its own (two writers of one step: an elastic leader taken for dead
// while only stopped, and its successor). A write leaves another process's temp directory of the same step alone
// (it may be in progress) and removes those of other steps.
TEST(CheckpointTest, AnotherWritersTempDirOfTheSameStepIsLeftAlone) {
  TempDir tmp;
  const std::string other = tmp / "ckpt-00000030.999999999-1.tmp";
  fs::create_directories(other);
  WriteText(other + "/model.bin", "in progress");
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 30, Files("thirty"), 0).ok());
  EXPECT_TRUE(fs::exists(other + "/model.bin"));
  EXPECT_EQ(DigestOf(tmp / "ckpt-00000030"), Digest(Files("thirty")));
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 40, Files("forty"), 0).ok());
  EXPECT_FALSE(fs::exists(other));
}

// may_publish, asked once the files are written: a reason not to publish leaves nothing behind (no checkpoint,
// no temp directory) and every earlier checkpoint as it was.
TEST(CheckpointTest, APublishVetoLeavesNothingBehind) {
  TempDir tmp;
  const std::string run = tmp / "run";
  ASSERT_TRUE(WriteCheckpoint(run, 5, {{"w.bin", "five"}}, 0).ok());
  int asked = 0;
  Status s = WriteCheckpoint(run, 10, {{"w.bin", "ten"}}, 0, nullptr, [&] {
    ++asked;
    return std::string("evicted");
  });
  EXPECT_EQ(s.code(), Code::kAborted) << s.ToString();
  EXPECT_TRUE(Contains(s.message(), "not published: evicted")) << s.message();
  EXPECT_EQ(asked, 1);
  EXPECT_EQ(DirEntries(run), std::vector<std::string>{"ckpt-00000005"});
  EXPECT_TRUE(VerifyCheckpoint(run + "/ckpt-00000005").ok());
  ASSERT_TRUE(WriteCheckpoint(run, 10, {{"w.bin", "ten"}}, 0, nullptr, [] { return std::string(); }).ok());
  EXPECT_TRUE(VerifyCheckpoint(run + "/ckpt-00000010").ok());
}

TEST(CheckpointTest, ResavingAStepReplacesIt) {
  TempDir tmp;
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 10, Files("first"), 0).ok());
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 10, Files("second", 500), 0).ok());
  EXPECT_EQ(DigestOf(tmp / "ckpt-00000010"), Digest(Files("second", 500)));
  EXPECT_EQ(DirEntries(tmp.path()), std::vector<std::string>{"ckpt-00000010"});
  // Re-saving over an invalid (uncommitted) copy works too.
  fs::remove(tmp / "ckpt-00000010/COMMITTED");
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 10, Files("third"), 1).ok());
  EXPECT_EQ(DigestOf(tmp / "ckpt-00000010"), Digest(Files("third")));
  EXPECT_EQ(DirEntries(tmp.path()), std::vector<std::string>{"ckpt-00000010"});
}

TEST(CheckpointTest, OldCopyFromInterruptedReplaceIsUsable) {
  TempDir tmp;
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 10, Files("ten"), 0).ok());
  // Crash after moving the old copy aside, before the new one was published.
  fs::rename(tmp / "ckpt-00000010", tmp / "ckpt-00000010.old");
  Result<CheckpointInfo> r = FindLatestValidCheckpoint(tmp.path(), nullptr);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->dir, tmp / "ckpt-00000010.old");
  // Crash after publishing the new copy, before COMMITTED: the plain one is invalid, .old still wins.
  fs::create_directories(tmp / "ckpt-00000010");
  fs::copy(tmp / "ckpt-00000010.old", tmp / "ckpt-00000010", fs::copy_options::recursive);
  fs::remove(tmp / "ckpt-00000010/COMMITTED");
  std::vector<std::string> warnings;
  r = FindLatestValidCheckpoint(tmp.path(), &warnings);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->dir, tmp / "ckpt-00000010.old");
  EXPECT_EQ(warnings.size(), 1u);
  // Re-saving the step keeps the valid .old until the new copy is committed, then removes it.
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 10, Files("new"), 0).ok());
  EXPECT_EQ(DirEntries(tmp.path()), std::vector<std::string>{"ckpt-00000010"});
  EXPECT_EQ(DigestOf(tmp / "ckpt-00000010"), Digest(Files("new")));
}

// An Env that delegates to the real one but fails the Nth call of the selected mutating operations
// (only WriteFile, or every mutation). Sticky: every later call fails too (a dead disk, the harder case
// for cleanup code); otherwise only the Nth call fails (a transient error, exercising the rollback).
class FaultyEnv : public Env {
 public:
  FaultyEnv(Env* base, int fail_at, bool writes_only, bool sticky)
      : base_(base), fail_at_(fail_at), writes_only_(writes_only), sticky_(sticky) {}
  int calls() const { return calls_; }
  bool fired() const { return fired_; }
  // Whether a COMMITTED marker was written through this Env (the commit point of WriteCheckpoint).
  bool marker_written() const { return marker_written_; }

  // Every path read through ReadFile, in order.
  const std::vector<std::string>& reads() const { return reads_; }

  Result<std::string> ReadFile(const std::string& p) override {
    reads_.push_back(p);
    return base_->ReadFile(p);
  }
  Status WriteFile(const std::string& p, std::string_view d) override {
    if (Trip("WriteFile", p)) return IoError(p + ": injected write failure");
    Status s = base_->WriteFile(p, d);
    if (s.ok() && BaseName(p) == "COMMITTED") marker_written_ = true;
    return s;
  }
  Status Rename(const std::string& a, const std::string& b) override {
    if (!writes_only_ && Trip("Rename", a)) return IoError(a + ": injected rename failure");
    return base_->Rename(a, b);
  }
  Status SyncDir(const std::string& d) override {
    if (!writes_only_ && Trip("SyncDir", d)) return IoError(d + ": injected fsync failure");
    return base_->SyncDir(d);
  }
  Status CreateDirs(const std::string& p) override {
    if (!writes_only_ && Trip("CreateDirs", p)) return IoError(p + ": injected mkdir failure");
    return base_->CreateDirs(p);
  }
  Status RemoveAll(const std::string& p) override {
    if (!writes_only_ && Trip("RemoveAll", p)) return IoError(p + ": injected remove failure");
    return base_->RemoveAll(p);
  }
  bool Exists(const std::string& p) override { return base_->Exists(p); }
  bool IsDir(const std::string& p) override { return base_->IsDir(p); }
  Result<std::vector<std::string>> ListDir(const std::string& d) override { return base_->ListDir(d); }
  Result<MappedFile> Map(const std::string& p) override { return base_->Map(p); }
  double NowSeconds() override { return base_->NowSeconds(); }

 private:
  // After the injected failure, every later call of the same kinds fails too (a dead disk), which is the
  // harder case for cleanup code.
  bool Trip(const char*, const std::string&) {
    ++calls_;
    const bool fail = sticky_ ? calls_ >= fail_at_ : calls_ == fail_at_;
    fired_ = fired_ || fail;
    return fail;
  }
  Env* base_;
  int fail_at_;
  bool writes_only_;
  bool sticky_;
  int calls_ = 0;
  bool fired_ = false;
  bool marker_written_ = false;
  std::vector<std::string> reads_;
};

struct EnvGuard {
  explicit EnvGuard(Env* e) { SetDefaultEnv(e); }
  ~EnvGuard() { SetDefaultEnv(nullptr); }
};

// Runs WriteCheckpoint(step_new) under a FaultyEnv failing from call N on, for every N until the write
// gets through untouched. Invariants: an injected failure is reported; before the commit point (the
// COMMITTED marker written) no valid checkpoint holds the new content and the latest valid one is the old
// one; after it, the latest valid checkpoint holds the new content or (if the failure handler could
// still roll back) the old one, never a mix; and a later fault-free save succeeds and leaves no debris.
void FaultSweep(int64_t step_new, bool writes_only, bool sticky) {
  const std::string kOld = Digest(Files("old")), kNew = Digest(Files("new"));
  int n = 1;
  for (;; ++n) {
    ASSERT_LT(n, 200) << "fault sweep did not terminate";
    TempDir tmp;
    ASSERT_TRUE(WriteCheckpoint(tmp.path(), 10, Files("old"), 0).ok());
    ASSERT_TRUE(WriteCheckpoint(tmp.path(), 5, Files("older"), 0).ok());
    Status s;
    bool fired, committed;
    {
      FaultyEnv faulty(DefaultEnv(), n, writes_only, sticky);
      EnvGuard guard(&faulty);
      s = WriteCheckpoint(tmp.path(), step_new, Files("new"), 2);
      fired = faulty.fired();
      committed = faulty.marker_written();
    }
    SCOPED_TRACE("fail at call " + std::to_string(n) + ": " + s.ToString());
    Result<CheckpointInfo> latest = FindLatestValidCheckpoint(tmp.path(), nullptr);
    ASSERT_TRUE(latest.ok()) << latest.status().message();
    const std::string content = DigestOf(latest->dir);
    if (!fired) {
      ASSERT_TRUE(s.ok());
      EXPECT_EQ(latest->step, step_new);
      EXPECT_EQ(content, kNew);
      break;
    }
    ASSERT_FALSE(s.ok()) << "an injected failure must be reported";
    EXPECT_TRUE(Contains(s.message(), "injected")) << s.message();
    if (!committed) {
      EXPECT_EQ(latest->step, 10);
      EXPECT_EQ(content, kOld);
      Result<std::vector<CheckpointInfo>> all = ListCheckpoints(tmp.path());
      ASSERT_TRUE(all.ok());
      for (const CheckpointInfo& c : all.value()) EXPECT_NE(DigestOf(c.dir), kNew) << c.dir;
    } else {
      EXPECT_TRUE(content == kNew || content == kOld) << content;
      if (Contains(s.message(), "committed, but cleanup failed")) {
        EXPECT_EQ(content, kNew);
      }
    }
    // With the fault gone, the next save succeeds and leaves a clean directory.
    ASSERT_TRUE(WriteCheckpoint(tmp.path(), step_new, Files("retry"), 2).ok());
    EXPECT_EQ(DigestOf(FindLatestValidCheckpoint(tmp.path(), nullptr)->dir), Digest(Files("retry")));
    for (const std::string& e : DirEntries(tmp.path())) {
      EXPECT_FALSE(Contains(e, ".tmp") || Contains(e, ".old")) << e;
    }
  }
  EXPECT_GT(n, writes_only ? 5 : 10) << "the sweep should have exercised several failure points";
}

// A grown file is rejected from its size alone: the file system is asked, the bytes are never read.
TEST(CheckpointTest, GrownFileIsRejectedWithoutReadingIt) {
  TempDir tmp;
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 1, Files("a"), 0).ok());
  const std::string dir = tmp / "ckpt-00000001";
  WriteText(dir + "/model.bin", std::string(1 << 20, 'x'));
  FaultyEnv spy(DefaultEnv(), 1 << 30, true, false);
  Result<std::map<std::string, std::string>> r = [&] {
    EnvGuard guard(&spy);
    return ReadCheckpoint(dir);
  }();
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Contains(r.status().message(), "model.bin: size 1048576, manifest says 3000")) << r.status().message();
  for (const std::string& p : spy.reads()) EXPECT_NE(BaseName(p), "model.bin") << "read before its size was checked";
}

// WriteFileAtomic writes a uniquely named temporary beside the file: concurrent writers of one path all succeed,
// a user's path.tmp (a directory, or a symlink) is never followed, replaced or removed, and nothing is left over.
TEST(AtomicWriteTest, UniqueTemporariesNeverTouchUserPaths) {
  TempDir tmp;
  const std::string path = tmp / "f.json";
  ASSERT_TRUE(DefaultEnv()->CreateDirs(path + ".tmp").ok());
  WriteText(path + ".tmp/mine", "mine");
  WriteText(tmp / "target", "target");
  fs::create_symlink(tmp / "target", tmp / "g.json.tmp");
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 25; ++i)
        if (!WriteFileAtomic(path, "writer " + std::to_string(t)).ok()) ++failures;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  ASSERT_TRUE(WriteFileAtomic(tmp / "g.json", "g").ok());
  EXPECT_EQ(ReadAll(tmp / "g.json"), "g");
  EXPECT_TRUE(fs::is_symlink(tmp / "g.json.tmp"));
  EXPECT_TRUE(Contains(ReadAll(path), "writer "));
  EXPECT_EQ(ReadAll(path + ".tmp/mine"), "mine");
  EXPECT_EQ(ReadAll(tmp / "target"), "target");
  const std::vector<std::string> entries = {"f.json", "f.json.tmp", "g.json", "g.json.tmp", "target"};
  EXPECT_EQ(DirEntries(tmp.path()), entries);
  // A failed write (the target is a directory) removes its own temporary and nothing else.
  ASSERT_TRUE(DefaultEnv()->CreateDirs(tmp / "d/sub").ok());
  EXPECT_FALSE(WriteFileAtomic(tmp / "d", "x").ok());
  EXPECT_TRUE(fs::is_directory(tmp / "d/sub"));
  EXPECT_EQ(DirEntries(tmp.path()).size(), entries.size() + 1);
}

// CreateDirs makes every missing level (a trailing slash, "..", an existing path are fine) and reports a path
// it cannot create (a file in the way) as an error naming it.
TEST(AtomicWriteTest, CreateDirsMakesEveryMissingLevel) {
  TempDir tmp;
  ASSERT_TRUE(DefaultEnv()->CreateDirs(tmp / "a/b/../b/c/").ok());
  EXPECT_TRUE(fs::is_directory(tmp / "a/b/c"));
  EXPECT_TRUE(DefaultEnv()->CreateDirs(tmp / "a/b/c").ok());
  WriteText(tmp / "file", "x");
  Status s = DefaultEnv()->CreateDirs(tmp / "file/sub");
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s.message(), "file/sub")) << s.message();
}

// Map (data shards, tokenizers, model files) refuses a FIFO in a file's place at once instead of blocking in
// open() until a writer appears.
TEST(AtomicWriteTest, MapRefusesAFifoWithoutBlocking) {
  TempDir tmp;
  const std::string fifo = tmp / "train.bin";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto m = DefaultEnv()->Map(fifo);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().message(), fifo + ": not a regular file");
}

// Model-file errors name the file, and the optimizer file's errors say which tensor is wrong.
TEST(CheckpointModelFileTest, ErrorsNameTheFile) {
  GptConfig c;
  c.layers = 1;
  c.heads = 1;
  c.dim = 4;
  c.ctx = 2;
  c.vocab = 8;
  std::vector<float> p(NumParams(c), 0.5f);
  std::vector<TensorView> views;
  for (const auto& t : ParamLayout(c))
    views.push_back({t.name, t.name == "wpe" ? "I32" : "F32", t.shape, p.data() + t.offset, t.size * sizeof(float)});
  auto bytes = EncodeSafetensors(views, {{"config", c.ToJson().dump()}});
  ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
  auto r = DecodeModelFile("run/ckpt-1/model.safetensors", *bytes);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message().rfind("run/ckpt-1/model.safetensors: tensor 'wpe'", 0), 0u) << r.status().message();

  TempDir tmp;
  SnapshotView view;
  view.config = c;
  view.params = p.data();
  view.adam_m = p.data();
  view.adam_v = p.data();
  view.state = {{"step", 1}};
  view.tokenizer = "keel-byte-tokenizer v1\n";
  auto files = EncodeSnapshot(view);
  ASSERT_TRUE(files.ok());
  const int64_t n = static_cast<int64_t>(p.size());
  for (auto& f : *files)
    if (f.name == "optim.safetensors")
      f.data = EncodeSafetensors({{"adam.m", "F32", {n}, p.data(), p.size() * sizeof(float)},
                                  {"adam.v", "F32", {n - 1}, p.data(), (p.size() - 1) * sizeof(float)}},
                                 {}).value();
  ASSERT_TRUE(WriteCheckpoint(tmp.path(), 1, *files, 0).ok());
  auto s = LoadSnapshot(tmp.path(), true, nullptr);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), Code::kCorrupt);
  EXPECT_EQ(s.status().message(), tmp / "ckpt-00000001/optim.safetensors: tensor 'adam.v' has " +
                                      std::to_string(n - 1) + " elements, the model " + std::to_string(n) +
                                      " parameters");
}

// A model file whose config claims a model far larger than its tensors (hand-edited, re-signed) fails on the first
// missing tensor before anything of the claimed size is allocated (it used to throw std::bad_alloc out of keel).
TEST(CheckpointModelFileTest, AHugeClaimedConfigFailsBeforeAllocating) {
  nlohmann::json cfg = {{"layers", 1024}, {"heads", 1}, {"dim", 65536}, {"ctx", 1 << 20}, {"vocab", 1 << 24}};
  ASSERT_TRUE(GptConfig::FromJson(cfg).ok()) << "the claim must pass the config's own range checks";
  float x = 1.0f;
  auto bytes = EncodeSafetensors({{"wte", "F32", {1}, &x, sizeof x}}, {{"config", cfg.dump()}});
  ASSERT_TRUE(bytes.ok());
  auto r = DecodeModelFile("m.safetensors", *bytes);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kCorrupt);
  EXPECT_EQ(r.status().message().rfind("m.safetensors: ", 0), 0u) << r.status().message();
}

// The newest checkpoint passes its checksums but not the content checks (a non-finite optimizer moment): loading
// the run falls back to the older one with a warning, as for a checksum failure, instead of failing the resume.
TEST(CheckpointModelFileTest, ANewestCheckpointWithBadContentFallsBackToAnOlderOne) {
  GptConfig c;
  c.layers = 1;
  c.heads = 1;
  c.dim = 4;
  c.ctx = 2;
  c.vocab = 8;
  std::vector<float> p(NumParams(c), 0.5f), bad_v(NumParams(c), 0.5f);
  bad_v[3] = std::numeric_limits<float>::infinity();
  TempDir tmp;
  for (int step : {1, 2}) {
    SnapshotView view;
    view.config = c;
    view.params = p.data();
    view.adam_m = p.data();
    view.adam_v = step == 2 ? bad_v.data() : p.data();
    view.state = {{"step", step}};
    view.tokenizer = "keel-byte-tokenizer v1\n";
    auto files = EncodeSnapshot(view);
    ASSERT_TRUE(files.ok());
    ASSERT_TRUE(WriteCheckpoint(tmp.path(), step, *files, 0).ok());
  }
  std::vector<std::string> warnings;
  std::string dir;
  auto s = LoadSnapshot(tmp.path(), true, &warnings, &dir);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(dir, tmp / "ckpt-00000001");
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_EQ(warnings[0], "skipping " + tmp / "ckpt-00000002/optim.safetensors: tensor 'adam.v' has a non-finite "
                                           "value at element 3");
  // Without the optimizer (sampling, export) the newest one is fine.
  auto m = LoadSnapshot(tmp.path(), false, nullptr, &dir);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(dir, tmp / "ckpt-00000002");
}

// Config fields are range-checked as 64-bit integers before narrowing to int.
TEST(CheckpointModelFileTest, ConfigFieldsOutOfIntRangeAreRejected) {
  nlohmann::json j = {{"layers", 2}, {"heads", 2}, {"dim", 8}, {"ctx", 4}, {"vocab", 16}};
  ASSERT_TRUE(GptConfig::FromJson(j).ok());
  for (const nlohmann::json& v : {nlohmann::json(4294967298ull), nlohmann::json(int64_t{-4294967294}),
                                  nlohmann::json(~0ull), nlohmann::json(int64_t{1} << 40)}) {
    for (const char* key : {"layers", "heads", "dim", "ctx", "vocab"}) {
      auto k = j;
      k[key] = v;
      auto r = GptConfig::FromJson(k);
      ASSERT_FALSE(r.ok()) << key << " = " << v.dump() << " was accepted";
      EXPECT_EQ(r.status().message(),
                std::string("model config: field '") + key + "' is out of range (" + v.dump() + ")");
    }
  }
}

TEST(CheckpointFaultTest, FailingNthWriteFileLeavesPreviousCheckpointLatest) { FaultSweep(20, true, false); }
TEST(CheckpointFaultTest, DeadDiskAfterNthWriteFile) { FaultSweep(20, true, true); }
TEST(CheckpointFaultTest, FailingNthMutation) { FaultSweep(20, false, false); }
TEST(CheckpointFaultTest, DeadDiskAfterNthMutation) { FaultSweep(20, false, true); }
TEST(CheckpointFaultTest, ReplacingSameStepFailingNthMutation) { FaultSweep(10, false, false); }
TEST(CheckpointFaultTest, ReplacingSameStepDeadDisk) { FaultSweep(10, false, true); }

}  // namespace
}  // namespace keel
