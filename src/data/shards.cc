// shards.cc: writing and validating token shard files.
#include "data/shards.h"

#include <algorithm>
#include <bit>
#include <cassert>
#include <cstring>

#include "core/hash.h"

namespace keel {

static_assert(std::endian::native == std::endian::little, "shard files are little-endian; add byte swapping");

namespace {

template <typename T>
void Put(std::string* buf, size_t off, T v) {
  std::memcpy(buf->data() + off, &v, sizeof(T));
}
template <typename T>
T Get(const uint8_t* p, size_t off) {
  T v;
  std::memcpy(&v, p + off, sizeof(T));
  return v;
}

}  // namespace

Status WriteShard(const std::string& path, const std::vector<int32_t>& tokens, int vocab_size) {
  if (vocab_size < 1) return InvalidArgument(path + ": invalid vocab_size " + std::to_string(vocab_size));
  const uint32_t dtype = vocab_size <= 65536 ? 2 : 4;
  const size_t n = tokens.size();
  std::string buf(kShardHeaderBytes + n * dtype, '\0');
  uint8_t* data = reinterpret_cast<uint8_t*>(buf.data()) + kShardHeaderBytes;
  for (size_t i = 0; i < n; ++i) {
    const int32_t t = tokens[i];
    if (t < 0 || t >= vocab_size) {
      return InvalidArgument(path + ": token id " + std::to_string(t) + " at position " + std::to_string(i) +
                             " is outside [0, " + std::to_string(vocab_size) + ")");
    }
    if (dtype == 2) {
      const uint16_t v = static_cast<uint16_t>(t);
      std::memcpy(data + 2 * i, &v, 2);
    } else {
      const uint32_t v = static_cast<uint32_t>(t);
      std::memcpy(data + 4 * i, &v, 4);
    }
  }
  std::memcpy(buf.data(), kShardMagic, 8);
  Put<uint32_t>(&buf, 8, kShardVersion);
  Put<uint32_t>(&buf, 12, dtype);
  Put<uint64_t>(&buf, 16, n);
  Put<uint64_t>(&buf, 24, Hash64(data, n * dtype));
  Put<uint64_t>(&buf, 32, Hash64(buf.data(), 32));
  return WriteFileAtomic(path, buf);
}

Result<ShardReader> ShardReader::Open(const std::string& path) {
  KEEL_ASSIGN_OR_RETURN(MappedFile file, DefaultEnv()->Map(path));
  const uint8_t* p = file.data();
  const size_t size = file.size();
  if (size == 0) return Corrupt(path + ": empty file (not a token shard)");
  if (size < kShardHeaderBytes) {
    return Corrupt(path + ": truncated: file has " + std::to_string(size) + " bytes, less than the " +
                   std::to_string(kShardHeaderBytes) + "-byte header");
  }
  if (std::memcmp(p, kShardMagic, 8) != 0) return Corrupt(path + ": not a keel token shard (bad magic)");
  if (Get<uint64_t>(p, 32) != Hash64(p, 32)) return Corrupt(path + ": header checksum mismatch (file corrupt)");
  const uint32_t version = Get<uint32_t>(p, 8);
  if (version != kShardVersion) {
    return Corrupt(path + ": unsupported shard version " + std::to_string(version) + " (this keel reads version " +
                   std::to_string(kShardVersion) + ")");
  }
  const uint32_t dtype = Get<uint32_t>(p, 12);
  if (dtype != 2 && dtype != 4) return Corrupt(path + ": invalid token size " + std::to_string(dtype) + " bytes");
  for (size_t i = 40; i < kShardHeaderBytes; ++i) {
    if (p[i] != 0) return Corrupt(path + ": reserved header bytes are not zero (file corrupt)");
  }
  const uint64_t count = Get<uint64_t>(p, 16);
  const uint64_t payload = size - kShardHeaderBytes;
  if (count > payload / dtype || count * dtype != payload) {
    const bool short_file = count > payload / dtype;  // (also avoids overflow in count * dtype)
    const std::string want = count > (UINT64_MAX - kShardHeaderBytes) / dtype
                                 ? std::string("more than 2^64")
                                 : std::to_string(count * dtype) + " + " + std::to_string(kShardHeaderBytes);
    return Corrupt(path + ": " + (short_file ? "truncated" : "trailing data") + ": header says " +
                   std::to_string(count) + " tokens (" + want + " bytes) but file has " + std::to_string(size) +
                   " bytes");
  }
  const uint64_t data_hash = Get<uint64_t>(p, 24);
  if (Hash64(p + kShardHeaderBytes, payload) != data_hash) {
    return Corrupt(path + ": checksum mismatch (file corrupt)");
  }
  ShardReader r;
  r.file_ = std::move(file);
  r.path_ = path;
  r.count_ = static_cast<size_t>(count);
  r.dtype_bytes_ = static_cast<int>(dtype);
  r.data_hash_ = data_hash;
  return r;
}

int32_t ShardReader::operator[](size_t i) const {
  assert(i < count_);
  if (dtype_bytes_ == 2) return Get<uint16_t>(tokens(), 2 * i);
  return static_cast<int32_t>(Get<uint32_t>(tokens(), 4 * i));
}

void ShardReader::Copy(size_t start, size_t n, int32_t* out) const {
  assert(start <= count_ && n <= count_ - start);
  const uint8_t* p = tokens();
  if (dtype_bytes_ == 2) {
    for (size_t i = 0; i < n; ++i) out[i] = Get<uint16_t>(p, 2 * (start + i));
  } else {
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(Get<uint32_t>(p, 4 * (start + i)));
  }
}

int64_t ShardReader::MaxToken() const {
  // Unsigned: a 4-byte id of 2^31 or more (0xFFFFFFFF, a converter's -100 "ignore" id) must count as large, not
  // as the negative int32 that operator[] would make of it.
  int64_t m = -1;
  const uint8_t* p = tokens();
  for (size_t i = 0; i < count_; ++i)
    m = std::max<int64_t>(m, dtype_bytes_ == 2 ? int64_t{Get<uint16_t>(p, 2 * i)} : int64_t{Get<uint32_t>(p, 4 * i)});
  return m;
}

}  // namespace keel
