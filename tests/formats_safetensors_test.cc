// formats_safetensors_test.cc: tests of the safetensors reader/writer (formats/safetensors.h).
// Round trips for every dtype, F32 conversion, encoder validation, and the parser against corrupt and
// hostile files (truncation, bad headers, bad layouts, random bit flips): each must give a one-line
// error naming the source, or a self-consistent parse.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "core/hash.h"
#include "formats/half.h"
#include "formats/safetensors.h"
#include "test_util.h"

namespace keel {
namespace {

using keel::testing::TempDir;

template <typename T>
std::string Raw(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// A safetensors file from a literal header (no padding added) and a data buffer.
std::string MakeFile(const std::string& header, const std::string& data) {
  std::string out;
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  return out + header + data;
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// Expects a kCorrupt one-line error starting with "<bytes>: " and containing `needle`.
void ExpectCorrupt(const std::string& file, const std::string& needle) {
  Result<SafetensorsFile> r = SafetensorsFile::FromBytes(file);
  ASSERT_FALSE(r.ok()) << "parsed, expected error containing: " << needle;
  EXPECT_EQ(r.status().code(), Code::kCorrupt) << r.status().message();
  const std::string& m = r.status().message();
  EXPECT_EQ(m.rfind("<bytes>: ", 0), 0u) << m;
  EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  EXPECT_NE(m.find(needle), std::string::npos) << "message: " << m << "\nexpected to contain: " << needle;
}

struct Fixture {
  std::vector<float> f32 = {1.5f, -2.25f, 3.0f, 0.0f, 1e-3f, 42.0f};
  std::vector<uint16_t> f16, bf16;
  std::vector<int32_t> i32 = {-1, 0, 7, 2147483647};
  std::vector<int64_t> i64 = {-9000000000000LL, 5};
  std::vector<uint8_t> u8 = {0, 1, 2, 255, 128};
  std::vector<double> f64 = {3.141592653589793, -1e300, 0.1};
  std::vector<TensorView> tensors;
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"step", "120"}, {"note", "h\xc3\xa9llo \"q\""},
                                             {"empty", ""}};
  Fixture() {
    for (float x : f32) f16.push_back(FloatToF16(x)), bf16.push_back(FloatToBF16(x));
    tensors = {
        {"w.f32", "F32", {2, 3}, f32.data(), f32.size() * 4},
        {"w.f16", "F16", {3, 2}, f16.data(), f16.size() * 2},
        {"w.bf16", "BF16", {6}, bf16.data(), bf16.size() * 2},
        {"ids", "I32", {4}, i32.data(), i32.size() * 4},
        {"big", "I64", {1, 2}, i64.data(), i64.size() * 8},
        {"bytes", "U8", {5}, u8.data(), u8.size()},
        {"d", "F64", {3}, f64.data(), f64.size() * 8},
        {"scalar", "F32", {}, f32.data(), 4},
        {"empty", "F32", {0, 4}, nullptr, 0},
    };
  }
};

void ExpectSameTensors(const SafetensorsFile& f, const std::vector<TensorView>& want) {
  std::vector<std::string> names;
  for (const TensorView& t : want) names.push_back(t.name);
  EXPECT_EQ(f.names(), names);
  for (const TensorView& t : want) {
    const TensorView* g = f.Find(t.name);
    ASSERT_NE(g, nullptr) << t.name;
    EXPECT_EQ(g->name, t.name);
    EXPECT_EQ(g->dtype, t.dtype);
    EXPECT_EQ(g->shape, t.shape);
    ASSERT_EQ(g->nbytes, t.nbytes);
    if (t.nbytes) {
      EXPECT_EQ(std::memcmp(g->data, t.data, t.nbytes), 0) << t.name;
    }
  }
}

TEST(SafetensorsTest, RoundTripEveryDtypeInMemory) {
  Fixture fx;
  Result<std::string> bytes = EncodeSafetensors(fx.tensors, fx.meta);
  ASSERT_TRUE(bytes.ok()) << bytes.status().message();
  uint64_t hlen = 0;
  std::memcpy(&hlen, bytes->data(), 8);
  EXPECT_EQ((8 + hlen) % 8, 0u) << "data buffer must start 8-byte aligned";
  EXPECT_EQ(bytes->at(8), '{');
  Result<SafetensorsFile> f = SafetensorsFile::FromBytes(bytes.value());
  ASSERT_TRUE(f.ok()) << f.status().message();
  EXPECT_EQ(f->metadata(), fx.meta);
  ExpectSameTensors(f.value(), fx.tensors);
  EXPECT_EQ(f->Find("nope"), nullptr);
  EXPECT_EQ(f->source(), "<bytes>");
  // Moving the file keeps views valid (data lives on the heap / in the mapping).
  SafetensorsFile moved = std::move(f.value());
  ExpectSameTensors(moved, fx.tensors);
}

TEST(SafetensorsTest, RoundTripThroughFileAndNoMetadata) {
  Fixture fx;
  TempDir dir;
  const std::string path = dir / "model.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, fx.tensors, fx.meta).ok());
  EXPECT_EQ(testing::DirEntries(dir.path()), std::vector<std::string>{"model.safetensors"});  // no temporary left
  Result<SafetensorsFile> f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status().message();
  EXPECT_EQ(f->metadata(), fx.meta);
  EXPECT_EQ(f->source(), path);
  ExpectSameTensors(f.value(), fx.tensors);
  // The file on disk is exactly the in-memory encoding.
  EXPECT_EQ(ReadAll(path), EncodeSafetensors(fx.tensors, fx.meta).value());

  Result<std::string> nometa = EncodeSafetensors(fx.tensors, {});
  ASSERT_TRUE(nometa.ok());
  EXPECT_EQ(nometa->find("__metadata__"), std::string::npos);
  Result<SafetensorsFile> g = SafetensorsFile::FromBytes(nometa.value());
  ASSERT_TRUE(g.ok()) << g.status().message();
  EXPECT_TRUE(g->metadata().empty());

  Result<SafetensorsFile> none = SafetensorsFile::Open(dir / "missing.safetensors");
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), Code::kNotFound);
  EXPECT_NE(none.status().message().find(dir / "missing.safetensors"), std::string::npos);
}

TEST(SafetensorsTest, EmptyFileHasNoTensors) {
  Result<std::string> bytes = EncodeSafetensors({}, {});
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ(bytes->size(), 16u);  // 8 + "{}" padded to 8
  Result<SafetensorsFile> f = SafetensorsFile::FromBytes(bytes.value());
  ASSERT_TRUE(f.ok()) << f.status().message();
  EXPECT_TRUE(f->names().empty());
}

TEST(SafetensorsTest, ReadF32ConvertsHalfTypes) {
  Fixture fx;
  Result<SafetensorsFile> f = SafetensorsFile::FromBytes(EncodeSafetensors(fx.tensors, {}).value());
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->ReadF32("w.f32").value(), fx.f32);
  std::vector<float> h = f->ReadF32("w.f16").value(), b = f->ReadF32("w.bf16").value();
  ASSERT_EQ(h.size(), fx.f32.size());
  ASSERT_EQ(b.size(), fx.f32.size());
  for (size_t i = 0; i < fx.f32.size(); ++i) {
    EXPECT_EQ(h[i], F16ToFloat(fx.f16[i]));
    EXPECT_EQ(b[i], BF16ToFloat(fx.bf16[i]));
    EXPECT_NEAR(h[i], fx.f32[i], std::fabs(fx.f32[i]) * 1e-3 + 1e-7);
    EXPECT_NEAR(b[i], fx.f32[i], std::fabs(fx.f32[i]) * 8e-3 + 1e-7);
  }
  EXPECT_EQ(f->ReadF32("scalar").value(), std::vector<float>{1.5f});
  EXPECT_TRUE(f->ReadF32("empty").value().empty());
  EXPECT_EQ(f->ReadF32("ids").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(f->ReadF32("d").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(f->ReadF32("nope").status().code(), Code::kNotFound);
}

TEST(SafetensorsTest, ReadF32FromUnalignedForeignFile) {
  // Other writers need not pad the header; views may be unaligned (UBSan would flag a direct load).
  std::vector<float> v = {1.0f, 2.0f};
  std::vector<uint16_t> hv = {FloatToF16(3.0f)};
  const std::string file = MakeFile(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"h":{"dtype":"F16","shape":[1],"data_offsets":[8,10]}})",
      Raw(v) + Raw(hv));
  Result<SafetensorsFile> f = SafetensorsFile::FromBytes(file);
  ASSERT_TRUE(f.ok()) << f.status().message();
  EXPECT_EQ(f->ReadF32("a").value(), v);
  EXPECT_EQ(f->ReadF32("h").value(), std::vector<float>{3.0f});
}

TEST(SafetensorsTest, EncoderRejectsBadInput) {
  float x[4] = {};
  auto bad = [](std::vector<TensorView> t, const std::string& needle) {
    Result<std::string> r = EncodeSafetensors(t, {});
    ASSERT_FALSE(r.ok()) << needle;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().message();
  };
  bad({{"a", "F32", {2}, x, 16}}, "needs 8");
  bad({{"a", "F32", {4}, x, 16}, {"a", "F32", {4}, x, 16}}, "duplicate tensor name");
  bad({{"a", "Q4", {4}, x, 4}}, "unsupported dtype");
  bad({{"a", "F32", {-1, 4}, x, 16}}, "invalid shape");
  bad({{"a", "F32", {1LL << 40, 1LL << 40}, x, 16}}, "invalid shape");
  bad({{"__metadata__", "F32", {4}, x, 16}}, "reserved");
  bad({{"", "F32", {4}, x, 16}}, "empty tensor name");
  bad({{"a", "F32", {4}, nullptr, 16}}, "null data");
  bad({{"\xff\xfe", "F32", {4}, x, 16}}, "UTF-8");
  EXPECT_FALSE(EncodeSafetensors({}, {{"k", "\xc3"}}).ok());
  TempDir dir;
  Status s = WriteSafetensors(dir / "x.safetensors", {{"a", "F32", {2}, x, 16}}, {});
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.message().rfind(dir / "x.safetensors", 0), 0u) << s.message();
  EXPECT_FALSE(std::filesystem::exists(dir / "x.safetensors"));
}

TEST(SafetensorsTest, HostileHeaders) {
  const std::string d8(8, '\0');
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  ASSERT_TRUE(SafetensorsFile::FromBytes(MakeFile(ok, d8)).ok());

  ExpectCorrupt("", "too short");
  ExpectCorrupt(std::string("\x02\0\0", 3), "too short");
  {
    std::string huge = MakeFile(ok, d8);
    huge[5] = 0x01;  // header length ~2^40
    ExpectCorrupt(huge, "100 MiB");
    std::string all_ff(16, '\xff');
    ExpectCorrupt(all_ff, "100 MiB");
  }
  {
    std::string beyond = MakeFile(ok, d8);
    beyond[0] = static_cast<char>(ok.size() + 9);
    ExpectCorrupt(beyond, "exceeds file size");
  }
  ExpectCorrupt(MakeFile("", ""), "invalid JSON");
  ExpectCorrupt(MakeFile("{\"a\":", d8), "invalid JSON");
  ExpectCorrupt(MakeFile(ok + "x", d8), "invalid JSON");
  ExpectCorrupt(MakeFile(std::string("{\"a\0\":1}", 8), ""), "invalid JSON");
  ExpectCorrupt(MakeFile("{\"\xff\":{}}", ""), "invalid JSON");
  ExpectCorrupt(MakeFile("[1,2]", ""), "not a JSON object");
  ExpectCorrupt(MakeFile("42", ""), "not a JSON object");
  ExpectCorrupt(MakeFile(R"({"a":[1]})", ""), "'a': entry is not an object");
  ExpectCorrupt(MakeFile(R"({"a":3})", ""), "'a': entry is not an object");
  ExpectCorrupt(MakeFile(R"({"__metadata__":[]})", ""), "__metadata__ is not an object");
  ExpectCorrupt(MakeFile(R"({"__metadata__":{"k":1}})", ""), "__metadata__ value for 'k' is not a string");
  ExpectCorrupt(MakeFile(R"({"__metadata__":{"k":{"x":"y"}}})", ""), "is not a string");
  ExpectCorrupt(MakeFile(R"({"__metadata__":{"k":null}})", ""), "is not a string");
  ExpectCorrupt(MakeFile(R"({"__metadata__":{"k":"a","k":"b"}})", ""), "duplicate __metadata__ key 'k'");
  ExpectCorrupt(MakeFile(R"({"__metadata__":{},"__metadata__":{}})", ""), "duplicate __metadata__");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", d8), "unknown dtype 'F33'");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":7,"shape":[2],"data_offsets":[0,8]}})", d8), "dtype is not a string");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", d8), "shape is not an array");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", d8), "negative dimension");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", d8), "not an integer");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", d8), "not an integer");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}})", d8), "not an integer");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]}})", d8),
                "too large");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", d8),
                "overflows");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,8]}})", d8),
                "overflows");  // elements fit in 64 bits, bytes do not
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", d8), "exactly 2 entries");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}})", d8), "exactly 2 entries");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-1,8]}})", d8), "negative data offset");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":{}}})", d8), "data_offsets is not an array");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", d8), "out of range");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551615]}})", d8),
                "out of range");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", d8), "end before begin");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", d8), "needs 12");
  ExpectCorrupt(MakeFile(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", d8), "missing dtype");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", d8), "missing shape");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2]}})", d8), "missing data_offsets");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", d8),
                "duplicate key 'dtype'");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                         d8 + d8),
                "duplicate tensor name 'a'");
  // Layout: overlap, hole, trailing bytes.
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                         std::string(12, '\0')),
                "overlaps");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                         d8),
                "overlaps");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
                         std::string(20, '\0')),
                "hole of 4 bytes before tensor 'b'");
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(12, '\0')),
                "hole of 4 bytes");
  ExpectCorrupt(MakeFile(ok, d8 + "xyz"), "3 bytes after the last tensor");
  ExpectCorrupt(MakeFile("{}", "x"), "1 bytes after the last tensor");
  // Names with control characters stay on one line in the message.
  ExpectCorrupt(MakeFile(R"({"a\nb\u0000":{"dtype":"X","shape":[],"data_offsets":[0,0]}})", ""), "a\\x0ab\\x00");
  // Deep nesting inside an ignored key is bounded.
  ExpectCorrupt(MakeFile(R"({"a":{"x":)" + std::string(1000, '[') + std::string(1000, ']') + "}}", ""),
                "nesting too deep");
}

TEST(SafetensorsTest, AcceptsWhatTheSpecAllows) {
  // Unknown keys in an entry are ignored (at any nesting depth within the limit), tensors may appear in
  // the header in any order relative to their offsets, and empty tensors may share an offset.
  std::vector<float> v = {1, 2, 3, 4};
  const std::string file = MakeFile(
      R"({"b":{"data_offsets":[8,16],"shape":[2],"dtype":"F32","extra":{"x":[1,{"y":null}]}},)"
      R"("z":{"dtype":"I64","shape":[0],"data_offsets":[8,8]},)"
      R"("__metadata__":{"k":"v"},)"
      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"more":true}}    )",
      Raw(v));
  Result<SafetensorsFile> f = SafetensorsFile::FromBytes(file);
  ASSERT_TRUE(f.ok()) << f.status().message();
  EXPECT_EQ(f->names(), (std::vector<std::string>{"a", "z", "b"}));
  EXPECT_EQ(f->ReadF32("b").value(), (std::vector<float>{3, 4}));
  EXPECT_EQ(f->metadata().at("k"), "v");
}

// Every strict prefix of a valid file is rejected with a clean error, in memory and on disk.
TEST(SafetensorsTest, TruncatedAnywhereIsAnError) {
  Fixture fx;
  const std::string bytes = EncodeSafetensors(fx.tensors, fx.meta).value();
  for (size_t len = 0; len < bytes.size(); ++len) {
    Result<SafetensorsFile> r = SafetensorsFile::FromBytes(bytes.substr(0, len));
    ASSERT_FALSE(r.ok()) << "prefix of " << len << " bytes parsed";
    ASSERT_EQ(r.status().code(), Code::kCorrupt);
    ASSERT_EQ(r.status().message().rfind("<bytes>: ", 0), 0u) << r.status().message();
    ASSERT_EQ(r.status().message().find('\n'), std::string::npos);
  }
  TempDir dir;
  const std::string path = dir / "t.safetensors";
  for (size_t len : {size_t{0}, size_t{4}, size_t{8}, size_t{30}, bytes.size() - 1}) {
    keel::testing::WriteText(path, bytes.substr(0, len));
    Result<SafetensorsFile> r = SafetensorsFile::Open(path);
    ASSERT_FALSE(r.ok()) << len;
    EXPECT_EQ(r.status().message().rfind(path + ": ", 0), 0u) << r.status().message();
  }
}

// A parse that succeeds must be self-consistent: views inside the buffer, sizes matching shapes, the
// buffer exactly covered, names unique and findable.
void CheckConsistent(const SafetensorsFile& f, const std::string& bytes) {
  uint64_t hlen = 0;
  std::memcpy(&hlen, bytes.data(), 8);
  ASSERT_LE(8 + hlen, bytes.size());
  std::set<std::string> names;
  size_t total = 0;
  for (const TensorView& t : f.tensors()) {
    ASSERT_TRUE(names.insert(t.name).second);
    ASSERT_EQ(f.Find(t.name), &t);
    const size_t es = SafetensorsDtypeSize(t.dtype);
    ASSERT_GT(es, 0u);
    uint64_t n = 1;
    for (int64_t d : t.shape) {
      ASSERT_GE(d, 0);
      n *= static_cast<uint64_t>(d);
    }
    ASSERT_EQ(n * es, t.nbytes);
    total += t.nbytes;
    if (t.nbytes) {
      const char* p = static_cast<const char*>(t.data);
      volatile uint64_t h = Hash64(p, t.nbytes);  // touches every byte: ASan catches out-of-range views
      (void)h;
    }
    if (t.dtype == "F32" || t.dtype == "F16" || t.dtype == "BF16") {
      ASSERT_TRUE(f.ReadF32(t.name).ok());
    }
  }
  ASSERT_EQ(8 + hlen + total, bytes.size());
}

TEST(SafetensorsTest, RandomBitFlipsInHeaderNeverCrash) {
  Fixture fx;
  const std::string bytes = EncodeSafetensors(fx.tensors, fx.meta).value();
  uint64_t hlen = 0;
  std::memcpy(&hlen, bytes.data(), 8);
  Rng rng(77);
  int parsed = 0, rejected = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    std::string m = bytes;
    const int flips = 1 + static_cast<int>(rng.Below(3));
    for (int k = 0; k < flips; ++k) {
      const size_t pos = rng.Below(8 + hlen);
      m[pos] = static_cast<char>(m[pos] ^ (1 << rng.Below(8)));
    }
    Result<SafetensorsFile> r = SafetensorsFile::FromBytes(m);
    if (r.ok()) {
      ++parsed;
      CheckConsistent(r.value(), m);
    } else {
      ++rejected;
      ASSERT_EQ(r.status().message().rfind("<bytes>: ", 0), 0u) << r.status().message();
      ASSERT_EQ(r.status().message().find('\n'), std::string::npos) << r.status().message();
    }
  }
  EXPECT_GT(rejected, 1000);  // most flips in structure must be caught
  RecordProperty("parsed", parsed);
  // Flips in the data buffer are not the parser's business: the structure parses identically.
  for (int trial = 0; trial < 200; ++trial) {
    std::string m = bytes;
    const size_t pos = 8 + hlen + rng.Below(bytes.size() - 8 - hlen);
    m[pos] = static_cast<char>(m[pos] ^ 0x10);
    Result<SafetensorsFile> r = SafetensorsFile::FromBytes(m);
    ASSERT_TRUE(r.ok()) << r.status().message();
    ASSERT_EQ(r->names(), SafetensorsFile::FromBytes(bytes)->names());
  }
}

TEST(SafetensorsTest, RandomGarbageNeverCrashes) {
  Rng rng(99);
  for (int trial = 0; trial < 3000; ++trial) {
    const size_t len = rng.Below(64);
    std::string junk;
    for (size_t i = 0; i < len; ++i) {
      // Mostly JSON-ish characters so the parser gets past the first byte.
      static const char kAlpha[] = "{}[]\":,0123456789-.eE \\u\"dtypeshapedata_offsetsF32__metadata__";
      junk.push_back(rng.Below(4) ? kAlpha[rng.Below(sizeof(kAlpha) - 1)] : static_cast<char>(rng.Next()));
    }
    const std::string file = MakeFile(junk, std::string(rng.Below(16), 'x'));
    Result<SafetensorsFile> r = SafetensorsFile::FromBytes(file);
    if (r.ok()) {
      CheckConsistent(r.value(), file);
    } else {
      ASSERT_EQ(r.status().message().find('\n'), std::string::npos);
    }
  }
}

}  // namespace
}  // namespace keel
