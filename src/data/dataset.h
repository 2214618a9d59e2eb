// dataset.h: a prepared keel data directory opened for training: the mapped shards, the tokenizer, and
// batch sampling.
//
// Contract:
//  - Open validates the whole directory: meta.json (format, version, required fields), both shards
//    (shards.h checks), the tokenizer file, and that they agree with meta.json (token counts, hashes,
//    vocab size, fingerprint) and that every token id is < vocab_size. Errors are one line naming the file.
//  - TrainMicroBatch is a pure function of (data, seed, step, micro_index, B, T): row b's window starts at
//    MixKey(MixKey(MixKey(seed, step), micro_index), b) % (train_tokens - T - 1), so any process can
//    compute any micro-batch (multi-worker and restart-after-failure training rely on this).
//    inputs[b*T + t] = train[start + t], targets[b*T + t] = train[start + t + 1].
//  - ValBatch takes consecutive non-overlapping windows: window w starts at w*T; batch i row b uses window
//    (i*B + b) mod W, W = (val_tokens - 1) / T. NumValBatches(B, T) = max(1, W / B) (0 if W == 0), so an
//    evaluation over NumValBatches batches sees each window at most once unless W < B.
//  - Callers must check CheckContext(T) before sampling; sampling with a context the data cannot supply,
//    or with B or T < 1, is a programmer error (asserted).
// Thread safety: immutable after Open; all const methods may be called concurrently.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/status.h"
#include "data/shards.h"
#include "data/tokenizer.h"

namespace keel {

class Dataset {
 public:
  static Result<Dataset> Open(const std::string& data_dir);

  Dataset(Dataset&&) noexcept = default;
  Dataset& operator=(Dataset&&) noexcept = default;

  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const std::string& fingerprint() const { return fingerprint_; }
  const std::string& dir() const { return dir_; }
  size_t train_tokens() const { return train_.size(); }
  size_t val_tokens() const { return val_.size(); }
  int vocab_size() const { return tokenizer_->vocab_size(); }
  const ShardReader& train() const { return train_; }
  const ShardReader& val() const { return val_; }

  // Ok if both splits are long enough for context length T (each needs more than T + 1 tokens).
  Status CheckContext(int T) const;

  // Start of row b's training window (see the contract above).
  size_t TrainWindowStart(uint64_t seed, int64_t step, int micro_index, int b, int T) const;
  // Fills inputs and targets, each B*T int32 (row-major [B][T]).
  void TrainMicroBatch(uint64_t seed, int64_t step, int micro_index, int B, int T, int32_t* inputs,
                       int32_t* targets) const;
  void ValBatch(int index, int B, int T, int32_t* inputs, int32_t* targets) const;
  int NumValBatches(int B, int T) const;

 private:
  Dataset(std::string dir, std::unique_ptr<Tokenizer> tok, ShardReader train, ShardReader val, std::string fp)
      : dir_(std::move(dir)),
        tokenizer_(std::move(tok)),
        train_(std::move(train)),
        val_(std::move(val)),
        fingerprint_(std::move(fp)) {}

  std::string dir_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ShardReader train_, val_;
  std::string fingerprint_;
};

}  // namespace keel
