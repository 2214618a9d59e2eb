// data_shards_test.cc: tests for the token shard format: round trips and clear errors on corrupt files.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/env.h"
#include "core/hash.h"
#include "data/shards.h"
#include "test_util.h"

namespace keel {
namespace {

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

std::vector<int32_t> RandomTokens(size_t n, int vocab, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng.Below(static_cast<uint64_t>(vocab)));
  return t;
}

TEST(DataShards, RoundTripUint16) {
  TempDir t;
  std::vector<int32_t> tokens = RandomTokens(10007, 65536, 1);
  tokens[0] = 0;
  tokens[1] = 65535;  // the largest uint16 id
  ASSERT_TRUE(WriteShard(t / "a.bin", tokens, 65536).ok());
  EXPECT_EQ(std::filesystem::file_size(t / "a.bin"), 64u + 2u * tokens.size());
  EXPECT_EQ(testing::DirEntries(t.path()), std::vector<std::string>{"a.bin"});  // no temporary left
  auto r = ShardReader::Open(t / "a.bin");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->dtype_bytes(), 2);
  ASSERT_EQ(r->size(), tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) ASSERT_EQ((*r)[i], tokens[i]) << i;
  std::vector<int32_t> window(100);
  r->Copy(500, 100, window.data());
  EXPECT_TRUE(std::equal(window.begin(), window.end(), tokens.begin() + 500));
  EXPECT_EQ(r->MaxToken(), 65535);
  EXPECT_EQ(r->data_hash(), Hash64(ReadAll(t / "a.bin").data() + 64, 2 * tokens.size()));
}

TEST(DataShards, RoundTripUint32) {
  TempDir t;
  std::vector<int32_t> tokens = RandomTokens(5000, 1 << 20, 2);
  tokens[7] = (1 << 20) - 1;
  ASSERT_TRUE(WriteShard(t / "b.bin", tokens, 1 << 20).ok());
  EXPECT_EQ(std::filesystem::file_size(t / "b.bin"), 64u + 4u * tokens.size());
  auto r = ShardReader::Open(t / "b.bin");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->dtype_bytes(), 4);
  ASSERT_EQ(r->size(), tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) ASSERT_EQ((*r)[i], tokens[i]) << i;
  // vocab 65537 is the first that needs uint32.
  ASSERT_TRUE(WriteShard(t / "c.bin", {65536}, 65537).ok());
  auto c = ShardReader::Open(t / "c.bin");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->dtype_bytes(), 4);
  EXPECT_EQ((*c)[0], 65536);
}

TEST(DataShards, HeaderLayout) {
  TempDir t;
  ASSERT_TRUE(WriteShard(t / "h.bin", {1, 2, 3}, 256).ok());
  const std::string b = ReadAll(t / "h.bin");
  ASSERT_EQ(b.size(), 70u);
  EXPECT_EQ(b.substr(0, 8), "KEELTOKS");
  uint32_t version, dtype;
  uint64_t count, data_hash, header_hash;
  std::memcpy(&version, b.data() + 8, 4);
  std::memcpy(&dtype, b.data() + 12, 4);
  std::memcpy(&count, b.data() + 16, 8);
  std::memcpy(&data_hash, b.data() + 24, 8);
  std::memcpy(&header_hash, b.data() + 32, 8);
  EXPECT_EQ(version, 1u);
  EXPECT_EQ(dtype, 2u);
  EXPECT_EQ(count, 3u);
  EXPECT_EQ(data_hash, Hash64(b.data() + 64, 6));
  EXPECT_EQ(header_hash, Hash64(b.data(), 32));
  EXPECT_EQ(b.substr(40, 24), std::string(24, '\0'));
  EXPECT_EQ(b.substr(64), std::string("\x01\x00\x02\x00\x03\x00", 6));
}

TEST(DataShards, EmptyShardIsValid) {
  TempDir t;
  ASSERT_TRUE(WriteShard(t / "e.bin", {}, 256).ok());
  auto r = ShardReader::Open(t / "e.bin");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->size(), 0u);
  EXPECT_EQ(r->MaxToken(), -1);
}

TEST(DataShards, RejectsOutOfRangeTokens) {
  TempDir t;
  EXPECT_EQ(WriteShard(t / "x.bin", {1, 256}, 256).code(), Code::kInvalidArgument);
  EXPECT_EQ(WriteShard(t / "x.bin", {-1}, 256).code(), Code::kInvalidArgument);
  EXPECT_EQ(WriteShard(t / "x.bin", {0}, 0).code(), Code::kInvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(t / "x.bin"));
}

class CorruptShardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tokens_ = RandomTokens(1000, 4096, 3);
    ASSERT_TRUE(WriteShard(path(), tokens_, 4096).ok());
    good_ = ReadAll(path());
  }
  std::string path() const { return dir_ / "train.bin"; }
  // Opens bytes written to the shard path; expects a one-line kCorrupt error naming the file.
  std::string OpenError(const std::string& bytes) {
    WriteText(path(), bytes);
    auto r = ShardReader::Open(path());
    if (r.ok()) {
      ADD_FAILURE() << "corrupt shard opened";
      return "";
    }
    EXPECT_EQ(r.status().code(), Code::kCorrupt);
    const std::string& m = r.status().message();
    EXPECT_EQ(m.rfind(path() + ": ", 0), 0u) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    return m;
  }
  TempDir dir_;
  std::vector<int32_t> tokens_;
  std::string good_;
};

TEST_F(CorruptShardTest, Truncated) {
  const std::string m = OpenError(good_.substr(0, 1500));
  EXPECT_EQ(m, path() + ": truncated: header says 1000 tokens (2000 + 64 bytes) but file has 1500 bytes");
  EXPECT_TRUE(Contains(OpenError(good_.substr(0, 40)), "truncated"));
}

TEST_F(CorruptShardTest, TrailingData) {
  EXPECT_TRUE(Contains(OpenError(good_ + "xx"), "trailing data"));
}

TEST_F(CorruptShardTest, BitFlipInData) {
  for (size_t off : {size_t{64}, size_t{1000}, good_.size() - 1}) {
    std::string bad = good_;
    bad[off] ^= 0x10;
    EXPECT_EQ(OpenError(bad), path() + ": checksum mismatch (file corrupt)") << off;
  }
}

TEST_F(CorruptShardTest, BitFlipInHeader) {
  for (size_t off : {size_t{8}, size_t{12}, size_t{16}, size_t{20}, size_t{24}, size_t{33}}) {
    std::string bad = good_;
    bad[off] ^= 0x01;
    EXPECT_TRUE(Contains(OpenError(bad), "header checksum mismatch")) << off;
  }
  std::string reserved = good_;
  reserved[50] = 1;
  EXPECT_TRUE(Contains(OpenError(reserved), "reserved"));
}

TEST_F(CorruptShardTest, WrongMagic) {
  std::string bad = good_;
  bad[0] = 'X';
  EXPECT_TRUE(Contains(OpenError(bad), "bad magic"));
  EXPECT_TRUE(Contains(OpenError(std::string(200, 'a')), "bad magic"));
}

TEST_F(CorruptShardTest, EmptyFile) { EXPECT_TRUE(Contains(OpenError(""), "empty file")); }

TEST_F(CorruptShardTest, UnsupportedVersionWithValidHeaderHash) {
  std::string bad = good_;
  const uint32_t v2 = 2;
  std::memcpy(bad.data() + 8, &v2, 4);
  const uint64_t h = Hash64(bad.data(), 32);
  std::memcpy(bad.data() + 32, &h, 8);
  EXPECT_TRUE(Contains(OpenError(bad), "unsupported shard version 2"));
}

TEST_F(CorruptShardTest, HugeTokenCountDoesNotOverflow) {
  std::string bad = good_;
  const uint64_t count = ~uint64_t{0} / 2;
  std::memcpy(bad.data() + 16, &count, 8);
  const uint64_t h = Hash64(bad.data(), 32);
  std::memcpy(bad.data() + 32, &h, 8);
  EXPECT_TRUE(Contains(OpenError(bad), "truncated"));
}

// A 4-byte id of 2^31 or more (written by another tool: 0xFFFFFFFF, or -100 as an "ignore" id) is a large id,
// which Dataset::Open's vocabulary check must see; as an int32 it would be negative and pass.
TEST(DataShards, MaxTokenSeesFourByteIdsAboveInt32) {
  TempDir t;
  ASSERT_TRUE(WriteShard(t / "w.bin", {5, 65536, 7}, 65537).ok());
  std::string b = ReadAll(t / "w.bin");
  ASSERT_EQ(b.size(), 64u + 12u);
  const uint32_t huge = 0xFFFFFFFFu;
  std::memcpy(b.data() + 64 + 4, &huge, 4);
  const uint64_t data_hash = Hash64(b.data() + 64, 12);  // re-signed, as a converter would
  std::memcpy(b.data() + 24, &data_hash, 8);
  const uint64_t header_hash = Hash64(b.data(), 32);
  std::memcpy(b.data() + 32, &header_hash, 8);
  WriteText(t / "w.bin", b);
  auto r = ShardReader::Open(t / "w.bin");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->MaxToken(), int64_t{0xFFFFFFFFu});
}

TEST(DataShards, MissingFile) {
  TempDir t;
  auto r = ShardReader::Open(t / "nope.bin");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
  EXPECT_TRUE(Contains(r.status().message(), t / "nope.bin"));
}

}  // namespace
}  // namespace keel
