// export_gguf_test.cc: the GGUF writer/reader (format, Q8_0 codec, hostile input) and the keel <-> GGUF model
// round trip (identical logits for f32, bounded error for f16 and q8_0).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <new>
#include <random>
#include <set>

#include "core/env.h"
#include "export/export.h"
#include "export/gguf.h"
#include "export/gguf_model.h"
#include "export_test_util.h"
#include "formats/half.h"
#include "test_util.h"

// The largest single allocation while g_track_allocs is set (GgufHostile.HugeClaimedCountsReserveLittle).
namespace {
std::atomic<bool> g_track_allocs{false};
std::atomic<size_t> g_max_alloc{0};
}  // namespace

// A replacement allocator (malloc/free underneath); GCC's -Wmismatched-new-delete cannot tell it is a matched pair.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(size_t n) {
  if (g_track_allocs.load(std::memory_order_relaxed)) {
    size_t m = g_max_alloc.load(std::memory_order_relaxed);
    while (n > m && !g_max_alloc.compare_exchange_weak(m, n)) {
    }
  }
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
#pragma GCC diagnostic pop

namespace keel {
namespace {

using testing::Logits;
using testing::MakeSnapshot;
using testing::RelError;
using testing::DirEntries;
using testing::TempDir;
using testing::TestTokens;

GptConfig Tiny(int layers = 2, int heads = 2, int dim = 64, int ctx = 16) {
  GptConfig c;
  c.layers = layers;
  c.heads = heads;
  c.dim = dim;
  c.ctx = ctx;
  return c;
}

// ---------------------------------------------------------------------------------------------------------
// Q8_0

TEST(Q8_0, BlockLayoutAndErrorBound) {
  std::mt19937 rng(1);
  for (float scale : {1e-6f, 0.02f, 1.0f, 300.0f}) {
    std::normal_distribution<float> nd(0.0f, scale);
    std::vector<float> x(32 * 64);
    for (auto& v : x) v = nd(rng);
    x[5] = 0.0f;
    std::string q = QuantizeQ8_0(x.data(), x.size());
    ASSERT_EQ(q.size(), x.size() / 32 * 34);
    std::vector<float> y(x.size());
    DequantizeQ8_0(reinterpret_cast<const uint8_t*>(q.data()), y.data(), y.size());
    for (size_t b = 0; b < x.size() / 32; ++b) {
      float amax = 0;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
      const double d = amax / 127.0;
      uint16_t dh;
      std::memcpy(&dh, q.data() + b * 34, 2);
      EXPECT_EQ(dh, FloatToF16(static_cast<float>(amax / 127.0f))) << "scale is f16(max|x| / 127)";
      // |x - q d'| <= d/2 + 127 |d - d'|, with d' = f16(d): within a relative 2^-11 of d, or within 2^-25 where
      // d is an f16 subnormal (tiny blocks lose relative precision, as in ggml).
      const double bound = d / 2 * 1.0001 + 127.0 * std::max(d / 2048.0, std::ldexp(1.0, -25)) + 1e-30;
      int saw_127 = 0;
      for (int j = 0; j < 32; ++j) {
        EXPECT_LE(std::fabs(double(x[b * 32 + j]) - double(y[b * 32 + j])), bound) << "block " << b;
        const int qj = static_cast<int8_t>(q[b * 34 + 2 + j]);
        EXPECT_LE(std::abs(qj), 127);
        saw_127 += std::abs(qj) == 127;
      }
      EXPECT_GE(saw_127, 1) << "the largest magnitude maps to +-127";
    }
    EXPECT_EQ(y[5], 0.0f);
  }
}

TEST(Q8_0, ZeroAndNonFiniteBlocksAreSafe) {
  std::vector<float> x(64, 0.0f);
  x[40] = NAN;
  x[41] = 1.0f;
  std::string q = QuantizeQ8_0(x.data(), x.size());
  std::vector<float> y(64, -1.0f);
  DequantizeQ8_0(reinterpret_cast<const uint8_t*>(q.data()), y.data(), y.size());
  for (int i = 0; i < 32; ++i) EXPECT_EQ(y[i], 0.0f);
  EXPECT_EQ(y[40], 0.0f);
  EXPECT_NEAR(y[41], 1.0f, 1e-3);
}

// ---------------------------------------------------------------------------------------------------------
// Format

// An independent walk over the bytes of a GGUF file: returns tensor (name, offset, nbytes-from-type) and the
// data section start, checking what the spec requires along the way.
struct RawTensor {
  std::string name;
  std::vector<uint64_t> ne;
  uint32_t type;
  uint64_t offset;
};
struct RawWalk {
  uint64_t n_tensors = 0, n_kv = 0, data_start = 0;
  std::vector<std::string> keys;
  std::vector<RawTensor> tensors;
};

RawWalk Walk(const std::string& b) {
  RawWalk w;
  size_t p = 0;
  auto u32 = [&] { uint32_t v; std::memcpy(&v, b.data() + p, 4); p += 4; return v; };
  auto u64 = [&] { uint64_t v; std::memcpy(&v, b.data() + p, 8); p += 8; return v; };
  auto str = [&] { uint64_t n = u64(); std::string s = b.substr(p, n); p += n; return s; };
  EXPECT_EQ(b.substr(0, 4), "GGUF");
  p = 4;
  EXPECT_EQ(u32(), 3u);
  w.n_tensors = u64();
  w.n_kv = u64();
  const size_t scalar[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
  for (uint64_t k = 0; k < w.n_kv; ++k) {
    w.keys.push_back(str());
    uint32_t t = u32();
    if (t == 8) {
      str();
    } else if (t == 9) {
      uint32_t et = u32();
      uint64_t n = u64();
      if (et == 8) {
        for (uint64_t i = 0; i < n; ++i) str();
      } else {
        p += n * scalar[et];
      }
    } else {
      p += scalar[t];
    }
  }
  for (uint64_t k = 0; k < w.n_tensors; ++k) {
    RawTensor t;
    t.name = str();
    uint32_t nd = u32();
    for (uint32_t d = 0; d < nd; ++d) t.ne.push_back(u64());
    t.type = u32();
    t.offset = u64();
    w.tensors.push_back(t);
  }
  w.data_start = (p + 31) / 32 * 32;
  for (size_t i = p; i < w.data_start; ++i) EXPECT_EQ(b[i], '\0') << "padding before the data section";
  return w;
}

TEST(Gguf, MetadataRoundTripAllTypes) {
  GgufMetadata md;
  GgufValue v;
  auto scalar = [&](GgufType t, uint64_t u, int64_t i, double f) {
    GgufValue x;
    x.type = t;
    x.u = u;
    x.i = i;
    x.f = f;
    return x;
  };
  md.emplace_back("u8", scalar(GgufType::kUint8, 200, 0, 0));
  md.emplace_back("i8", scalar(GgufType::kInt8, 0, -100, 0));
  md.emplace_back("u16", scalar(GgufType::kUint16, 60000, 0, 0));
  md.emplace_back("i16", scalar(GgufType::kInt16, 0, -30000, 0));
  md.emplace_back("u32", GgufValue::U32(4000000000u));
  md.emplace_back("i32", GgufValue::I32(-2000000000));
  md.emplace_back("f32", GgufValue::F32(1.5f));
  md.emplace_back("bool", GgufValue::Bool(true));
  md.emplace_back("str", GgufValue::Str(std::string("h\0llo", 5)));
  md.emplace_back("u64", GgufValue::U64(~0ull));
  md.emplace_back("i64", scalar(GgufType::kInt64, 0, -(1ll << 62), 0));
  md.emplace_back("f64", scalar(GgufType::kFloat64, 0, 0, 0.1));
  md.emplace_back("strs", GgufValue::StrArray({"a", "", "\xE2\x96\x81the"}));
  md.emplace_back("f32s", GgufValue::F32Array({1.0f, -2.5f}));
  md.emplace_back("i32s", GgufValue::I32Array({1, -2, 3}));
  md.emplace_back("bytes", GgufValue::U8Array(std::string("\x00\xff\x10", 3)));
  md.emplace_back("empty", GgufValue::I32Array({}));
  auto enc = EncodeGguf(md, {});
  ASSERT_TRUE(enc.ok()) << enc.status().ToString();
  auto f = GgufFile::FromBytes(*enc);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->version(), 3u);
  ASSERT_EQ(f->metadata().size(), md.size());
  EXPECT_EQ(*f->FindKey("u8")->AsUint(), 200u);
  EXPECT_EQ(f->FindKey("i8")->i, -100);
  EXPECT_EQ(*f->FindKey("u16")->AsUint(), 60000u);
  EXPECT_EQ(f->FindKey("i16")->i, -30000);
  EXPECT_EQ(*f->FindKey("u32")->AsUint(), 4000000000u);
  EXPECT_EQ(f->FindKey("i32")->i, -2000000000);
  EXPECT_FALSE(f->FindKey("i32")->AsUint().has_value());
  EXPECT_EQ(*f->FindKey("f32")->AsFloat(), 1.5);
  EXPECT_EQ(*f->FindKey("bool")->AsBool(), true);
  EXPECT_EQ(*f->FindKey("str")->AsString(), std::string("h\0llo", 5));
  EXPECT_EQ(*f->FindKey("u64")->AsUint(), ~0ull);
  EXPECT_EQ(f->FindKey("i64")->i, -(1ll << 62));
  EXPECT_EQ(*f->FindKey("f64")->AsFloat(), 0.1);
  EXPECT_EQ(*f->FindKey("strs")->AsStringArray(), (std::vector<std::string>{"a", "", "\xE2\x96\x81the"}));
  EXPECT_EQ(*f->FindKey("f32s")->AsF32Array(), (std::vector<float>{1.0f, -2.5f}));
  EXPECT_EQ(*f->FindKey("i32s")->AsI32Array(), (std::vector<int32_t>{1, -2, 3}));
  EXPECT_EQ(*f->FindKey("bytes")->AsU8Array(), std::string("\x00\xff\x10", 3));
  EXPECT_TRUE(f->FindKey("empty")->AsI32Array()->empty());
  EXPECT_EQ(f->FindKey("missing"), nullptr);
}

TEST(Gguf, EncodeRejectsBadInput) {
  float x[64] = {};
  auto enc = [&](std::vector<GgufTensorIn> t, GgufMetadata md = {}) { return EncodeGguf(md, t).status().code(); };
  EXPECT_EQ(enc({{"a", {4}, GgmlType::kF32, x, 16}, {"a", {4}, GgmlType::kF32, x, 16}}), Code::kInvalidArgument);
  EXPECT_EQ(enc({{"", {4}, GgmlType::kF32, x, 16}}), Code::kInvalidArgument);
  EXPECT_EQ(enc({{"a", {4}, GgmlType::kF32, x, 12}}), Code::kInvalidArgument);
  EXPECT_EQ(enc({{"a", {}, GgmlType::kF32, x, 4}}), Code::kInvalidArgument);
  EXPECT_EQ(enc({{"a", {1, 1, 1, 1, 1}, GgmlType::kF32, x, 4}}), Code::kInvalidArgument);
  EXPECT_EQ(enc({{"a", {16}, GgmlType::kQ8_0, x, 17}}), Code::kInvalidArgument);  // not a whole block
  EXPECT_EQ(enc({}, {{"k", GgufValue::U32(1)}, {"k", GgufValue::U32(2)}}), Code::kInvalidArgument);
  EXPECT_EQ(enc({}, {{"general.alignment", GgufValue::U32(24)}}), Code::kInvalidArgument);
  EXPECT_EQ(enc({}, {{"general.alignment", GgufValue::U64(32)}}), Code::kInvalidArgument);
}

TEST(Gguf, AlignmentKeyMustMatchTheArgument) {
  const GgufMetadata md = {{"general.alignment", GgufValue::U32(64)}};
  auto mismatch = EncodeGguf(md, {}, 32);
  ASSERT_FALSE(mismatch.ok()) << "a general.alignment key that disagrees with the alignment argument";
  EXPECT_EQ(mismatch.status().code(), Code::kInvalidArgument);
  EXPECT_NE(mismatch.status().message().find("does not match"), std::string::npos) << mismatch.status().message();
  float x[8] = {};
  auto match = EncodeGguf(md, {{"t", {8}, GgmlType::kF32, x, 32}}, 64);
  ASSERT_TRUE(match.ok()) << match.status().ToString();
  auto f = GgufFile::FromBytes(*match);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->alignment(), 64u);
  EXPECT_EQ(f->data_offset() % 64, 0u);
}

TEST(Gguf, WrittenModelFileHasAlignedConsecutiveTensors) {
  auto s = MakeSnapshot("bpe", Tiny(2, 2, 48), 5, 1);  // dim 48: q8_0 falls back to f16 for 48-wide rows
  for (ExportDtype d : {ExportDtype::kF32, ExportDtype::kF16, ExportDtype::kQ8_0}) {
    SCOPED_TRACE(ExportDtypeName(d));
    auto enc = EncodeModelGguf(s, d, "tiny");
    ASSERT_TRUE(enc.ok()) << enc.status().ToString();
    const std::string& b = *enc;
    RawWalk w = Walk(b);
    auto f = GgufFile::FromBytes(b);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    EXPECT_EQ(f->data_offset(), w.data_start);
    EXPECT_EQ(f->data_offset() % 32, 0u);
    EXPECT_EQ(b.size() % 32, 0u) << "the last tensor is padded too, as ggml writes it";
    ASSERT_EQ(w.tensors.size(), ParamLayout(s.config).size() + 1);
    uint64_t expect_offset = 0;
    for (size_t i = 0; i < w.tensors.size(); ++i) {
      const auto& t = w.tensors[i];
      const GgufTensorInfo* ti = f->FindTensor(t.name);
      ASSERT_NE(ti, nullptr) << t.name;
      EXPECT_EQ(t.offset, expect_offset) << t.name;
      EXPECT_EQ(t.offset % 32, 0u) << t.name;
      EXPECT_EQ(ti->file_offset, w.data_start + t.offset);
      const uint64_t n = t.ne.size() == 1 ? t.ne[0] : t.ne[0] * t.ne[1];
      const bool matrix = t.ne.size() == 2 && t.name != "position_embd.weight";
      uint32_t want_type = 0;
      if (matrix && d == ExportDtype::kF16) want_type = 1;
      if (matrix && d == ExportDtype::kQ8_0) want_type = t.ne[0] % 32 == 0 ? 8 : 1;
      EXPECT_EQ(t.type, want_type) << t.name;
      const uint64_t nbytes = want_type == 0 ? n * 4 : want_type == 1 ? n * 2 : n / 32 * 34;
      EXPECT_EQ(ti->nbytes, nbytes);
      expect_offset += (nbytes + 31) / 32 * 32;
    }
    EXPECT_EQ(w.data_start + expect_offset, b.size());
    // Shapes: ne[0] is the input (column) dimension of keel's [out, in] matrices.
    const int64_t C = s.config.dim, V = s.config.vocab;
    EXPECT_EQ(f->FindTensor("token_embd.weight")->ne, (std::vector<uint64_t>{uint64_t(C), uint64_t(V)}));
    EXPECT_EQ(f->FindTensor("output.weight")->ne, (std::vector<uint64_t>{uint64_t(C), uint64_t(V)}));
    EXPECT_EQ(f->FindTensor("blk.1.attn_qkv.weight")->ne, (std::vector<uint64_t>{uint64_t(C), uint64_t(3 * C)}));
    EXPECT_EQ(f->FindTensor("blk.1.ffn_up.weight")->ne, (std::vector<uint64_t>{uint64_t(C), uint64_t(4 * C)}));
    EXPECT_EQ(f->FindTensor("blk.1.ffn_down.weight")->ne, (std::vector<uint64_t>{uint64_t(4 * C), uint64_t(C)}));
    EXPECT_EQ(f->FindTensor("blk.0.attn_norm.bias")->ne, (std::vector<uint64_t>{uint64_t(C)}));
    // Metadata llama.cpp needs, with the types it checks.
    EXPECT_EQ(*f->FindKey("general.architecture")->AsString(), "gpt2");
    EXPECT_EQ(f->FindKey("general.alignment")->type, GgufType::kUint32);
    EXPECT_EQ(f->FindKey("gpt2.block_count")->type, GgufType::kUint32);
    EXPECT_EQ(*f->FindKey("gpt2.feed_forward_length")->AsUint(), uint64_t(4 * C));
    EXPECT_EQ(f->FindKey("gpt2.attention.layer_norm_epsilon")->type, GgufType::kFloat32);
    EXPECT_EQ(*f->FindKey("general.file_type")->AsUint(), d == ExportDtype::kF32 ? 0u : d == ExportDtype::kF16 ? 1u : 7u);
    EXPECT_EQ(*f->FindKey("tokenizer.ggml.model")->AsString(), "llama");
    EXPECT_EQ(*f->FindKey("tokenizer.ggml.add_bos_token")->AsBool(), false);
    const auto* toks = f->FindKey("tokenizer.ggml.tokens")->AsStringArray();
    ASSERT_EQ(toks->size(), size_t(V));
    EXPECT_EQ(std::set<std::string>(toks->begin(), toks->end()).size(), toks->size()) << "token texts are unique";
    EXPECT_EQ((*toks)[V - 1], "<pad_" + std::to_string(V - 1) + ">");
    auto types = *f->FindKey("tokenizer.ggml.token_type")->AsI32Array();
    EXPECT_EQ(types[V - 1], 5);
    EXPECT_EQ(types[0], 2) << "<unk>";
    EXPECT_EQ((*toks)[1], "<s>");
    EXPECT_EQ(types[1], 3);
    EXPECT_EQ(*f->FindKey("tokenizer.ggml.bos_token_id")->AsUint(), 1u);
    EXPECT_EQ(*f->FindKey("tokenizer.ggml.eos_token_id")->AsUint(), 2u);
    EXPECT_EQ(f->FindKey("tokenizer.ggml.scores")->AsF32Array()->size(), size_t(V));
  }
}

TEST(Gguf, ByteTokenizerVocabulary) {
  auto s = MakeSnapshot("byte", Tiny(1, 2, 32, 8), 0, 2);
  auto enc = EncodeModelGguf(s, ExportDtype::kF32, "");
  ASSERT_TRUE(enc.ok()) << enc.status().ToString();
  auto f = GgufFile::FromBytes(*enc);
  ASSERT_TRUE(f.ok());
  const auto* toks = f->FindKey("tokenizer.ggml.tokens")->AsStringArray();
  ASSERT_EQ(toks->size(), 256u);
  EXPECT_EQ((*toks)[0x0A], "<0x0A>");
  EXPECT_EQ((*toks)[0xFF], "<0xFF>");
  EXPECT_EQ((*toks)[0x20], "\xE2\x96\x81") << "llama.cpp's SPM tokenizer looks spaces up as U+2581";
  const auto types = f->FindKey("tokenizer.ggml.token_type")->AsI32Array().value();
  for (int i = 0; i < 256; ++i) EXPECT_EQ(types[i], i == 0x20 ? 1 : 6) << i;
  EXPECT_EQ(f->FindKey("tokenizer.ggml.bos_token_id"), nullptr);
  EXPECT_EQ(*f->FindKey("general.name")->AsString(), "keel-gpt2");
}

// ---------------------------------------------------------------------------------------------------------
// Model round trip

void RoundTrip(const std::string& tok, ExportDtype d, double max_rel) {
  SCOPED_TRACE(tok + " " + ExportDtypeName(d));
  TempDir tmp;
  auto s = MakeSnapshot(tok, Tiny(), tok == "byte" ? 3 : 4, 3);
  const std::string path = tmp / "m.gguf";
  ASSERT_TRUE(ExportModel(s, path, {"gguf", d, "t"}).ok());
  EXPECT_EQ(testing::DirEntries(tmp.path()), std::vector<std::string>{"m.gguf"});  // no temporary left
  std::vector<std::string> warnings;
  auto back = LoadExportedModel(path, &warnings);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_TRUE(warnings.empty()) << warnings[0];
  EXPECT_EQ(back->config, s.config);
  EXPECT_EQ(back->tokenizer, s.tokenizer);
  EXPECT_EQ(back->state["step"], 7);
  EXPECT_EQ(back->state["imported_from"], path);
  const auto tokens = TestTokens(s.config.ctx, s.config.vocab);
  const auto ref = Logits(s, tokens), got = Logits(*back, tokens);
  if (d == ExportDtype::kF32) {
    EXPECT_EQ(back->params, s.params);
    EXPECT_EQ(got, ref) << "f32 export must reproduce the logits exactly";
  } else {
    const double rel = RelError(got, ref);
    EXPECT_LT(rel, max_rel);
    EXPECT_GT(rel, 0.0);
    std::printf("  %s %s: logits rel error %.3g\n", tok.c_str(), ExportDtypeName(d), rel);
  }
}

TEST(GgufModel, RoundTripF32IsExact) {
  RoundTrip("bpe", ExportDtype::kF32, 0);
  RoundTrip("byte", ExportDtype::kF32, 0);
}
TEST(GgufModel, RoundTripF16) { RoundTrip("bpe", ExportDtype::kF16, 2e-3); }
TEST(GgufModel, RoundTripQ8_0) {
  RoundTrip("bpe", ExportDtype::kQ8_0, 2e-2);
  RoundTrip("byte", ExportDtype::kQ8_0, 2e-2);
}

TEST(GgufModel, UntiedHeadWarnsAndWrongArchitectureFails) {
  auto s = MakeSnapshot("byte", Tiny(1, 2, 32, 8), 0, 4);
  auto enc = EncodeModelGguf(s, ExportDtype::kF32, "");
  ASSERT_TRUE(enc.ok());
  std::string b = *enc;
  auto f = GgufFile::FromBytes(b);
  ASSERT_TRUE(f.ok());
  const GgufTensorInfo* out = f->FindTensor("output.weight");
  // A flipped byte anywhere in the tensor data fails keel.checksum.
  std::string changed = b;
  changed[out->file_offset + 5] ^= 0x40;
  auto f2 = GgufFile::FromBytes(changed, "x.gguf");
  ASSERT_TRUE(f2.ok());
  auto bad = DecodeModelGguf(*f2, nullptr);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message(), "x.gguf: checksum mismatch (keel.checksum): the file is corrupt");
  // A file another tool rewrote with an untied head (and without keel.checksum): two warnings, and it loads.
  GgufMetadata md2;
  for (const auto& kv : f->metadata())
    if (kv.first != "keel.checksum") md2.push_back(kv);
  std::vector<std::string> datas;
  std::vector<GgufTensorIn> ts;
  datas.reserve(f->tensors().size());
  for (const auto& t : f->tensors()) {
    datas.emplace_back(reinterpret_cast<const char*>(t.data), t.nbytes);
    if (t.name == "output.weight") datas.back()[5] ^= 0x40;
    ts.push_back({t.name, t.ne, t.type, datas.back().data(), t.nbytes});
  }
  auto f4 = GgufFile::FromBytes(EncodeGguf(md2, ts).value(), "x.gguf");
  ASSERT_TRUE(f4.ok());
  std::vector<std::string> warnings;
  auto m = DecodeModelGguf(*f4, &warnings);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  ASSERT_EQ(warnings.size(), 2u);
  EXPECT_EQ(warnings[0], "x.gguf: no keel.checksum (exported by an older keel): the tensor data is not verified");
  EXPECT_NE(warnings[1].find("output.weight differs from token_embd.weight (max |diff| "), std::string::npos)
      << warnings[1];

  // Another architecture, and a file without keel's tokenizer: clear errors.
  GgufMetadata md = {{"general.architecture", GgufValue::Str("llama")}};
  auto f3 = GgufFile::FromBytes(EncodeGguf(md, {}).value(), "llama.gguf");
  ASSERT_TRUE(f3.ok());
  auto m3 = DecodeModelGguf(*f3, nullptr);
  ASSERT_FALSE(m3.ok());
  EXPECT_EQ(m3.status().message(), "llama.gguf: architecture 'llama' is not supported (keel imports gpt2 only)");
}

// A keel export that another tool re-encoded (llama-quantize copies every metadata key, keel.checksum included,
// into a file whose tensors have other types): a warning that the data cannot be verified, not "corrupt".
TEST(GgufModel, ReencodedByAnotherToolWarnsInsteadOfFailing) {
  auto s = MakeSnapshot("byte", Tiny(1, 2, 32, 8), 0, 6);
  auto f = GgufFile::FromBytes(EncodeModelGguf(s, ExportDtype::kF32, "").value(), "q.gguf");
  ASSERT_TRUE(f.ok());
  std::vector<std::vector<uint16_t>> halves;
  std::vector<GgufTensorIn> ts;
  halves.reserve(f->tensors().size());
  for (const auto& t : f->tensors()) {
    if (t.ne.size() == 2 && t.name != "position_embd.weight") {  // the matrices, to F16
      auto x = f->ReadF32(t.name).value();
      halves.emplace_back(x.size());
      FloatToF16N(x.data(), halves.back().data(), x.size());
      ts.push_back({t.name, t.ne, GgmlType::kF16, halves.back().data(), x.size() * 2});
    } else {
      ts.push_back({t.name, t.ne, t.type, t.data, t.nbytes});
    }
  }
  auto g = GgufFile::FromBytes(EncodeGguf(f->metadata(), ts).value(), "q.gguf");
  ASSERT_TRUE(g.ok());
  std::vector<std::string> warnings;
  auto m = DecodeModelGguf(*g, &warnings);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("rewritten by another tool"), std::string::npos) << warnings[0];
}

// Rewrites an f32 export with edited metadata and/or tensors (keel.checksum copied as it was), then imports it.
Result<TrainingSnapshot> ImportEdited(const std::function<void(GgufMetadata*)>& edit_md,
                                      const std::function<void(std::vector<GgufTensorIn>*)>& edit_tensors,
                                      std::vector<std::string>* warnings) {
  auto s = MakeSnapshot("byte", Tiny(3, 2, 32, 8), 0, 7);
  auto bytes = std::make_shared<std::string>(EncodeModelGguf(s, ExportDtype::kF32, "").value());
  auto f = GgufFile::FromBytes(*bytes, "e.gguf");
  if (!f.ok()) return f.status();
  GgufMetadata md = f->metadata();
  std::vector<GgufTensorIn> ts;
  for (const auto& t : f->tensors()) ts.push_back({t.name, t.ne, t.type, t.data, t.nbytes});
  edit_md(&md);
  edit_tensors(&ts);
  auto out = EncodeGguf(md, ts);
  if (!out.ok()) return out.status();
  auto g = GgufFile::FromBytes(*out, "e.gguf");
  if (!g.ok()) return g.status();
  return DecodeModelGguf(*g, warnings);
}

// A flipped bit in a gpt2.* key (block_count 3 -> 2, not covered by keel.checksum) must not load as another,
// smaller model: keel.config (covered) disagrees, and the extra tensors give it away too.
TEST(GgufModel, AConfigKeyThatDisagreesWithKeelConfigIsAnError) {
  std::vector<std::string> warnings;
  auto m = ImportEdited(
      [](GgufMetadata* md) {
        for (auto& [k, v] : *md)
          if (k == "gpt2.block_count") v = GgufValue::U32(2);
      },
      [](std::vector<GgufTensorIn>*) {}, &warnings);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kCorrupt);
  EXPECT_NE(m.status().message().find("disagree with keel.config"), std::string::npos) << m.status().message();
  // Without keel.config and keel.checksum (another tool dropped keel's keys), the third block's tensors are
  // unexpected.
  auto n = ImportEdited(
      [](GgufMetadata* md) {
        for (auto& [k, v] : *md)
          if (k == "gpt2.block_count") v = GgufValue::U32(2);
        md->erase(std::remove_if(md->begin(), md->end(),
                                 [](const auto& kv) { return kv.first == "keel.config" || kv.first == "keel.checksum"; }),
                  md->end());
      },
      [](std::vector<GgufTensorIn>*) {}, &warnings);
  ASSERT_FALSE(n.ok());
  EXPECT_NE(n.status().message().find("unexpected tensor 'blk.2."), std::string::npos) << n.status().message();
  // A newer format version is refused with what to do.
  auto v = ImportEdited(
      [](GgufMetadata* md) {
        for (auto& [k, val] : *md)
          if (k == "keel.format_version") val = GgufValue::U32(2);
      },
      [](std::vector<GgufTensorIn>*) {}, &warnings);
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.status().message().find("keel.format_version 2 is newer"), std::string::npos) << v.status().message();
}

// A flipped type byte (F32 -> F16) on a vector halves its size and keeps it aligned and in bounds: its F32 bytes
// would be decoded as F16 garbage, all finite. Vectors are always F32, so it is an error.
TEST(GgufModel, AVectorStoredAsF16IsAnError) {
  std::vector<std::string> warnings;
  auto m = ImportEdited([](GgufMetadata*) {},
                        [](std::vector<GgufTensorIn>* ts) {
                          for (auto& t : *ts)
                            if (t.name == "blk.0.attn_norm.weight") {
                              t.type = GgmlType::kF16;
                              t.nbytes /= 2;
                            }
                        },
                        &warnings);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("tensor 'blk.0.attn_norm.weight' is a vector stored as type 1"),
            std::string::npos)
      << m.status().message();
}

TEST(GgufModel, ExportErrorsLeaveNoFile) {
  TempDir tmp;
  auto s = MakeSnapshot("byte", Tiny(1, 2, 32, 8), 0, 5);
  // Missing parent directory: an I/O error naming the path, nothing written.
  Status st = ExportModel(s, tmp / "no/such/dir/m.gguf", {"gguf", ExportDtype::kF32, ""});
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("no/such/dir"), std::string::npos) << st.message();
  // An inconsistent snapshot fails before anything is written; an existing file stays as it was.
  const std::string path = tmp / "m.gguf";
  testing::WriteText(path, "old");
  auto broken = s;
  broken.params.pop_back();
  EXPECT_EQ(ExportModel(broken, path, {"gguf", ExportDtype::kF32, ""}).code(), Code::kInvalidArgument);
  EXPECT_EQ(DefaultEnv()->ReadFile(path).value(), "old");
  for (const std::string& e : testing::DirEntries(tmp.path())) EXPECT_NE(e.rfind("m.gguf.", 0), 0u) << e;
  EXPECT_FALSE(ParseExportDtype("q4_0").ok());
  EXPECT_EQ(ExportModel(s, tmp.path(), {"gguf", ExportDtype::kF32, ""}).code(), Code::kInvalidArgument);
}

// The import records its path in state["imported_from"]; a path that is not UTF-8 must not break a re-export
// (nlohmann's dump() throws on invalid UTF-8) nor a checkpoint of the imported state.
TEST(GgufModel, ImportFromNonUtf8PathReexports) {
  TempDir tmp;
  auto s = MakeSnapshot("byte", Tiny(1, 2, 32, 8), 0, 8);
  const std::string path = tmp / "m\xff\xfe.gguf";
  ASSERT_TRUE(ExportModel(s, path, {"gguf", ExportDtype::kF32, ""}).ok());
  auto back = LoadModelForInference(path, nullptr);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->state["imported_from"].get<std::string>(), path);
  for (ExportDtype d : {ExportDtype::kF32, ExportDtype::kQ8_0}) {
    Status st = ExportModel(*back, tmp / "again.gguf", {"gguf", d, ""});
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  ASSERT_TRUE(ExportModel(*back, tmp / "hf", {"safetensors", ExportDtype::kF32, ""}).ok());
  auto again = LoadExportedModel(tmp / "again.gguf", nullptr);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->state["step"], 7);
  SnapshotView view;
  view.config = back->config;
  view.params = back->params.data();
  view.state = back->state;
  view.tokenizer = back->tokenizer;
  auto files = EncodeSnapshot(view);
  ASSERT_TRUE(files.ok()) << files.status().ToString();
}

// Temporaries are uniquely named and only they are ever removed: a user's m.gguf.tmp directory survives a
// successful export and a failed write, and no temporary is left behind.
TEST(GgufModel, ExportLeavesUsersTmpPathsAlone) {
  TempDir tmp;
  auto s = MakeSnapshot("byte", Tiny(1, 2, 32, 8), 0, 9);
  const std::string path = tmp / "m.gguf";
  ASSERT_TRUE(DefaultEnv()->CreateDirs(path + ".tmp").ok());
  testing::WriteText(path + ".tmp/notes.txt", "mine");
  Status st = ExportModel(s, path, {"gguf", ExportDtype::kF32, ""});
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_TRUE(ExportModel(s, path, {"gguf", ExportDtype::kF16, ""}).ok());
  EXPECT_EQ(DefaultEnv()->ReadFile(path + ".tmp/notes.txt").value(), "mine");
  EXPECT_TRUE(LoadExportedModel(path, nullptr).ok());
  // WriteGgufFile onto a directory: the rename fails; the directory, its contents and the neighbours stay.
  ASSERT_TRUE(DefaultEnv()->CreateDirs(tmp / "d/sub").ok());
  EXPECT_FALSE(WriteGgufFile(tmp / "d", {}, {}).ok());
  EXPECT_TRUE(DefaultEnv()->IsDir(tmp / "d/sub"));
  ASSERT_TRUE(WriteGgufFile(tmp / "w.gguf", {}, {}).ok());
  EXPECT_EQ(DirEntries(tmp.path()), (std::vector<std::string>{"d", "m.gguf", "m.gguf.tmp", "w.gguf"}));
  EXPECT_EQ(DirEntries(path + ".tmp"), std::vector<std::string>{"notes.txt"});
}

// ---------------------------------------------------------------------------------------------------------
// Hostile input

std::string SmallModelFile() {
  auto s = MakeSnapshot("byte", Tiny(1, 1, 32, 4), 0, 6);
  auto enc = EncodeModelGguf(s, ExportDtype::kQ8_0, "");
  EXPECT_TRUE(enc.ok());
  return *enc;
}

void ExpectOneLineError(const Status& s, const std::string& src) {
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.message().rfind(src + ": ", 0), 0u) << s.message();
  EXPECT_EQ(s.message().find('\n'), std::string::npos) << s.message();
}

TEST(GgufHostile, EveryTruncationFailsCleanly) {
  const std::string b = SmallModelFile();
  auto full = GgufFile::FromBytes(b);
  ASSERT_TRUE(full.ok());
  uint64_t data_end = 0;
  for (const auto& t : full->tensors()) data_end = std::max(data_end, t.file_offset + t.nbytes);
  const size_t header = full->data_offset();
  int parsed = 0;
  // Every prefix near the header, then every 97th, then the last few and the whole file (which must parse).
  std::vector<size_t> lengths;
  for (size_t n = 0; n < b.size(); n += (n < header + 64 ? 1 : 97)) lengths.push_back(n);
  for (size_t n = data_end > 2 ? data_end - 2 : 0; n <= b.size(); ++n) lengths.push_back(n);
  for (size_t n : lengths) {
    auto f = GgufFile::FromBytes(b.substr(0, n), "cut.gguf");
    if (n < data_end) {
      ASSERT_FALSE(f.ok()) << "prefix of " << n << " bytes parsed";
      ExpectOneLineError(f.status(), "cut.gguf");
    } else if (f.ok()) {
      ++parsed;
      EXPECT_TRUE(DecodeModelGguf(*f, nullptr).ok());
    }
  }
  EXPECT_GE(parsed, 1);  // at least the whole file: the branch above ran
}

TEST(GgufHostile, RandomBitFlipsNeverCrash) {
  const std::string b = SmallModelFile();
  auto full = GgufFile::FromBytes(b);
  ASSERT_TRUE(full.ok());
  const size_t header = full->data_offset();
  std::mt19937_64 rng(42);
  int ok = 0, failed = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string m = b;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      // Mostly the header (counts, lengths, types, offsets); sometimes anywhere.
      const size_t pos = rng() % 4 ? rng() % header : rng() % m.size();
      m[pos] = static_cast<char>(m[pos] ^ (1u << (rng() % 8)));
    }
    auto f = GgufFile::FromBytes(m, "flip.gguf");
    if (!f.ok()) {
      ExpectOneLineError(f.status(), "flip.gguf");
      ++failed;
      continue;
    }
    ++ok;
    auto s = DecodeModelGguf(*f, nullptr);  // must not crash; may fail
    if (!s.ok()) ExpectOneLineError(s.status(), "flip.gguf");
  }
  EXPECT_GT(failed, 0);
  std::printf("  bit flips: %d parsed, %d rejected\n", ok, failed);
}

// Hand-built headers.
struct Builder {
  std::string b;
  Builder& u32(uint32_t v) { b.append(reinterpret_cast<const char*>(&v), 4); return *this; }
  Builder& u64(uint64_t v) { b.append(reinterpret_cast<const char*>(&v), 8); return *this; }
  Builder& str(const std::string& s) { u64(s.size()); b += s; return *this; }
  Builder& head(uint64_t nt, uint64_t nkv, uint32_t version = 3) {
    b = "GGUF";
    return u32(version).u64(nt).u64(nkv);
  }
};

std::string Err(const std::string& bytes) {
  auto f = GgufFile::FromBytes(bytes, "h.gguf");
  if (f.ok()) return "OK";
  EXPECT_EQ(f.status().code(), Code::kCorrupt);
  ExpectOneLineError(f.status(), "h.gguf");
  return f.status().message();
}

void ExpectErr(const std::string& bytes, const std::string& part) {
  const std::string e = Err(bytes);
  EXPECT_NE(e.find(part), std::string::npos) << "got: " << e << "\nwanted: " << part;
}

TEST(GgufHostile, CraftedHeaders) {
  Builder g;
  ExpectErr("", "bad magic");
  ExpectErr("GGML\3\0\0\0", "bad magic");
  ExpectErr(g.head(0, 0, 1).b, "unsupported GGUF version 1");
  ExpectErr(g.head(0, 0, 4).b, "unsupported GGUF version 4");
  ExpectErr(g.head(0, 0, 0x03000000).b, "big-endian");
  ExpectErr(std::string("GGUF\3\0\0\0", 8), "truncated header");
  EXPECT_EQ(Err(g.head(0, 0).b), "OK");
  ExpectErr(g.head(~0ull, 0).b, "tensor count");
  ExpectErr(g.head(1ull << 62, 0).b, "tensor count");
  ExpectErr(g.head(0, ~0ull).b, "metadata count");
  ExpectErr(g.head(0, 1).str("k").u32(4).b, "truncated value of key 'k'");
  ExpectErr(g.head(0, 1).u64(~0ull).b + std::string(16, 'x'), "truncated metadata key 0");  // huge key length
  ExpectErr(g.head(0, 1).str("k").u32(8).u64(1ull << 60).b + "xxxxxxxx", "truncated value");  // huge string
  ExpectErr(g.head(0, 1).str("k").u32(13).b + "xxxxxxxx", "unknown type 13");
  ExpectErr(g.head(0, 1).str("k").u32(9).u32(9).u64(1).b + "xxxxxxxxxxxxxxxx", "array of arrays");
  ExpectErr(g.head(0, 1).str("k").u32(9).u32(77).u64(1).b + "xxxxxxxx", "unknown value type 77");
  ExpectErr(g.head(0, 1).str("k").u32(9).u32(6).u64(1ull << 61).b + "xxxxxxxx", "does not fit");
  ExpectErr(g.head(0, 1).str("k").u32(9).u32(8).u64(~0ull).b + "xxxxxxxx", "does not fit");
  ExpectErr(g.head(0, 2).str("k").u32(4).u32(1).str("k").u32(4).u32(1).b, "duplicate metadata key 'k'");
  ExpectErr(g.head(0, 1).str("general.alignment").u32(4).u32(24).b, "not a power of two");
  ExpectErr(g.head(0, 1).str("general.alignment").u32(4).u32(0).b, "not a power of two");
  ExpectErr(g.head(0, 1).str("general.alignment").u32(10).u64(32).b, "not a u32");

  auto tensor = [&](uint32_t nd, std::vector<uint64_t> ne, uint32_t type, uint64_t off, const std::string& name = "t") {
    g.str(name).u32(nd);
    for (auto d : ne) g.u64(d);
    g.u32(type).u64(off);
    return g;
  };
  auto pad = [&](size_t data_bytes) {
    g.b.resize((g.b.size() + 31) / 32 * 32, '\0');
    g.b.append(data_bytes, '\0');
    return g.b;
  };
  g.head(1, 0);
  tensor(1, {8}, 0, 0);
  EXPECT_EQ(Err(pad(32)), "OK");
  g.head(1, 0);
  tensor(1, {8}, 0, 0);
  ExpectErr(pad(31), "past the end of the file");
  g.head(1, 0);
  tensor(5, {1, 1, 1, 1, 1}, 0, 0);
  ExpectErr(pad(32), "5 dimensions");
  g.head(1, 0);
  tensor(2, {1ull << 40, 1ull << 40}, 0, 0);
  ExpectErr(pad(32), "implausible shape");
  g.head(1, 0);
  tensor(1, {~0ull}, 0, 0);
  ExpectErr(pad(32), "implausible shape");
  g.head(1, 0);
  tensor(1, {1ull << 60}, 0, 0);  // 2^62 bytes: no overflow, but far past the end of the file
  ExpectErr(pad(32), "past the end");
  g.head(1, 0);
  tensor(1, {8}, 99, 0);
  ExpectErr(pad(32), "unknown or unsupported tensor type 99");
  g.head(1, 0);
  tensor(1, {16}, 8, 0);
  ExpectErr(pad(64), "not a multiple of the Q8_0 block size");
  g.head(1, 0);
  tensor(1, {8}, 0, 4);
  ExpectErr(pad(64), "not a multiple of the alignment");
  g.head(1, 0);
  tensor(1, {8}, 0, 1ull << 63);
  ExpectErr(pad(64), "data offset 9223372036854775808, expected 0 (tensors lie back to back)");
  g.head(1, 0);
  tensor(1, {8}, 0, ~0ull - 31);
  ExpectErr(pad(64), "expected 0 (tensors lie back to back)");
  g.head(2, 0);
  tensor(1, {16}, 0, 0, "a");
  tensor(1, {8}, 0, 32, "b");
  ExpectErr(pad(96), "tensor 'b' data offset 32, expected 64");
  // A tensor that a flipped type bit shrank (F32 -> F16: 64 bytes -> 32) leaves a hole before the next one, or
  // room after the last one; either is an error.
  g.head(2, 0);
  tensor(1, {16}, 1, 0, "a");
  tensor(1, {8}, 0, 64, "b");
  ExpectErr(pad(96), "tensor 'b' data offset 64, expected 32");
  g.head(1, 0);
  tensor(1, {16}, 1, 0, "a");
  ExpectErr(pad(64), "32 bytes follow the last tensor's data");
  g.head(2, 0);
  tensor(1, {8}, 0, 0, "a");
  tensor(1, {8}, 0, 32, "a");
  ExpectErr(pad(96), "duplicate tensor 'a'");
  g.head(1, 0);
  g.u64(~0ull);
  ExpectErr(pad(64), "truncated tensor info 0");
  // A hostile name is quoted printably and cut short in the error.
  g.head(2, 0);
  tensor(1, {8}, 0, 0, std::string("\x01\n\xff", 3) + std::string(100, 'n'));
  tensor(1, {8}, 0, 0, std::string("\x01\n\xff", 3) + std::string(100, 'n'));
  ExpectErr(pad(64), "'\\x01\\x0A\\xFFnnn");
}

TEST(GgufHostile, ReadF32OnlyForDecodableTypes) {
  Builder g;
  g.head(1, 0);
  g.str("q").u32(1).u64(32).u32(2).u64(0);  // Q4_0: parsed (known size) but not decodable
  g.b.resize((g.b.size() + 31) / 32 * 32, '\0');
  g.b.append(32, '\0');
  auto f = GgufFile::FromBytes(g.b, "q4.gguf");
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->ReadF32("q").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(f->ReadF32("nope").status().code(), Code::kNotFound);
}

// Counts that fit the file by their smallest encoding must not make the parser reserve memory for them up front
// (an entry in memory is ~10x its smallest encoding).
TEST(GgufHostile, HugeClaimedCountsReserveLittle) {
  const size_t body = 2 << 20;
  Builder kv, ti;
  const std::string kvs = kv.head(0, body / 13).b + std::string(body, 'x');
  const std::string tis = ti.head(body / 24, 0).b + std::string(body, 'x');
  for (const std::string* bytes : {&kvs, &tis}) {
    std::string copy = *bytes;  // allocated before tracking starts
    g_max_alloc = 0;
    g_track_allocs = true;
    auto f = GgufFile::FromBytes(std::move(copy), "h.gguf");
    g_track_allocs = false;
    EXPECT_FALSE(f.ok());
    EXPECT_LT(g_max_alloc.load(), body) << "one allocation larger than the whole input";
  }
}

// Name lookups are hashed: a model with many tensors is not quadratic to import.
TEST(GgufHostile, TensorLookupIsNotQuadratic) {
  const int n = 80000;
  Builder g;
  g.head(n, 0);
  char name[16];
  for (int i = 0; i < n; ++i) {
    std::snprintf(name, sizeof(name), "tensor%08d", i);
    g.str(name).u32(1).u64(0).u32(0).u64(0);  // empty F32 tensors
  }
  auto f = GgufFile::FromBytes(g.b, "many.gguf");
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  const auto t0 = std::chrono::steady_clock::now();
  int found = 0;
  for (int i = 0; i < n; ++i) {
    std::snprintf(name, sizeof(name), "tensor%08d", i);
    const GgufTensorInfo* t = f->FindTensor(name);
    found += t != nullptr && t->name == name;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(found, n);
  EXPECT_EQ(f->FindTensor("tensor"), nullptr);
  EXPECT_LT(secs, 1.0) << n << " lookups (a linear scan takes several seconds)";
  EXPECT_EQ(f->FindKey("general.alignment"), nullptr);
}

}  // namespace
}  // namespace keel
