// data_tokenizer_test.cc: tests for the byte and BPE tokenizers: exact round trips, determinism, loading.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <set>

#include "core/hash.h"
#include "data/corpus.h"
#include "data/tokenizer.h"
#include "test_util.h"

namespace keel {
namespace {

using keel::testing::TempDir;
using keel::testing::WriteText;

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// ~200 KB of pseudo-English (2000 made-up words, Zipf-like frequencies) with some non-ASCII words,
// indentation and blank lines; deterministic.
std::string SyntheticCorpus(size_t bytes = 200 << 10) {
  static const char* kSyllables[] = {"ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "qui", "bra",
                                     "st", "or", "en", "th", "ch", "ée", "ün", "ça", "ol", "ix"};
  Rng rng(42);
  std::vector<std::string> words;
  for (int i = 0; i < 2000; ++i) {
    std::string w;
    const int n = 1 + static_cast<int>(rng.Below(4));
    for (int j = 0; j < n; ++j) w += kSyllables[rng.Below(sizeof(kSyllables) / sizeof(kSyllables[0]))];
    words.push_back(w);
  }
  for (const char* w : {"the", "a", "of", "and", "café", "—", "“quoted”", "x=1;"}) words.push_back(w);
  std::string s;
  while (s.size() < bytes) {
    const int n = 3 + static_cast<int>(rng.Below(12));
    if (rng.Below(10) == 0) s += "    ";  // indented lines
    for (int w = 0; w < n; ++w) {
      if (w) s += rng.Below(20) == 0 ? "  " : " ";
      // Zipf-like: small indices much more frequent.
      const uint64_t r = rng.Below(words.size());
      s += words[rng.Below(r + 1)];
    }
    s += rng.Below(8) == 0 ? ".\n\n" : ".\n";
  }
  return s;
}

// Strings that must survive Encode/Decode exactly.
std::vector<std::string> TrickyStrings() {
  std::vector<std::string> v = {
      "",
      " ",
      "\n",
      "the quick brown fox",
      "  leading and trailing spaces  ",
      "tabs\tand\r\nCRLF\r\nlines\n\n\n",
      "many          spaces",
      "h\xC3\xA9llo w\xC3\xB6rld \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xF0\x9F\x8E\x89",  // héllo wörld 日本語 🎉
      "\xE2\x96\x81 literal U+2581 \xE2\x96\x81\xE2\x96\x81x",                            // SentencePiece's space
      std::string("nul\0inside", 10),
      "invalid \xFF\xFE utf8 \xC3",  // lone bytes and a truncated sequence
      "\xEF\xAC\x81 \xE2\x91\xA0 \xEF\xBC\xA1",  // ﬁ ① Ａ: NFKC would change these
      "ends with newline\n",
      std::string(10000, ' '),  // longer than one SentencePiece run
  };
  // Long lines, cut into several runs: words, and multi-byte characters with no spaces at all.
  std::string words, cjk;
  while (words.size() < 20000) words += "the fox jumps over ";
  while (cjk.size() < 20000) cjk += "\xE6\x97\xA5\xE6\x9C\xAC\xF0\x9F\x8E\x89";
  v.push_back(words);
  v.push_back(cjk);
  v.push_back("x" + cjk);  // shifts the character boundaries relative to the cut points
  return v;
}

class BpeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto t = TrainBpeTokenizer(SyntheticCorpus(), 512);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tok_ = std::move(t).value().release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    tok_ = nullptr;
  }
  static Tokenizer* tok_;
};
Tokenizer* BpeTest::tok_ = nullptr;

TEST(DataTokenizer, ByteRoundTripAllBytes) {
  ByteTokenizer tok;
  std::string all;
  for (int i = 0; i < 256; ++i) all += static_cast<char>(i);
  const std::vector<int32_t> ids = tok.Encode(all);
  ASSERT_EQ(ids.size(), 256u);
  for (int i = 0; i < 256; ++i) EXPECT_EQ(ids[i], i);
  EXPECT_EQ(tok.Decode(ids), all);
  for (const std::string& s : TrickyStrings()) EXPECT_EQ(tok.Decode(tok.Encode(s)), s);
  EXPECT_EQ(tok.DecodePiece(0x41), "A");
  EXPECT_EQ(tok.DecodePiece(300), "");
  EXPECT_EQ(tok.vocab_size(), 256);
  EXPECT_EQ(tok.bos_id(), -1);
  EXPECT_EQ(tok.eos_id(), -1);
  EXPECT_EQ(tok.piece(10), "<0x0A>");
  EXPECT_EQ(tok.piece_type(10), kPieceByte);
  EXPECT_EQ(tok.type(), "byte");
  EXPECT_EQ(tok.Serialize(), "keel-byte-tokenizer v1\n");
  auto loaded = LoadTokenizer("byte", tok.Serialize());
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  EXPECT_EQ((*loaded)->type(), "byte");
}

TEST_F(BpeTest, RoundTripIsExact) {
  const Tokenizer& tok = *tok_;
  EXPECT_EQ(tok.type(), "bpe");
  EXPECT_EQ(tok.vocab_size(), 512);
  for (const std::string& s : TrickyStrings()) {
    const std::vector<int32_t> ids = tok.Encode(s);
    for (int32_t id : ids) {
      ASSERT_GE(id, 0);
      ASSERT_LT(id, tok.vocab_size());
      EXPECT_NE(id, tok.bos_id());
      EXPECT_NE(id, tok.eos_id());
    }
    EXPECT_EQ(tok.Decode(ids), s) << "input: " << s;
  }
  const std::string corpus = SyntheticCorpus(20000);
  EXPECT_EQ(tok.Decode(tok.Encode(corpus)), corpus);
}

TEST_F(BpeTest, CompressesTrainingLikeText) {
  const std::string text = SyntheticCorpus(20000);
  const size_t n = tok_->Encode(text).size();
  EXPECT_LT(n, text.size() / 2) << "BPE should merge frequent words";
}

TEST_F(BpeTest, DecodePieceConcatenatesToDecode) {
  // Streaming: piece-by-piece output, including byte-fallback pieces of a multi-byte character the model
  // never saw (so it is split into bytes), must equal the full decode.
  const std::string s = "the fox \xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x90\x9F\n";  // 世界 🐟 are not in the corpus
  const std::vector<int32_t> ids = tok_->Encode(s);
  std::string streamed;
  int byte_pieces = 0;
  for (int32_t id : ids) {
    streamed += tok_->DecodePiece(id);
    if (tok_->piece_type(id) == kPieceByte) {
      ++byte_pieces;
      EXPECT_EQ(tok_->DecodePiece(id).size(), 1u);
    }
  }
  EXPECT_EQ(streamed, s);
  EXPECT_GE(byte_pieces, 10);  // 6 + 4 bytes of the unseen characters, and the newline
}

TEST_F(BpeTest, VocabularyMetadata) {
  const Tokenizer& tok = *tok_;
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.piece_type(0), kPieceUnknown);
  EXPECT_EQ(tok.piece_type(1), kPieceControl);
  EXPECT_EQ(tok.piece_type(2), kPieceControl);
  EXPECT_EQ(tok.DecodePiece(1), "");
  EXPECT_EQ(tok.DecodePiece(-5), "");
  EXPECT_EQ(tok.DecodePiece(tok.vocab_size()), "");
  std::set<std::string> pieces;
  int bytes = 0, normal = 0;
  for (int id = 0; id < tok.vocab_size(); ++id) {
    pieces.insert(tok.piece(id));
    if (tok.piece_type(id) == kPieceByte) ++bytes;
    if (tok.piece_type(id) == kPieceNormal) ++normal;
  }
  EXPECT_EQ(pieces.size(), static_cast<size_t>(tok.vocab_size()));  // pieces are unique
  EXPECT_EQ(bytes, 256);
  EXPECT_EQ(normal, tok.vocab_size() - 259);
  EXPECT_EQ(tok.piece(3), "<0x00>");
}

TEST_F(BpeTest, SerializeLoadRoundTrip) {
  TempDir t;
  WriteText(t / "tokenizer.model", tok_->Serialize());
  auto loaded = LoadTokenizerFile(t / "tokenizer.model");
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  const Tokenizer& tok2 = **loaded;
  EXPECT_EQ(tok2.type(), "bpe");
  EXPECT_EQ(tok2.Serialize(), tok_->Serialize());
  EXPECT_EQ(tok2.vocab_size(), tok_->vocab_size());
  const std::string text = SyntheticCorpus(5000);
  EXPECT_EQ(tok2.Encode(text), tok_->Encode(text));
  for (int id = 0; id < tok2.vocab_size(); ++id) {
    ASSERT_EQ(tok2.piece(id), tok_->piece(id));
    ASSERT_EQ(tok2.score(id), tok_->score(id));
  }
  // Byte tokenizer files are detected by content.
  WriteText(t / "byte.model", ByteTokenizer().Serialize());
  auto byte = LoadTokenizerFile(t / "byte.model");
  ASSERT_TRUE(byte.ok()) << byte.status().ToString();
  EXPECT_EQ((*byte)->type(), "byte");
}

TEST_F(BpeTest, CorruptTokenizerFilesGiveClearErrors) {
  TempDir t;
  const std::string good = tok_->Serialize();
  struct Case {
    std::string name, bytes;
  };
  std::string garbage(4000, '\0');
  Rng rng(7);
  for (char& c : garbage) c = static_cast<char>(rng.Next());
  const std::vector<Case> cases = {
      {"empty.model", ""},
      {"truncated.model", good.substr(0, good.size() / 2)},
      {"garbage.model", garbage},
      {"text.model", "just some text\n"},
      {"byte_v2.model", "keel-byte-tokenizer v2\n"},
  };
  for (const Case& c : cases) {
    WriteText(t / c.name, c.bytes);
    auto r = LoadTokenizerFile(t / c.name);
    ASSERT_FALSE(r.ok()) << c.name << " loaded";
    EXPECT_EQ(r.status().code(), Code::kCorrupt) << c.name;
    EXPECT_TRUE(Contains(r.status().message(), t / c.name)) << r.status().message();
    EXPECT_EQ(r.status().message().find('\n'), std::string::npos) << r.status().message();
  }
  auto missing = LoadTokenizerFile(t / "missing.model");
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(Contains(missing.status().message(), t / "missing.model"));
  // Type mismatches.
  EXPECT_FALSE(LoadTokenizer("byte", good).ok());
  EXPECT_FALSE(LoadTokenizer("bpe", ByteTokenizer().Serialize()).ok());
  EXPECT_EQ(LoadTokenizer("wordpiece", good).status().code(), Code::kInvalidArgument);
}

// An implausibly large tokenizer file is refused before SentencePiece parses it (and whatever SentencePiece
// throws while loading becomes a Status).
TEST(DataTokenizer, OversizedBpeModelIsRefusedBeforeLoading) {
  std::string huge(size_t{129} << 20, 'x');  // over kMaxTokenizerFileBytes (128 MiB)
  auto r = LoadTokenizer("bpe", huge);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kCorrupt);
  EXPECT_TRUE(Contains(r.status().message(), "implausibly large")) << r.status().message();
}

// A tokenizer file's size is checked before it is read: a sparse 200 GB file is refused without reading it.
TEST(DataTokenizer, HugeTokenizerFileIsRefusedWithoutReadingIt) {
  keel::testing::TempDir t;
  const std::string path = t / "tokenizer.model";
  keel::testing::WriteText(path, "x");
  std::filesystem::resize_file(path, uint64_t{200} << 30);
  auto r = LoadTokenizerFile(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kCorrupt);
  EXPECT_EQ(r.status().message().rfind(path + ": tokenizer file of 214748364800 bytes is implausibly large", 0), 0u)
      << r.status().message();
}

TEST(DataTokenizer, BpeTrainingIsDeterministic) {
  const std::string text = SyntheticCorpus(100 << 10);
  auto a = TrainBpeTokenizer(text, 400);
  auto b = TrainBpeTokenizer(text, 400);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)->Serialize(), (*b)->Serialize());
  // A different text gives a different model (the check above is not vacuous).
  auto c = TrainBpeTokenizer(text + "zebra zebra zebra zebra zebra zebra\n", 400);
  ASSERT_TRUE(c.ok());
  EXPECT_NE((*a)->Serialize(), (*c)->Serialize());
}

TEST(DataTokenizer, BpeTrainingErrors) {
  EXPECT_EQ(TrainBpeTokenizer("some text", 100).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(TrainBpeTokenizer("some text", (1 << 20) + 1).status().code(), Code::kInvalidArgument);
  EXPECT_FALSE(TrainBpeTokenizer("", 1000).ok());
  EXPECT_FALSE(TrainBpeTokenizer("\n\n\n", 1000).ok());
  // 300 distinct characters need 559 pieces.
  std::string many_chars;
  for (int cp = 0x4E00; cp < 0x4E00 + 300; ++cp) {
    many_chars += static_cast<char>(0xE0 | (cp >> 12));
    many_chars += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    many_chars += static_cast<char>(0x80 | (cp & 0x3F));
  }
  auto r = TrainBpeTokenizer(many_chars + "\n", 400);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Contains(r.status().message(), "too small")) << r.status().message();
  EXPECT_TRUE(Contains(r.status().message(), "559")) << r.status().message();
}

TEST(DataTokenizer, BpeOnTinyTextYieldsSmallerVocab) {
  auto r = TrainBpeTokenizer("hello world\nhello there\n", 4096);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_LT((*r)->vocab_size(), 4096);
  EXPECT_GE((*r)->vocab_size(), 259 + 9);  // reserved + the 9 distinct characters
  EXPECT_EQ((*r)->Decode((*r)->Encode("hello world")), "hello world");
}

// Timing on the fortunes corpus (the spec's reference corpus); run with --gtest_also_run_disabled_tests.
TEST(DataTokenizer, DISABLED_FortunesTrainingTime) {
  auto files = CollectTextFiles({"/usr/share/games/fortunes"});
  ASSERT_TRUE(files.ok()) << files.status().ToString();
  auto text = ReadCorpus(*files);
  ASSERT_TRUE(text.ok());
  for (int vocab : {4096, 8192}) {
    const auto t0 = std::chrono::steady_clock::now();
    auto tok = TrainBpeTokenizer(*text, vocab);
    const double train_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ASSERT_TRUE(tok.ok()) << tok.status().ToString();
    const auto t1 = std::chrono::steady_clock::now();
    const size_t n = (*tok)->Encode(*text).size();
    const double enc_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    std::printf("fortunes: %zu bytes, vocab %d: train %.2f s, encode %.2f s (1 thread), %zu tokens (%.2f bytes/token)\n",
                text->size(), vocab, train_s, enc_s, n, static_cast<double>(text->size()) / n);
  }
}

}  // namespace
}  // namespace keel
