// cmd_prepare.cc: `keel prepare` — text files/directories to token shards, tokenizer and metadata.
#include "data/prepare.h"
#include "tools/keel/cli_util.h"
#include "tools/keel/commands.h"

namespace keel::cli {

int RunPrepare(int argc, char** argv) {
  PrepareOptions o;
  CLI::App app("Tokenize text files into training shards (train/val split, tokenizer, meta.json).", "prepare");
  app.add_option("--input", o.inputs, "text files or directories (the default corpus is /usr/share/games/fortunes: pass it)")
      ->required();
  app.add_option("--out", o.out_dir, "data directory to write")->required();
  app.add_option("--tokenizer", o.tokenizer, "bpe (SentencePiece) or byte")
      ->check(CLI::IsMember({"bpe", "byte"}))->capture_default_str();
  app.add_option("--vocab-size", o.vocab_size, "BPE vocabulary size")->capture_default_str();
  app.add_option("--val-fraction", o.val_fraction, "fraction of tokens held out for validation")->capture_default_str();
  if (int rc = Parse(app, argc, argv); rc >= 0) return rc;
  // The byte tokenizer's vocabulary is fixed: a --vocab-size given with it was silently ignored.
  if (o.tokenizer == "byte" && app.count("--vocab-size"))
    return Fail("prepare",
                InvalidArgument("--vocab-size applies only to --tokenizer bpe (the byte tokenizer has 256 ids)"));
  o.progress = [](std::string_view m) { std::fprintf(stderr, "%.*s\n", static_cast<int>(m.size()), m.data()); };
  auto r = Prepare(o);
  if (!r.ok()) return Fail("prepare", r.status());
  std::fprintf(stderr, "wrote %s: %zu files, %llu bytes -> %zu train + %zu val tokens (%s tokenizer, vocab %d) in %.1fs\n",
               r->out_dir.c_str(), r->source_files, static_cast<unsigned long long>(r->source_bytes), r->train_tokens,
               r->val_tokens, r->tokenizer.c_str(), r->vocab_size, r->total_seconds);
  return 0;
}

}  // namespace keel::cli
