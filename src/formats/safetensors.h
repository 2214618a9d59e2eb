// safetensors.h: reading and writing the Hugging Face safetensors tensor file format.
// Layout: a little-endian u64 header length N, N bytes of JSON header padded with spaces, then one
// contiguous data buffer.
//
// Contract:
//  - Supported dtypes: F32, F16, BF16, I32, I64, U8, F64. Data is little-endian, row-major.
//  - Errors are returned, never thrown; each is one line starting with the file path (or FromBytes's source
//    name, default "<bytes>"; "safetensors encode" for EncodeSafetensors) and saying what is wrong. Malformed
//    input is kCorrupt, unreadable files kIo/kNotFound, bad arguments kInvalidArgument.
//  - The parser treats its input as hostile: header length beyond the file or over 100 MiB, invalid
//    JSON, entries that are not objects, unknown dtypes, negative or overflowing shapes, offsets out of
//    range, size/shape mismatches, overlapping tensors, holes or trailing bytes in the data buffer,
//    duplicate names and non-string metadata values are all rejected as kCorrupt. Unknown keys inside a
//    tensor entry are ignored (as the reference implementation does).
//  - TensorView::data of a parsed file points into the file's bytes and is NOT necessarily aligned for
//    its dtype (the header length need not be a multiple of 8 in files from other writers); copy with
//    memcpy or use ReadF32. Views stay valid as long as the SafetensorsFile (moving it keeps them valid).
//  - Thread safety: a SafetensorsFile is immutable after Open/FromBytes; const methods may be called
//    from several threads at once. The free functions are reentrant.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/env.h"
#include "core/status.h"

namespace keel {

struct TensorView {
  std::string name;
  std::string dtype;            // "F32", "F16", "BF16", "I32", "I64", "U8", "F64"
  std::vector<int64_t> shape;   // empty = scalar (one element)
  const void* data = nullptr;
  size_t nbytes = 0;
};

// Bytes per element of a dtype name; 0 if the dtype is not supported.
size_t SafetensorsDtypeSize(const std::string& dtype);

// Serialises tensors, laid out contiguously in the given order, after a JSON header padded with spaces
// so the data buffer starts at a multiple of 8 bytes. Validates: known dtype, non-negative dims, no
// size overflow, nbytes == product(shape) * dtype size, data non-null when nbytes > 0, non-empty unique
// names other than "__metadata__", UTF-8 names and metadata. Returns kInvalidArgument otherwise.
Result<std::string> EncodeSafetensors(const std::vector<TensorView>& tensors,
                                      const std::map<std::string, std::string>& metadata);

// EncodeSafetensors, then WriteFileAtomic(path) through the default Env (a crash leaves the old file or
// the new one). Holds the whole encoded file in memory once.
Status WriteSafetensors(const std::string& path, const std::vector<TensorView>& tensors,
                        const std::map<std::string, std::string>& metadata);

class SafetensorsFile {
 public:
  // Memory-maps path through DefaultEnv() and parses/validates the header.
  static Result<SafetensorsFile> Open(const std::string& path);
  // Parses an in-memory file (takes ownership of the bytes). source_name starts every error message.
  static Result<SafetensorsFile> FromBytes(std::string bytes, std::string source_name = "<bytes>");

  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Tensor names in file order (ascending data offset; ties between empty tensors in header order).
  std::vector<std::string> names() const;
  // All tensors, in file order.
  const std::vector<TensorView>& tensors() const { return tensors_; }
  // nullptr if there is no tensor of that name.
  const TensorView* Find(const std::string& name) const;
  // Copies a F32/F16/BF16 tensor out as floats. kNotFound for a missing name, kInvalidArgument for a
  // tensor of another dtype.
  Result<std::vector<float>> ReadF32(const std::string& name) const;
  // The path given to Open, or FromBytes's source_name.
  const std::string& source() const { return source_; }

 private:
  SafetensorsFile() = default;
  static Result<SafetensorsFile> Parse(SafetensorsFile f, const uint8_t* data, size_t size);

  std::string source_;
  MappedFile map_;                     // backing storage when opened from a path
  std::unique_ptr<std::string> bytes_; // backing storage from FromBytes (heap, so views survive moves)
  std::map<std::string, std::string> metadata_;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t> index_;  // name -> position in tensors_
};

}  // namespace keel
