// dataset.cc: opening and validating a data directory; deterministic train and validation batches.
#include "data/dataset.h"

#include <algorithm>
#include <cassert>
#include <climits>
#include <nlohmann/json.hpp>

#include "core/env.h"
#include "core/hash.h"
#include "data/prepare.h"

namespace keel {

namespace {

using Json = nlohmann::json;

Result<uint64_t> GetCount(const Json& j, const char* key, const std::string& file) {
  auto it = j.find(key);
  if (it == j.end()) return Corrupt(file + ": missing field \"" + key + "\"");
  if (!it->is_number_unsigned() && !(it->is_number_integer() && it->get<int64_t>() >= 0)) {
    return Corrupt(file + ": field \"" + key + "\" must be a non-negative integer");
  }
  return it->get<uint64_t>();
}

Result<std::string> GetString(const Json& j, const char* key, const std::string& file) {
  auto it = j.find(key);
  if (it == j.end()) return Corrupt(file + ": missing field \"" + key + "\"");
  if (!it->is_string()) return Corrupt(file + ": field \"" + key + "\" must be a string");
  return it->get<std::string>();
}

Status Mismatch(const std::string& file, const std::string& what) {
  return Corrupt(file + ": does not match meta.json (" + what + "); the data directory is inconsistent, run "
                 "prepare again");
}

}  // namespace

Result<Dataset> Dataset::Open(const std::string& data_dir) {
  Env* env = DefaultEnv();
  if (!env->IsDir(data_dir)) {
    return NotFound(data_dir + (env->Exists(data_dir) ? ": not a directory" : ": no such data directory"));
  }
  const std::string meta_path = JoinPath(data_dir, kMetaFile);
  if (!env->Exists(meta_path)) return NotFound(data_dir + ": not a keel data directory (no meta.json)");
  KEEL_ASSIGN_OR_RETURN(std::string meta_text, env->ReadFile(meta_path));
  Json meta;
  try {
    meta = Json::parse(meta_text);
  } catch (const Json::parse_error& e) {
    return Corrupt(meta_path + ": invalid JSON: " + e.what());
  }
  if (!meta.is_object()) return Corrupt(meta_path + ": not a JSON object");
  KEEL_ASSIGN_OR_RETURN(std::string format, GetString(meta, "format", meta_path));
  if (format != "keel-data") return Corrupt(meta_path + ": format is \"" + format + "\", expected \"keel-data\"");
  KEEL_ASSIGN_OR_RETURN(uint64_t version, GetCount(meta, "format_version", meta_path));
  if (version != kDataFormatVersion) {
    return Corrupt(meta_path + ": unsupported format_version " + std::to_string(version) + " (this keel reads " +
                   std::to_string(kDataFormatVersion) + ")");
  }
  KEEL_ASSIGN_OR_RETURN(std::string tok_type, GetString(meta, "tokenizer", meta_path));
  if (tok_type != "bpe" && tok_type != "byte") return Corrupt(meta_path + ": unknown tokenizer \"" + tok_type + "\"");
  KEEL_ASSIGN_OR_RETURN(uint64_t vocab, GetCount(meta, "vocab_size", meta_path));
  KEEL_ASSIGN_OR_RETURN(uint64_t n_train, GetCount(meta, "train_tokens", meta_path));
  KEEL_ASSIGN_OR_RETURN(uint64_t n_val, GetCount(meta, "val_tokens", meta_path));
  KEEL_ASSIGN_OR_RETURN(std::string tok_hash, GetString(meta, "tokenizer_hash", meta_path));
  KEEL_ASSIGN_OR_RETURN(std::string train_hash, GetString(meta, "train_hash", meta_path));
  KEEL_ASSIGN_OR_RETURN(std::string val_hash, GetString(meta, "val_hash", meta_path));
  KEEL_ASSIGN_OR_RETURN(std::string fingerprint, GetString(meta, "fingerprint", meta_path));

  const std::string tok_path = JoinPath(data_dir, kTokenizerFileName);
  KEEL_ASSIGN_OR_RETURN(std::string tok_bytes, ReadTokenizerBytes(tok_path));
  if (HashHex(Hash64(tok_bytes.data(), tok_bytes.size())) != tok_hash) {
    return Corrupt(tok_path + ": checksum mismatch with meta.json (file corrupt or replaced)");
  }
  auto tok = LoadTokenizer(tok_type, tok_bytes);
  if (!tok.ok()) return tok.status().Wrap(tok_path);
  if (static_cast<uint64_t>((*tok)->vocab_size()) != vocab) {
    return Mismatch(tok_path, "vocab size " + std::to_string((*tok)->vocab_size()) + " vs " + std::to_string(vocab));
  }

  KEEL_ASSIGN_OR_RETURN(ShardReader train, ShardReader::Open(JoinPath(data_dir, kTrainShardFile)));
  KEEL_ASSIGN_OR_RETURN(ShardReader val, ShardReader::Open(JoinPath(data_dir, kValShardFile)));
  for (const auto* s : {&train, &val}) {
    const uint64_t want = s == &train ? n_train : n_val;
    const std::string& want_hash = s == &train ? train_hash : val_hash;
    if (s->size() != want) {
      return Mismatch(s->path(), std::to_string(s->size()) + " tokens vs " + std::to_string(want));
    }
    if (HashHex(s->data_hash()) != want_hash) return Mismatch(s->path(), "data hash");
    const int64_t max_tok = s->MaxToken();
    if (max_tok >= static_cast<int64_t>(vocab)) {
      return Corrupt(s->path() + ": token id " + std::to_string(max_tok) + " is outside the vocabulary (size " +
                     std::to_string(vocab) + ")");
    }
  }
  const std::string fp = DataFingerprint(tok_bytes, train.data_hash(), val.data_hash());
  if (fp != fingerprint) return Corrupt(meta_path + ": fingerprint mismatch (" + fingerprint + " vs " + fp + ")");
  return Dataset(data_dir, std::move(tok).value(), std::move(train), std::move(val), fp);
}

Status Dataset::CheckContext(int T) const {
  if (T < 1) return InvalidArgument("context length must be at least 1, got " + std::to_string(T));
  const uint64_t need = static_cast<uint64_t>(T) + 1;
  if (train_.size() <= need || val_.size() <= need) {
    const bool train_short = train_.size() <= need;
    return InvalidArgument("corpus too short for context length " + std::to_string(T) + ": " +
                           (train_short ? "train" : "val") + " split has " +
                           std::to_string(train_short ? train_.size() : val_.size()) + " tokens (needs > " +
                           std::to_string(need) + ")");
  }
  return Status::Ok();
}

size_t Dataset::TrainWindowStart(uint64_t seed, int64_t step, int micro_index, int b, int T) const {
  assert(T >= 1 && train_.size() > static_cast<size_t>(T) + 1);
  const uint64_t key = MixKey(MixKey(MixKey(seed, static_cast<uint64_t>(step)), static_cast<uint64_t>(micro_index)),
                              static_cast<uint64_t>(b));
  return static_cast<size_t>(key % (train_.size() - static_cast<size_t>(T) - 1));
}

void Dataset::TrainMicroBatch(uint64_t seed, int64_t step, int micro_index, int B, int T, int32_t* inputs,
                              int32_t* targets) const {
  assert(B >= 1 && T >= 1);
  for (int b = 0; b < B; ++b) {
    const size_t start = TrainWindowStart(seed, step, micro_index, b, T);
    train_.Copy(start, T, inputs + static_cast<size_t>(b) * T);
    train_.Copy(start + 1, T, targets + static_cast<size_t>(b) * T);
  }
}

int Dataset::NumValBatches(int B, int T) const {
  assert(B >= 1 && T >= 1);
  if (val_.size() < 2) return 0;
  const size_t windows = (val_.size() - 1) / static_cast<size_t>(T);
  if (windows == 0) return 0;
  return static_cast<int>(std::min<size_t>(INT_MAX, std::max<size_t>(1, windows / static_cast<size_t>(B))));
}

void Dataset::ValBatch(int index, int B, int T, int32_t* inputs, int32_t* targets) const {
  assert(B >= 1 && T >= 1 && index >= 0);
  assert(val_.size() >= static_cast<size_t>(T) + 1);
  const size_t windows = (val_.size() - 1) / static_cast<size_t>(T);
  for (int b = 0; b < B; ++b) {
    const size_t w = (static_cast<size_t>(index) * B + b) % windows;
    const size_t start = w * T;
    val_.Copy(start, T, inputs + static_cast<size_t>(b) * T);
    val_.Copy(start + 1, T, targets + static_cast<size_t>(b) * T);
  }
}

}  // namespace keel
