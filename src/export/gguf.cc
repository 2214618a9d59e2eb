// gguf.cc: GGUF v3 encoding, hostile-input parsing, and the Q8_0 block codec.
#include "export/gguf.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <unordered_map>

#include "formats/half.h"

namespace keel {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32

bool IsPow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// Size in bytes of a scalar of type t; 0 for string/array/unknown.
size_t ScalarSize(GgufType t) {
  switch (t) {
    case GgufType::kUint8: case GgufType::kInt8: case GgufType::kBool: return 1;
    case GgufType::kUint16: case GgufType::kInt16: return 2;
    case GgufType::kUint32: case GgufType::kInt32: case GgufType::kFloat32: return 4;
    case GgufType::kUint64: case GgufType::kInt64: case GgufType::kFloat64: return 8;
    default: return 0;
  }
}

bool KnownValueType(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::kFloat64); }

template <typename T>
T LoadLE(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // keel targets little-endian hosts only (as the CPU backend does)
  return v;
}

template <typename T>
void PutLE(std::string* out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out->append(b, sizeof(T));
}

void PutString(std::string* out, const std::string& s) {
  PutLE<uint64_t>(out, s.size());
  out->append(s);
}

// Decodes a raw little-endian scalar of type t into v's u/i/f fields.
void SetScalar(GgufValue* v, GgufType t, const uint8_t* p) {
  v->type = t;
  switch (t) {
    case GgufType::kUint8: v->u = p[0]; break;
    case GgufType::kBool: v->u = p[0] != 0; break;
    case GgufType::kInt8: v->i = static_cast<int8_t>(p[0]); break;
    case GgufType::kUint16: v->u = LoadLE<uint16_t>(p); break;
    case GgufType::kInt16: v->i = LoadLE<int16_t>(p); break;
    case GgufType::kUint32: v->u = LoadLE<uint32_t>(p); break;
    case GgufType::kInt32: v->i = LoadLE<int32_t>(p); break;
    case GgufType::kUint64: v->u = LoadLE<uint64_t>(p); break;
    case GgufType::kInt64: v->i = LoadLE<int64_t>(p); break;
    case GgufType::kFloat32: v->f = LoadLE<float>(p); break;
    case GgufType::kFloat64: v->f = LoadLE<double>(p); break;
    default: break;
  }
}

// Appends the raw little-endian bytes of scalar v.
void PutScalar(std::string* out, const GgufValue& v) {
  switch (v.type) {
    case GgufType::kUint8: PutLE<uint8_t>(out, static_cast<uint8_t>(v.u)); break;
    case GgufType::kBool: PutLE<uint8_t>(out, v.u ? 1 : 0); break;
    case GgufType::kInt8: PutLE<int8_t>(out, static_cast<int8_t>(v.i)); break;
    case GgufType::kUint16: PutLE<uint16_t>(out, static_cast<uint16_t>(v.u)); break;
    case GgufType::kInt16: PutLE<int16_t>(out, static_cast<int16_t>(v.i)); break;
    case GgufType::kUint32: PutLE<uint32_t>(out, static_cast<uint32_t>(v.u)); break;
    case GgufType::kInt32: PutLE<int32_t>(out, static_cast<int32_t>(v.i)); break;
    case GgufType::kUint64: PutLE<uint64_t>(out, v.u); break;
    case GgufType::kInt64: PutLE<int64_t>(out, v.i); break;
    case GgufType::kFloat32: PutLE<float>(out, static_cast<float>(v.f)); break;
    case GgufType::kFloat64: PutLE<double>(out, v.f); break;
    default: break;
  }
}

// A bounds-checked read position over the input. Every read checks what is left first.
// The largest metadata value (a string, or an array's bytes) a reader accepts: keel's largest is the embedded
// tokenizer (at most kMaxTokenizerFileBytes, 128 MiB).
constexpr uint64_t kMaxValueBytes = uint64_t{256} << 20;

class Cursor {
 public:
  Cursor(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  size_t pos() const { return pos_; }
  size_t left() const { return n_ - pos_; }
  bool Take(size_t k, const uint8_t** out) {
    if (k > left()) return false;
    *out = p_ + pos_;
    pos_ += k;
    return true;
  }
  template <typename T>
  bool Read(T* v) {
    const uint8_t* q;
    if (!Take(sizeof(T), &q)) return false;
    *v = LoadLE<T>(q);
    return true;
  }
  // A GGUF string: u64 length (at most what is left), then the bytes.
  // Strings longer than kMaxValueBytes fail too: a sparse file can claim (and hold) a 100 GB string, whose
  // copy would end in bad_alloc.
  bool String(std::string* s) {
    uint64_t len;
    if (!Read(&len) || len > left() || len > kMaxValueBytes) return false;
    s->assign(reinterpret_cast<const char*>(p_ + pos_), static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return true;
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
};

std::string Quote(const std::string& s) { return GgufQuote(s); }

}  // namespace

std::string GgufQuote(const std::string& s) {
  // Names come from hostile files: keep error lines printable and short.
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < 64; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      char b[8];
      std::snprintf(b, sizeof(b), "\\x%02X", c);
      out += b;
    }
  }
  if (s.size() > 64) out += "...";
  return out + "'";
}

namespace {

Status ParseValue(Cursor& c, GgufType type, GgufValue* v, const std::string& key) {
  auto truncated = [&] { return Corrupt("truncated value of key " + Quote(key)); };
  if (type == GgufType::kString) {
    v->type = type;
    if (!c.String(&v->str)) return truncated();
    return Status::Ok();
  }
  if (type == GgufType::kArray) {
    uint32_t et;
    uint64_t count;
    if (!c.Read(&et) || !c.Read(&count)) return truncated();
    if (!KnownValueType(et))
      return Corrupt("key " + Quote(key) + " is an array of unknown value type " + std::to_string(et));
    const auto elem = static_cast<GgufType>(et);
    if (elem == GgufType::kArray) return Corrupt("key " + Quote(key) + " is an array of arrays (not supported)");
    v->type = type;
    v->elem_type = elem;
    v->count = count;
    if (elem == GgufType::kString) {
      // Each element takes at least its 8-byte length.
      if (count > c.left() / 8)
        return Corrupt("key " + Quote(key) + ": array of " + std::to_string(count) + " strings does not fit in the file");
      if (count > kMaxValueBytes / 8)
        return Corrupt("key " + Quote(key) + ": array of " + std::to_string(count) + " strings is implausibly large");
      v->strs.resize(static_cast<size_t>(count));
      uint64_t total = 0;
      for (auto& s : v->strs) {
        if (!c.String(&s)) return truncated();
        if ((total += s.size()) > kMaxValueBytes)
          return Corrupt("key " + Quote(key) + ": array of strings is implausibly large");
      }
      return Status::Ok();
    }
    const size_t es = ScalarSize(elem);
    if (count > c.left() / es)
      return Corrupt("key " + Quote(key) + ": array of " + std::to_string(count) + " elements does not fit in the file");
    if (count > kMaxValueBytes / es)
      return Corrupt("key " + Quote(key) + ": array of " + std::to_string(count) + " elements is implausibly large");
    const uint8_t* q = nullptr;
    c.Take(static_cast<size_t>(count) * es, &q);
    v->raw.assign(reinterpret_cast<const char*>(q), static_cast<size_t>(count) * es);
    return Status::Ok();
  }
  const uint8_t* q;
  if (!c.Take(ScalarSize(type), &q)) return truncated();
  SetScalar(v, type, q);
  return Status::Ok();
}

Status ValidateValue(const std::string& key, const GgufValue& v) {
  if (!KnownValueType(static_cast<uint32_t>(v.type))) return InvalidArgument("key '" + key + "': unknown value type");
  if (v.type != GgufType::kArray) return Status::Ok();
  if (v.elem_type == GgufType::kArray || !KnownValueType(static_cast<uint32_t>(v.elem_type)))
    return InvalidArgument("key '" + key + "': arrays must hold scalars or strings");
  if (v.elem_type == GgufType::kString) {
    if (v.strs.size() != v.count) return InvalidArgument("key '" + key + "': count does not match the strings");
  } else if (v.raw.size() / ScalarSize(v.elem_type) != v.count || v.raw.size() % ScalarSize(v.elem_type) != 0) {
    return InvalidArgument("key '" + key + "': count does not match the raw element bytes");
  }
  return Status::Ok();
}

constexpr uint64_t kMaxMetadataKeys = uint64_t{1} << 16;

uint64_t AlignUp(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Types

const char* GgufTypeName(GgufType t) {
  static const char* const kNames[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32",
                                       "bool", "string", "array", "u64", "i64", "f64"};
  const auto i = static_cast<uint32_t>(t);
  return i < 13 ? kNames[i] : "unknown";
}

const char* GgmlTypeName(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return "F32";
    case GgmlType::kF16: return "F16";
    case GgmlType::kQ4_0: return "Q4_0";
    case GgmlType::kQ4_1: return "Q4_1";
    case GgmlType::kQ5_0: return "Q5_0";
    case GgmlType::kQ5_1: return "Q5_1";
    case GgmlType::kQ8_0: return "Q8_0";
    case GgmlType::kQ8_1: return "Q8_1";
    case GgmlType::kI8: return "I8";
    case GgmlType::kI16: return "I16";
    case GgmlType::kI32: return "I32";
    case GgmlType::kI64: return "I64";
    case GgmlType::kF64: return "F64";
    case GgmlType::kBF16: return "BF16";
  }
  return "unknown";
}

std::pair<uint64_t, uint64_t> GgmlBlockInfo(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return {1, 4};
    case GgmlType::kF16: return {1, 2};
    case GgmlType::kBF16: return {1, 2};
    case GgmlType::kQ4_0: return {32, 18};
    case GgmlType::kQ4_1: return {32, 20};
    case GgmlType::kQ5_0: return {32, 22};
    case GgmlType::kQ5_1: return {32, 24};
    case GgmlType::kQ8_0: return {32, 34};
    case GgmlType::kQ8_1: return {32, 36};
    case GgmlType::kI8: return {1, 1};
    case GgmlType::kI16: return {1, 2};
    case GgmlType::kI32: return {1, 4};
    case GgmlType::kI64: return {1, 8};
    case GgmlType::kF64: return {1, 8};
  }
  return {0, 0};
}

std::optional<uint64_t> GgmlNbytes(GgmlType t, uint64_t n) {
  auto [blk, bytes] = GgmlBlockInfo(t);
  if (blk == 0 || n % blk != 0) return std::nullopt;
  const uint64_t blocks = n / blk;
  if (blocks > std::numeric_limits<uint64_t>::max() / bytes) return std::nullopt;
  return blocks * bytes;
}

// ---------------------------------------------------------------------------------------------------------
// Values

GgufValue GgufValue::U32(uint32_t v) { GgufValue x; x.type = GgufType::kUint32; x.u = v; return x; }
GgufValue GgufValue::I32(int32_t v) { GgufValue x; x.type = GgufType::kInt32; x.i = v; return x; }
GgufValue GgufValue::U64(uint64_t v) { GgufValue x; x.type = GgufType::kUint64; x.u = v; return x; }
GgufValue GgufValue::F32(float v) { GgufValue x; x.type = GgufType::kFloat32; x.f = v; return x; }
GgufValue GgufValue::Bool(bool v) { GgufValue x; x.type = GgufType::kBool; x.u = v ? 1 : 0; return x; }
GgufValue GgufValue::Str(std::string v) { GgufValue x; x.type = GgufType::kString; x.str = std::move(v); return x; }

GgufValue GgufValue::StrArray(std::vector<std::string> v) {
  GgufValue x;
  x.type = GgufType::kArray;
  x.elem_type = GgufType::kString;
  x.count = v.size();
  x.strs = std::move(v);
  return x;
}

GgufValue GgufValue::F32Array(const std::vector<float>& v) {
  GgufValue x;
  x.type = GgufType::kArray;
  x.elem_type = GgufType::kFloat32;
  x.count = v.size();
  x.raw.assign(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  return x;
}

GgufValue GgufValue::I32Array(const std::vector<int32_t>& v) {
  GgufValue x;
  x.type = GgufType::kArray;
  x.elem_type = GgufType::kInt32;
  x.count = v.size();
  x.raw.assign(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(int32_t));
  return x;
}

GgufValue GgufValue::U8Array(std::string bytes) {
  GgufValue x;
  x.type = GgufType::kArray;
  x.elem_type = GgufType::kUint8;
  x.count = bytes.size();
  x.raw = std::move(bytes);
  return x;
}

std::optional<uint64_t> GgufValue::AsUint() const {
  switch (type) {
    case GgufType::kUint8: case GgufType::kUint16: case GgufType::kUint32: case GgufType::kUint64:
      return u;
    case GgufType::kInt8: case GgufType::kInt16: case GgufType::kInt32: case GgufType::kInt64:
      if (i < 0) return std::nullopt;
      return static_cast<uint64_t>(i);
    default:
      return std::nullopt;
  }
}

std::optional<double> GgufValue::AsFloat() const {
  if (type == GgufType::kFloat32 || type == GgufType::kFloat64) return f;
  return std::nullopt;
}

std::optional<std::string> GgufValue::AsString() const {
  if (type == GgufType::kString) return str;
  return std::nullopt;
}

std::optional<bool> GgufValue::AsBool() const {
  if (type == GgufType::kBool) return u != 0;
  return std::nullopt;
}

std::optional<std::vector<float>> GgufValue::AsF32Array() const {
  if (type != GgufType::kArray || elem_type != GgufType::kFloat32 || raw.size() / sizeof(float) != count ||
      raw.size() % sizeof(float) != 0)
    return std::nullopt;  // a hand-built value whose raw bytes disagree with its count
  std::vector<float> v(static_cast<size_t>(count));
  if (!v.empty()) std::memcpy(v.data(), raw.data(), v.size() * sizeof(float));
  return v;
}

std::optional<std::vector<int32_t>> GgufValue::AsI32Array() const {
  if (type != GgufType::kArray || elem_type != GgufType::kInt32 || raw.size() / sizeof(int32_t) != count ||
      raw.size() % sizeof(int32_t) != 0)
    return std::nullopt;
  std::vector<int32_t> v(static_cast<size_t>(count));
  if (!v.empty()) std::memcpy(v.data(), raw.data(), v.size() * sizeof(int32_t));
  return v;
}

const std::vector<std::string>* GgufValue::AsStringArray() const {
  return type == GgufType::kArray && elem_type == GgufType::kString ? &strs : nullptr;
}

const std::string* GgufValue::AsU8Array() const {
  return type == GgufType::kArray && (elem_type == GgufType::kUint8 || elem_type == GgufType::kInt8) ? &raw : nullptr;
}

// ---------------------------------------------------------------------------------------------------------
// Writing

Result<std::string> EncodeGguf(const GgufMetadata& metadata, const std::vector<GgufTensorIn>& tensors,
                               uint32_t alignment) {
  std::set<std::string> keys;
  for (const auto& [key, v] : metadata) {
    if (key.empty()) return InvalidArgument("gguf encode: empty metadata key");
    if (!keys.insert(key).second) return InvalidArgument("gguf encode: duplicate metadata key '" + key + "'");
    KEEL_RETURN_IF_ERROR(ValidateValue(key, v).Wrap("gguf encode"));
    if (key == "general.alignment") {
      if (v.type != GgufType::kUint32 || !IsPow2(v.u))
        return InvalidArgument("gguf encode: general.alignment must be a u32 power of two");
      if (v.u != alignment)
        return InvalidArgument("gguf encode: general.alignment " + std::to_string(v.u) +
                               " does not match the alignment argument " + std::to_string(alignment));
    }
  }
  if (!IsPow2(alignment)) return InvalidArgument("gguf encode: alignment must be a power of two");

  std::set<std::string> names;
  std::vector<uint64_t> offsets;
  uint64_t data_size = 0;
  for (const auto& t : tensors) {
    const std::string what = "gguf encode: tensor '" + t.name + "'";
    if (t.name.empty()) return InvalidArgument("gguf encode: empty tensor name");
    if (!names.insert(t.name).second) return InvalidArgument(what + " appears twice");
    if (t.ne.empty() || t.ne.size() > static_cast<size_t>(kGgufMaxDims))
      return InvalidArgument(what + " must have 1 to 4 dimensions");
    uint64_t n = 1;
    for (uint64_t d : t.ne) {
      if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) || (d != 0 && n > UINT64_MAX / d))
        return InvalidArgument(what + " is too large");
      n *= d;
    }
    auto nb = GgmlNbytes(t.type, n);
    if (!nb || t.ne[0] % GgmlBlockInfo(t.type).first != 0)
      return InvalidArgument(what + ": shape does not fit type " + GgmlTypeName(t.type));
    if (*nb != t.nbytes)
      return InvalidArgument(what + " has " + std::to_string(t.nbytes) + " bytes, its type and shape need " +
                             std::to_string(*nb));
    if (t.nbytes > 0 && !t.data) return InvalidArgument(what + " has no data");
    offsets.push_back(data_size);
    data_size += AlignUp(t.nbytes, alignment);
  }

  std::string out;
  PutLE<uint32_t>(&out, kMagic);
  PutLE<uint32_t>(&out, kGgufVersion);
  PutLE<uint64_t>(&out, tensors.size());
  PutLE<uint64_t>(&out, metadata.size());
  for (const auto& [key, v] : metadata) {
    PutString(&out, key);
    PutLE<uint32_t>(&out, static_cast<uint32_t>(v.type));
    if (v.type == GgufType::kString) {
      PutString(&out, v.str);
    } else if (v.type == GgufType::kArray) {
      PutLE<uint32_t>(&out, static_cast<uint32_t>(v.elem_type));
      PutLE<uint64_t>(&out, v.count);
      if (v.elem_type == GgufType::kString) {
        for (const auto& s : v.strs) PutString(&out, s);
      } else if (v.elem_type == GgufType::kBool) {
        for (char b : v.raw) PutLE<uint8_t>(&out, b != 0 ? 1 : 0);
      } else {
        out.append(v.raw);
      }
    } else {
      PutScalar(&out, v);
    }
  }
  for (size_t k = 0; k < tensors.size(); ++k) {
    const auto& t = tensors[k];
    PutString(&out, t.name);
    PutLE<uint32_t>(&out, static_cast<uint32_t>(t.ne.size()));
    for (uint64_t d : t.ne) PutLE<uint64_t>(&out, d);
    PutLE<uint32_t>(&out, static_cast<uint32_t>(t.type));
    PutLE<uint64_t>(&out, offsets[k]);
  }
  const size_t data_start = AlignUp(out.size(), alignment);
  out.reserve(data_start + data_size);
  out.resize(data_start, '\0');
  for (const auto& t : tensors) {
    if (t.nbytes > 0) out.append(static_cast<const char*>(t.data), t.nbytes);
    out.resize(AlignUp(out.size() - data_start, alignment) + data_start, '\0');
  }
  return out;
}

Status WriteGgufFile(const std::string& path, const GgufMetadata& metadata, const std::vector<GgufTensorIn>& tensors,
                     uint32_t alignment) {
  auto bytes = EncodeGguf(metadata, tensors, alignment);
  if (!bytes.ok()) return bytes.status().Wrap(path);
  return WriteFileAtomic(path, *bytes);  // removes its own temporary on failure, and nothing else
}

// ---------------------------------------------------------------------------------------------------------
// Reading

Result<GgufFile> GgufFile::Open(const std::string& path) {
  auto m = DefaultEnv()->Map(path);
  if (!m.ok()) return m.status();
  GgufFile f;
  f.source_ = path;
  f.map_ = std::move(m).value();
  const uint8_t* data = f.map_.data();
  const size_t size = f.map_.size();
  return Parse(std::move(f), data, size);
}

Result<GgufFile> GgufFile::FromBytes(std::string bytes, std::string source_name) {
  GgufFile f;
  f.source_ = std::move(source_name);
  f.bytes_ = std::make_unique<std::string>(std::move(bytes));
  const auto* data = reinterpret_cast<const uint8_t*>(f.bytes_->data());
  const size_t size = f.bytes_->size();
  return Parse(std::move(f), data, size);
}

Result<GgufFile> GgufFile::Parse(GgufFile f, const uint8_t* data, size_t size) {
  const std::string src = f.source_;
  auto bad = [&](const std::string& what) { return Corrupt(src + ": " + what); };
  Cursor c(data, size);
  uint32_t magic = 0, version = 0;
  if (!c.Read(&magic) || magic != kMagic) return bad("not a GGUF file (bad magic)");
  if (!c.Read(&version)) return bad("truncated header");
  if (version != 2 && version != 3) {
    if ((version & 0xFFFF) == 0 && version != 0) return bad("big-endian GGUF files are not supported");
    return bad("unsupported GGUF version " + std::to_string(version) + " (keel reads versions 2 and 3)");
  }
  f.version_ = version;
  uint64_t n_tensors = 0, n_kv = 0;
  if (!c.Read(&n_tensors) || !c.Read(&n_kv)) return bad("truncated header");
  // Smallest possible entries: a kv is an 8-byte key length + 4-byte type + 1-byte value; a tensor info is
  // an 8-byte name length + 4-byte n_dims + 4-byte type + 8-byte offset.
  if (n_kv > c.left() / 13) return bad("metadata count " + std::to_string(n_kv) + " does not fit in the file");
  // Real files carry tens of keys; each costs ~250 bytes of memory against 13 in the file, so a bound keeps a
  // crafted file's memory use a small multiple of its size.
  if (n_kv > kMaxMetadataKeys)
    return bad("metadata count " + std::to_string(n_kv) + " is implausible (at most " +
               std::to_string(kMaxMetadataKeys) + ")");
  if (n_tensors > c.left() / 24) return bad("tensor count " + std::to_string(n_tensors) + " does not fit in the file");

  // Counts are only bounded by the file size, and an entry in memory is far larger than its smallest encoding:
  // reserve a bounded amount and let the vectors grow with what actually parses.
  constexpr uint64_t kMaxReserve = 4096;
  std::unordered_map<std::string, size_t>& key_index = f.key_index_;
  f.metadata_.reserve(static_cast<size_t>(std::min(n_kv, kMaxReserve)));
  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key;
    if (!c.String(&key)) return bad("truncated metadata key " + std::to_string(k));
    if (key_index.count(key)) return bad("duplicate metadata key " + Quote(key));
    uint32_t type;
    if (!c.Read(&type)) return bad("truncated metadata key " + Quote(key));
    if (!KnownValueType(type)) return bad("metadata key " + Quote(key) + " has unknown type " + std::to_string(type));
    GgufValue v;
    Status s = ParseValue(c, static_cast<GgufType>(type), &v, key);
    if (!s.ok()) return s.Wrap(src);
    key_index[key] = f.metadata_.size();
    f.metadata_.emplace_back(std::move(key), std::move(v));
  }
  if (auto it = key_index.find("general.alignment"); it != key_index.end()) {
    const GgufValue& v = f.metadata_[it->second].second;
    if (v.type != GgufType::kUint32) return bad("general.alignment is not a u32");
    if (!IsPow2(v.u)) return bad("general.alignment " + std::to_string(v.u) + " is not a power of two");
    f.alignment_ = static_cast<uint32_t>(v.u);
  }

  f.tensors_.reserve(static_cast<size_t>(std::min(n_tensors, kMaxReserve)));
  uint64_t next_offset = 0;  // where the next tensor's data must start
  for (uint64_t k = 0; k < n_tensors; ++k) {
    GgufTensorInfo t;
    if (!c.String(&t.name)) return bad("truncated tensor info " + std::to_string(k));
    const std::string what = "tensor " + Quote(t.name);
    if (!f.tensor_index_.emplace(t.name, f.tensors_.size()).second) return bad("duplicate " + what);
    uint32_t n_dims;
    if (!c.Read(&n_dims)) return bad("truncated " + what);
    if (n_dims > static_cast<uint32_t>(kGgufMaxDims))
      return bad(what + " has " + std::to_string(n_dims) + " dimensions (at most 4)");
    t.nelements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t ne;
      if (!c.Read(&ne)) return bad("truncated " + what);
      if (ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (ne != 0 && t.nelements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / ne))
        return bad(what + " has an implausible shape");
      t.nelements *= ne;
      t.ne.push_back(ne);
    }
    uint32_t type;
    if (!c.Read(&type) || !c.Read(&t.offset)) return bad("truncated " + what);
    t.type = static_cast<GgmlType>(type);
    const auto [blk, blk_bytes] = GgmlBlockInfo(t.type);
    if (blk == 0) return bad(what + " has unknown or unsupported tensor type " + std::to_string(type));
    if (!t.ne.empty() && t.ne[0] % blk != 0)
      return bad(what + ": row length " + std::to_string(t.ne[0]) + " is not a multiple of the " +
                 GgmlTypeName(t.type) + " block size");
    auto nb = GgmlNbytes(t.type, t.nelements);
    if (!nb) return bad(what + " has an implausible shape");
    t.nbytes = *nb;
    if (t.offset % f.alignment_ != 0)
      return bad(what + " data offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
                 std::to_string(f.alignment_));
    // Tensors lie back to back in the order of their infos, each padded to the alignment, as ggml writes them
    // and llama.cpp's loader demands. Besides matching that loader, this makes a flipped type bit (F32 -> F16
    // or Q8_0 shrinks a tensor) an error rather than a model decoded from the wrong bytes.
    if (t.offset != next_offset)
      return bad(what + " data offset " + std::to_string(t.offset) + ", expected " + std::to_string(next_offset) +
                 " (tensors lie back to back)");
    next_offset += AlignUp(t.nbytes, f.alignment_);
    f.tensors_.push_back(std::move(t));
  }

  // The data section starts at the next multiple of the alignment (it may be absent if there are no tensors).
  f.data_offset_ = AlignUp(c.pos(), f.alignment_);
  f.size_ = size;
  const uint64_t data_size = f.data_offset_ <= size ? size - f.data_offset_ : 0;
  // Nor is there room after the last tensor for more than its padding (a shrunken last tensor).
  if (next_offset <= data_size && data_size - next_offset >= f.alignment_)
    return bad(std::to_string(data_size - next_offset) + " bytes follow the last tensor's data");
  for (auto& t : f.tensors_) {
    if (t.nbytes == 0) {
      t.file_offset = f.data_offset_;
      continue;
    }
    if (f.data_offset_ > size || t.offset > data_size || t.nbytes > data_size - t.offset)
      return bad("tensor " + Quote(t.name) + " data (" + std::to_string(t.nbytes) + " bytes at offset " +
                 std::to_string(t.offset) + ") lies past the end of the file (truncated?)");
    t.file_offset = f.data_offset_ + t.offset;
    t.data = data + t.file_offset;
  }
  // No two tensors may share bytes.
  std::vector<const GgufTensorInfo*> order;
  for (const auto& t : f.tensors_)
    if (t.nbytes > 0) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < order.size(); ++k)
    if (order[k - 1]->offset + order[k - 1]->nbytes > order[k]->offset)
      return bad("tensors " + Quote(order[k - 1]->name) + " and " + Quote(order[k]->name) + " overlap");
  return f;
}

const GgufValue* GgufFile::FindKey(const std::string& key) const {
  auto it = key_index_.find(key);
  return it == key_index_.end() ? nullptr : &metadata_[it->second].second;
}

const GgufTensorInfo* GgufFile::FindTensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

Result<std::vector<float>> GgufFile::ReadF32(const std::string& name) const {
  const GgufTensorInfo* t = FindTensor(name);
  if (!t) return NotFound(source_ + ": no tensor '" + name + "'");
  if (t->nelements > (uint64_t{1} << 40)) return Corrupt(source_ + ": tensor '" + name + "' is implausibly large");
  const size_t n = static_cast<size_t>(t->nelements);
  std::vector<float> out(n);
  switch (t->type) {
    case GgmlType::kF32:
      if (n) std::memcpy(out.data(), t->data, n * sizeof(float));
      break;
    case GgmlType::kF16:
    case GgmlType::kBF16: {
      std::vector<uint16_t> h(n);
      if (n) std::memcpy(h.data(), t->data, n * sizeof(uint16_t));
      if (t->type == GgmlType::kF16)
        F16ToFloatN(h.data(), out.data(), n);
      else
        BF16ToFloatN(h.data(), out.data(), n);
      break;
    }
    case GgmlType::kQ8_0:
      DequantizeQ8_0(t->data, out.data(), n);
      break;
    default:
      return InvalidArgument(source_ + ": tensor '" + name + "' has type " + GgmlTypeName(t->type) +
                             ", which keel cannot decode (F32, F16, BF16, Q8_0)");
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Q8_0

std::string QuantizeQ8_0(const float* x, size_t n) {
  const size_t nb = n / kQ8_0BlockSize;
  std::string out(nb * kQ8_0BlockBytes, '\0');
  for (size_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQ8_0BlockSize;
    float amax = 0.0f;
    for (size_t j = 0; j < kQ8_0BlockSize; ++j) amax = std::max(amax, std::fabs(xb[j]));  // NaN is skipped
    const float d = amax / 127.0f;
    const float id = d != 0.0f && std::isfinite(d) ? 1.0f / d : 0.0f;
    char* ob = out.data() + b * kQ8_0BlockBytes;
    const uint16_t dh = FloatToF16(d);
    std::memcpy(ob, &dh, 2);
    for (size_t j = 0; j < kQ8_0BlockSize; ++j) {
      const float v = xb[j] * id;
      const float q = std::isfinite(v) ? std::round(std::clamp(v, -127.0f, 127.0f)) : 0.0f;
      ob[2 + j] = static_cast<char>(static_cast<int8_t>(q));
    }
  }
  return out;
}

void DequantizeQ8_0(const uint8_t* blocks, float* out, size_t n) {
  const size_t nb = n / kQ8_0BlockSize;
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* ib = blocks + b * kQ8_0BlockBytes;
    uint16_t dh;
    std::memcpy(&dh, ib, 2);
    const float d = F16ToFloat(dh);
    for (size_t j = 0; j < kQ8_0BlockSize; ++j)
      out[b * kQ8_0BlockSize + j] = static_cast<float>(static_cast<int8_t>(ib[2 + j])) * d;
  }
}

}  // namespace keel
