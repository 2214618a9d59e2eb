// shards.h: the token shard file (train.bin / val.bin): a checksummed, memory-mappable array of token ids.
//
// Format, version 1 (all integers little-endian):
//   offset  size  field
//        0     8  magic "KEELTOKS"
//        8     4  u32 version = 1
//       12     4  u32 dtype_bytes: 2 (uint16 tokens) or 4 (uint32 tokens)
//       16     8  u64 token_count
//       24     8  u64 data_hash   = Hash64 of the token bytes
//       32     8  u64 header_hash = Hash64 of header bytes [0, 32)
//       40    24  reserved, zero
//       64     -  token_count * dtype_bytes bytes of tokens
// Contract: WriteShard writes atomically (WriteFileAtomic) and picks uint16 when vocab_size <= 65536.
// ShardReader::Open maps the file through DefaultEnv()->Map and validates magic, header checksum, version,
// dtype, exact file size and data checksum before returning, so a reader that opened successfully never
// reads out of bounds or returns bytes other than those written. Every error is one line naming the file.
// Thread safety: a ShardReader is immutable; concurrent reads are safe.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/env.h"
#include "core/status.h"

namespace keel {

inline constexpr char kShardMagic[8] = {'K', 'E', 'E', 'L', 'T', 'O', 'K', 'S'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 64;

// Writes tokens (each in [0, vocab_size)) to path. Errors: a token out of range, vocab_size < 1, I/O.
Status WriteShard(const std::string& path, const std::vector<int32_t>& tokens, int vocab_size);

class ShardReader {
 public:
  static Result<ShardReader> Open(const std::string& path);

  ShardReader(ShardReader&&) noexcept = default;
  ShardReader& operator=(ShardReader&&) noexcept = default;

  size_t size() const { return count_; }
  // Token i (i < size(); asserted).
  int32_t operator[](size_t i) const;
  // Copies tokens [start, start + n) into out (the range must lie within the shard; asserted).
  void Copy(size_t start, size_t n, int32_t* out) const;
  // Largest token id in the shard, or -1 if it is empty (a full scan).
  int64_t MaxToken() const;

  int dtype_bytes() const { return dtype_bytes_; }
  uint64_t data_hash() const { return data_hash_; }
  const std::string& path() const { return path_; }

 private:
  ShardReader() = default;
  const uint8_t* tokens() const { return file_.data() + kShardHeaderBytes; }

  MappedFile file_;
  std::string path_;
  size_t count_ = 0;
  int dtype_bytes_ = 2;
  uint64_t data_hash_ = 0;
};

}  // namespace keel
