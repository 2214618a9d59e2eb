// data_dataset_test.cc: tests for Dataset: validation on open, pure micro-batch sampling, val batches.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/env.h"
#include "core/hash.h"
#include "data/dataset.h"
#include "data/prepare.h"
#include "test_util.h"

namespace keel {
namespace {

namespace fs = std::filesystem;
using keel::testing::TempDir;
using keel::testing::WriteText;

std::string ReadAll(const std::string& path) {
  auto r = DefaultEnv()->ReadFile(path);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? *r : std::string();
}

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// A byte-tokenized data directory over known text (token i == byte i of the text), built once.
class DatasetTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    Rng rng(5);
    text_ = new std::string();
    while (text_->size() < 40000) *text_ += "line " + std::to_string(rng.Below(1000000)) + " of the corpus\n";
    WriteText(*dir_ / "corpus.txt", *text_);
    PrepareOptions o;
    o.inputs = {*dir_ / "corpus.txt"};
    o.out_dir = *dir_ / "data";
    o.tokenizer = "byte";
    o.val_fraction = 0.1;
    auto s = Prepare(o);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    fingerprint_ = new std::string(s->fingerprint);
  }
  static void TearDownTestSuite() {
    delete dir_;
    delete text_;
    delete fingerprint_;
  }
  static Dataset OpenOrDie() {
    auto d = Dataset::Open(*dir_ / "data");
    EXPECT_TRUE(d.ok()) << d.status().ToString();
    return std::move(d).value();
  }
  // A copy of the data directory to damage.
  static std::string CopyData(const TempDir& t) {
    fs::copy(*dir_ / "data", t / "data", fs::copy_options::recursive);
    return t / "data";
  }
  static std::string OpenError(const std::string& dir) {
    auto d = Dataset::Open(dir);
    if (d.ok()) {
      ADD_FAILURE() << "damaged data directory opened";
      return "";
    }
    EXPECT_EQ(d.status().message().find('\n'), std::string::npos);
    return d.status().message();
  }
  static TempDir* dir_;
  static std::string* text_;
  static std::string* fingerprint_;
};
TempDir* DatasetTest::dir_ = nullptr;
std::string* DatasetTest::text_ = nullptr;
std::string* DatasetTest::fingerprint_ = nullptr;

TEST_F(DatasetTest, OpensAndReportsMetadata) {
  Dataset d = OpenOrDie();
  EXPECT_EQ(d.fingerprint(), *fingerprint_);
  EXPECT_EQ(d.vocab_size(), 256);
  EXPECT_EQ(d.tokenizer().type(), "byte");
  EXPECT_EQ(d.train_tokens() + d.val_tokens(), text_->size());
  EXPECT_EQ(d.val_tokens(), text_->size() / 10);
}

TEST_F(DatasetTest, TrainMicroBatchIsPure) {
  const Dataset d = OpenOrDie();
  const Dataset d2 = OpenOrDie();  // another "process"
  constexpr int B = 4, T = 32;
  auto batch = [&](const Dataset& ds, uint64_t seed, int64_t step, int micro) {
    std::vector<int32_t> x(B * T), y(B * T);
    ds.TrainMicroBatch(seed, step, micro, B, T, x.data(), y.data());
    return std::make_pair(x, y);
  };
  const auto a = batch(d, 7, 100, 2);
  EXPECT_EQ(a, batch(d, 7, 100, 2));
  EXPECT_EQ(a, batch(d2, 7, 100, 2));
  EXPECT_NE(a.first, batch(d, 7, 101, 2).first);  // another step
  EXPECT_NE(a.first, batch(d, 7, 100, 3).first);  // another micro-batch
  EXPECT_NE(a.first, batch(d, 8, 100, 2).first);  // another seed
  // Rows differ from each other, inputs are the text at the window start and targets are shifted by one.
  std::set<size_t> starts;
  for (int b = 0; b < B; ++b) {
    const size_t start = d.TrainWindowStart(7, 100, 2, b, T);
    starts.insert(start);
    ASSERT_LT(start, d.train_tokens() - T - 1);
    for (int t = 0; t < T; ++t) {
      EXPECT_EQ(a.first[b * T + t], static_cast<uint8_t>((*text_)[start + t]));
      EXPECT_EQ(a.second[b * T + t], static_cast<uint8_t>((*text_)[start + t + 1]));
      if (t + 1 < T) {
        EXPECT_EQ(a.second[b * T + t], a.first[b * T + t + 1]);
      }
    }
  }
  EXPECT_EQ(starts.size(), static_cast<size_t>(B));
  // The documented formula, independently computed.
  const uint64_t key = MixKey(MixKey(MixKey(7, 100), 2), 3);
  EXPECT_EQ(d.TrainWindowStart(7, 100, 2, 3, T), key % (d.train_tokens() - T - 1));
}

TEST_F(DatasetTest, TrainWindowsCoverTheSplit) {
  const Dataset d = OpenOrDie();
  constexpr int T = 64;
  const size_t range = d.train_tokens() - T - 1;
  int buckets[10] = {};
  for (int64_t step = 0; step < 2000; ++step) ++buckets[d.TrainWindowStart(1, step, 0, 0, T) * 10 / range];
  for (int k = 0; k < 10; ++k) EXPECT_GT(buckets[k], 120) << "bucket " << k;  // ~200 expected each
}

TEST_F(DatasetTest, ValBatchesAreConsecutiveWindows) {
  const Dataset d = OpenOrDie();
  constexpr int B = 3, T = 100;
  const size_t windows = (d.val_tokens() - 1) / T;
  EXPECT_EQ(d.NumValBatches(B, T), static_cast<int>(windows / B));
  EXPECT_EQ(d.NumValBatches(1, d.val_tokens() - 1), 1);
  EXPECT_EQ(d.NumValBatches(100000, 1), 1);  // fewer windows than rows: one wrapping batch
  const std::string val_text = text_->substr(d.train_tokens());
  std::vector<int32_t> x(B * T), y(B * T);
  for (int index : {0, 1, static_cast<int>(windows / B) + 2}) {
    d.ValBatch(index, B, T, x.data(), y.data());
    for (int b = 0; b < B; ++b) {
      const size_t start = ((static_cast<size_t>(index) * B + b) % windows) * T;
      for (int t = 0; t < T; ++t) {
        ASSERT_EQ(x[b * T + t], static_cast<uint8_t>(val_text[start + t]));
        ASSERT_EQ(y[b * T + t], static_cast<uint8_t>(val_text[start + t + 1]));
      }
    }
  }
}

TEST_F(DatasetTest, CheckContext) {
  const Dataset d = OpenOrDie();
  EXPECT_TRUE(d.CheckContext(256).ok());
  EXPECT_TRUE(d.CheckContext(static_cast<int>(d.val_tokens()) - 2).ok());
  const int too_long_for_val = static_cast<int>(d.val_tokens()) - 1;
  EXPECT_EQ(d.CheckContext(too_long_for_val).message(),
            "corpus too short for context length " + std::to_string(too_long_for_val) + ": val split has " +
                std::to_string(d.val_tokens()) + " tokens (needs > " + std::to_string(too_long_for_val + 1) + ")");
  const int too_long = static_cast<int>(d.train_tokens());
  EXPECT_EQ(d.CheckContext(too_long).message(),
            "corpus too short for context length " + std::to_string(too_long) + ": train split has " +
                std::to_string(d.train_tokens()) + " tokens (needs > " + std::to_string(too_long + 1) + ")");
  EXPECT_FALSE(d.CheckContext(0).ok());
}

TEST_F(DatasetTest, MissingOrNonDataDirectory) {
  TempDir t;
  EXPECT_TRUE(Contains(OpenError(t / "nope"), t / "nope"));
  EXPECT_TRUE(Contains(OpenError(t.path()), "not a keel data directory"));
}

TEST_F(DatasetTest, BadMetaJson) {
  TempDir t;
  const std::string dir = CopyData(t);
  WriteText(dir + "/meta.json", "{\"format\": \"keel-data\", ");
  std::string m = OpenError(dir);
  EXPECT_TRUE(Contains(m, dir + "/meta.json: invalid JSON")) << m;

  WriteText(dir + "/meta.json", "{\"format\": \"keel-data\", \"format_version\": 1}");
  m = OpenError(dir);
  EXPECT_TRUE(Contains(m, "missing field")) << m;

  auto meta = nlohmann::json::parse(ReadAll(*dir_ / "data/meta.json"));
  meta["format_version"] = 2;
  WriteText(dir + "/meta.json", meta.dump());
  EXPECT_TRUE(Contains(OpenError(dir), "unsupported format_version 2"));

  meta["format_version"] = 1;
  meta["train_tokens"] = "many";
  WriteText(dir + "/meta.json", meta.dump());
  EXPECT_TRUE(Contains(OpenError(dir), "\"train_tokens\" must be a non-negative integer"));
}

TEST_F(DatasetTest, DamagedFilesAreDetected) {
  TempDir t;
  const std::string dir = CopyData(t);
  // A truncated shard: the shard's own error, naming the file.
  const std::string val = ReadAll(dir + "/val.bin");
  WriteText(dir + "/val.bin", val.substr(0, val.size() - 10));
  EXPECT_TRUE(Contains(OpenError(dir), dir + "/val.bin: truncated"));
  WriteText(dir + "/val.bin", val);
  ASSERT_TRUE(Dataset::Open(dir).ok());

  // A valid shard with other content (swapped in from another preparation).
  ASSERT_TRUE(WriteShard(dir + "/train.bin", std::vector<int32_t>(100, 65), 256).ok());
  std::string m = OpenError(dir);
  EXPECT_TRUE(Contains(m, dir + "/train.bin: does not match meta.json")) << m;
  fs::copy_file(*dir_ / "data/train.bin", dir + "/train.bin", fs::copy_options::overwrite_existing);

  // A damaged tokenizer file.
  WriteText(dir + "/tokenizer.model", "keel-byte-tokenizer v9\n");
  m = OpenError(dir);
  EXPECT_TRUE(Contains(m, dir + "/tokenizer.model: checksum mismatch")) << m;
}

}  // namespace
}  // namespace keel
