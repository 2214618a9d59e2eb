// tokenizer.h: text <-> token ids. Two kinds: "byte" (one token per byte, vocab 256) and "bpe"
// (a SentencePiece BPE model trained on the corpus, with byte fallback).
//
// Contract:
//  - Decode(Encode(s)) == s for EVERY byte string s, including invalid UTF-8, NUL bytes and the
//    character U+2581 (which SentencePiece uses internally for space). The BPE tokenizer guarantees this
//    by sending only well-formed, NUL-free, U+2581-free runs to SentencePiece and encoding every other
//    byte as its byte-fallback token. '\n' is always encoded as its byte token <0x0A> (runs never span
//    lines), and lines longer than 4 KiB are encoded in pieces of at most 4 KiB, cut before a space where
//    possible (SentencePiece's encoder is superlinear in input length).
//  - Encode never emits bos/eos/unk; ids are in [0, vocab_size()).
//  - Decode(ids) is exactly the concatenation of DecodePiece(id) over ids, so streaming output piece by
//    piece yields the same bytes as decoding at the end (a piece may be a partial UTF-8 sequence).
//    Ids out of range and control ids decode to "".
//  - Serialize() returns the bytes of the tokenizer file (tokenizer.model); LoadTokenizer(type(),
//    Serialize()) reproduces an identical tokenizer. A byte tokenizer file is the text
//    "keel-byte-tokenizer v1\n"; a bpe tokenizer file is a SentencePiece ModelProto.
//  - TrainBpeTokenizer is deterministic: the same text and vocab_size give byte-identical models.
//  - Loading rejects corrupt files and SentencePiece models without the 256 byte-fallback pieces.
// Thread safety: a Tokenizer is immutable after construction; all const methods are safe to call
// concurrently. Training is safe to run on one thread at a time (SentencePiece's logging is global).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace keel {

// Piece types, numbered as in GGUF's tokenizer.ggml.token_type.
enum PieceType : int { kPieceNormal = 1, kPieceUnknown = 2, kPieceControl = 3, kPieceUnused = 5, kPieceByte = 6 };

inline constexpr char kByteTokenizerMagic[] = "keel-byte-tokenizer v1\n";
inline constexpr char kTokenizerFileName[] = "tokenizer.model";
// Smallest vocab a BPE tokenizer can have: unk, bos, eos, 256 byte pieces, and at least one character.
inline constexpr int kMinBpeVocabSize = 260;
inline constexpr int kMaxBpeVocabSize = 1 << 20;
// Largest tokenizer file keel loads (a SentencePiece model of kMaxBpeVocabSize pieces is far smaller).
inline constexpr size_t kMaxTokenizerFileBytes = size_t{128} << 20;

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<int32_t> Encode(std::string_view text) const = 0;
  virtual std::string Decode(const std::vector<int32_t>& ids) const;
  // The bytes of one token (for streaming). A byte-fallback piece yields its raw byte.
  virtual std::string DecodePiece(int32_t id) const = 0;
  virtual int vocab_size() const = 0;
  virtual int bos_id() const = 0;  // -1 if none
  virtual int eos_id() const = 0;  // -1 if none
  virtual std::string type() const = 0;  // "byte" or "bpe"
  virtual std::string Serialize() const = 0;
  // Vocabulary for export (GGUF): the piece string as SentencePiece spells it ("▁the", "<0x0A>"),
  // its score, and its PieceType.
  virtual std::string piece(int id) const = 0;
  virtual float score(int id) const = 0;
  virtual int piece_type(int id) const = 0;
};

// One token per byte: id = byte value. No bos/eos.
class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> Encode(std::string_view text) const override;
  std::string Decode(const std::vector<int32_t>& ids) const override;
  std::string DecodePiece(int32_t id) const override;
  int vocab_size() const override { return 256; }
  int bos_id() const override { return -1; }
  int eos_id() const override { return -1; }
  std::string type() const override { return "byte"; }
  std::string Serialize() const override { return kByteTokenizerMagic; }
  std::string piece(int id) const override;  // "<0xNN>"
  float score(int) const override { return 0.0f; }
  int piece_type(int) const override { return kPieceByte; }
};

// A SentencePiece model (keel trains BPE with byte fallback). Construct with Load (or LoadTokenizer).
class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Parses and validates a serialized ModelProto: it must load, contain all 256 byte-fallback pieces,
  // and round-trip a probe text exactly (which rules out normalizing models). Errors are kCorrupt.
  static Result<std::unique_ptr<SentencePieceTokenizer>> Load(const std::string& bytes);
  ~SentencePieceTokenizer() override;

  std::vector<int32_t> Encode(std::string_view text) const override;
  std::string DecodePiece(int32_t id) const override;
  int vocab_size() const override { return static_cast<int>(surface_.size()); }
  int bos_id() const override { return bos_id_; }
  int eos_id() const override { return eos_id_; }
  std::string type() const override { return "bpe"; }
  std::string Serialize() const override { return bytes_; }
  std::string piece(int id) const override;
  float score(int id) const override;
  int piece_type(int id) const override;

 private:
  SentencePieceTokenizer();
  void EncodeRun(std::string_view run, std::vector<int32_t>* out) const;

  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string bytes_;
  std::vector<std::string> surface_;  // DecodePiece table
  int32_t byte_id_[256] = {};
  int bos_id_ = -1, eos_id_ = -1;
};

// Trains a SentencePiece BPE model on text. The training sentences are exactly the runs Encode hands to
// SentencePiece (lines, cut to 4 KiB); at most ~16 MiB of them are used, sampled deterministically by
// stride. The resulting vocabulary may be smaller than vocab_size when the text is
// too small to support that many merges; vocab_size() reports the actual size. Errors: vocab_size out of
// [kMinBpeVocabSize, kMaxBpeVocabSize] or too small for the distinct characters of the text; empty text.
Result<std::unique_ptr<Tokenizer>> TrainBpeTokenizer(const std::string& text, int vocab_size);

// type is "byte" or "bpe"; bytes are the tokenizer file's contents.
Result<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& type, const std::string& bytes);
// Reads a tokenizer file, detecting its type from the content. Errors name the file.
Result<std::unique_ptr<Tokenizer>> LoadTokenizerFile(const std::string& path);
// A tokenizer file's bytes; Corrupt (naming the file) above kMaxTokenizerFileBytes, checked before reading.
Result<std::string> ReadTokenizerBytes(const std::string& path);

}  // namespace keel
