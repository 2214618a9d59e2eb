// gguf.h: reading and writing GGUF v3, the llama.cpp / ggml model file format, plus the F16 and Q8_0 tensor
// encodings keel exports.
//
// File layout (all integers little-endian):
//   u32 magic "GGUF" | u32 version (3) | u64 tensor_count | u64 metadata_kv_count
//   metadata_kv_count x { string key | u32 value_type | value }
//   tensor_count x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset }
//   zero padding to a multiple of `general.alignment` (u32 key, default 32)
//   data section: each tensor at data_start + offset (offset a multiple of the alignment), zero padding after
//   each tensor (the last one included) to the alignment, as ggml writes it.
// A string is { u64 length | bytes } (no terminator); an array value is { u32 element type | u64 count |
// elements }. ne[] lists dimensions fastest-varying first: a row-major [rows, cols] matrix is ne = {cols, rows}.
//
// Contract:
//  - EncodeGguf validates its input (unique non-empty names and keys, 1..4 dims, ne[0] a multiple of the block
//    size for Q8_0, data size == the size the type and shape imply, a power-of-two alignment that matches a
//    `general.alignment` key if one is given) and returns kInvalidArgument otherwise (a mismatch included).
//  - WriteGgufFile writes atomically (WriteFileAtomic: a new uniquely named path.tmp.XXXXXX, fsync, rename): a
//    failure leaves the old file or none, never a partial one, and removes only the temporary it created.
//  - The parser treats its input as hostile (it has a fuzz target): every count, length, dimension, type and
//    offset is bounds-checked against the bytes actually present before anything is allocated, sizes are
//    computed with overflow checks, nested arrays, unknown value types and unknown tensor types are rejected,
//    as are duplicate keys or tensor names, a non-u32 or non-power-of-two `general.alignment`, misaligned
//    tensor offsets, tensors past the end of the file, overlapping tensors, and tensors not back to back in
//    the order of their infos (each offset the previous ones' padded sizes summed, as ggml writes and
//    llama.cpp's loader demands), and more than the padding after the last one. Errors are one line, start
//    with the source name (the path, or "<bytes>"), and are kCorrupt (kIo/kNotFound for unreadable files).
//    Memory use is bounded by a small multiple of the input size.
//  - Thread safety: a GgufFile is immutable after parsing; its const methods may be called concurrently.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/env.h"
#include "core/status.h"

namespace keel {

inline constexpr uint32_t kGgufVersion = 3;
inline constexpr uint32_t kGgufDefaultAlignment = 32;
inline constexpr int kGgufMaxDims = 4;  // GGML_MAX_DIMS

// Metadata value types (gguf_type).
enum class GgufType : uint32_t {
  kUint8 = 0, kInt8 = 1, kUint16 = 2, kInt16 = 3, kUint32 = 4, kInt32 = 5, kFloat32 = 6, kBool = 7,
  kString = 8, kArray = 9, kUint64 = 10, kInt64 = 11, kFloat64 = 12,
};
const char* GgufTypeName(GgufType t);

// Tensor element types (ggml_type), those whose sizes the parser knows.
enum class GgmlType : uint32_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ8_1 = 9,
  kI8 = 24, kI16 = 25, kI32 = 26, kI64 = 27, kF64 = 28, kBF16 = 30,
};
const char* GgmlTypeName(GgmlType t);
// Elements per block and bytes per block; {0, 0} for a type the parser does not know.
std::pair<uint64_t, uint64_t> GgmlBlockInfo(GgmlType t);
// Bytes of a tensor of n elements (n a multiple of the block size); nullopt on overflow or unknown type.
std::optional<uint64_t> GgmlNbytes(GgmlType t, uint64_t n);

// llama_ftype values for general.file_type.
inline constexpr uint32_t kGgufFileTypeAllF32 = 0, kGgufFileTypeMostlyF16 = 1, kGgufFileTypeMostlyQ8_0 = 7;

// A metadata value: a scalar, a string, or a one-level array (elements of one non-array type).
struct GgufValue {
  GgufType type = GgufType::kUint32;
  // Scalars: integers in u (unsigned types, bool) or i (signed types), floats in f.
  uint64_t u = 0;
  int64_t i = 0;
  double f = 0.0;
  std::string str;                 // kString
  GgufType elem_type = GgufType::kUint8;  // kArray: element type (never kArray)
  uint64_t count = 0;              // kArray: number of elements
  std::string raw;                 // kArray of numbers/bools: the elements' little-endian bytes
  std::vector<std::string> strs;   // kArray of strings

  static GgufValue U32(uint32_t v);
  static GgufValue I32(int32_t v);
  static GgufValue U64(uint64_t v);
  static GgufValue F32(float v);
  static GgufValue Bool(bool v);
  static GgufValue Str(std::string v);
  static GgufValue StrArray(std::vector<std::string> v);
  static GgufValue F32Array(const std::vector<float>& v);
  static GgufValue I32Array(const std::vector<int32_t>& v);
  static GgufValue U8Array(std::string bytes);

  // Typed reads: nullopt when the value is not of that type (integers convert between integer types
  // only when the value fits).
  std::optional<uint64_t> AsUint() const;
  std::optional<double> AsFloat() const;  // kFloat32 / kFloat64
  std::optional<std::string> AsString() const;
  std::optional<bool> AsBool() const;
  // Array elements (nullopt if not an array of that element type).
  std::optional<std::vector<float>> AsF32Array() const;
  std::optional<std::vector<int32_t>> AsI32Array() const;
  const std::vector<std::string>* AsStringArray() const;
  const std::string* AsU8Array() const;  // raw bytes of a kUint8 or kInt8 array
};

using GgufMetadata = std::vector<std::pair<std::string, GgufValue>>;

// A tensor to write: data points at exactly GgmlNbytes(type, product(ne)) bytes in the type's encoding.
struct GgufTensorIn {
  std::string name;
  std::vector<uint64_t> ne;  // fastest-varying first
  GgmlType type = GgmlType::kF32;
  const void* data = nullptr;
  size_t nbytes = 0;
};

// Serialises a GGUF v3 file. Tensors are aligned to `alignment`; a general.alignment key, if present, must equal
// it (kInvalidArgument otherwise). No key is added (the reader's default is 32, so pass 32 or add the key).
Result<std::string> EncodeGguf(const GgufMetadata& metadata, const std::vector<GgufTensorIn>& tensors,
                               uint32_t alignment = kGgufDefaultAlignment);
// EncodeGguf, then an atomic write through DefaultEnv(). Errors name the path.
Status WriteGgufFile(const std::string& path, const GgufMetadata& metadata, const std::vector<GgufTensorIn>& tensors,
                     uint32_t alignment = kGgufDefaultAlignment);

// s in single quotes, printable and at most 64 characters (names and strings come from hostile files; error
// messages stay one line).
std::string GgufQuote(const std::string& s);

struct GgufTensorInfo {
  std::string name;
  std::vector<uint64_t> ne;
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;        // relative to the data section, as stored
  uint64_t file_offset = 0;   // absolute position in the file
  uint64_t nelements = 0;
  uint64_t nbytes = 0;
  const uint8_t* data = nullptr;  // into the file's bytes (not necessarily aligned in memory)
};

class GgufFile {
 public:
  static Result<GgufFile> Open(const std::string& path);  // memory-maps through DefaultEnv()
  static Result<GgufFile> FromBytes(std::string bytes, std::string source_name = "<bytes>");

  GgufFile(GgufFile&&) noexcept = default;
  GgufFile& operator=(GgufFile&&) noexcept = default;
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& source() const { return source_; }
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // start of the data section in the file
  uint64_t file_size() const { return size_; }
  const GgufMetadata& metadata() const { return metadata_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufValue* FindKey(const std::string& key) const;
  const GgufTensorInfo* FindTensor(const std::string& name) const;
  // Decodes an F32, F16, BF16 or Q8_0 tensor to floats (row-major, ne[0] fastest). kNotFound for a missing
  // name, kInvalidArgument for another type.
  Result<std::vector<float>> ReadF32(const std::string& name) const;

 private:
  GgufFile() = default;
  static Result<GgufFile> Parse(GgufFile f, const uint8_t* data, size_t size);

  std::string source_;
  MappedFile map_;
  std::unique_ptr<std::string> bytes_;
  uint32_t version_ = 0;
  uint32_t alignment_ = kGgufDefaultAlignment;
  uint64_t data_offset_ = 0;
  uint64_t size_ = 0;
  GgufMetadata metadata_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> key_index_;     // key -> position in metadata_
  std::unordered_map<std::string, size_t> tensor_index_;  // name -> position in tensors_
};

// Q8_0: blocks of 32 values, each { f16 d; int8 q[32] } (34 bytes), d = max|x| / 127, q = round(x / d)
// (computed as round(x * (1/d)), half away from zero, as ggml's reference quantizer does), x' = q * d with d
// read back from f16. n must be a multiple of 32. Per element, |x - x'| <= d/2 + 127 x (rounding of d to f16),
// i.e. about max|block| / 254 while d is a normal f16 (max|block| >= ~7.8e-3). Below that d is an f16
// subnormal and the error grows towards d/2 + 127 x 2^-25; a block with max|x| <= ~3.8e-6 decodes to zeros.
// Quantizing against the unrounded d keeps the output identical to ggml's.
inline constexpr size_t kQ8_0BlockSize = 32;
inline constexpr size_t kQ8_0BlockBytes = 34;
std::string QuantizeQ8_0(const float* x, size_t n);
void DequantizeQ8_0(const uint8_t* blocks, float* out, size_t n);

}  // namespace keel
