// tokenizer.cc: the byte tokenizer, the SentencePiece wrapper, BPE training and tokenizer loading.
#include "data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "core/env.h"
#include "data/utf8.h"

// Exported by libsentencepiece (0.1.9x) but not declared in its public headers.
namespace sentencepiece::logging {
int GetMinLogLevel();
void SetMinLogLevel(int v);
}  // namespace sentencepiece::logging

namespace keel {

namespace {

constexpr char kBytePrefix[] = "keel-byte-tokenizer";
constexpr char kSpaceSymbol[] = "\xE2\x96\x81";  // U+2581, SentencePiece's stand-in for ' '
// Training input limits: sentences are cut to at most kMaxSentenceBytes, and at most kMaxTrainBytes of
// sentences are used (sampled by stride) so that training stays within seconds on large corpora.
constexpr size_t kMaxSentenceBytes = 4096;
constexpr size_t kMaxTrainBytes = size_t{16} << 20;

// Silences SentencePiece's logging (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL) for a scope; errors reach the
// caller as Status instead.
// SentencePiece's log level is process-wide: the lock keeps concurrent loads (a server, tests) from leaving it
// stuck at the quiet level.
class ScopedSpLogLevel {
 public:
  explicit ScopedSpLogLevel(int level) : lock_(Mutex()), old_(sentencepiece::logging::GetMinLogLevel()) {
    sentencepiece::logging::SetMinLogLevel(level);
  }
  ~ScopedSpLogLevel() { sentencepiece::logging::SetMinLogLevel(old_); }

 private:
  static std::mutex& Mutex() {
    static std::mutex m;
    return m;
  }
  std::lock_guard<std::mutex> lock_;
  int old_;
};

std::string ByteHex(int b) {
  char buf[8];
  std::snprintf(buf, sizeof(buf), "<0x%02X>", b & 0xFF);
  return buf;
}

// Calls on_run(run) for each piece of text SentencePiece should encode and on_byte(b) for each byte that is
// encoded directly as its byte-fallback token, in order. Runs are well-formed UTF-8 without NUL, '\n' or
// U+2581 (SentencePiece cannot reproduce the first three exactly and encodes '\n' as a byte anyway), and
// at most kMaxSentenceBytes long: longer stretches are cut, preferably before a space, because
// SentencePiece's encoder slows down superlinearly on long inputs. Training sentences are exactly these
// runs, so the model is trained on what it will be asked to encode.
template <typename OnRun, typename OnByte>
void ForEachRun(std::string_view s, OnRun&& on_run, OnByte&& on_byte) {
  auto emit = [&](std::string_view run) {
    while (run.size() > kMaxSentenceBytes) {
      size_t cut = kMaxSentenceBytes;
      while ((static_cast<uint8_t>(run[cut]) & 0xC0) == 0x80) --cut;  // back to a character boundary
      const size_t space = run.rfind(' ', cut);
      if (space != std::string_view::npos && space > kMaxSentenceBytes / 2) cut = space;
      on_run(run.substr(0, cut));
      run.remove_prefix(cut);
    }
    if (!run.empty()) on_run(run);
  };
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const size_t n = s.size();
  size_t run = 0, i = 0;
  while (i < n) {
    const size_t len = utf8::SeqLen(p + i, n - i);
    const bool special =
        len == 0 || p[i] == 0 || p[i] == '\n' || (len == 3 && s.compare(i, 3, kSpaceSymbol) == 0);
    if (!special) {
      i += len;
      continue;
    }
    if (i > run) emit(s.substr(run, i - run));
    const size_t k = len == 0 ? 1 : len;
    for (size_t j = 0; j < k; ++j) on_byte(p[i + j]);
    i += k;
    run = i;
  }
  if (n > run) emit(s.substr(run, n - run));
}

class VectorSentenceIterator final : public sentencepiece::SentenceIterator {
 public:
  explicit VectorSentenceIterator(const std::vector<std::string>* v) : v_(v) {}
  bool done() const override { return i_ >= v_->size(); }
  void Next() override { ++i_; }
  const std::string& value() const override { return (*v_)[i_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>* v_;
  size_t i_ = 0;
};

// A probe with double spaces, leading/trailing space, tabs, newlines, compatibility characters and
// non-ASCII text: a model with any normalization (NFKC, whitespace folding, dummy prefix) changes it.
constexpr char kProbe[] =
    "  Two  spaces,\ttab\r\nnew\n\nlines \xEF\xAC\x81 \xE2\x91\xA0 \xC3\x85ngstr\xC3\xB6m \xE6\x97\xA5\xE6\x9C\xAC "
    // U+10FFFD (private use): in no trained vocabulary, so it round-trips only through byte fallback. A model
    // that has the <0xNN> pieces but byte_fallback switched off turns it into unk (" \u2047 ").
    "\xF4\x8F\xBF\xBD ";

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Tokenizer / ByteTokenizer

std::string Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) out += DecodePiece(id);
  return out;
}

std::vector<int32_t> ByteTokenizer::Encode(std::string_view text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<uint8_t>(text[i]);
  return ids;
}

std::string ByteTokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  out.reserve(ids.size());
  for (int32_t id : ids) {
    if (id >= 0 && id < 256) out += static_cast<char>(id);
  }
  return out;
}

std::string ByteTokenizer::DecodePiece(int32_t id) const {
  return id >= 0 && id < 256 ? std::string(1, static_cast<char>(id)) : std::string();
}

std::string ByteTokenizer::piece(int id) const { return ByteHex(id); }

// ---------------------------------------------------------------------------------------------------
// SentencePieceTokenizer

SentencePieceTokenizer::SentencePieceTokenizer() : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
SentencePieceTokenizer::~SentencePieceTokenizer() = default;

Result<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::Load(const std::string& bytes) {
  if (bytes.empty()) return Corrupt("empty tokenizer file");
  if (bytes.size() > kMaxTokenizerFileBytes)
    return Corrupt("tokenizer file of " + std::to_string(bytes.size()) + " bytes is implausibly large (limit " +
                   std::to_string(kMaxTokenizerFileBytes) + ")");
  std::unique_ptr<SentencePieceTokenizer> t(new SentencePieceTokenizer());
  {
    ScopedSpLogLevel quiet(3);
    // SentencePiece and protobuf may throw (std::bad_alloc on a hostile length, among others): keep it a Status.
    try {
      auto st = t->sp_->LoadFromSerializedProto(bytes);
      if (!st.ok()) return Corrupt(std::string("not a valid SentencePiece model (") + st.message() + ")");
    } catch (const std::exception& e) {
      return Corrupt(std::string("not a valid SentencePiece model (") + e.what() + ")");
    } catch (...) {
      return Corrupt("not a valid SentencePiece model (loading it threw an exception)");
    }
  }
  const int n = t->sp_->GetPieceSize();
  if (n < kMinBpeVocabSize || n > kMaxBpeVocabSize) {
    return Corrupt("SentencePiece model has " + std::to_string(n) + " pieces; expected [" +
                   std::to_string(kMinBpeVocabSize) + ", " + std::to_string(kMaxBpeVocabSize) + "]");
  }
  for (int b = 0; b < 256; ++b) {
    const int id = t->sp_->PieceToId(ByteHex(b));
    if (id < 0 || id >= n || !t->sp_->IsByte(id)) {
      return Corrupt("SentencePiece model lacks byte-fallback piece " + ByteHex(b) +
                     " (keel needs a model trained with byte_fallback)");
    }
    t->byte_id_[b] = id;
  }
  t->surface_.resize(n);
  for (int id = 0; id < n; ++id) {
    if (t->sp_->IsByte(id)) {
      continue;  // filled from byte_id_ below
    } else if (t->sp_->IsControl(id) || t->sp_->IsUnused(id)) {
      t->surface_[id].clear();
    } else if (t->sp_->IsUnknown(id)) {
      t->surface_[id] = " \xE2\x81\x87 ";  // SentencePiece's default unk surface " ⁇ "
    } else {
      std::string s = t->sp_->IdToPiece(id);
      for (size_t pos; (pos = s.find(kSpaceSymbol)) != std::string::npos;) s.replace(pos, 3, " ");
      t->surface_[id] = std::move(s);
    }
  }
  for (int b = 0; b < 256; ++b) t->surface_[t->byte_id_[b]] = std::string(1, static_cast<char>(b));
  const int bos = t->sp_->bos_id(), eos = t->sp_->eos_id();
  t->bos_id_ = bos >= 0 && bos < n ? bos : -1;
  t->eos_id_ = eos >= 0 && eos < n ? eos : -1;
  t->bytes_ = bytes;
  if (t->Decode(t->Encode(kProbe)) != kProbe) {
    return Corrupt("SentencePiece model does not reproduce text exactly (it normalizes text; keel needs "
                   "normalization_rule_name=identity, no dummy prefix, no whitespace folding)");
  }
  return t;
}

void SentencePieceTokenizer::EncodeRun(std::string_view run, std::vector<int32_t>* out) const {
  std::vector<int> ids;
  if (sp_->Encode(run, &ids).ok()) {
    out->insert(out->end(), ids.begin(), ids.end());
    return;
  }
  // Not expected for well-formed input; fall back to bytes so Encode stays lossless.
  for (char c : run) out->push_back(byte_id_[static_cast<uint8_t>(c)]);
}

std::vector<int32_t> SentencePieceTokenizer::Encode(std::string_view text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 1);
  ForEachRun(
      text, [&](std::string_view run) { EncodeRun(run, &out); }, [&](uint8_t b) { out.push_back(byte_id_[b]); });
  return out;
}

std::string SentencePieceTokenizer::DecodePiece(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < surface_.size() ? surface_[id] : std::string();
}

std::string SentencePieceTokenizer::piece(int id) const {
  return id >= 0 && id < vocab_size() ? sp_->IdToPiece(id) : std::string();
}

float SentencePieceTokenizer::score(int id) const { return id >= 0 && id < vocab_size() ? sp_->GetScore(id) : 0.0f; }

int SentencePieceTokenizer::piece_type(int id) const {
  if (id < 0 || id >= vocab_size()) return kPieceUnused;
  if (sp_->IsByte(id)) return kPieceByte;
  if (sp_->IsUnknown(id)) return kPieceUnknown;
  if (sp_->IsControl(id)) return kPieceControl;
  if (sp_->IsUnused(id)) return kPieceUnused;
  return kPieceNormal;
}

// ---------------------------------------------------------------------------------------------------
// Training

Result<std::unique_ptr<Tokenizer>> TrainBpeTokenizer(const std::string& text, int vocab_size) {
  if (vocab_size < kMinBpeVocabSize || vocab_size > kMaxBpeVocabSize) {
    return InvalidArgument("BPE vocab_size must be in [" + std::to_string(kMinBpeVocabSize) + ", " +
                           std::to_string(kMaxBpeVocabSize) + "], got " + std::to_string(vocab_size));
  }
  // Sentences: the runs Encode hands to SentencePiece (so, in particular, no sentence spans a line).
  // Two passes, so that only the subsample is ever copied: the sizes, then every stride-th sentence (a
  // deterministic subsample when the text exceeds kMaxTrainBytes).
  size_t total = 0;
  ForEachRun(text, [&](std::string_view run) { total += run.size(); }, [](uint8_t) {});
  if (total == 0) return InvalidArgument("cannot train a BPE tokenizer on empty text");
  const size_t stride = total > kMaxTrainBytes ? (total + kMaxTrainBytes - 1) / kMaxTrainBytes : 1;
  std::vector<std::string> sentences;
  size_t index = 0;
  ForEachRun(
      text,
      [&](std::string_view run) {
        if (index++ % stride == 0) sentences.emplace_back(run);
      },
      [](uint8_t) {});
  // SentencePiece needs a piece for every distinct character (character_coverage 1.0) besides the 259
  // reserved ones; check up front for a clear message.
  std::unordered_set<uint32_t> chars;
  for (const std::string& s : sentences) {
    const auto* p = reinterpret_cast<const uint8_t*>(s.data());
    for (size_t i = 0; i < s.size();) {
      const size_t len = utf8::SeqLen(p + i, s.size() - i);
      uint32_t key = 0;
      for (size_t j = 0; j < len; ++j) key = key << 8 | p[i + j];
      chars.insert(key);
      i += len;
    }
  }
  const size_t required = 259 + chars.size();
  if (static_cast<size_t>(vocab_size) < required) {
    return InvalidArgument("BPE vocab_size " + std::to_string(vocab_size) + " is too small for this corpus: it has " +
                           std::to_string(chars.size()) + " distinct characters, so the vocabulary needs at least " +
                           std::to_string(required) + " (259 reserved + one per character)");
  }
  const std::unordered_map<std::string, std::string> args = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(vocab_size)},
      {"byte_fallback", "true"},
      {"character_coverage", "1.0"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"split_by_whitespace", "true"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"num_threads", "2"},
      {"input_sentence_size", "0"},  // use every sentence given (sampling is done above, deterministically)
      {"shuffle_input_sentence", "false"},
      {"max_sentence_length", std::to_string(2 * kMaxSentenceBytes)},
      {"hard_vocab_limit", "false"},  // small corpora yield fewer pieces instead of failing
  };
  VectorSentenceIterator it(&sentences);
  std::string model;
  {
    ScopedSpLogLevel quiet(2);
    auto st = sentencepiece::SentencePieceTrainer::Train(args, &it, &model);
    if (!st.ok()) return Internal(std::string("BPE tokenizer training failed: ") + st.message());
  }
  auto loaded = SentencePieceTokenizer::Load(model);
  if (!loaded.ok()) {
    // SentencePiece trained on a handful of bytes yields such a model; the corpus, not keel, is the problem then.
    if (text.size() < 1024)
      return InvalidArgument("the corpus (" + std::to_string(text.size()) +
                             " bytes) is too small to train a BPE tokenizer: use more text, or --tokenizer byte");
    return Internal("BPE tokenizer training produced an unusable model: " + loaded.status().message());
  }
  return std::unique_ptr<Tokenizer>(std::move(loaded).value());
}

// ---------------------------------------------------------------------------------------------------
// Loading

Result<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& type, const std::string& bytes) {
  const bool looks_byte = bytes.compare(0, sizeof(kBytePrefix) - 1, kBytePrefix) == 0;
  if (type == "byte") {
    if (bytes == kByteTokenizerMagic) return std::unique_ptr<Tokenizer>(std::make_unique<ByteTokenizer>());
    if (looks_byte) return Corrupt("unsupported byte tokenizer version (expected \"keel-byte-tokenizer v1\")");
    return Corrupt("not a keel byte tokenizer file");
  }
  if (type == "bpe") {
    if (looks_byte) return Corrupt("is a byte tokenizer file, not a bpe one");
    auto t = SentencePieceTokenizer::Load(bytes);
    if (!t.ok()) return t.status();
    return std::unique_ptr<Tokenizer>(std::move(t).value());
  }
  return InvalidArgument("unknown tokenizer type \"" + type + "\" (expected bpe or byte)");
}

Result<std::string> ReadTokenizerBytes(const std::string& path) {
  // Size first: a huge file (or a sparse one) must not be read into memory only to be refused.
  KEEL_ASSIGN_OR_RETURN(const uint64_t size, DefaultEnv()->FileSize(path));
  if (size > kMaxTokenizerFileBytes)
    return Corrupt(path + ": tokenizer file of " + std::to_string(size) + " bytes is implausibly large (limit " +
                   std::to_string(kMaxTokenizerFileBytes) + ")");
  return DefaultEnv()->ReadFile(path);
}

Result<std::unique_ptr<Tokenizer>> LoadTokenizerFile(const std::string& path) {
  KEEL_ASSIGN_OR_RETURN(std::string bytes, ReadTokenizerBytes(path));
  const bool looks_byte = bytes.compare(0, sizeof(kBytePrefix) - 1, kBytePrefix) == 0;
  auto t = LoadTokenizer(looks_byte ? "byte" : "bpe", bytes);
  if (!t.ok()) return t.status().Wrap(path);
  return t;
}

}  // namespace keel
