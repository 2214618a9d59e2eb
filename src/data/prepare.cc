// prepare.cc: builds a keel data directory from raw text (collect, tokenize, split, write, swap into place).
#include "data/prepare.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <functional>
#include <memory>
#include <new>
#include <nlohmann/json.hpp>

#include "core/env.h"
#include "core/hash.h"
#include "data/corpus.h"
#include "data/shards.h"
#include "data/tokenizer.h"

namespace keel {

namespace {

// Encoding works on chunks of about this many bytes, each extended to the next newline.
constexpr size_t kEncodeChunkBytes = size_t{256} << 10;

std::string StripTrailingSlashes(std::string p) {
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}

Status ValidateOptions(const PrepareOptions& o) {
  if (o.inputs.empty()) return InvalidArgument("no input files or directories given");
  if (o.out_dir.empty()) return InvalidArgument("no output directory given");
  if (o.tokenizer_file.empty()) {
    if (o.tokenizer != "bpe" && o.tokenizer != "byte") {
      return InvalidArgument("unknown tokenizer \"" + o.tokenizer + "\" (expected bpe or byte)");
    }
    if (o.tokenizer == "bpe" && (o.vocab_size < kMinBpeVocabSize || o.vocab_size > kMaxBpeVocabSize)) {
      return InvalidArgument("--vocab-size must be in [" + std::to_string(kMinBpeVocabSize) + ", " +
                             std::to_string(kMaxBpeVocabSize) + "] for the bpe tokenizer, got " +
                             std::to_string(o.vocab_size));
    }
  }
  if (!(o.val_fraction > 0.0 && o.val_fraction <= 0.5)) {
    return InvalidArgument("--val-fraction must be in (0, 0.5], got " + std::to_string(o.val_fraction));
  }
  return Status::Ok();
}

// OUT may be created or replaced if it does not exist, is an empty directory, or is a keel data directory: a
// meta.json that says so, and nothing but the files Prepare writes (and their atomic-write temporaries). A
// directory that merely holds some meta.json (a project, a corpus) is never replaced: replacing deletes it.
Status CheckOutDir(const std::string& out) {
  Env* env = DefaultEnv();
  if (!env->Exists(out)) return CheckCanCreateDir(env, out, "--out " + out);
  const std::string not_data = out + " exists and is not a keel data directory";
  if (!env->IsDir(out)) return InvalidArgument(not_data);
  KEEL_ASSIGN_OR_RETURN(std::vector<std::string> names, env->ListDir(out));
  if (names.empty()) return Status::Ok();
  const std::string meta_path = JoinPath(out, kMetaFile);
  if (!env->Exists(meta_path)) return InvalidArgument(not_data);
  KEEL_ASSIGN_OR_RETURN(const uint64_t meta_size, env->FileSize(meta_path));
  if (meta_size > (uint64_t{1} << 20)) return InvalidArgument(not_data + " (its meta.json is not keel's)");
  KEEL_ASSIGN_OR_RETURN(const std::string meta_text, env->ReadFile(meta_path));
  const nlohmann::json meta = nlohmann::json::parse(meta_text, nullptr, /*allow_exceptions=*/false);
  if (!meta.is_object() || meta.value("format", nlohmann::json()) != "keel-data")
    return InvalidArgument(not_data + " (its meta.json is not keel's)");
  for (const std::string& name : names) {
    bool ours = false;
    for (const char* f : {kMetaFile, kTrainShardFile, kValShardFile, kTokenizerFileName})
      ours |= name == f || name.rfind(std::string(f) + ".tmp.", 0) == 0;
    if (!ours) return InvalidArgument(not_data + " (it holds " + name + ", which keel prepare does not write)");
  }
  return Status::Ok();
}

// OUT, and the OUT.tmp.* / OUT.old.* directories made next to it, must not lie inside an input directory: the
// walk would read an earlier run's output (meta.json, a byte tokenizer's file, a killed run's leftovers) as
// corpus text, and the same inputs would no longer give the same data.
Status CheckOutOutsideInputs(const std::string& out, const std::vector<std::string>& inputs) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path parent = fs::weakly_canonical(fs::absolute(fs::path(out), ec).parent_path(), ec);
  if (ec) return Status::Ok();  // CheckOutDir vetted OUT; the walk reports unreadable inputs itself
  // An input inside OUT (OUT itself, say, an earlier prepare's output given back as --input): the walk would
  // read OUT's meta.json as text, and the install would then delete the input.
  std::error_code oe;
  const fs::path out_dir = fs::canonical(out, oe);
  for (const std::string& in : inputs) {
    std::error_code e;
    const fs::path p = fs::canonical(in, e);
    if (!oe && !e && std::mismatch(out_dir.begin(), out_dir.end(), p.begin(), p.end()).first == out_dir.end())
      return InvalidArgument("--input " + in + " lies inside --out " + out +
                             ", which prepare replaces (put --out outside the inputs)");
  }
  for (const std::string& in : inputs) {
    std::error_code e;
    if (!fs::is_directory(in, e)) continue;
    const fs::path dir = fs::canonical(in, e);
    if (e) continue;
    if (std::mismatch(dir.begin(), dir.end(), parent.begin(), parent.end()).first == dir.end())
      return InvalidArgument("--out " + out + " lies inside --input " + in +
                             ": its files would be read as corpus text (put --out outside the inputs)");
  }
  return Status::Ok();
}

// Encodes text in newline-aligned chunks, in parallel; the output does not depend on the thread count.
// Out of memory is an error, not std::terminate: an exception may not leave an OpenMP region, so each chunk
// catches its own.
Result<std::vector<int32_t>> EncodeCorpus(const Tokenizer& tok, std::string_view text) {
  std::vector<std::string_view> chunks;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = pos + kEncodeChunkBytes;
    if (end >= text.size()) {
      end = text.size();
    } else {
      const size_t nl = text.find('\n', end);
      end = nl == std::string_view::npos ? text.size() : nl + 1;
    }
    chunks.push_back(text.substr(pos, end - pos));
    pos = end;
  }
  std::vector<std::vector<int32_t>> parts(chunks.size());
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  std::atomic<bool> out_of_memory{false};
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < nchunks; ++i) {
    try {
      parts[i] = tok.Encode(chunks[i]);
    } catch (const std::bad_alloc&) {
      out_of_memory = true;
    }
  }
  size_t total = 0;
  for (const auto& p : parts) total += p.size();
  std::vector<int32_t> out;
  try {
    if (!out_of_memory) out.reserve(total);
  } catch (const std::bad_alloc&) {
    out_of_memory = true;
  }
  if (out_of_memory)
    return Unavailable("out of memory encoding the corpus (" + std::to_string(text.size()) +
                       " bytes): use a smaller corpus or a machine with more memory");
  for (auto& p : parts) {
    out.insert(out.end(), p.begin(), p.end());
    std::vector<int32_t>().swap(p);
  }
  return out;
}

// Moves the finished tmp directory to out, replacing an existing (already checked) out.
Status Install(const std::string& tmp, const std::string& out, const std::function<void(const std::string&)>& warn) {
  Env* env = DefaultEnv();
  if (env->Exists(out)) {
    // One atomic exchange where the filesystem has it (Linux renameat2): OUT is never missing, not even for the
    // moment between two renames, during which a training job that starts would find no data directory.
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, out.c_str(), RENAME_EXCHANGE) == 0) {
      // tmp now holds the previous data (or the symlink that OUT was). The new data is in place either way;
      // the exchange is made durable before the previous data goes (if it cannot be, the previous data stays).
      if (Status sy = env->SyncDir(DirName(out)); !sy.ok()) {
        warn("warning: the new data is in place, the previous data is left in " + tmp + " (" + sy.message() + ")");
        return Status::Ok();
      }
      if (Status rm = env->RemoveAll(tmp); !rm.ok())
        warn("warning: the previous data is left in " + tmp + " (" + rm.message() + ")");
      return Status::Ok();
    }
    // A fresh unique name (never a user's entry): reserved by creating it, then freed again so that the rename
    // also works for an OUT that is a symlink (rename() replaces an empty directory only with a directory).
    KEEL_ASSIGN_OR_RETURN(const std::string old, env->CreateUniqueDir(out + ".old."));
    KEEL_RETURN_IF_ERROR(env->RemoveAll(old));
    KEEL_RETURN_IF_ERROR(env->Rename(out, old));
    Status st = env->Rename(tmp, out);
    if (!st.ok()) {
      if (!env->Rename(old, out).ok())  // best effort: put the previous data back
        return Status(st.code(), st.message() + " (the previous data is in " + old + ")");
      return st;
    }
    if (Status sy = env->SyncDir(DirName(out)); !sy.ok()) {
      warn("warning: the new data is in place, the previous data is left in " + old + " (" + sy.message() + ")");
      return Status::Ok();
    }
    if (Status rm = env->RemoveAll(old); !rm.ok())
      warn("warning: the previous data is left in " + old + " (" + rm.message() + ")");
  } else {
    KEEL_RETURN_IF_ERROR(env->Rename(tmp, out));
  }
  return env->SyncDir(DirName(out));
}

Status WriteDataDir(const std::string& dir, const PrepareOptions& opt, const Tokenizer& tok,
                    const std::vector<int32_t>& tokens, size_t n_train, PrepareSummary* sum) {
  const std::string train_path = JoinPath(dir, kTrainShardFile), val_path = JoinPath(dir, kValShardFile);
  KEEL_RETURN_IF_ERROR(WriteShard(train_path, std::vector<int32_t>(tokens.begin(), tokens.begin() + n_train),
                                  tok.vocab_size()));
  KEEL_RETURN_IF_ERROR(
      WriteShard(val_path, std::vector<int32_t>(tokens.begin() + n_train, tokens.end()), tok.vocab_size()));
  const std::string tok_bytes = tok.Serialize();
  KEEL_RETURN_IF_ERROR(WriteFileAtomic(JoinPath(dir, kTokenizerFileName), tok_bytes));
  // Read the shards back: validates what reached the disk and yields their data hashes.
  KEEL_ASSIGN_OR_RETURN(ShardReader train, ShardReader::Open(train_path));
  KEEL_ASSIGN_OR_RETURN(ShardReader val, ShardReader::Open(val_path));
  sum->fingerprint = DataFingerprint(tok_bytes, train.data_hash(), val.data_hash());

  nlohmann::ordered_json meta;
  meta["format"] = "keel-data";
  meta["format_version"] = kDataFormatVersion;
  meta["keel_version"] = KEEL_VERSION;
  meta["tokenizer"] = tok.type();
  meta["vocab_size"] = tok.vocab_size();
  meta["requested_vocab_size"] = sum->requested_vocab_size;
  meta["train_tokens"] = train.size();
  meta["val_tokens"] = val.size();
  meta["val_fraction"] = opt.val_fraction;
  meta["source_files"] = sum->source_files;
  meta["source_bytes"] = sum->source_bytes;
  meta["tokenizer_hash"] = HashHex(Hash64(tok_bytes.data(), tok_bytes.size()));
  meta["train_hash"] = HashHex(train.data_hash());
  meta["val_hash"] = HashHex(val.data_hash());
  meta["fingerprint"] = sum->fingerprint;
  return WriteFileAtomic(JoinPath(dir, kMetaFile), meta.dump(2) + "\n");
}

}  // namespace

std::string DataFingerprint(const std::string& tokenizer_bytes, uint64_t train_data_hash, uint64_t val_data_hash) {
  const uint64_t words[3] = {Hash64(tokenizer_bytes.data(), tokenizer_bytes.size()), train_data_hash,
                             val_data_hash};
  return HashHex(Hash64(words, sizeof(words)));
}

namespace {

Status OutOfMemory(const std::string& out) {
  return Unavailable("out of memory preparing --out " + out +
                     ": use a smaller corpus or a machine with more memory");
}

Result<PrepareSummary> PrepareUnguarded(const PrepareOptions& opt) {
  KEEL_RETURN_IF_ERROR(ValidateOptions(opt));
  Env* env = DefaultEnv();
  const double t0 = env->NowSeconds();
  auto progress = [&](const std::string& msg) {
    if (opt.progress) opt.progress(msg);
  };
  const std::string out = StripTrailingSlashes(opt.out_dir);
  KEEL_RETURN_IF_ERROR(CheckOutDir(out));  // fail before the expensive work
  KEEL_RETURN_IF_ERROR(CheckOutOutsideInputs(out, opt.inputs));

  PrepareSummary sum;
  sum.out_dir = out;
  CollectStats stats;
  KEEL_ASSIGN_OR_RETURN(std::vector<std::string> files, CollectTextFiles(opt.inputs, &stats));
  sum.source_files = files.size();
  sum.skipped_files = stats.skipped_binary + stats.skipped_hidden + stats.skipped_other;
  progress("reading " + std::to_string(files.size()) + " text files");
  KEEL_ASSIGN_OR_RETURN(std::string text, ReadCorpus(files));
  sum.source_bytes = text.size();

  const double t1 = env->NowSeconds();
  std::unique_ptr<Tokenizer> tok;
  if (!opt.tokenizer_file.empty()) {
    progress("loading tokenizer " + opt.tokenizer_file);
    KEEL_ASSIGN_OR_RETURN(tok, LoadTokenizerFile(opt.tokenizer_file));
    sum.requested_vocab_size = tok->vocab_size();
  } else if (opt.tokenizer == "byte") {
    tok = std::make_unique<ByteTokenizer>();
    sum.requested_vocab_size = tok->vocab_size();
  } else {
    progress("training BPE tokenizer (vocab " + std::to_string(opt.vocab_size) + ") on " +
             std::to_string(text.size()) + " bytes");
    KEEL_ASSIGN_OR_RETURN(tok, TrainBpeTokenizer(text, opt.vocab_size));
    sum.requested_vocab_size = opt.vocab_size;
  }
  sum.tokenizer = tok->type();
  sum.vocab_size = tok->vocab_size();
  const double t2 = env->NowSeconds();
  sum.tokenizer_seconds = t2 - t1;

  progress("encoding corpus");
  KEEL_ASSIGN_OR_RETURN(const std::vector<int32_t> tokens, EncodeCorpus(*tok, text));
  std::string().swap(text);
  sum.encode_seconds = env->NowSeconds() - t2;

  const size_t n = tokens.size();
  const size_t n_val = static_cast<size_t>(std::floor(static_cast<double>(n) * opt.val_fraction));
  const size_t n_train = n - n_val;
  if (n_val < kMinSplitTokens) {
    return InvalidArgument("validation split would have " + std::to_string(n_val) + " tokens (corpus has " +
                           std::to_string(n) + " tokens, --val-fraction " + std::to_string(opt.val_fraction) +
                           "); need at least " + std::to_string(kMinSplitTokens) +
                           ": use more text or a larger val_fraction");
  }
  if (n_train < kMinSplitTokens) {
    return InvalidArgument("train split would have " + std::to_string(n_train) + " tokens; need at least " +
                           std::to_string(kMinSplitTokens));
  }
  sum.train_tokens = n_train;
  sum.val_tokens = n_val;

  progress("writing " + out);
  // The data is written into a new uniquely named sibling and renamed into place when complete: OUT is never
  // half-written, and nothing of the user's (say a directory named OUT.tmp) is touched.
  Status parent = DirName(out).empty() ? Status::Ok() : env->CreateDirs(DirName(out));
  if (!parent.ok()) return parent.Wrap("cannot write --out " + out);
  auto staged = env->CreateUniqueDir(out + ".tmp.");
  if (!staged.ok()) return staged.status().Wrap("cannot write --out " + out);
  const std::string tmp = *staged;
  Status st;
  try {  // the temporary directory goes whatever happens
    st = WriteDataDir(tmp, opt, *tok, tokens, n_train, &sum);
  } catch (const std::bad_alloc&) {
    st = OutOfMemory(out);
  }
  if (st.ok()) st = CheckOutDir(out);  // re-check: OUT may have appeared meanwhile
  if (st.ok()) st = Install(tmp, out, progress).Wrap("cannot write --out " + out);
  if (!st.ok()) {
    (void)env->RemoveAll(tmp);
    return st;
  }
  sum.total_seconds = env->NowSeconds() - t0;
  return sum;
}

}  // namespace

// Out of memory anywhere (reading, tokenizer training, the splits, the shards) is an error, not std::terminate.
Result<PrepareSummary> Prepare(const PrepareOptions& opt) {
  try {
    return PrepareUnguarded(opt);
  } catch (const std::bad_alloc&) {
    return OutOfMemory(opt.out_dir);
  }
}

}  // namespace keel
