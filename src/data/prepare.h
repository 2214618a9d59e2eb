// prepare.h: raw text -> a keel data directory (train.bin, val.bin, tokenizer.model, meta.json).
//
// Contract:
//  - Prepare collects the text files (corpus.h), trains (bpe) or builds (byte) the tokenizer, encodes the
//    corpus (in parallel chunks cut after newlines; the result does not depend on the thread count) and
//    splits the token stream: the last floor(val_fraction * N) tokens are validation, the rest training.
//  - The output is built in a new OUT.tmp.XXXXXX next to OUT and renamed into place, so OUT is never left half
//    written. An existing OUT that is a keel data directory (a meta.json of format keel-data, and only the
//    files listed below) is replaced; an empty directory is replaced; anything else is an error ("OUT exists
//    and is not a keel data directory"). OUT inside an input directory is an error.
//  - meta.json records format, keel version, tokenizer type, vocab size, split sizes, source file count
//    and bytes, the hashes of the three data files, and `fingerprint` (DataFingerprint below), which
//    identifies the data for checkpoints.
//  - The same inputs and options always produce byte-identical train.bin, val.bin and tokenizer.model.
// Thread safety: Prepare may be called from one thread at a time (BPE training is not reentrant).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace keel {

// The files of a data directory.
inline constexpr char kTrainShardFile[] = "train.bin";
inline constexpr char kValShardFile[] = "val.bin";
inline constexpr char kMetaFile[] = "meta.json";
inline constexpr int kDataFormatVersion = 1;
// Each split needs at least this many tokens (one input and its target).
inline constexpr size_t kMinSplitTokens = 2;

struct PrepareOptions {
  std::vector<std::string> inputs;  // files and/or directories
  std::string out_dir;
  std::string tokenizer = "bpe";    // "bpe" or "byte"
  int vocab_size = 4096;            // bpe only: [kMinBpeVocabSize, kMaxBpeVocabSize]
  double val_fraction = 0.05;       // (0, 0.5]
  // If set, this tokenizer file is used instead of training one (tokenizer and vocab_size are ignored).
  std::string tokenizer_file;
  // If set, called with one-line progress messages ("training BPE tokenizer (vocab 4096)...").
  std::function<void(std::string_view)> progress;
};

struct PrepareSummary {
  std::string out_dir;
  std::string tokenizer;        // "bpe" or "byte"
  int vocab_size = 0;           // actual (BPE on a small corpus may yield fewer pieces than requested)
  int requested_vocab_size = 0;
  size_t train_tokens = 0, val_tokens = 0;
  size_t source_files = 0;
  size_t skipped_files = 0;     // binary / hidden / special files skipped inside directories
  uint64_t source_bytes = 0;    // bytes of the concatenated corpus
  std::string fingerprint;      // 16 hex digits
  double tokenizer_seconds = 0, encode_seconds = 0, total_seconds = 0;
};

Result<PrepareSummary> Prepare(const PrepareOptions& options);

// Hex Hash64 identifying a data directory: over the tokenizer file bytes and the data hashes of the two
// shards. Computed by Prepare and re-checked by Dataset::Open.
std::string DataFingerprint(const std::string& tokenizer_bytes, uint64_t train_data_hash, uint64_t val_data_hash);

}  // namespace keel
