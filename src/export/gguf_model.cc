// gguf_model.cc: the keel <-> GGUF "gpt2" mapping (see gguf_model.h).
#include "export/gguf_model.h"

#include <cmath>
#include <cstdio>
#include <functional>
#include <cstring>
#include <map>
#include <set>

#include "core/hash.h"
#include "data/tokenizer.h"
#include "formats/half.h"

namespace keel {

namespace {

constexpr float kLayerNormEps = 1e-5f;

std::string ToStr(const std::vector<uint64_t>& ne) {
  std::string s = "{";
  for (size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
  return s + "}";
}

// GGUF ne of a keel tensor: the keel shape reversed.
std::vector<uint64_t> GgufNe(const std::vector<int64_t>& shape) {
  std::vector<uint64_t> ne;
  for (auto it = shape.rbegin(); it != shape.rend(); ++it) ne.push_back(static_cast<uint64_t>(*it));
  return ne;
}

// Encodes n floats as type; data must stay alive while the tensor is written.
struct Encoded {
  GgmlType type;
  std::string bytes;
};

// The type a tensor is written as: vectors (and keep_f32: wpe) stay F32; matrices take the dtype, except that a
// Q8_0 matrix whose rows are not a multiple of the 32-value block falls back to F16.
GgmlType StoredType(const std::vector<int64_t>& shape, ExportDtype dtype, bool keep_f32) {
  if (shape.size() < 2 || keep_f32 || dtype == ExportDtype::kF32) return GgmlType::kF32;
  if (dtype == ExportDtype::kQ8_0 && shape.back() % static_cast<int64_t>(kQ8_0BlockSize) == 0) return GgmlType::kQ8_0;
  return GgmlType::kF16;
}

Encoded EncodeTensor(const float* x, const std::vector<int64_t>& shape, ExportDtype dtype, bool keep_f32) {
  size_t n = 1;
  for (auto d : shape) n *= static_cast<size_t>(d);
  const GgmlType type = StoredType(shape, dtype, keep_f32);
  if (type == GgmlType::kF32) return {GgmlType::kF32, std::string(reinterpret_cast<const char*>(x), n * sizeof(float))};
  if (type == GgmlType::kQ8_0) return {GgmlType::kQ8_0, QuantizeQ8_0(x, n)};
  std::string b(n * sizeof(uint16_t), '\0');
  std::vector<uint16_t> h(n);
  FloatToF16N(x, h.data(), n);
  std::memcpy(b.data(), h.data(), b.size());
  return {GgmlType::kF16, std::move(b)};
}

uint32_t FileType(ExportDtype d) {
  switch (d) {
    case ExportDtype::kF32: return kGgufFileTypeAllF32;
    case ExportDtype::kF16: return kGgufFileTypeMostlyF16;
    case ExportDtype::kQ8_0: return kGgufFileTypeMostlyQ8_0;
  }
  return kGgufFileTypeAllF32;
}

}  // namespace

std::string GgufTensorName(const std::string& n) {
  if (n == "wte") return "token_embd.weight";
  if (n == "wpe") return "position_embd.weight";
  if (n == "lnf.weight") return "output_norm.weight";
  if (n == "lnf.bias") return "output_norm.bias";
  if (n.rfind("h.", 0) != 0) return "";
  const size_t dot = n.find('.', 2);
  if (dot == std::string::npos) return "";
  const std::string layer = n.substr(2, dot - 2), rest = n.substr(dot + 1);
  static const std::map<std::string, std::string> kMap = {
      {"ln1.weight", "attn_norm.weight"},      {"ln1.bias", "attn_norm.bias"},
      {"attn.qkv.weight", "attn_qkv.weight"},  {"attn.qkv.bias", "attn_qkv.bias"},
      {"attn.proj.weight", "attn_output.weight"}, {"attn.proj.bias", "attn_output.bias"},
      {"ln2.weight", "ffn_norm.weight"},       {"ln2.bias", "ffn_norm.bias"},
      {"mlp.fc.weight", "ffn_up.weight"},      {"mlp.fc.bias", "ffn_up.bias"},
      {"mlp.proj.weight", "ffn_down.weight"},  {"mlp.proj.bias", "ffn_down.bias"},
  };
  auto it = kMap.find(rest);
  return it == kMap.end() ? "" : "blk." + layer + "." + it->second;
}

namespace {

constexpr const char* kGgufChecksumKey = "keel.checksum";

std::string FormatG(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

// One tensor as the checksum sees it: its name, type, shape and bytes.
struct ChecksumTensor {
  const std::string* name;
  GgmlType type;
  const std::vector<uint64_t>* ne;
  const uint8_t* data;
  size_t nbytes;
};

std::string Hex64(uint64_t h) {
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

// keel.checksum = "LAYOUT-DATA", two Hash64s (hex): LAYOUT over every tensor's name, type and shape in file order;
// DATA over their bytes, then the keel.* metadata import uses (config, state, tokenizer). llama.cpp ignores the
// key; keel's import verifies it, so a flipped byte in an export is an error instead of a silently different
// model. Tools such as llama-quantize copy the key into a file whose tensors they re-encoded: the layout then
// differs, and import only warns that it cannot verify such a file.
std::string GgufChecksum(const std::vector<ChecksumTensor>& tensors, const GgufMetadata& md) {
  uint64_t layout = 0x6B65656C6C61796Full, h = 0x6B65656C67677566ull;
  for (const auto& t : tensors) {
    layout = Hash64(t.name->data(), t.name->size(), layout);
    const uint32_t type = static_cast<uint32_t>(t.type);
    layout = Hash64(&type, sizeof type, layout);
    layout = Hash64(t.ne->data(), t.ne->size() * sizeof(uint64_t), layout);
    h = Hash64(t.data, t.nbytes, h);
  }
  for (const char* key : {"keel.config", "keel.state", "keel.tokenizer"}) {
    for (const auto& [k, v] : md) {
      if (k != key) continue;
      if (auto str = v.AsString()) h = Hash64(str->data(), str->size(), h);
      else if (auto bytes = v.AsU8Array()) h = Hash64(bytes->data(), bytes->size(), h);
    }
  }
  return Hex64(layout) + "-" + Hex64(h);
}

// Verifies keel.checksum where the file has one (exports of keel before 2026-11-27 do not: a warning).
Status VerifyGgufChecksum(const GgufFile& f, const std::function<void(const std::string&)>& warn) {
  const GgufValue* v = f.FindKey(kGgufChecksumKey);
  if (!v) {
    warn("no keel.checksum (exported by an older keel): the tensor data is not verified");
    return Status::Ok();
  }
  if (!v->AsString() || v->AsString()->size() != 33) return Corrupt(f.source() + ": keel.checksum is malformed");
  std::vector<ChecksumTensor> ts;
  for (const auto& t : f.tensors()) ts.push_back({&t.name, t.type, &t.ne, t.data, t.nbytes});
  const std::string want = *v->AsString(), got = GgufChecksum(ts, f.metadata());
  if (got == want) return Status::Ok();
  if (got.compare(0, 16, want, 0, 16) != 0) {
    warn("the tensors' names, types or shapes are not those keel exported (rewritten by another tool, e.g. "
         "llama-quantize?): keel.checksum cannot verify the data");
    return Status::Ok();
  }
  return Corrupt(f.source() + ": checksum mismatch (keel.checksum): the file is corrupt");
}

}  // namespace

Result<std::string> EncodeModelGguf(const TrainingSnapshot& s, ExportDtype dtype, const std::string& name) {
  const GptConfig& c = s.config;
  KEEL_RETURN_IF_ERROR(c.Validate());
  if (s.params.size() != NumParams(c))
    return InvalidArgument("gguf export: the parameter buffer does not match the model config");
  KEEL_RETURN_IF_ERROR(CheckFiniteParams(s, "gguf export", [dtype](const ParamTensor& t) {
    const GgmlType type = StoredType(t.shape, dtype, t.name == "wpe");  // wte's shape is also output.weight's
    return type == GgmlType::kF16 ? kF16Max : type == GgmlType::kQ8_0 ? kQ8_0Max : HUGE_VAL;
  }));
  const bool byte_tok = s.tokenizer.rfind("keel-byte-tokenizer", 0) == 0;
  auto tok = LoadTokenizer(byte_tok ? "byte" : "bpe", s.tokenizer);
  if (!tok.ok()) return tok.status().Wrap("gguf export: tokenizer");
  const int T = (*tok)->vocab_size();
  if (T > c.vocab)
    return InvalidArgument("gguf export: the tokenizer has " + std::to_string(T) + " tokens but the model only " +
                           std::to_string(c.vocab) + " embedding rows");

  // Vocabulary: exactly c.vocab entries, unique strings (llama.cpp maps text -> id).
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;
  std::set<std::string> seen;
  int unk = -1;
  for (int i = 0; i < c.vocab; ++i) {
    std::string p;
    float sc = 0.0f;
    int ty = kPieceUnused;
    if (i < T) {
      p = (*tok)->piece(i);
      sc = (*tok)->score(i);
      ty = (*tok)->piece_type(i);
      if (ty == kPieceUnknown && unk < 0) unk = i;
      if (byte_tok && i == ' ') {
        // llama.cpp's SPM tokenizer rewrites every space as U+2581 before looking pieces up; with "<0x20>" it
        // would fall back to the three bytes of U+2581. A normal piece "▁" maps it back to id 32 (and
        // detokenizes to a space).
        p = "\xE2\x96\x81";
        ty = kPieceNormal;
      }
    } else {
      p = "<pad_" + std::to_string(i) + ">";
    }
    if (p.empty()) p = "<empty_" + std::to_string(i) + ">";
    while (!seen.insert(p).second) p += "_";  // never expected for SentencePiece/byte pieces; keeps text unique
    tokens.push_back(std::move(p));
    scores.push_back(sc);
    types.push_back(ty);
  }

  GgufMetadata md;
  md.emplace_back("general.architecture", GgufValue::Str("gpt2"));
  md.emplace_back("general.name", GgufValue::Str(name.empty() ? "keel-gpt2" : name));
  md.emplace_back("general.alignment", GgufValue::U32(kGgufDefaultAlignment));
  md.emplace_back("general.file_type", GgufValue::U32(FileType(dtype)));
  md.emplace_back("general.quantization_version", GgufValue::U32(2));
  md.emplace_back("gpt2.context_length", GgufValue::U32(static_cast<uint32_t>(c.ctx)));
  md.emplace_back("gpt2.embedding_length", GgufValue::U32(static_cast<uint32_t>(c.dim)));
  md.emplace_back("gpt2.feed_forward_length", GgufValue::U32(static_cast<uint32_t>(4 * c.dim)));
  md.emplace_back("gpt2.block_count", GgufValue::U32(static_cast<uint32_t>(c.layers)));
  md.emplace_back("gpt2.attention.head_count", GgufValue::U32(static_cast<uint32_t>(c.heads)));
  md.emplace_back("gpt2.attention.layer_norm_epsilon", GgufValue::F32(kLayerNormEps));
  md.emplace_back("tokenizer.ggml.model", GgufValue::Str("llama"));
  md.emplace_back("tokenizer.ggml.tokens", GgufValue::StrArray(std::move(tokens)));
  md.emplace_back("tokenizer.ggml.scores", GgufValue::F32Array(scores));
  md.emplace_back("tokenizer.ggml.token_type", GgufValue::I32Array(types));
  if (!byte_tok) {
    if ((*tok)->bos_id() >= 0)
      md.emplace_back("tokenizer.ggml.bos_token_id", GgufValue::U32(static_cast<uint32_t>((*tok)->bos_id())));
    if ((*tok)->eos_id() >= 0)
      md.emplace_back("tokenizer.ggml.eos_token_id", GgufValue::U32(static_cast<uint32_t>((*tok)->eos_id())));
    if (unk >= 0) md.emplace_back("tokenizer.ggml.unknown_token_id", GgufValue::U32(static_cast<uint32_t>(unk)));
  }
  md.emplace_back("tokenizer.ggml.add_bos_token", GgufValue::Bool(false));
  md.emplace_back("tokenizer.ggml.add_eos_token", GgufValue::Bool(false));
  md.emplace_back("tokenizer.ggml.add_space_prefix", GgufValue::Bool(false));
  md.emplace_back("tokenizer.ggml.remove_extra_whitespaces", GgufValue::Bool(false));
  md.emplace_back("keel.format_version", GgufValue::U32(1));
  md.emplace_back("keel.config", GgufValue::Str(c.ToJson().dump()));
  // The state holds user strings (imported_from is a path, which need not be UTF-8): replace, never throw.
  const auto kReplace = nlohmann::json::error_handler_t::replace;
  md.emplace_back("keel.state", GgufValue::Str(s.state.is_object() ? s.state.dump(-1, ' ', false, kReplace) : "{}"));
  md.emplace_back("keel.tokenizer_type", GgufValue::Str(byte_tok ? "byte" : "bpe"));
  md.emplace_back("keel.tokenizer", GgufValue::U8Array(s.tokenizer));

  std::vector<Encoded> enc;
  std::vector<GgufTensorIn> tensors;
  const auto layout = ParamLayout(c);
  enc.reserve(layout.size() + 1);
  auto add = [&](const std::string& gname, const ParamTensor& t, bool keep_f32) {
    enc.push_back(EncodeTensor(s.params.data() + t.offset, t.shape, dtype, keep_f32));
    tensors.push_back({gname, GgufNe(t.shape), enc.back().type, enc.back().bytes.data(), enc.back().bytes.size()});
  };
  for (const auto& t : layout) add(GgufTensorName(t.name), t, t.name == "wpe");
  add("output.weight", layout[0], false);  // the tied LM head, written explicitly (llama.cpp requires it)
  std::vector<ChecksumTensor> ts;
  for (const auto& t : tensors) ts.push_back({&t.name, t.type, &t.ne, static_cast<const uint8_t*>(t.data), t.nbytes});
  md.emplace_back(kGgufChecksumKey, GgufValue::Str(GgufChecksum(ts, md)));
  return EncodeGguf(md, tensors, kGgufDefaultAlignment);
}

Status ExportGguf(const TrainingSnapshot& s, const std::string& path, ExportDtype dtype, const std::string& name) {
  auto bytes = EncodeModelGguf(s, dtype, name);
  if (!bytes.ok()) return bytes.status().Wrap(path);
  return WriteFileAtomic(path, *bytes);  // removes its own temporary on failure, and nothing else
}

Result<TrainingSnapshot> DecodeModelGguf(const GgufFile& f, std::vector<std::string>* warnings) {
  const std::string& src = f.source();
  auto bad = [&](const std::string& what) { return Corrupt(src + ": " + what); };
  auto warn = [&](const std::string& w) {
    if (warnings) warnings->push_back(src + ": " + w);
  };
  KEEL_RETURN_IF_ERROR(VerifyGgufChecksum(f, warn));
  const GgufValue* arch = f.FindKey("general.architecture");
  if (!arch || !arch->AsString()) return bad("no general.architecture");
  if (*arch->AsString() != "gpt2")
    return bad("architecture " + GgufQuote(*arch->AsString()) + " is not supported (keel imports gpt2 only)");
  if (const GgufValue* fv = f.FindKey("keel.format_version")) {
    if (!fv->AsUint()) return bad("keel.format_version is not an integer");
    if (*fv->AsUint() > 1)
      return bad("keel.format_version " + std::to_string(*fv->AsUint()) +
                 " is newer than this keel reads (1): export it again with this keel, or update keel");
  }
  auto get_u = [&](const std::string& key, int* out) -> Status {
    const GgufValue* v = f.FindKey(key);
    if (!v || !v->AsUint()) return Corrupt(src + ": missing or non-integer " + key);
    if (*v->AsUint() > (1u << 30)) return Corrupt(src + ": implausible " + key);
    *out = static_cast<int>(*v->AsUint());
    return Status::Ok();
  };
  GptConfig c;
  KEEL_RETURN_IF_ERROR(get_u("gpt2.block_count", &c.layers));
  KEEL_RETURN_IF_ERROR(get_u("gpt2.attention.head_count", &c.heads));
  KEEL_RETURN_IF_ERROR(get_u("gpt2.embedding_length", &c.dim));
  KEEL_RETURN_IF_ERROR(get_u("gpt2.context_length", &c.ctx));
  if (f.FindKey("gpt2.feed_forward_length")) {
    int ff = 0;
    KEEL_RETURN_IF_ERROR(get_u("gpt2.feed_forward_length", &ff));
    if (ff != 4 * static_cast<int64_t>(c.dim))  // 64-bit: dim may be up to 2^30 here (Validate comes later)
      return bad("feed_forward_length " + std::to_string(ff) + " is not 4 x embedding_length");
  }
  if (const GgufValue* eps = f.FindKey("gpt2.attention.layer_norm_epsilon")) {
    if (!eps->AsFloat()) return bad("gpt2.attention.layer_norm_epsilon is not a float");
    if (std::fabs(*eps->AsFloat() - kLayerNormEps) > 1e-3 * kLayerNormEps)
      warn("layer_norm_epsilon is " + std::to_string(*eps->AsFloat()) + "; keel always uses 1e-5");
  }
  const GgufTensorInfo* emb = f.FindTensor("token_embd.weight");
  if (!emb) return bad("missing tensor 'token_embd.weight'");
  if (emb->ne.size() != 2) return bad("token_embd.weight is not a matrix");
  if (emb->ne[1] > (1u << 30)) return bad("implausible vocabulary size");
  c.vocab = static_cast<int>(emb->ne[1]);
  // Named by the file's keys, not keel's flags (the user passed none).
  if (Status v = c.Validate({"gpt2.block_count", "gpt2.attention.head_count", "gpt2.embedding_length",
                             "gpt2.context_length", "token_embd.weight's vocabulary size"});
      !v.ok())
    return bad("model config: " + v.message());

  // keel's own copy of the config (covered by keel.checksum, unlike the gpt2.* keys) must agree: a flipped bit
  // in gpt2.block_count (6 -> 2) would otherwise load as a smaller, different model without a word.
  if (const GgufValue* kc = f.FindKey("keel.config")) {
    const nlohmann::json j = kc->AsString() ? nlohmann::json::parse(*kc->AsString(), nullptr, false) : nlohmann::json();
    auto mine = j.is_object() ? GptConfig::FromJson(j) : Result<GptConfig>(Corrupt("not a JSON object"));
    if (!mine.ok()) return bad("keel.config is malformed (" + mine.status().message() + ")");
    if (mine->layers != c.layers || mine->heads != c.heads || mine->dim != c.dim || mine->ctx != c.ctx ||
        mine->vocab != c.vocab)
      return bad("the gpt2.* keys (" + c.ToJson().dump() + ") disagree with keel.config (" + mine->ToJson().dump() +
                 "): the file is corrupt");
  }

  // Every tensor must be present with its shape before anything is allocated (the config comes from the file),
  // and no other tensor may be there: one outside the layout (blk.7.* in a 6-layer model) means the keys lie.
  const auto layout = ParamLayout(c);
  std::set<std::string> expected = {"output.weight"};
  for (const auto& t : layout) {
    const std::string g = GgufTensorName(t.name);
    expected.insert(g);
    const GgufTensorInfo* ti = f.FindTensor(g);
    if (!ti) return bad("missing tensor '" + g + "'");
    if (ti->ne != GgufNe(t.shape))
      return bad("tensor '" + g + "' has shape " + ToStr(ti->ne) + ", expected " + ToStr(GgufNe(t.shape)));
    // Vectors (biases, LayerNorm) stay F32 in keel's exports and in llama-quantize's output: another type there
    // is a flipped type byte, whose data would be decoded as garbage.
    if (ti->ne.size() == 1 && ti->type != GgmlType::kF32)
      return bad("tensor '" + g + "' is a vector stored as type " + std::to_string(static_cast<int>(ti->type)) +
                 " (vectors are F32): the file is corrupt");
  }
  for (const auto& t : f.tensors())
    if (!expected.count(t.name)) return bad("unexpected tensor " + GgufQuote(t.name) + " for this model config");
  TrainingSnapshot s;
  s.config = c;
  s.params.assign(NumParams(c), 0.0f);
  for (const auto& t : layout) {
    const std::string g = GgufTensorName(t.name);
    KEEL_ASSIGN_OR_RETURN(std::vector<float> v, f.ReadF32(g));
    std::copy(v.begin(), v.end(), s.params.begin() + static_cast<std::ptrdiff_t>(t.offset));
  }
  if (const GgufTensorInfo* out = f.FindTensor("output.weight")) {
    if (out->ne != emb->ne) return bad("output.weight has shape " + ToStr(out->ne) + ", expected " + ToStr(emb->ne));
    KEEL_ASSIGN_OR_RETURN(std::vector<float> o, f.ReadF32("output.weight"));
    double max_diff = 0.0;
    const float* w = s.params.data();  // wte is the first tensor
    for (size_t i = 0; i < o.size(); ++i) max_diff = std::max(max_diff, std::fabs(double(o[i]) - double(w[i])));
    if (!(max_diff == 0.0))
      warn("output.weight differs from token_embd.weight (max |diff| " + FormatG(max_diff) +
           "); keel ties the LM head to the token embedding and ignores output.weight");
  }

  const GgufValue* tv = f.FindKey("keel.tokenizer");
  if (!tv || !tv->AsU8Array())
    return bad("no keel.tokenizer metadata: keel imports only GGUF files it exported (the tokenizer cannot be "
               "rebuilt from the token list)");
  s.tokenizer = *tv->AsU8Array();
  const bool byte_tok = s.tokenizer.rfind("keel-byte-tokenizer", 0) == 0;
  auto tok = LoadTokenizer(byte_tok ? "byte" : "bpe", s.tokenizer);
  if (!tok.ok()) return tok.status().Wrap(src + ": keel.tokenizer");
  if ((*tok)->vocab_size() > c.vocab) return bad("the embedded tokenizer has more tokens than the model");

  s.state = nlohmann::json::object();
  if (const GgufValue* st = f.FindKey("keel.state"); st && st->AsString()) {
    auto j = nlohmann::json::parse(*st->AsString(), nullptr, false);
    if (j.is_object()) s.state = j;
  }
  if (!s.state.contains("step") || !s.state["step"].is_number_integer()) s.state["step"] = 0;
  s.state["imported_from"] = src;
  return s;
}

Result<TrainingSnapshot> ImportGguf(const std::string& path, std::vector<std::string>* warnings) {
  auto f = GgufFile::Open(path);
  if (!f.ok()) return f.status();
  return DecodeModelGguf(*f, warnings);
}

}  // namespace keel
