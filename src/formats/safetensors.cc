// safetensors.cc: the safetensors encoder and a hostile-input-safe parser.
// The parser streams the JSON header through a SAX handler that accepts only the expected shape of
// document, then checks the layout of the data buffer.
#include "formats/safetensors.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "formats/half.h"

namespace keel {

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // 100 MiB
constexpr size_t kMaxRank = 64;
constexpr int kMaxSkipDepth = 64;
const char kMetadataKey[] = "__metadata__";

// Makes untrusted text safe to embed in a one-line error: escapes control bytes, caps the length.
std::string Printable(const std::string& s, size_t max_len = 120) {
  std::string out;
  for (size_t i = 0; i < s.size() && i < max_len; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      static const char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > max_len) out += "...";
  return out;
}

// Appends rather than `"'" + ...`: GCC 12 misreports that form under -Wrestrict (a known false positive).
std::string Quote(const std::string& name) {
  std::string out = "'";
  out += Printable(name);
  out += '\'';
  return out;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Number of elements of shape, or false on a negative dimension or overflow past 2^64.
bool NumElements(const std::vector<int64_t>& shape, uint64_t* out) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
  }
  *out = n;
  return true;
}

struct RawEntry {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t offsets[2] = {0, 0};
  int n_offsets = 0;
  bool has_dtype = false, has_shape = false, has_offsets = false;
  size_t order = 0;  // position in the header
};

// SAX handler for the header. It accepts exactly
//   { "__metadata__": {str: str, ...}, name: {"dtype": str, "shape": [uint...], "data_offsets": [u, u],
//     other keys ignored}, ... }
// and stops at the first deviation, recording a one-line reason. Memory is bounded by what it keeps.
class HeaderSax {
 public:
  using json = nlohmann::json;

  std::string error;
  std::map<std::string, std::string> metadata;
  std::vector<RawEntry> entries;

  bool null() { return Scalar(kNull, nullptr); }
  bool boolean(bool) { return Scalar(kOther, nullptr); }
  bool number_integer(json::number_integer_t v) {
    if (v < 0) return Scalar(kNegative, nullptr);
    return Unsigned(static_cast<uint64_t>(v));
  }
  bool number_unsigned(json::number_unsigned_t v) { return Unsigned(v); }
  bool number_float(json::number_float_t, const json::string_t&) { return Scalar(kFloat, nullptr); }
  bool string(json::string_t& s) { return Scalar(kString, &s); }
  bool binary(json::binary_t&) { return Scalar(kOther, nullptr); }

  bool start_object(std::size_t) {
    switch (state_) {
      case kTop: state_ = kTopObj; return true;
      case kTopVal:
        if (top_key_ == kMetadataKey) {
          state_ = kMeta;
        } else {
          cur_ = RawEntry();
          cur_.name = top_key_;
          cur_.order = entries.size();
          state_ = kEntry;
        }
        return true;
      case kEntryVal:
        if (field_ == kFieldOther) return BeginSkip();
        return FieldTypeError();
      case kSkip: return Deeper();
      default: return NotAllowed("an object");
    }
  }
  bool start_array(std::size_t) {
    switch (state_) {
      case kEntryVal:
        if (field_ == kFieldShape) { state_ = kShape; return true; }
        if (field_ == kFieldOffsets) { state_ = kOffsets; return true; }
        if (field_ == kFieldOther) return BeginSkip();
        return FieldTypeError();
      case kSkip: return Deeper();
      default: return NotAllowed("an array");
    }
  }
  bool key(json::string_t& k) {
    switch (state_) {
      case kTopObj:
        if (!top_keys_.insert(k).second) {
          return Fail(k == kMetadataKey ? "duplicate __metadata__" : "duplicate tensor name " + Quote(k));
        }
        top_key_ = k;
        state_ = kTopVal;
        return true;
      case kMeta:
        if (metadata.count(k)) return Fail("duplicate __metadata__ key " + Quote(k));
        meta_key_ = k;
        state_ = kMetaVal;
        return true;
      case kEntry: {
        bool* seen = nullptr;
        if (k == "dtype") { field_ = kFieldDtype; seen = &cur_.has_dtype; }
        else if (k == "shape") { field_ = kFieldShape; seen = &cur_.has_shape; }
        else if (k == "data_offsets") { field_ = kFieldOffsets; seen = &cur_.has_offsets; }
        else field_ = kFieldOther;
        if (seen) {
          if (*seen) return Fail("tensor " + Quote(cur_.name) + ": duplicate key '" + k + "'");
          *seen = true;
        }
        state_ = kEntryVal;
        return true;
      }
      case kSkip: return true;
      default: return Fail("unexpected key");
    }
  }
  bool end_object() {
    switch (state_) {
      case kTopObj: state_ = kDone; return true;
      case kMeta: state_ = kTopObj; return true;
      case kEntry:
        if (!cur_.has_dtype) return Fail("tensor " + Quote(cur_.name) + ": missing dtype");
        if (!cur_.has_shape) return Fail("tensor " + Quote(cur_.name) + ": missing shape");
        if (!cur_.has_offsets) return Fail("tensor " + Quote(cur_.name) + ": missing data_offsets");
        entries.push_back(std::move(cur_));
        state_ = kTopObj;
        return true;
      case kSkip: return Shallower();
      default: return Fail("unexpected end of object");
    }
  }
  bool end_array() {
    switch (state_) {
      case kShape: state_ = kEntry; return true;
      case kOffsets:
        if (cur_.n_offsets != 2) return OffsetsCountError();
        state_ = kEntry;
        return true;
      case kSkip: return Shallower();
      default: return Fail("unexpected end of array");
    }
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& ex) {
    return Fail(std::string("invalid JSON header: ") + ex.what());
  }

 private:
  enum State { kTop, kTopObj, kTopVal, kMeta, kMetaVal, kEntry, kEntryVal, kShape, kOffsets, kSkip, kDone };
  enum Field { kFieldDtype, kFieldShape, kFieldOffsets, kFieldOther };
  enum ScalarKind { kNull, kNegative, kFloat, kString, kOther };

  bool Fail(std::string msg) {
    if (error.empty()) error = Printable(msg, 400);
    return false;
  }
  std::string Where() const { return "tensor " + Quote(cur_.name); }
  bool FieldTypeError() {
    switch (field_) {
      case kFieldDtype: return Fail(Where() + ": dtype is not a string");
      case kFieldShape: return Fail(Where() + ": shape is not an array");
      default: return Fail(Where() + ": data_offsets is not an array");
    }
  }
  bool OffsetsCountError() { return Fail(Where() + ": data_offsets must have exactly 2 entries"); }
  bool NotAllowed(const char* what) {
    switch (state_) {
      case kTop: return Fail("header is not a JSON object");
      case kTopVal:
        return Fail(top_key_ == kMetadataKey ? std::string("__metadata__ is not an object")
                                             : "tensor " + Quote(top_key_) + ": entry is not an object");
      case kMetaVal: return Fail("__metadata__ value for " + Quote(meta_key_) + " is not a string");
      case kShape: return Fail(Where() + ": shape contains " + what + ", not an integer");
      case kOffsets: return Fail(Where() + ": data_offsets contains " + what + ", not an integer");
      case kDone: return Fail("content after the header object");
      default: return Fail(std::string("unexpected ") + what);
    }
  }
  bool BeginSkip() {
    skip_depth_ = 1;
    state_ = kSkip;
    return true;
  }
  bool Deeper() {
    if (++skip_depth_ > kMaxSkipDepth) return Fail(Where() + ": nesting too deep");
    return true;
  }
  bool Shallower() {
    if (--skip_depth_ == 0) state_ = kEntry;
    return true;
  }
  bool Unsigned(uint64_t v) {
    if (state_ == kShape) {
      if (cur_.shape.size() >= kMaxRank) return Fail(Where() + ": shape has more than 64 dimensions");
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Fail(Where() + ": shape dimension " + std::to_string(v) + " too large");
      }
      cur_.shape.push_back(static_cast<int64_t>(v));
      return true;
    }
    if (state_ == kOffsets) {
      if (cur_.n_offsets >= 2) return OffsetsCountError();
      cur_.offsets[cur_.n_offsets++] = v;
      return true;
    }
    return Scalar(kOther, nullptr);
  }
  bool Scalar(ScalarKind kind, json::string_t* s) {
    switch (state_) {
      case kMetaVal:
        if (kind != kString) return NotAllowed("a non-string");
        metadata.emplace(meta_key_, std::move(*s));
        state_ = kMeta;
        return true;
      case kEntryVal:
        if (field_ == kFieldOther) { state_ = kEntry; return true; }
        if (field_ == kFieldDtype && kind == kString) {
          cur_.dtype = std::move(*s);
          state_ = kEntry;
          return true;
        }
        return FieldTypeError();
      case kShape:
        if (kind == kNegative) return Fail(Where() + ": negative dimension in shape");
        return NotAllowed(kind == kFloat ? "a non-integer number" : "a non-number");
      case kOffsets:
        if (kind == kNegative) return Fail(Where() + ": negative data offset");
        return NotAllowed(kind == kFloat ? "a non-integer number" : "a non-number");
      case kSkip: return true;
      default: return NotAllowed("a scalar");
    }
  }

  State state_ = kTop;
  Field field_ = kFieldOther;
  int skip_depth_ = 0;
  std::string top_key_, meta_key_;
  std::set<std::string> top_keys_;
  RawEntry cur_;
};

uint64_t LoadLE64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

size_t SafetensorsDtypeSize(const std::string& dtype) {
  if (dtype == "F32" || dtype == "I32") return 4;
  if (dtype == "F16" || dtype == "BF16") return 2;
  if (dtype == "I64" || dtype == "F64") return 8;
  if (dtype == "U8") return 1;
  return 0;
}

Result<std::string> EncodeSafetensors(const std::vector<TensorView>& tensors,
                                      const std::map<std::string, std::string>& metadata) {
  const std::string where = "safetensors encode";
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header[kMetadataKey] = std::move(meta);
  }
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const TensorView& t : tensors) {
    const std::string tw = where + ": tensor " + Quote(t.name);
    if (t.name.empty()) return InvalidArgument(where + ": empty tensor name");
    if (t.name == kMetadataKey) return InvalidArgument(tw + ": name is reserved");
    if (!seen.insert(t.name).second) return InvalidArgument(where + ": duplicate tensor name " + Quote(t.name));
    const size_t esize = SafetensorsDtypeSize(t.dtype);
    if (esize == 0) return InvalidArgument(tw + ": unsupported dtype " + Quote(t.dtype));
    uint64_t n = 0, bytes = 0;
    if (!NumElements(t.shape, &n) || __builtin_mul_overflow(n, esize, &bytes)) {
      return InvalidArgument(tw + ": invalid shape " + ShapeString(t.shape));
    }
    if (bytes != t.nbytes) {
      return InvalidArgument(tw + ": nbytes " + std::to_string(t.nbytes) + " but shape " + ShapeString(t.shape) +
                             " of " + t.dtype + " needs " + std::to_string(bytes));
    }
    if (bytes > 0 && t.data == nullptr) return InvalidArgument(tw + ": null data");
    uint64_t end = 0;
    if (__builtin_add_overflow(offset, bytes, &end)) return InvalidArgument(tw + ": total size overflows");
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, end}}};
    offset = end;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception&) {
    return InvalidArgument(where + ": a tensor name or metadata string is not valid UTF-8");
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  if (offset > std::numeric_limits<size_t>::max() - 8 - text.size()) {
    return InvalidArgument(where + ": file too large for memory");
  }
  std::string out;
  out.reserve(8 + text.size() + offset);
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += text;
  for (const TensorView& t : tensors) {
    if (t.nbytes) out.append(static_cast<const char*>(t.data), t.nbytes);
  }
  return out;
}

Status WriteSafetensors(const std::string& path, const std::vector<TensorView>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  Result<std::string> bytes = EncodeSafetensors(tensors, metadata);
  if (!bytes.ok()) return bytes.status().Wrap(path);
  return WriteFileAtomic(path, bytes.value());
}

Result<SafetensorsFile> SafetensorsFile::Open(const std::string& path) {
  KEEL_ASSIGN_OR_RETURN(MappedFile map, DefaultEnv()->Map(path));
  SafetensorsFile f;
  f.source_ = path;
  f.map_ = std::move(map);
  const uint8_t* data = f.map_.data();
  const size_t size = f.map_.size();
  return Parse(std::move(f), data, size);
}

Result<SafetensorsFile> SafetensorsFile::FromBytes(std::string bytes, std::string source_name) {
  SafetensorsFile f;
  f.source_ = std::move(source_name);
  f.bytes_ = std::make_unique<std::string>(std::move(bytes));
  const uint8_t* data = reinterpret_cast<const uint8_t*>(f.bytes_->data());
  const size_t size = f.bytes_->size();
  return Parse(std::move(f), data, size);
}

Result<SafetensorsFile> SafetensorsFile::Parse(SafetensorsFile f, const uint8_t* data, size_t size) {
  const std::string& src = f.source_;
  if (size < 8) {
    return Corrupt(src + ": file too short for a safetensors header (" + std::to_string(size) + " bytes)");
  }
  const uint64_t hlen = LoadLE64(data);
  if (hlen > kMaxHeaderBytes) {
    return Corrupt(src + ": header length " + std::to_string(hlen) + " exceeds the 100 MiB limit (not a safetensors file?)");
  }
  if (hlen > size - 8) {
    return Corrupt(src + ": header length " + std::to_string(hlen) + " exceeds file size " + std::to_string(size) +
                   " (truncated?)");
  }
  const char* hbegin = reinterpret_cast<const char*>(data + 8);
  HeaderSax sax;
  bool parsed = false;
  try {
    parsed = nlohmann::json::sax_parse(hbegin, hbegin + hlen, &sax, nlohmann::json::input_format_t::json,
                                       /*strict=*/true, /*ignore_comments=*/false);
  } catch (const std::exception& e) {
    return Corrupt(src + ": cannot parse header: " + Printable(e.what(), 300));
  }
  if (!parsed) return Corrupt(src + ": " + (sax.error.empty() ? std::string("invalid JSON header") : sax.error));

  const uint8_t* buf = data + 8 + hlen;
  const uint64_t buf_size = size - 8 - hlen;
  std::vector<TensorView> views;
  views.reserve(sax.entries.size());
  std::vector<size_t> order(sax.entries.size());
  for (size_t i = 0; i < sax.entries.size(); ++i) {
    const RawEntry& e = sax.entries[i];
    const std::string tw = src + ": tensor " + Quote(e.name);
    const size_t esize = SafetensorsDtypeSize(e.dtype);
    if (esize == 0) return Corrupt(tw + ": unknown dtype " + Quote(e.dtype));
    uint64_t n = 0, need = 0;
    if (!NumElements(e.shape, &n) || __builtin_mul_overflow(n, esize, &need)) {
      return Corrupt(tw + ": shape " + ShapeString(e.shape) + " overflows");
    }
    const uint64_t b = e.offsets[0], en = e.offsets[1];
    if (en < b) {
      return Corrupt(tw + ": data_offsets [" + std::to_string(b) + ", " + std::to_string(en) + "] end before begin");
    }
    if (en > buf_size) {
      return Corrupt(tw + ": data_offsets [" + std::to_string(b) + ", " + std::to_string(en) +
                     "] out of range (data buffer is " + std::to_string(buf_size) + " bytes; truncated?)");
    }
    if (en - b != need) {
      return Corrupt(tw + ": " + std::to_string(en - b) + " bytes but shape " + ShapeString(e.shape) + " of " +
                     e.dtype + " needs " + std::to_string(need));
    }
    views.push_back(TensorView{e.name, e.dtype, e.shape, buf + b, static_cast<size_t>(en - b)});
    order[i] = i;
  }
  // File order: by begin offset, then end (empty tensors first), then header order. The buffer must be
  // covered exactly: each tensor starts where the previous ended and the last ends at the buffer's end.
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const RawEntry& x = sax.entries[a];
    const RawEntry& y = sax.entries[b];
    if (x.offsets[0] != y.offsets[0]) return x.offsets[0] < y.offsets[0];
    if (x.offsets[1] != y.offsets[1]) return x.offsets[1] < y.offsets[1];
    return x.order < y.order;
  });
  uint64_t pos = 0;
  const RawEntry* prev = nullptr;
  for (size_t i : order) {
    const RawEntry& e = sax.entries[i];
    if (e.offsets[0] < pos) {
      return Corrupt(src + ": tensor " + Quote(e.name) + " overlaps tensor " + Quote(prev->name));
    }
    if (e.offsets[0] > pos) {
      return Corrupt(src + ": hole of " + std::to_string(e.offsets[0] - pos) + " bytes before tensor " +
                     Quote(e.name) + " at data offset " + std::to_string(pos));
    }
    pos = e.offsets[1];
    prev = &e;
  }
  if (pos != buf_size) {
    return Corrupt(src + ": " + std::to_string(buf_size - pos) +
                   " bytes after the last tensor (data buffer not fully covered)");
  }
  f.metadata_ = std::move(sax.metadata);
  f.tensors_.reserve(views.size());
  for (size_t i : order) {
    f.index_.emplace(views[i].name, f.tensors_.size());
    f.tensors_.push_back(std::move(views[i]));
  }
  return f;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const TensorView& t : tensors_) out.push_back(t.name);
  return out;
}

const TensorView* SafetensorsFile::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Result<std::vector<float>> SafetensorsFile::ReadF32(const std::string& name) const {
  const TensorView* t = Find(name);
  if (!t) return NotFound(source_ + ": no tensor " + Quote(name));
  const uint8_t* p = static_cast<const uint8_t*>(t->data);
  if (t->dtype == "F32") {
    std::vector<float> out(t->nbytes / 4);
    if (t->nbytes) std::memcpy(out.data(), p, out.size() * 4);
    return out;
  }
  const bool f16 = t->dtype == "F16";
  if (!f16 && t->dtype != "BF16") {
    return InvalidArgument(source_ + ": tensor " + Quote(name) + " has dtype " + t->dtype +
                           ", not F32/F16/BF16");
  }
  std::vector<float> out(t->nbytes / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    out[i] = f16 ? F16ToFloat(h) : BF16ToFloat(h);
  }
  return out;
}

}  // namespace keel
