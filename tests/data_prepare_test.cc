// data_prepare_test.cc: end-to-end tests of Prepare (raw text -> data directory) with both tokenizers.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/env.h"
#include "core/hash.h"
#include "data/prepare.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "test_util.h"

namespace keel {
namespace {

namespace fs = std::filesystem;
using keel::testing::DirEntries;
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

std::vector<int32_t> ReadShard(const std::string& path) {
  auto r = ShardReader::Open(path);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  std::vector<int32_t> out;
  if (!r.ok()) return out;
  out.resize(r->size());
  r->Copy(0, out.size(), out.data());
  return out;
}

// Deterministic text: lines of made-up words, about `bytes` long.
std::string MakeText(size_t bytes, uint64_t seed) {
  static const char* kSyl[] = {"ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "ün", "é", "th", "st"};
  Rng rng(seed);
  std::string s;
  while (s.size() < bytes) {
    const int words = 2 + static_cast<int>(rng.Below(10));
    for (int w = 0; w < words; ++w) {
      if (w) s += ' ';
      const int syl = 1 + static_cast<int>(rng.Below(3));
      for (int k = 0; k < syl; ++k) s += kSyl[rng.Below(rng.Below(12) + 1)];
    }
    s += ".\n";
  }
  return s;
}

// Writes a small corpus directory: two text files and a binary file that must be skipped.
std::string MakeCorpusDir(const TempDir& t, size_t bytes_per_file, uint64_t seed = 1) {
  const std::string dir = t / "corpus";
  fs::create_directories(dir);
  WriteText(dir + "/a.txt", MakeText(bytes_per_file, seed));
  WriteText(dir + "/b.txt", MakeText(bytes_per_file, seed + 1));
  WriteText(dir + "/c.dat", std::string("\0\1\2\3", 4));
  return dir;
}

TEST(DataPrepare, ByteTokenizerEndToEnd) {
  TempDir t;
  const std::string corpus = MakeCorpusDir(t, 20000);
  const std::string text = ReadAll(corpus + "/a.txt") + "\n" + ReadAll(corpus + "/b.txt");
  PrepareOptions o;
  o.inputs = {corpus};
  o.out_dir = t / "data";
  o.tokenizer = "byte";
  o.val_fraction = 0.1;
  auto s = Prepare(o);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->tokenizer, "byte");
  EXPECT_EQ(s->vocab_size, 256);
  EXPECT_EQ(s->source_files, 2u);
  EXPECT_EQ(s->skipped_files, 1u);
  EXPECT_EQ(s->source_bytes, text.size());
  EXPECT_EQ(s->val_tokens, static_cast<size_t>(std::floor(text.size() * 0.1)));
  EXPECT_EQ(s->train_tokens + s->val_tokens, text.size());

  EXPECT_EQ(DirEntries(t.path()), (std::vector<std::string>{"corpus", "data"}));  // no tmp dirs left
  EXPECT_EQ(DirEntries(t / "data"),
            (std::vector<std::string>{"meta.json", "tokenizer.model", "train.bin", "val.bin"}));
  // The shards hold the corpus bytes, train then val.
  std::vector<int32_t> all = ReadShard(t / "data/train.bin");
  const std::vector<int32_t> val = ReadShard(t / "data/val.bin");
  EXPECT_EQ(all.size(), s->train_tokens);
  all.insert(all.end(), val.begin(), val.end());
  EXPECT_EQ(ByteTokenizer().Decode(all), text);
  EXPECT_EQ(ReadAll(t / "data/tokenizer.model"), "keel-byte-tokenizer v1\n");

  auto meta = nlohmann::json::parse(ReadAll(t / "data/meta.json"));
  EXPECT_EQ(meta["format"], "keel-data");
  EXPECT_EQ(meta["format_version"], 1);
  EXPECT_EQ(meta["keel_version"], KEEL_VERSION);
  EXPECT_EQ(meta["tokenizer"], "byte");
  EXPECT_EQ(meta["vocab_size"], 256);
  EXPECT_EQ(meta["train_tokens"], s->train_tokens);
  EXPECT_EQ(meta["val_tokens"], s->val_tokens);
  EXPECT_EQ(meta["source_files"], 2);
  EXPECT_EQ(meta["source_bytes"], text.size());
  EXPECT_EQ(meta["fingerprint"], s->fingerprint);
  EXPECT_EQ(s->fingerprint.size(), 16u);
}

TEST(DataPrepare, BpeEndToEndIsExactAndDeterministic) {
  TempDir t;
  // Two files of 150 KB: the corpus spans more than one parallel encoding chunk.
  const std::string corpus = MakeCorpusDir(t, 150000);
  const std::string text = ReadAll(corpus + "/a.txt") + "\n" + ReadAll(corpus + "/b.txt");
  std::vector<std::string> progress;
  PrepareOptions o;
  o.inputs = {corpus};
  o.out_dir = t / "d1";
  o.vocab_size = 400;
  o.progress = [&](std::string_view m) { progress.emplace_back(m); };
  auto s1 = Prepare(o);
  ASSERT_TRUE(s1.ok()) << s1.status().ToString();
  EXPECT_EQ(s1->tokenizer, "bpe");
  EXPECT_EQ(s1->vocab_size, 400);
  EXPECT_FALSE(progress.empty());

  auto tok = LoadTokenizerFile(t / "d1/tokenizer.model");
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  std::vector<int32_t> all = ReadShard(t / "d1/train.bin");
  const std::vector<int32_t> val = ReadShard(t / "d1/val.bin");
  all.insert(all.end(), val.begin(), val.end());
  EXPECT_EQ((*tok)->Decode(all), text);
  // Chunked parallel encoding gives the same tokens as encoding the whole text at once.
  EXPECT_EQ(all, (*tok)->Encode(text));
  EXPECT_LT(all.size(), text.size() / 2);

  o.out_dir = t / "d2";
  auto s2 = Prepare(o);
  ASSERT_TRUE(s2.ok()) << s2.status().ToString();
  EXPECT_EQ(s2->fingerprint, s1->fingerprint);
  for (const char* f : {"train.bin", "val.bin", "tokenizer.model", "meta.json"}) {
    EXPECT_EQ(ReadAll(t / "d1/" + f), ReadAll(t / "d2/" + f)) << f;
  }

  // Reusing the tokenizer file reproduces the same data.
  o.out_dir = t / "d3";
  o.tokenizer_file = t / "d1/tokenizer.model";
  auto s3 = Prepare(o);
  ASSERT_TRUE(s3.ok()) << s3.status().ToString();
  EXPECT_EQ(s3->fingerprint, s1->fingerprint);
}

TEST(DataPrepare, ReplacesExistingDataDirOnly) {
  TempDir t;
  const std::string corpus = MakeCorpusDir(t, 5000);
  PrepareOptions o;
  o.inputs = {corpus};
  o.out_dir = t / "data";
  o.tokenizer = "byte";
  auto s1 = Prepare(o);
  ASSERT_TRUE(s1.ok()) << s1.status().ToString();
  WriteText(corpus + "/a.txt", "different text now, long enough to split into train and val\n");
  o.out_dir = t / "data/";  // trailing slash is accepted
  auto s2 = Prepare(o);
  ASSERT_TRUE(s2.ok()) << s2.status().ToString();
  EXPECT_NE(s2->fingerprint, s1->fingerprint);
  EXPECT_EQ(nlohmann::json::parse(ReadAll(t / "data/meta.json"))["fingerprint"], s2->fingerprint);
  EXPECT_EQ(DirEntries(t.path()), (std::vector<std::string>{"corpus", "data"}));

  // An empty directory may be used.
  fs::create_directories(t / "empty");
  o.out_dir = t / "empty";
  EXPECT_TRUE(Prepare(o).ok());

  // Anything else is refused and left untouched.
  fs::create_directories(t / "precious");
  WriteText(t / "precious/thesis.txt", "do not delete");
  o.out_dir = t / "precious";
  auto r = Prepare(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), (t / "precious") + " exists and is not a keel data directory");
  EXPECT_EQ(ReadAll(t / "precious/thesis.txt"), "do not delete");
  WriteText(t / "afile", "x");
  o.out_dir = t / "afile";
  EXPECT_FALSE(Prepare(o).ok());
  EXPECT_EQ(ReadAll(t / "afile"), "x");
  // Under a file: refused before any work, naming the file in the way.
  int progress_lines = 0;
  o.progress = [&](std::string_view) { ++progress_lines; };
  o.out_dir = t / "afile/sub/data";
  auto under = Prepare(o);
  ASSERT_FALSE(under.ok());
  EXPECT_EQ(under.status().message(),
            "--out " + (t / "afile/sub/data") + ": cannot be created: " + (t / "afile") + " is not a directory");
  EXPECT_EQ(progress_lines, 0);
}

// A directory that merely holds a meta.json (a project, a corpus, someone else's format) is not replaced:
// replacing it deletes everything in it.
TEST(DataPrepare, NeverReplacesADirectoryThatIsNotKeelData) {
  TempDir t;
  const std::string corpus = MakeCorpusDir(t, 5000);
  PrepareOptions o;
  o.inputs = {corpus};
  o.tokenizer = "byte";
  fs::create_directories(t / "project");
  WriteText(t / "project/meta.json", "{\"name\": \"my project\"}\n");
  WriteText(t / "project/notes.txt", "do not delete");
  o.out_dir = t / "project";
  auto r = Prepare(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), (t / "project") + " exists and is not a keel data directory (its meta.json is not keel's)");
  EXPECT_EQ(ReadAll(t / "project/notes.txt"), "do not delete");
  // keel's meta.json next to a file keel does not write: refused too, naming the file.
  o.out_dir = t / "data";
  ASSERT_TRUE(Prepare(o).ok());
  WriteText(t / "data/mine.txt", "do not delete");
  auto r2 = Prepare(o);
  ASSERT_FALSE(r2.ok());
  EXPECT_EQ(r2.status().message(),
            (t / "data") + " exists and is not a keel data directory (it holds mine.txt, which keel prepare does not write)");
  EXPECT_EQ(ReadAll(t / "data/mine.txt"), "do not delete");
  // A leftover atomic-write temporary does not make it someone else's.
  fs::remove(t / "data/mine.txt");
  WriteText(t / "data/meta.json.tmp.Ab12Cd", "{");
  EXPECT_TRUE(Prepare(o).ok());
}

// --out inside an input directory: the walk would read the previous output as corpus text, so the same inputs
// would give other data each time. Refused before any work.
TEST(DataPrepare, RefusesAnOutputInsideAnInput) {
  TempDir t;
  const std::string corpus = MakeCorpusDir(t, 5000);
  PrepareOptions o;
  o.inputs = {t.path()};
  o.tokenizer = "byte";
  o.out_dir = corpus + "/data";
  int progress_lines = 0;
  o.progress = [&](std::string_view) { ++progress_lines; };
  auto r = Prepare(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "--out " + corpus + "/data lies inside --input " + t.path() +
                                      ": its files would be read as corpus text (put --out outside the inputs)");
  EXPECT_FALSE(fs::exists(corpus + "/data"));
  EXPECT_EQ(progress_lines, 0);
  o.inputs = {corpus + "/a.txt"};  // a file input: fine
  EXPECT_TRUE(Prepare(o).ok());
  // The earlier output given back as the input (or a file inside it): prepare would read its meta.json as text
  // and then replace, i.e. delete, the input. Refused; the data directory is left as it was.
  const std::string meta = ReadAll(corpus + "/data/meta.json");
  for (const std::string& in : {corpus + "/data", corpus + "/data/meta.json"}) {
    o.inputs = {in};
    r = Prepare(o);
    ASSERT_FALSE(r.ok()) << in;
    EXPECT_EQ(r.status().message(), "--input " + in + " lies inside --out " + corpus +
                                        "/data, which prepare replaces (put --out outside the inputs)");
    EXPECT_EQ(ReadAll(corpus + "/data/meta.json"), meta);
  }
}

TEST(DataPrepare, ValidatesOptions) {
  TempDir t;
  const std::string corpus = MakeCorpusDir(t, 2000);
  auto check = [&](auto mutate, const std::string& expect) {
    PrepareOptions o;
    o.inputs = {corpus};
    o.out_dir = t / "data";
    mutate(o);
    auto r = Prepare(o);
    ASSERT_FALSE(r.ok()) << expect;
    EXPECT_TRUE(Contains(r.status().message(), expect)) << r.status().message();
    EXPECT_FALSE(fs::exists(t / "data"));
  };
  check([](PrepareOptions& o) { o.tokenizer = "wordpiece"; }, "unknown tokenizer");
  check([](PrepareOptions& o) { o.vocab_size = 100; }, "--vocab-size must be in");
  check([](PrepareOptions& o) { o.vocab_size = (1 << 20) + 1; }, "--vocab-size must be in");
  check([](PrepareOptions& o) { o.val_fraction = 0; }, "--val-fraction");
  check([](PrepareOptions& o) { o.val_fraction = 0.6; }, "--val-fraction");
  check([](PrepareOptions& o) { o.val_fraction = std::nan(""); }, "--val-fraction");
  check([](PrepareOptions& o) { o.inputs.clear(); }, "no input");
  check([](PrepareOptions& o) { o.out_dir.clear(); }, "no output directory");
  check([&](PrepareOptions& o) { o.inputs = {t / "missing"}; }, t / "missing");
  // Too little text for a validation split.
  WriteText(t / "tiny.txt", "hi there\n");
  check(
      [&](PrepareOptions& o) {
        o.inputs = {t / "tiny.txt"};
        o.tokenizer = "byte";
      },
      "validation split would have 0 tokens");
  // Corpus with too many distinct characters for the vocab: training's error is surfaced.
  std::string cjk;
  for (int cp = 0x4E00; cp < 0x4E00 + 200; ++cp) {
    cjk += static_cast<char>(0xE0 | (cp >> 12));
    cjk += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    cjk += static_cast<char>(0x80 | (cp & 0x3F));
  }
  WriteText(t / "cjk.txt", cjk + "\n");
  check(
      [&](PrepareOptions& o) {
        o.inputs = {t / "cjk.txt"};
        o.vocab_size = 300;
      },
      "too small");
}

}  // namespace
}  // namespace keel
