// data_corpus_test.cc: tests for text-file collection (dedupe, binary skip, errors) and corpus reading.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "data/corpus.h"
#include "test_util.h"

namespace keel {
namespace {

using keel::testing::TempDir;
using keel::testing::WriteText;

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

TEST(DataCorpus, WhyNotText) {
  EXPECT_EQ(WhyNotText(""), "");
  EXPECT_EQ(WhyNotText("plain ascii\n"), "");
  EXPECT_EQ(WhyNotText("h\xC3\xA9llo \xF0\x9F\x8E\x89"), "");  // é, 🎉
  EXPECT_NE(WhyNotText(std::string("a\0b", 3)), "");
  EXPECT_EQ(WhyNotText("ok \xFF"), "not valid UTF-8 at byte 3");
  EXPECT_NE(WhyNotText("\xC0\xAF"), "");          // overlong '/'
  EXPECT_NE(WhyNotText("\xED\xA0\x80"), "");      // surrogate
  EXPECT_NE(WhyNotText("\xF4\x90\x80\x80"), "");  // > U+10FFFF
  EXPECT_NE(WhyNotText("\xE6\x97"), "");          // truncated sequence
  // NUL is only sniffed in the first 8 KiB; later it is valid UTF-8.
  std::string late(kBinarySniffBytes + 10, 'x');
  late[kBinarySniffBytes + 5] = '\0';
  EXPECT_EQ(WhyNotText(late), "");
}

TEST(DataCorpus, CollectsSortedRecursivelyAndSkipsBinaryAndHidden) {
  TempDir t;
  std::filesystem::create_directories(t / "d/sub");
  std::filesystem::create_directories(t / "d/.git");
  WriteText(t / "d/b.txt", "bee\n");
  WriteText(t / "d/a.txt", "ay\n");
  WriteText(t / "d/sub/c.txt", "see\n");
  WriteText(t / "d/.git/config", "hidden\n");
  WriteText(t / "d/.hidden.txt", "hidden\n");
  WriteText(t / "d/index.dat", std::string("\x00\x00\x00\x02\x01", 5));  // like fortune's .dat files
  WriteText(t / "d/latin1.txt", "caf\xE9\n");                             // not UTF-8
  CollectStats stats;
  auto files = CollectTextFiles({t / "d"}, &stats);
  ASSERT_TRUE(files.ok()) << files.status().ToString();
  EXPECT_EQ(*files, (std::vector<std::string>{t / "d/a.txt", t / "d/b.txt", t / "d/sub/c.txt"}));
  EXPECT_EQ(stats.skipped_binary, 2u);
  EXPECT_EQ(stats.skipped_hidden, 2u);
}

TEST(DataCorpus, FollowsSymlinksButIncludesEachFileOnce) {
  TempDir t;
  std::filesystem::create_directories(t / "d");
  std::filesystem::create_directories(t / "other");
  WriteText(t / "d/art", "art fortunes\n");
  WriteText(t / "other/linked.txt", "reached through a directory link\n");
  ASSERT_EQ(symlink("art", (t / "d/art.u8").c_str()), 0);                     // like fortunes' .u8 links
  ASSERT_EQ(symlink((t / "other").c_str(), (t / "d/link_dir").c_str()), 0);  // directory symlink
  ASSERT_EQ(symlink("..", (t / "d/loop").c_str()), 0);                        // a cycle back to t/
  ASSERT_EQ(symlink("missing", (t / "d/dangling").c_str()), 0);
  CollectStats stats;
  auto files = CollectTextFiles({t / "d", t / "d/art"}, &stats);
  ASSERT_TRUE(files.ok()) << files.status().ToString();
  // The loop reaches t/other and t/d again; neither is collected twice.
  EXPECT_EQ(*files, (std::vector<std::string>{t / "d/art", t / "d/link_dir/linked.txt"}));
  EXPECT_GE(stats.duplicates, 2u);  // art.u8 and the explicit second input
  EXPECT_EQ(stats.skipped_other, 1u);
}

// An input inside an earlier one is walked once; its parent, whose only text is in it, is not "without text files".
TEST(DataCorpus, AParentWhoseOnlyTextIsInAnEarlierInputIsNotEmpty) {
  TempDir t;
  std::filesystem::create_directories(t / "corpus/sub");
  WriteText(t / "corpus/sub/a.txt", "some text\n");
  auto files = CollectTextFiles({t / "corpus/sub", t / "corpus"});
  ASSERT_TRUE(files.ok()) << files.status().ToString();
  EXPECT_EQ(*files, (std::vector<std::string>{t / "corpus/sub/a.txt"}));
}

TEST(DataCorpus, ErrorsNameThePath) {
  TempDir t;
  auto missing = CollectTextFiles({t / "nope"});
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), Code::kNotFound);
  EXPECT_TRUE(Contains(missing.status().message(), t / "nope")) << missing.status().message();

  std::filesystem::create_directories(t / "empty");
  auto empty = CollectTextFiles({t / "empty"});
  ASSERT_FALSE(empty.ok());
  EXPECT_EQ(empty.status().message(), "no text files in " + (t / "empty"));

  std::filesystem::create_directories(t / "bin");
  WriteText(t / "bin/x.dat", std::string("\0\1\2", 3));
  auto bin_dir = CollectTextFiles({t / "bin"});
  ASSERT_FALSE(bin_dir.ok());
  EXPECT_EQ(bin_dir.status().message(), "no text files in " + (t / "bin"));

  auto bin_file = CollectTextFiles({t / "bin/x.dat"});  // named explicitly: an error, not a silent skip
  ASSERT_FALSE(bin_file.ok());
  EXPECT_TRUE(Contains(bin_file.status().message(), "not a text file")) << bin_file.status().message();

  EXPECT_FALSE(CollectTextFiles({}).ok());
}

TEST(DataCorpus, ReadCorpusJoinsWithNewlineAndRejectsEmpty) {
  TempDir t;
  WriteText(t / "a", "first");
  WriteText(t / "b", "second\n");
  auto text = ReadCorpus({t / "a", t / "b"});
  ASSERT_TRUE(text.ok()) << text.status().ToString();
  EXPECT_EQ(*text, "first\nsecond\n");

  WriteText(t / "blank", " \n\t\r\n");
  WriteText(t / "zero", "");
  auto empty = ReadCorpus({t / "blank", t / "zero"});
  ASSERT_FALSE(empty.ok());
  EXPECT_TRUE(Contains(empty.status().message(), "corpus is empty")) << empty.status().message();
  EXPECT_FALSE(ReadCorpus({}).ok());

  // A file that turned binary after collection is reported, not silently read.
  WriteText(t / "changed", "now \xFF binary");
  auto changed = ReadCorpus({t / "a", t / "changed"});
  ASSERT_FALSE(changed.ok());
  EXPECT_TRUE(Contains(changed.status().message(), t / "changed"));
}

TEST(DataCorpus, FortunesPackageIfInstalled) {
  const std::string dir = "/usr/share/games/fortunes";
  if (!std::filesystem::is_directory(dir)) KEEL_SKIP_UNLESS_REQUIRED(std::string(dir) + " not installed");
  CollectStats stats;
  auto files = CollectTextFiles({dir}, &stats);
  ASSERT_TRUE(files.ok()) << files.status().ToString();
  EXPECT_GT(files->size(), 10u);
  for (const std::string& f : *files) {
    EXPECT_FALSE(f.ends_with(".dat")) << f;  // binary index files
    EXPECT_FALSE(f.ends_with(".u8")) << f;   // symlinks to files already collected
  }
  EXPECT_GT(stats.skipped_binary, 10u);
  EXPECT_GT(stats.duplicates, 10u);
}

}  // namespace
}  // namespace keel
