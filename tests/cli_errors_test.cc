// cli_errors_test.cc: bad input gets a one-line error naming the file or flag, a non-zero exit, no crash and no
// half-written output.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "formats/checkpoint.h"
#include "test_util.h"
#include "train/checkpoint_io.h"

namespace keel::testing {
namespace {

namespace fs = std::filesystem;

// The error line keel printed (the last non-empty line of its output).
std::string LastLine(const std::string& out) {
  std::string s = out;
  while (!s.empty() && s.back() == '\n') s.pop_back();
  auto pos = s.rfind('\n');
  return pos == std::string::npos ? s : s.substr(pos + 1);
}

void ExpectError(const CommandResult& r, const std::string& must_mention) {
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_LT(r.exit_code, 128) << "crashed: " << r.output;
  EXPECT_NE(LastLine(r.output).find(must_mention), std::string::npos) << "output: " << r.output;
  EXPECT_EQ(r.output.find("terminate called"), std::string::npos) << r.output;
}

class CliErrors : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    std::string text;
    for (int i = 0; i < 400; ++i) text += "Line " + std::to_string(i) + ": the quick brown fox jumps over the lazy dog.\n";
    WriteText(*dir_ / "corpus.txt", text);
    ASSERT_EQ(RunKeel("prepare --input " + *dir_ / "corpus.txt" + " --out " + Data() + " --tokenizer byte").exit_code, 0);
    ASSERT_EQ(RunKeel("train " + Small(Run()) + " --steps 4").exit_code, 0);
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string Data() { return *dir_ / "data"; }
  static std::string Run() { return *dir_ / "run"; }
  static std::string Small(const std::string& out) {
    return "--data " + Data() + " --out " + out + " --layers 1 --heads 2 --dim 16 --ctx 16 --batch 2 --threads 1 "
           "--no-progress --checkpoint-every 2";
  }
  static TempDir* dir_;
};
TempDir* CliErrors::dir_ = nullptr;

TEST_F(CliErrors, MissingCorpusPath) {
  TempDir t;
  auto r = RunKeel("prepare --input /nonexistent/corpus --out " + t / "d");
  ExpectError(r, "/nonexistent/corpus");
  EXPECT_FALSE(fs::exists(t / "d"));
}

TEST_F(CliErrors, EmptyCorpus) {
  TempDir t;
  WriteText(t / "empty.txt", "");
  auto r = RunKeel("prepare --input " + t / "empty.txt" + " --out " + t / "d" + " --tokenizer byte");
  ExpectError(r, "empty");
  EXPECT_FALSE(fs::exists(t / "d"));
}

// A BPE tokenizer cannot be trained on a few bytes: say so (it read "SentencePiece model does not reproduce text
// exactly (it normalizes text; ...)").
TEST_F(CliErrors, CorpusTooSmallForBpe) {
  TempDir t;
  WriteText(t / "tiny.txt", "ab");
  auto r = RunKeel("prepare --input " + t / "tiny.txt" + " --out " + t / "d");
  ExpectError(r, "too small to train a BPE tokenizer: use more text, or --tokenizer byte");
  EXPECT_FALSE(fs::exists(t / "d"));
}

TEST_F(CliErrors, DirectoryWithoutTextFiles) {
  TempDir t;
  fs::create_directory(t / "bin");
  std::ofstream(t / "bin/x.dat", std::ios::binary).write("\0\1\2\3", 4);
  auto r = RunKeel("prepare --input " + t / "bin" + " --out " + t / "d" + " --tokenizer byte");
  ExpectError(r, "no text files");
  EXPECT_FALSE(fs::exists(t / "d"));
}

// An output that cannot be written is reported by its flag (it used to name keel's temporary, OUT.tmp-PID or
// OUT.tmp.XXXXXX), nothing is left behind, and a user's own OUT.tmp is never touched.
TEST_F(CliErrors, UnwritableOutputNamesTheFlag) {
  ExpectError(RunKeel("prepare --input " + *dir_ / "corpus.txt" + " --out /dev/null/data --tokenizer byte"),
              "--out /dev/null/data");
  ExpectError(RunKeel("export " + Run() + " --format gguf --out /dev/null/m.gguf"), "--out /dev/null/m.gguf");
  ExpectError(RunKeel("export " + Run() + " --format safetensors --out /dev/null/hf"), "--out /dev/null/hf");
  TempDir t;
  fs::create_directory(t / "d.tmp");
  WriteText(t / "d.tmp/notes.txt", "mine");
  ASSERT_EQ(RunKeel("prepare --input " + *dir_ / "corpus.txt" + " --out " + t / "d --tokenizer byte").exit_code, 0);
  // Again, over the existing data: the replaced directory goes through a unique OUT.old.XXXXXX.
  ASSERT_EQ(RunKeel("prepare --input " + *dir_ / "corpus.txt" + " --out " + t / "d --tokenizer byte").exit_code, 0);
  EXPECT_EQ(DirEntries(t.path()), (std::vector<std::string>{"d", "d.tmp"}));
  EXPECT_EQ(DirEntries(t / "d.tmp"), std::vector<std::string>{"notes.txt"});
  // OUT a symlink to existing data: the link itself is replaced (rename onto a reserved empty directory failed).
  fs::create_directory_symlink(t / "d", t / "link");
  ASSERT_EQ(RunKeel("prepare --input " + *dir_ / "corpus.txt" + " --out " + t / "link --tokenizer byte").exit_code, 0);
  EXPECT_EQ(DirEntries(t.path()), (std::vector<std::string>{"d", "d.tmp", "link"}));
}

// (--ctx 2000 overruns the 1094-token val split; --ctx 100000 used to, but its micro-batch needs 320 GB of
// attention activations, which the up-front memory check refuses first on most machines.)
TEST_F(CliErrors, CorpusTooShortForContext) {
  TempDir t;
  auto r = RunKeel("train " + Small(t / "r") + " --ctx 2000 --steps 1");
  ExpectError(r, "corpus too short for context length 2000");
  EXPECT_FALSE(fs::exists(t / "r/ckpt-00000001"));
}

TEST_F(CliErrors, UnknownFlag) {
  auto r = RunKeel("train --data x --out y --bogus-flag 3");
  ExpectError(r, "--bogus-flag");
}

// A flag given twice: the last value wins in every subcommand (train's --config fields and scripts that append
// overrides rely on it), except --inject, whose faults add up (the last one used to drop the others).
TEST_F(CliErrors, FlagGivenTwice) {
  TempDir t;
  setenv("KEEL_ALLOW_FAULT_INJECTION", "1", 1);
  auto r = RunKeel("train " + Small(t / "r") + " --steps 9 --steps=2 --inject nan:rank=0,step=0 "
                   "--inject corrupt:rank=0,step=1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(t / "r/ckpt-00000002")) << r.output;
  EXPECT_FALSE(fs::exists(t / "r/ckpt-00000004")) << r.output;
  EXPECT_NE(r.output.find("inject: nan at step=0,"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("inject: corrupt at step=1,"), std::string::npos) << r.output;
  unsetenv("KEEL_ALLOW_FAULT_INJECTION");
  r = RunKeel("sample --ckpt " + Run() + " -n 3 --threads 1 --seed 5 --temperature 0.5 --seed 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output, RunKeel("sample --ckpt " + Run() + " -n 3 --threads 1 --temperature 0.5 --seed 1").output);
}

// q8_0 export of a model whose rows are not whole 32-value blocks: the F16 fallback is named.
TEST_F(CliErrors, Q8ExportNamesTheF16Fallback) {
  TempDir t;
  auto r = RunKeel("export " + Run() + " --format gguf --dtype q8_0 --out " + t / "q.gguf");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // dim 16: token_embd, qkv, attn proj, mlp fc and output have 16-value rows; mlp proj's 64 are two blocks.
  EXPECT_NE(r.output.find("note: 5 of 6 matrices are stored as F16, not Q8_0"), std::string::npos) << r.output;
}

TEST_F(CliErrors, DimNotDivisibleByHeads) {
  TempDir t;
  ExpectError(RunKeel("train " + Small(t / "r") + " --dim 30 --heads 4"), "--dim 30 is not divisible by --heads 4");
  EXPECT_FALSE(fs::exists(t / "r"));
}

TEST_F(CliErrors, ZeroAndNegativeSizes) {
  TempDir t;
  ExpectError(RunKeel("train " + Small(t / "r") + " --layers 0"), "--layers");
  ExpectError(RunKeel("train " + Small(t / "r") + " --batch -2"), "--batch");
  ExpectError(RunKeel("train " + Small(t / "r") + " --steps 0"), "--steps");
  ExpectError(RunKeel("train " + Small(t / "r") + " --peak-gflops -5"), "--peak-gflops");
  // A step's micro-batches live in 128-bit sets in every mode (--fast included: 129 used to write past them).
  ExpectError(RunKeel("train " + Small(t / "r") + " --fast --grad-accum 129"), "--grad-accum");
  EXPECT_FALSE(fs::exists(t / "r"));
}

TEST_F(CliErrors, BadSyncAndCompressionFlags) {
  TempDir t;
  ExpectError(RunKeel("train " + Small(t / "r") + " --sync allreduce"), "--sync");
  ExpectError(RunKeel("train " + Small(t / "r") + " --sync diloco --inner-steps 0"), "--inner-steps");
  ExpectError(RunKeel("train " + Small(t / "r") + " --sync diloco --outer-momentum 1"), "--outer-momentum");
  ExpectError(RunKeel("train " + Small(t / "r") + " --sync diloco --outer-lr -1"), "--outer-lr");
  ExpectError(RunKeel("train " + Small(t / "r") + " --compress fp4"), "--compress");
  ExpectError(RunKeel("train " + Small(t / "r") + " --optimizer lion"), "--optimizer");
  // Optimizer values that used to train (on NaN, skipping every step) and exit 0.
  ExpectError(RunKeel("train " + Small(t / "r") + " --weight-decay nan"), "--weight-decay");
  ExpectError(RunKeel("train " + Small(t / "r") + " --grad-clip -1"), "--grad-clip");
  ExpectError(RunKeel("train " + Small(t / "r") + " --min-lr-frac 2"), "--min-lr-frac");
  // Launch flags are checked for a single worker too.
  ExpectError(RunKeel("train " + Small(t / "r") + " --nproc -1"), "--nproc");
  // 0 means "not given" inside, but given it was accepted (and one process trained).
  ExpectError(RunKeel("train " + Small(t / "r") + " --nproc 0"), "--nproc/--nproc-per-node must be >= 1");
  ExpectError(RunKeel("train " + Small(t / "r") + " --nproc-per-node 0"), "--nproc/--nproc-per-node must be >= 1");
  ExpectError(RunKeel("train " + Small(t / "r") + " --min-workers 5 --max-workers 2"), "--max-workers");
  ExpectError(RunKeel("train " + Small(t / "r") + " --rdzv-timeout nan"), "--rdzv-timeout");
  // Huge timeouts overflowed the millisecond and deadline arithmetic (undefined behaviour): refused above a week.
  ExpectError(RunKeel("train " + Small(t / "r") + " --hang-timeout 1e16 --elastic"),
              "--hang-timeout must be a positive number of seconds, at most 604800 (a week)");
  ExpectError(RunKeel("train " + Small(t / "r") + " --comm-timeout 1e300 --nproc 2"), "--comm-timeout must be");
  EXPECT_FALSE(fs::exists(t / "r"));
}

// A seed is a decimal integer in [0, 2^64-1]: -1 used to wrap to 2^64-1, a larger value to saturate, 0x10 to be
// read as hex, each training or sampling silently with another seed.
TEST_F(CliErrors, SeedOutOfRange) {
  TempDir t;
  for (const char* seed : {"-1", "99999999999999999999", "0x10", "+5", "''"})
    ExpectError(RunKeel("train " + Small(t / "r") + " --steps 2 --seed " + seed),
                "--seed: must be a decimal integer in [0, 18446744073709551615]");
  ExpectError(RunKeel("sample --ckpt " + Run() + " -n 2 --seed -1"), "--seed: must be a decimal integer");
  ExpectError(RunKeel("sample --ckpt " + Run() + " -n 2 -s 18446744073709551616"), "--seed: must be a decimal integer");
  // The same check covers a config file's value, and the error names the file.
  WriteText(t / "seed.json", "{\"seed\": -1}");
  ExpectError(RunKeel("train --config " + t / "seed.json" + " " + Small(t / "r") + " --steps 2"),
              "--config " + t / "seed.json" + ": --seed: must be a decimal integer");
  // DiLoCo's settings without --sync diloco would be ignored: refused.
  ExpectError(RunKeel("train " + Small(t / "r") + " --steps 2 --inner-steps 7"),
              "--inner-steps applies only with --sync diloco");
  // Every integer field, not only the seed: a hex --steps in a config names the file, not a flag nobody typed.
  WriteText(t / "steps.json", "{\"steps\": \"0x10\"}");
  ExpectError(RunKeel("train --config " + t / "steps.json" + " " + Small(t / "r")),
              "--config " + t / "steps.json" + ": --steps: must be a decimal integer");
  EXPECT_FALSE(fs::exists(t / "r"));
  auto r = RunKeel("sample --ckpt " + Run() + " -n 2 --threads 1 --seed 18446744073709551615");
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

// An explicitly empty value (an unset shell variable) for a flag whose default is "not given" used to mean the
// default silently: serve --host "" bound [::1] and announced "http://:PORT".
TEST_F(CliErrors, EmptyFlagValues) {
  TempDir t;
  // serve checks its flags before it opens the checkpoint (a nonexistent one here: the test cannot start a server).
  ExpectError(RunKeel("serve /nonexistent/run --host ''"), "--host must not be empty");
  ExpectError(RunKeel("serve /nonexistent/run --model-name ''"), "--model-name must not be empty");
  ExpectError(RunKeel("serve /nonexistent/run --api-key ''"), "--api-key must not be empty");
  ExpectError(RunKeel("train " + Small(t / "r") + " --steps 2 --rdzv ''"), "--rdzv must not be empty");
  ExpectError(RunKeel("train " + Small(t / "r") + " --steps 2 --host ''"), "--host must not be empty");
  EXPECT_FALSE(fs::exists(t / "r"));
  ExpectError(RunKeel("export " + Run() + " --format gguf --out " + t / "m.gguf" + " --name ''"),
              "--name must not be empty");
  EXPECT_FALSE(fs::exists(t / "m.gguf"));
}

// The byte tokenizer's vocabulary is fixed (256 ids): --vocab-size with it was silently ignored.
TEST_F(CliErrors, VocabSizeWithByteTokenizer) {
  TempDir t;
  ExpectError(RunKeel("prepare --input " + *dir_ / "corpus.txt" + " --out " + t / "d --tokenizer byte --vocab-size 5"),
              "--vocab-size applies only to --tokenizer bpe");
  EXPECT_FALSE(fs::exists(t / "d"));
}

// An unknown command: one line naming it and `keel --help` (the full usage used to follow it), exit status 2.
TEST_F(CliErrors, UnknownCommand) {
  auto r = RunKeel("bogus");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(r.output, "keel: unknown command 'bogus' (run 'keel --help' for the commands)\n");
}

TEST_F(CliErrors, ContextLongerThanPositionTableOnResume) {
  auto r = RunKeel("train " + Small(Run()) + " --ctx 32 --steps 8 --resume");
  ExpectError(r, "position table");
}

TEST_F(CliErrors, OutputDirectoryHoldsSomeoneElsesRun) {
  ExpectError(RunKeel("train " + Small(Run()) + " --steps 8"), "already holds a training run");
  TempDir t;
  WriteText(t / "notes.txt", "mine");
  ExpectError(RunKeel("train " + Small(t.path()) + " --steps 2"), "not a keel run directory");
  EXPECT_FALSE(fs::exists(t / "run.json"));
}

TEST_F(CliErrors, TokenizerDoesNotMatchCheckpoint) {
  TempDir t;
  // Same text, BPE tokenizer: a different tokenizer (and so a different data fingerprint).
  std::string text;
  for (int i = 0; i < 400; ++i) text += "Line " + std::to_string(i) + ": the quick brown fox jumps over the lazy dog.\n";
  WriteText(t / "c.txt", text);
  ASSERT_EQ(RunKeel("prepare --input " + t / "c.txt" + " --out " + t / "bpe --tokenizer bpe --vocab-size 300").exit_code, 0);
  auto r = RunKeel("train --data " + t / "bpe" + " --out " + Run() +
                   " --layers 1 --heads 2 --dim 16 --ctx 16 --batch 2 --threads 1 --steps 8 --resume");
  ExpectError(r, "different data");
}

// The seed and batch shape choose the data of every step: a resume with other values would silently continue on
// another data stream (it used to), so it is refused with the value to pass.
TEST_F(CliErrors, ResumeWithAnotherSeedOrBatchShape) {
  TempDir t;
  fs::copy(Run(), t / "run", fs::copy_options::recursive);
  ExpectError(RunKeel("train " + Small(t / "run") + " --steps 8 --resume --seed 7"), "--seed 1337");
  ExpectError(RunKeel("train " + Small(t / "run") + " --steps 8 --resume --batch 3"), "--batch 2");
  ExpectError(RunKeel("train " + Small(t / "run") + " --steps 8 --resume --grad-accum 2"), "--grad-accum 1");
  EXPECT_FALSE(fs::exists(t / "run/ckpt-00000006"));
  auto r = RunKeel("train " + Small(t / "run") + " --steps 6 --resume");
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

// --resume with nothing to resume starts a new run and says so; a resume of a finished run trains nothing and
// says that instead of reporting a loss of 0.
TEST_F(CliErrors, ResumeWithNothingToDo) {
  TempDir t;
  auto r = RunKeel("train " + Small(t / "new") + " --steps 2 --resume");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("--resume: --out " + t / "new" + " does not exist: starting a new run"), std::string::npos)
      << r.output;
  r = RunKeel("train " + Small(t / "new") + " --steps 2 --resume");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("done: at step 2; this run trained no steps itself"), std::string::npos) << r.output;
}

TEST_F(CliErrors, TruncatedOrBitFlippedCheckpoint) {
  TempDir t;
  fs::copy(Run(), t / "run", fs::copy_options::recursive);
  std::string ckpt = t / "run/ckpt-00000004";
  auto size = fs::file_size(ckpt + "/model.safetensors");
  fs::resize_file(ckpt + "/model.safetensors", size / 2);
  ExpectError(RunKeel("sample --ckpt " + ckpt + " -n 2"), "model.safetensors");
  ExpectError(RunKeel("info " + ckpt), "truncated");
  // The run directory falls back to the older valid checkpoint, with a warning.
  auto r = RunKeel("sample --ckpt " + t / "run" + " -n 2 --threads 1");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("warning: skipping"), std::string::npos) << r.output;
  ExpectError(RunKeel("info " + t / "run"), "1 of 2 checkpoint(s) INVALID; sample, serve, export and --resume use step 2");
  EXPECT_EQ(RunKeel("info " + Run()).exit_code, 0);
  EXPECT_EQ(RunKeel("export " + t / "run --format gguf --out " + t / "m.gguf").exit_code, 0);
  // Bit flip in the older one too: nothing valid remains.
  std::string older = t / "run/ckpt-00000002/model.safetensors";
  {
    std::fstream f(older, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);
    f.put('\x7f');
  }
  ExpectError(RunKeel("sample --ckpt " + t / "run" + " -n 2"), "checkpoint");
  ExpectError(RunKeel("info " + t / "run"), "2 of 2 checkpoint(s) INVALID; none is valid");
}

TEST_F(CliErrors, CorruptShard) {
  TempDir t;
  fs::copy(Data(), t / "data", fs::copy_options::recursive);
  {
    std::fstream f(t / "data/train.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(200);
    f.put('\x55');
  }
  ExpectError(RunKeel("train --data " + t / "data" + " --out " + t / "r --steps 1 --threads 1"), "train.bin");
  ExpectError(RunKeel("info " + t / "data"), "train.bin");
  fs::resize_file(t / "data/train.bin", 100);
  ExpectError(RunKeel("train --data " + t / "data" + " --out " + t / "r --steps 1 --threads 1"), "train.bin");
  // `keel info` checks the shards, not just meta.json (it used to report a truncated shard's directory, exit 0).
  ExpectError(RunKeel("info " + t / "data"), "train.bin");
  EXPECT_EQ(RunKeel("info " + Data()).exit_code, 0);
  EXPECT_FALSE(fs::exists(t / "r"));
}

TEST_F(CliErrors, BadSamplingFlags) {
  ExpectError(RunKeel("sample --ckpt " + Run() + " --top-p 1.5"), "--top-p");
  ExpectError(RunKeel("sample --ckpt /nonexistent/run"), "/nonexistent/run");
  ExpectError(RunKeel("sample --ckpt " + Data()), "a data directory (from keel prepare), not a run or checkpoint");
  ExpectError(RunKeel("sample --ckpt " + Run() + " --top-k -5"), "--top-k");
  ExpectError(RunKeel("sample --ckpt " + Run() + " --samples 0"), "--samples");
  ExpectError(RunKeel("sample --ckpt " + Run() + " --dtype bf17"), "--dtype must be f32, f16 or bf16, got 'bf17'");
  ExpectError(RunKeel("serve " + Run() + " --dtype q8_0"), "--dtype must be f32, f16 or bf16, got 'q8_0'");
  ExpectError(RunKeel("sample --ckpt " + Run() + " --kv-dtype bf16"), "--kv-dtype must be f32 or f16, got 'bf16'");
  ExpectError(RunKeel("serve " + Run() + " --kv-dtype q8"), "--kv-dtype must be f32 or f16, got 'q8'");
  // libgomp crashed (SIGSEGV) or hung creating 100000 threads.
  ExpectError(RunKeel("sample --ckpt " + Run() + " --threads 100000"), "--threads");
  ExpectError(RunKeel("train " + Small(*dir_ / "r2") + " --threads 100000"), "--threads");
  // A prompt longer than the context (16) is refused before anything is printed.
  auto r = RunKeel("sample --ckpt " + Run() + " -n 2 -p 'a prompt of more than sixteen bytes'");
  ExpectError(r, "--prompt");
  EXPECT_EQ(r.output.find("a prompt of"), std::string::npos) << r.output;
  // -n beyond the context is not an error, but the shortfall is said (it used to stop without a word).
  r = RunKeel("sample --ckpt " + Run() + " -n 100 -p ab --ignore-eos --threads 1");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("stopped after 14 of -n 100 tokens: the model's context (16 tokens) is full"),
            std::string::npos) << r.output;
}

TEST_F(CliErrors, InvalidConfigFile) {
  TempDir t;
  WriteText(t / "c.json", "{\"layers\": [1,2]}");
  ExpectError(RunKeel("train --config " + t / "c.json" + " --data " + Data() + " --out " + t / "r"), "layers");
  // Unknown fields and wrong kinds name the config file and the field.
  WriteText(t / "typo.json", "{\"lyers\": 2}");
  ExpectError(RunKeel("train --config " + t / "typo.json" + " --data " + Data() + " --out " + t / "r"), "'lyers'");
  WriteText(t / "kind.json", "{\"no_progress\": \"yes\"}");
  ExpectError(RunKeel("train --config " + t / "kind.json" + " --data " + Data() + " --out " + t / "r"), "kind.json");
  WriteText(t / "bad.json", "{not json");
  ExpectError(RunKeel("train --config " + t / "bad.json" + " --data " + Data() + " --out " + t / "r"), "bad.json");
  // A value the flag cannot take names the file (it used to read "Could not convert: --layers = 1.5", as if typed),
  // also when a flag overrides it.
  WriteText(t / "frac.json", "{\"layers\": 1.5}");
  ExpectError(RunKeel("train --config " + t / "frac.json" + " --data " + Data() + " --out " + t / "r"),
              "--config " + t / "frac.json" + ": --layers: must be a decimal integer");
  ExpectError(RunKeel("train --config " + t / "frac.json" + " " + Small(t / "r") + " --layers 1"),
              "--config " + t / "frac.json" + ": --layers: must be a decimal integer");
  EXPECT_FALSE(fs::exists(t / "r"));
}

// Of two configs the later one wins (the earlier one used to), and a flag wins over both.
TEST_F(CliErrors, ALaterConfigOverridesAnEarlierOne) {
  TempDir t;
  WriteText(t / "a.json", "{\"steps\": 3, \"checkpoint_every\": 1}");
  WriteText(t / "b.json", "{\"steps\": 2}");
  auto r = RunKeel("train --config " + t / "a.json" + " --config " + t / "b.json" + " " + Small(t / "r"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(t / "r/ckpt-00000002")) << r.output;
  EXPECT_FALSE(fs::exists(t / "r/ckpt-00000003")) << r.output;
}

// An --out that cannot be created is refused before anything runs (train used to fail at its first metrics line
// with "metrics.jsonl: cannot open for appending").
TEST_F(CliErrors, OutputUnderAFileIsRefusedFirst) {
  TempDir t;
  WriteText(t / "f", "x");
  auto r = RunKeel("train " + Small(t / "f/run") + " --steps 2");
  ExpectError(r, "--out " + t / "f/run" + ": cannot be created: " + t / "f" + " is not a directory");
  EXPECT_EQ(r.output.find('\n'), r.output.size() - 1) << "one line: " << r.output;
  r = RunKeel("prepare --input " + *dir_ / "corpus.txt" + " --out " + t / "f/d" + " --tokenizer byte");
  ExpectError(r, "--out " + t / "f/d" + ": cannot be created: " + t / "f" + " is not a directory");
  EXPECT_EQ(r.output.find('\n'), r.output.size() - 1) << "one line: " << r.output;
}

// --resume keeps the checkpoint's model: a different --vocab is refused like --layers (it was silently ignored).
TEST_F(CliErrors, ResumeWithAnotherVocab) {
  TempDir t;
  fs::copy(Run(), t / "run", fs::copy_options::recursive);
  ExpectError(RunKeel("train " + Small(t / "run") + " --steps 6 --resume --vocab 300"), "--vocab 256");
  EXPECT_FALSE(fs::exists(t / "run/ckpt-00000006"));
}

// --resume keeps the run's optimizer: AdamW's moments continued by SGD (or SGD's zero moments taken for AdamW's)
// used to be accepted without a word.
TEST_F(CliErrors, ResumeWithAnotherOptimizer) {
  TempDir t;
  fs::copy(Run(), t / "run", fs::copy_options::recursive);
  auto r = RunKeel("train " + Small(t / "run") + " --steps 6 --resume --optimizer sgd");
  ExpectError(r, "--optimizer sgd differs from the run's adamw (" + t / "run/ckpt-00000004" +
                     "): pass --optimizer adamw to continue it");
  EXPECT_EQ(r.output.find('\n'), r.output.size() - 1) << "one line: " << r.output;
  EXPECT_FALSE(fs::exists(t / "run/ckpt-00000006"));
  // The reverse, through the launcher of two workers (each refuses it), and with the default.
  ASSERT_EQ(RunKeel("train " + Small(t / "sgd") + " --steps 2 --optimizer sgd").exit_code, 0);
  ExpectError(RunKeel("train " + Small(t / "sgd") + " --steps 4 --resume --optimizer adamw --nproc 2"),
              "--optimizer adamw differs from the run's sgd");
  ExpectError(RunKeel("train " + Small(t / "sgd") + " --steps 4 --resume"), "pass --optimizer sgd");
  // An elastic job's launcher also ends on the workers' reason, not only on "exited with status 1".
  ExpectError(RunKeel("train " + Small(t / "sgd") + " --steps 4 --resume --optimizer adamw --nproc 2 --elastic"),
              "--optimizer adamw differs from the run's sgd");
  EXPECT_FALSE(fs::exists(t / "sgd/ckpt-00000004"));
  r = RunKeel("train " + Small(t / "sgd") + " --steps 4 --resume --optimizer sgd");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(t / "sgd/ckpt-00000004")) << r.output;
}

// A model config read from a file names the file and its own keys: a checkpoint with heads 0 was reported as
// "--heads must be positive", a flag the user never passed.
TEST_F(CliErrors, BadModelConfigInAFileNamesTheFile) {
  TempDir t;
  auto snap = LoadSnapshot(Run(), true, nullptr);
  ASSERT_TRUE(snap.ok()) << snap.status().message();
  SnapshotView v;
  v.config = snap->config;
  v.config.heads = 0;  // the parameter layout does not depend on it: only the config is wrong
  v.params = snap->params.data();
  v.adam_m = snap->adam_m.data();
  v.adam_v = snap->adam_v.data();
  v.state = snap->state;
  v.tokenizer = snap->tokenizer;
  auto files = EncodeSnapshot(v);
  ASSERT_TRUE(files.ok()) << files.status().message();
  ASSERT_TRUE(WriteCheckpoint(t / "bad", 4, *files, 0).ok());
  const std::string ckpt = t / "bad/ckpt-00000004";
  auto r = RunKeel("sample --ckpt " + ckpt + " -n 2");
  ExpectError(r, ckpt + "/model.safetensors: model config: heads must be positive (got 0)");
  EXPECT_EQ(r.output.find("--heads"), std::string::npos) << r.output;
  ExpectError(RunKeel("export " + ckpt + " --format gguf --out " + t / "m.gguf"), "heads must be positive");
  EXPECT_FALSE(fs::exists(t / "m.gguf"));
  // A Hugging Face config.json: named with its own keys (it read "--dim 16 is not divisible by --heads 3").
  ASSERT_EQ(RunKeel("export " + Run() + " --format safetensors --out " + t / "hf").exit_code, 0);
  std::string cfg;
  {
    std::ifstream in(t / "hf/config.json");
    cfg.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const std::string two = "\"n_head\": 2";
  const auto at = cfg.find(two);
  ASSERT_NE(at, std::string::npos) << cfg;
  cfg.replace(at, two.size(), "\"n_head\": 3");
  WriteText(t / "hf/config.json", cfg);
  ExpectError(RunKeel("sample --ckpt " + t / "hf" + " -n 2"),
              t / "hf/config.json" + ": n_embd 16 is not divisible by n_head 3");
  // A --config file's value names the file (unless a flag overrides it, which is then the one named).
  WriteText(t / "c.json", "{\"heads\": 0}");
  ExpectError(RunKeel("train --config " + t / "c.json" + " --data " + Data() + " --out " + t / "r"),
              "--config " + t / "c.json" + ": --heads must be positive (got 0)");
  r = RunKeel("train --config " + t / "c.json" + " --data " + Data() + " --out " + t / "r --heads -1");
  ExpectError(r, "--heads must be positive (got -1)");
  EXPECT_EQ(r.output.find("c.json"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(t / "r"));
}

// An --iface this machine does not have is refused up front: one process used to ignore it and train, a job's
// workers each to fail at their first connection in Gloo's words.
TEST_F(CliErrors, UnknownNetworkInterface) {
  TempDir t;
  ExpectError(RunKeel("train " + Small(t / "r") + " --steps 2 --iface no-such-iface0"),
              "--iface no-such-iface0: no such network interface on this machine");
  ExpectError(RunKeel("train " + Small(t / "r") + " --steps 2 --iface no-such-iface0 --nproc 2"),
              "--iface no-such-iface0: no such network interface on this machine");
  EXPECT_FALSE(fs::exists(t / "r"));
}

// A micro-batch that cannot fit in this machine's memory is refused up front, naming --batch and the sizes (it
// used to fail at the allocation with "cpu: out of memory allocating N bytes").
TEST_F(CliErrors, ImplausibleBatchSize) {
  TempDir t;
  for (const char* launch : {"", " --nproc 2"}) {
    auto r = RunKeel("train " + Small(t / "r") + " --steps 1 --batch 1000000000" + launch);
    ExpectError(r, "--batch 1000000000 x --ctx 16: one micro-batch needs at least ");
    EXPECT_NE(LastLine(r.output).find("of parameters and optimizer state), more than this machine's"),
              std::string::npos) << r.output;
    EXPECT_EQ(r.output.find('\n'), r.output.size() - 1) << "one line: " << r.output;
  }
  EXPECT_FALSE(fs::exists(t / "r"));
}

// A model whose parameters and optimizer state alone exceed the machine's memory is refused up front, naming the
// model flags (it used to end in "cpu: out of memory allocating N bytes", or the OOM killer).
TEST_F(CliErrors, ImplausibleModelSize) {
  TempDir t;
  for (const char* launch : {"", " --nproc 2"}) {
    auto r = RunKeel("train " + Small(t / "r") + " --steps 1 --dim 65536 --heads 64 --vocab 16777216" + launch);
    ExpectError(r, "--layers ");
    EXPECT_NE(LastLine(r.output).find("the model's parameters, gradients and optimizer state need"), std::string::npos)
        << r.output;
    EXPECT_EQ(r.output.find('\n'), r.output.size() - 1) << "one line: " << r.output;
  }
  EXPECT_FALSE(fs::exists(t / "r"));
}

// A config file's "fast": true is overridden by --deterministic on the command line (flags override the config);
// both typed on the command line still exclude each other.
TEST_F(CliErrors, CommandLineDeterministicOverridesAConfigsFast) {
  TempDir t;
  WriteText(t / "fast.json", "{\"fast\": true}");
  auto r = RunKeel("train --config " + t / "fast.json" + " " + Small(t / "r") + " --steps 2 --deterministic");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("deterministic mode"), std::string::npos) << r.output;
  ExpectError(RunKeel("train " + Small(t / "r2") + " --steps 2 --fast --deterministic"),
              "--fast and --deterministic exclude each other");
}

// Integer flags are decimal: CLI11 alone reads "0100" as octal (64 steps) and saturates a huge int64 silently.
TEST_F(CliErrors, IntegerFlagsAreDecimal) {
  TempDir t;
  ExpectError(RunKeel("train " + Small(t / "r") + " --steps 0x10"), "--steps");
  ExpectError(RunKeel("train " + Small(t / "r") + " --steps 99999999999999999999"), "--steps");
  ExpectError(RunKeel("train " + Small(t / "r") + " --no-progress=x"), "--no-progress");
  // A decimal value too large for an int flag says so (it read "Could not convert: --layers = 99999999999"), also
  // from a config file.
  ExpectError(RunKeel("train " + Small(t / "r") + " --layers 99999999999"),
              "--layers: 99999999999 is out of range for this flag");
  ExpectError(RunKeel("serve " + Run() + " --port 3000000000"), "--port: 3000000000 is out of range");
  // A spike rollback needs the snapshot --check-every keeps (with 0 it went back to the first step and deleted
  // every checkpoint since).
  ExpectError(RunKeel("train " + Small(t / "r") + " --spike-factor 4 --check-every 0"), "it needs --check-every > 0");
  auto lr = RunKeel("train " + Small(t / "r") + " --lr abc");  // not an integer: CLI11's own message stays
  ExpectError(lr, "--lr");
  EXPECT_EQ(lr.output.find("out of range"), std::string::npos) << lr.output;
  WriteText(t / "big.json", "{\"layers\": 99999999999}");
  ExpectError(RunKeel("train --config " + t / "big.json" + " " + Small(t / "r")),
              "--config " + t / "big.json" + ": --layers: 99999999999 is out of range for this flag");
  EXPECT_FALSE(fs::exists(t / "r"));
  auto r = RunKeel("train " + Small(t / "r") + " --steps 03 --no-progress");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto info = RunKeel("info " + t / "r");
  EXPECT_NE(info.output.find("step 3"), std::string::npos) << info.output;
}

// Output that cannot be written (a full disk under `> file`) fails the command (it exited 0 with nothing
// written); -n -1 generates until the context is full, as llama.cpp's.
TEST_F(CliErrors, SampleOutputErrorsAndUntilTheContextIsFull) {
  auto full = RunCommand("sh -c '" + KeelBinary() + " sample --ckpt " + Run() + " -p ab -n 3 2>&1 >/dev/full'");
  EXPECT_EQ(full.exit_code, 1) << full.output;
  EXPECT_NE(full.output.find("cannot write the output to stdout"), std::string::npos) << full.output;
  auto all = RunKeel("sample --ckpt " + Run() + " -p ab -n -1 --temperature 0 --print-token-ids");
  ASSERT_EQ(all.exit_code, 0) << all.output;
  const size_t at = all.output.find("generated ids:");
  ASSERT_NE(at, std::string::npos) << all.output;
  std::string ids = all.output.substr(at + 14);
  ids = ids.substr(0, ids.find('\n'));
  int n = 0;
  for (size_t i = 0; i < ids.size(); ++i) n += ids[i] == ' ';
  EXPECT_EQ(n, 16 - 2) << all.output;  // Small()'s --ctx 16, less the two prompt tokens
  ExpectError(RunKeel("sample --ckpt " + Run() + " -p ab -n -2"), "-n must be >= 0, or -1");
}

// keel info checks exports too (it said "not a keel data directory, run directory or checkpoint"); an export into
// an existing empty directory is allowed; an --out that looks like a Hugging Face export without --format is
// refused (it got a GGUF file under that name).
TEST_F(CliErrors, InfoOnExportsAndExportTargets) {
  TempDir t;
  ASSERT_EQ(RunKeel("export " + Run() + " --format gguf --out " + t / "m.gguf").exit_code, 0);
  auto ok = RunKeel("info " + t / "m.gguf");
  EXPECT_EQ(ok.exit_code, 0) << ok.output;
  EXPECT_NE(ok.output.find("gguf export " + t / "m.gguf" + ": valid"), std::string::npos) << ok.output;
  std::ifstream in(t / "m.gguf", std::ios::binary);
  std::string b((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(b.size(), 100u);
  b[b.size() - 3] ^= 0x40;  // a weight byte
  WriteText(t / "bad.gguf", b);
  auto bad = RunKeel("info " + t / "bad.gguf");
  EXPECT_EQ(bad.exit_code, 1) << bad.output;
  EXPECT_NE(bad.output.find("INVALID"), std::string::npos) << bad.output;
  fs::create_directories(t / "empty");
  auto hf = RunKeel("export " + Run() + " --format safetensors --out " + t / "empty/");
  ASSERT_EQ(hf.exit_code, 0) << hf.output;
  auto hinfo = RunKeel("info " + t / "empty");
  EXPECT_EQ(hinfo.exit_code, 0) << hinfo.output;
  EXPECT_NE(hinfo.output.find("safetensors export"), std::string::npos) << hinfo.output;
  ExpectError(RunKeel("export " + Run() + " --out " + t / "x.safetensors"), "--format safetensors");
  EXPECT_FALSE(fs::exists(t / "x.safetensors"));
  // A symbolic link to an empty directory is refused (the link, not its target, would be replaced).
  fs::create_directories(t / "target");
  fs::create_directory_symlink(t / "target", t / "link");
  for (const std::string& out : {t / "link", t / "link/"})
    ExpectError(RunKeel("export " + Run() + " --format safetensors --out " + out), "symbolic link");
  EXPECT_TRUE(fs::is_symlink(t / "link"));
  EXPECT_TRUE(fs::is_empty(t / "target"));
  // A fault training never injects is refused before any worker starts.
  auto dev = RunCommand("KEEL_ALLOW_FAULT_INJECTION=1 " + KeelBinary() + " train " + Small(t / "r") +
                        " --nproc 2 --inject device-fail:step=1");
  ExpectError(dev, "device-fail is a keel serve fault");
  EXPECT_FALSE(fs::exists(t / "r"));
}

// Half a Hugging Face export is named for the file it lacks (it read "no checkpoints").
TEST_F(CliErrors, HalfAHuggingFaceExport) {
  TempDir t;
  ASSERT_EQ(RunKeel("export " + Run() + " --format safetensors --out " + t / "hf").exit_code, 0);
  fs::remove(t / "hf/config.json");
  ExpectError(RunKeel("sample --ckpt " + t / "hf" + " -n 2"), "config.json is missing");
}

}  // namespace
}  // namespace keel::testing
