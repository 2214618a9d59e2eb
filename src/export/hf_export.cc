// hf_export.cc: the keel <-> Hugging Face GPT-2 directory mapping (see hf_export.h).
#include "export/hf_export.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <stdio.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>

#include "core/env.h"
#include "core/hash.h"
#include "data/tokenizer.h"
#include "export/gguf.h"
#include "formats/half.h"
#include "formats/safetensors.h"

namespace keel {

namespace {

constexpr double kLayerNormEps = 1e-5;

// [rows, cols] row-major -> [cols, rows] row-major.
std::vector<float> Transpose(const float* x, int64_t rows, int64_t cols) {
  std::vector<float> t(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[static_cast<size_t>(c * rows + r)] = x[r * cols + c];
  return t;
}

// Pretty JSON text; invalid UTF-8 in strings (a path, a token piece) becomes U+FFFD instead of throwing.
std::string DumpJson(const nlohmann::json& j) {
  return j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

// Checksums of a keel export (keel's import verifies them where present; Hugging Face ignores them):
// "keel_checksum" in model.safetensors' __metadata__ (Hash64 chained over the tensors in name order: name, then
// the bytes) and "keel_tokenizer_checksum" in config.json (Hash64 of tokenizer.model).
constexpr const char* kHfChecksumKey = "keel_checksum";
constexpr const char* kHfTokenizerChecksumKey = "keel_tokenizer_checksum";

std::string Hex64(uint64_t h) {
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

std::string HfChecksum(std::vector<TensorView> views) {
  std::sort(views.begin(), views.end(), [](const TensorView& a, const TensorView& b) { return a.name < b.name; });
  uint64_t h = 0x6B65656C68667374ull;  // "keelhfst"
  for (const auto& v : views) {
    h = Hash64(v.name.data(), v.name.size(), h);
    h = Hash64(v.data, v.nbytes, h);
  }
  return Hex64(h);
}

std::string ToStr(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Writes the files into a new, uniquely named staging directory DIR.tmp.XXXXXX (as DIR.tmp.XXXXXX/new), then
// swaps it into place: an earlier export at dir moves to DIR.tmp.XXXXXX/old, the new one to dir, and the staging
// directory (with the old export) is removed. The earlier export is replaced only once the new one is complete,
// and nothing but the staging directory this call created is ever removed (a user's DIR.tmp or DIR.old is safe).
// An existing directory is replaced only when it is an earlier keel export: its config.json has keel's own
// "keel_config" field and it holds no file keel does not write. Any other directory (a Hugging Face model
// folder has a config.json too) is left alone: replacing it would delete the user's other files.
Status CheckReplaceable(const std::string& dir, const std::vector<std::pair<std::string, std::string>>& files) {
  Env* env = DefaultEnv();
  const std::string refuse = dir + ": exists and is not an earlier keel export; not overwriting it (pick a new --out)";
  if (!env->IsDir(dir)) return InvalidArgument(refuse);
  // An empty directory holds nothing to lose (`mkdir out && keel export ... --out out/`): it is replaced like an
  // earlier export. Not a symbolic link to one (the link would be replaced, not its target filled) nor a mount
  // point (it cannot be renamed).
  if (auto entries = env->ListDir(dir); entries.ok() && entries->empty()) {
    struct stat self, parent;
    std::string name = dir;  // (without trailing slashes: lstat("link/") would follow the link)
    while (name.size() > 1 && name.back() == '/') name.pop_back();
    const std::string up = name.find('/') == std::string::npos ? "." : name.substr(0, name.rfind('/') + 1);
    if (::lstat(name.c_str(), &self) != 0 || !S_ISDIR(self.st_mode) || ::stat(up.c_str(), &parent) != 0 ||
        parent.st_dev != self.st_dev)
      return InvalidArgument(dir + ": an empty directory that is a symbolic link or a mount point; keel replaces "
                                   "the directory itself (pick a --out inside it)");
    return Status::Ok();
  }
  auto cfg = env->ReadFile(JoinPath(dir, "config.json"));
  if (!cfg.ok()) return InvalidArgument(refuse);
  auto j = nlohmann::json::parse(*cfg, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("keel_config")) return InvalidArgument(refuse);
  KEEL_ASSIGN_OR_RETURN(const std::vector<std::string> entries, env->ListDir(dir));
  for (const auto& e : entries) {
    bool ours = false;
    for (const auto& f : files) ours |= f.first == e;
    if (!ours)
      return InvalidArgument(dir + ": holds " + GgufQuote(e) + ", which keel's export does not write; not overwriting it");
  }
  return Status::Ok();
}

Status WriteDirAtomic(const std::string& dir, const std::vector<std::pair<std::string, std::string>>& files) {
  Env* env = DefaultEnv();
  if (env->Exists(dir)) KEEL_RETURN_IF_ERROR(CheckReplaceable(dir, files));
  KEEL_ASSIGN_OR_RETURN(const std::string stage, env->CreateUniqueDir(dir + ".tmp."));
  const std::string fresh = JoinPath(stage, "new"), old = JoinPath(stage, "old");
  auto fail = [&](const Status& s) {
    (void)env->RemoveAll(stage);  // ours: created above
    return s;
  };
  Status s = env->CreateDirs(fresh);
  for (size_t i = 0; s.ok() && i < files.size(); ++i)
    s = env->WriteFile(JoinPath(fresh, files[i].first), files[i].second);
  if (s.ok()) s = env->SyncDir(fresh);
  if (!s.ok()) return fail(s);
  const bool had_old = env->Exists(dir);
  // One atomic exchange where the filesystem has it (Linux renameat2): DIR is never missing, so a crash leaves
  // the earlier export or the new one in place, never neither. Elsewhere, two renames.
  if (had_old && ::renameat2(AT_FDCWD, fresh.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) == 0) {
    const Status synced = env->SyncDir(DirName(dir));
    const Status removed = env->RemoveAll(stage);  // the staging directory, now holding the earlier export
    return synced.ok() ? removed : synced;
  }
  if (had_old) {
    if (Status r = env->Rename(dir, old); !r.ok()) return fail(r);
  }
  if (Status r = env->Rename(fresh, dir); !r.ok()) {
    // Put the earlier export back; if even that fails, it is still in the staging directory, which must then
    // not be removed: the error says where it is.
    if (had_old) {
      if (Status back = env->Rename(old, dir); !back.ok())
        return Status(r.code(), r.message() + "; the earlier export could not be put back and is in " + old);
    }
    return fail(r);
  }
  const Status synced = env->SyncDir(DirName(dir));
  const Status removed = env->RemoveAll(stage);  // the staging directory, holding the earlier export
  return synced.ok() ? removed : synced;
}

// dir without trailing slashes ("out/" -> "out"; "/" stays "/"), so DIR.tmp.* lands beside the directory.
std::string StripTrailingSlashes(std::string dir) {
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir;
}

}  // namespace

std::string HfTensorName(const std::string& n, bool* transposed) {
  *transposed = false;
  if (n == "wte") return "transformer.wte.weight";
  if (n == "wpe") return "transformer.wpe.weight";
  if (n == "lnf.weight") return "transformer.ln_f.weight";
  if (n == "lnf.bias") return "transformer.ln_f.bias";
  if (n.rfind("h.", 0) != 0) return "";
  const size_t dot = n.find('.', 2);
  if (dot == std::string::npos) return "";
  const std::string layer = n.substr(2, dot - 2), rest = n.substr(dot + 1);
  static const std::map<std::string, std::string> kMap = {
      {"ln1.weight", "ln_1.weight"},           {"ln1.bias", "ln_1.bias"},
      {"attn.qkv.weight", "attn.c_attn.weight"}, {"attn.qkv.bias", "attn.c_attn.bias"},
      {"attn.proj.weight", "attn.c_proj.weight"}, {"attn.proj.bias", "attn.c_proj.bias"},
      {"ln2.weight", "ln_2.weight"},           {"ln2.bias", "ln_2.bias"},
      {"mlp.fc.weight", "mlp.c_fc.weight"},    {"mlp.fc.bias", "mlp.c_fc.bias"},
      {"mlp.proj.weight", "mlp.c_proj.weight"}, {"mlp.proj.bias", "mlp.c_proj.bias"},
  };
  auto it = kMap.find(rest);
  if (it == kMap.end()) return "";
  *transposed = rest.find(".weight") != std::string::npos && rest.rfind("ln", 0) != 0;
  return "transformer.h." + layer + "." + it->second;
}

Status ExportHfSafetensors(const TrainingSnapshot& s, const std::string& out, ExportDtype dtype) {
  const std::string dir = StripTrailingSlashes(out);
  const GptConfig& c = s.config;
  KEEL_RETURN_IF_ERROR(c.Validate());
  if (dtype == ExportDtype::kQ8_0)
    return InvalidArgument(dir + ": safetensors export supports --dtype f32 and f16 (q8_0 is GGUF-only)");
  if (s.params.size() != NumParams(c))
    return InvalidArgument(dir + ": the parameter buffer does not match the model config");
  KEEL_RETURN_IF_ERROR(CheckFiniteParams(s, dir, [dtype](const ParamTensor&) {  // f16: every tensor
    return dtype == ExportDtype::kF16 ? kF16Max : HUGE_VAL;
  }));
  const bool byte_tok = s.tokenizer.rfind("keel-byte-tokenizer", 0) == 0;
  auto tok = LoadTokenizer(byte_tok ? "byte" : "bpe", s.tokenizer);
  if (!tok.ok()) return tok.status().Wrap(dir + ": tokenizer");
  if ((*tok)->vocab_size() > c.vocab) return InvalidArgument(dir + ": tokenizer is larger than the model's vocabulary");

  // Tensor data (transposed where GPT-2 uses Conv1D), kept alive until encoded.
  std::vector<std::string> data;
  std::vector<TensorView> views;
  const auto layout = ParamLayout(c);
  data.reserve(layout.size());
  for (const auto& t : layout) {
    bool tr = false;
    const std::string name = HfTensorName(t.name, &tr);
    const float* x = s.params.data() + t.offset;
    std::vector<int64_t> shape = t.shape;
    std::vector<float> tmp;
    if (tr) {
      tmp = Transpose(x, t.shape[0], t.shape[1]);
      x = tmp.data();
      shape = {t.shape[1], t.shape[0]};
    }
    std::string b;
    if (dtype == ExportDtype::kF16) {
      std::vector<uint16_t> h(t.size);
      FloatToF16N(x, h.data(), t.size);
      b.assign(reinterpret_cast<const char*>(h.data()), t.size * sizeof(uint16_t));
    } else {
      b.assign(reinterpret_cast<const char*>(x), t.size * sizeof(float));
    }
    data.push_back(std::move(b));
    views.push_back({name, dtype == ExportDtype::kF16 ? "F16" : "F32", shape, data.back().data(), data.back().size()});
  }
  auto model = EncodeSafetensors(views, {{"format", "pt"}, {kHfChecksumKey, HfChecksum(views)}});
  if (!model.ok()) return model.status().Wrap(dir);
  data.clear();

  const int bos = (*tok)->bos_id(), eos = (*tok)->eos_id();
  nlohmann::json config = {
      {"model_type", "gpt2"},
      {"architectures", {"GPT2LMHeadModel"}},
      {"vocab_size", c.vocab},
      {"n_positions", c.ctx},
      {"n_ctx", c.ctx},
      {"n_embd", c.dim},
      {"n_layer", c.layers},
      {"n_head", c.heads},
      {"n_inner", nullptr},
      {"activation_function", "gelu_new"},
      {"layer_norm_epsilon", kLayerNormEps},
      {"resid_pdrop", 0.0},
      {"embd_pdrop", 0.0},
      {"attn_pdrop", 0.0},
      {"initializer_range", 0.02},
      {"scale_attn_weights", true},
      {"use_cache", true},
      {"tie_word_embeddings", true},
      {"bos_token_id", bos >= 0 ? nlohmann::json(bos) : nlohmann::json(nullptr)},
      {"eos_token_id", eos >= 0 ? nlohmann::json(eos) : nlohmann::json(nullptr)},
      {"torch_dtype", dtype == ExportDtype::kF16 ? "float16" : "float32"},
      {"keel_config", c.ToJson()},
      {kHfTokenizerChecksumKey, Hex64(Hash64(s.tokenizer.data(), s.tokenizer.size()))},
      {"keel_tokenizer_type", byte_tok ? "byte" : "bpe"},
      {"keel_step", s.state.is_object() && s.state.contains("step") ? s.state["step"] : nlohmann::json(0)},
  };
  nlohmann::json tok_config;
  if (byte_tok) {
    tok_config = {{"tokenizer_class", nullptr},
                  {"keel_tokenizer_type", "byte"},
                  {"model_max_length", c.ctx},
                  {"note", "keel byte tokenizer: token id = byte value (0-255), no special tokens; tokenizer.model "
                           "is keel's marker file, not a SentencePiece model"}};
  } else {
    tok_config = {{"tokenizer_class", "LlamaTokenizer"},
                  {"keel_tokenizer_type", "bpe"},
                  {"model_max_length", c.ctx},
                  {"add_bos_token", false},
                  {"add_eos_token", false},
                  {"legacy", true},
                  {"clean_up_tokenization_spaces", false},
                  {"sp_model_kwargs", nlohmann::json::object()},
                  {"unk_token", "<unk>"},
                  {"bos_token", bos >= 0 ? nlohmann::json((*tok)->piece(bos)) : nlohmann::json(nullptr)},
                  {"eos_token", eos >= 0 ? nlohmann::json((*tok)->piece(eos)) : nlohmann::json(nullptr)},
                  {"pad_token", nullptr}};
  }
  return WriteDirAtomic(dir, {{"model.safetensors", std::move(model).value()},
                              {"config.json", DumpJson(config)},
                              {kTokenizerFileName, s.tokenizer},
                              {"tokenizer_config.json", DumpJson(tok_config)}});
}

Result<TrainingSnapshot> ImportHfSafetensors(const std::string& dir, std::vector<std::string>* warnings) {
  Env* env = DefaultEnv();
  const std::string cfg_path = JoinPath(dir, "config.json");
  auto bad = [](const std::string& file, const std::string& what) { return Corrupt(file + ": " + what); };
  // Size first: a config.json is a few hundred bytes, and a huge (or sparse) one must not be read into memory.
  auto cfg_size = env->FileSize(cfg_path);
  if (!cfg_size.ok()) return cfg_size.status();
  if (*cfg_size > (uint64_t{16} << 20)) return bad(cfg_path, "implausibly large (" + std::to_string(*cfg_size) + " bytes)");
  auto text = env->ReadFile(cfg_path);
  if (!text.ok()) return text.status();
  auto j = nlohmann::json::parse(*text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return bad(cfg_path, "not a JSON object");
  auto str_field = [&](const char* k, const std::string& dflt) {
    return j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : (j.contains(k) ? std::string("?") : dflt);
  };
  if (str_field("model_type", "") != "gpt2")
    return bad(cfg_path, "model_type is not \"gpt2\" (keel imports GPT-2 models only)");
  auto get = [&](std::initializer_list<const char*> keys, int* out) -> Status {
    for (const char* k : keys) {
      if (!j.contains(k)) continue;
      if (!j[k].is_number_integer() || j[k].get<int64_t>() <= 0 || j[k].get<int64_t>() > (1 << 30))
        return bad(cfg_path, std::string("'") + k + "' is not a positive integer");
      *out = j[k].get<int>();
      return Status::Ok();
    }
    return bad(cfg_path, std::string("missing '") + *keys.begin() + "'");
  };
  GptConfig c;
  KEEL_RETURN_IF_ERROR(get({"n_layer"}, &c.layers));
  KEEL_RETURN_IF_ERROR(get({"n_head"}, &c.heads));
  KEEL_RETURN_IF_ERROR(get({"n_embd"}, &c.dim));
  KEEL_RETURN_IF_ERROR(get({"n_positions", "n_ctx"}, &c.ctx));
  KEEL_RETURN_IF_ERROR(get({"vocab_size"}, &c.vocab));
  if (j.contains("n_inner") && !j["n_inner"].is_null() &&
      (!j["n_inner"].is_number_integer() || j["n_inner"].get<int64_t>() != 4 * static_cast<int64_t>(c.dim)))
    return bad(cfg_path, "n_inner must be null or 4 * n_embd");
  const std::string act = str_field("activation_function", "gelu_new");
  if (act != "gelu_new" && act != "gelu_pytorch_tanh")
    return bad(cfg_path, "activation_function " + GgufQuote(act) + " is not GELU-tanh (gelu_new)");
  if (j.contains("layer_norm_epsilon")) {
    if (!j["layer_norm_epsilon"].is_number()) return bad(cfg_path, "layer_norm_epsilon is not a number");
    const double eps = j["layer_norm_epsilon"].get<double>();
    if (std::fabs(eps - kLayerNormEps) > 1e-3 * kLayerNormEps && warnings)
      warnings->push_back(cfg_path + ": layer_norm_epsilon is " + std::to_string(eps) + "; keel always uses 1e-5");
  }
  // Named by config.json's keys: the user passed no --heads/--dim (it read "--dim 16 is not divisible by --heads 3").
  if (Status v = c.Validate({"n_layer", "n_head", "n_embd", "n_positions", "vocab_size"}); !v.ok())
    return bad(cfg_path, v.message());
  // keel's own export also carries keel_config: the GPT-2 keys must agree with it ("n_layer": 6 -> 2 is one
  // flipped bit, and config.json has no checksum).
  const bool keel_export = j.contains("keel_config");
  if (keel_export) {
    auto mine = j["keel_config"].is_object() ? GptConfig::FromJson(j["keel_config"])
                                             : Result<GptConfig>(Corrupt("not a JSON object"));
    if (!mine.ok()) return bad(cfg_path, "keel_config is malformed (" + mine.status().message() + ")");
    if (mine->layers != c.layers || mine->heads != c.heads || mine->dim != c.dim || mine->ctx != c.ctx ||
        mine->vocab != c.vocab)
      return bad(cfg_path, "the GPT-2 keys (" + c.ToJson().dump() + ") disagree with keel_config (" +
                               mine->ToJson().dump() + "): the file is corrupt");
  }

  const std::string st_path = JoinPath(dir, "model.safetensors");
  auto st = SafetensorsFile::Open(st_path);
  if (!st.ok()) return st.status();
  if (auto it = st->metadata().find(kHfChecksumKey); it != st->metadata().end()) {
    if (HfChecksum(st->tensors()) != it->second)
      return Corrupt(st_path + ": checksum mismatch (keel_checksum): the file is corrupt");
  } else if (j.contains("keel_config") && warnings) {
    warnings->push_back(st_path + ": no keel_checksum (exported by an older keel): the tensor data is not verified");
  }
  // Resolve names and check every shape before allocating (config.json is input too).
  const auto layout = ParamLayout(c);
  std::vector<std::string> names;
  for (const auto& t : layout) {
    bool tr = false;
    std::string name = HfTensorName(t.name, &tr);
    if (!st->Find(name)) name = name.substr(std::string("transformer.").size());  // checkpoints without prefix
    const TensorView* v = st->Find(name);
    if (!v) return bad(st_path, "missing tensor '" + HfTensorName(t.name, &tr) + "'");
    const std::vector<int64_t> want = tr ? std::vector<int64_t>{t.shape[1], t.shape[0]} : t.shape;
    if (v->shape != want)
      return bad(st_path, "tensor '" + name + "' has shape " + ToStr(v->shape) + ", expected " + ToStr(want));
    names.push_back(name);
  }
  if (keel_export) {  // keel writes exactly these (Hugging Face's own files may hold buffers such as attn.bias)
    std::set<std::string> expected(names.begin(), names.end());
    expected.insert("lm_head.weight");
    for (const TensorView& t : st->tensors())
      if (!expected.count(t.name))
        return bad(st_path, "unexpected tensor " + GgufQuote(t.name) + " for the model config in config.json");
  }
  TrainingSnapshot s;
  s.config = c;
  s.params.assign(NumParams(c), 0.0f);
  for (size_t k = 0; k < layout.size(); ++k) {
    const auto& t = layout[k];
    const std::string& name = names[k];
    bool tr = false;
    HfTensorName(t.name, &tr);
    const std::vector<int64_t> want = tr ? std::vector<int64_t>{t.shape[1], t.shape[0]} : t.shape;
    auto data = st->ReadF32(name);
    if (!data.ok()) return data.status();
    float* dst = s.params.data() + t.offset;
    if (tr) {
      auto back = Transpose(data->data(), want[0], want[1]);
      std::copy(back.begin(), back.end(), dst);
    } else {
      std::copy(data->begin(), data->end(), dst);
    }
  }
  const bool untied = j.contains("tie_word_embeddings") && j["tie_word_embeddings"].is_boolean() &&
                      !j["tie_word_embeddings"].get<bool>();
  if (untied || st->Find("lm_head.weight")) {
    const TensorView* head = st->Find("lm_head.weight");
    bool same = false;
    if (head && head->shape == std::vector<int64_t>{c.vocab, c.dim}) {
      auto h = st->ReadF32("lm_head.weight");
      same = h.ok() && std::equal(h->begin(), h->end(), s.params.begin());
    }
    if (!same && warnings)
      warnings->push_back(st_path + ": the model's LM head is not tied to wte; keel ties it and uses transformer.wte.weight");
  }

  const std::string tok_path = JoinPath(dir, kTokenizerFileName);
  auto tb = ReadTokenizerBytes(tok_path);
  if (!tb.ok()) return tb.status();
  s.tokenizer = std::move(tb).value();
  if (j.contains(kHfTokenizerChecksumKey) &&
      j[kHfTokenizerChecksumKey] != Hex64(Hash64(s.tokenizer.data(), s.tokenizer.size())))
    return Corrupt(tok_path + ": checksum mismatch (config.json keel_tokenizer_checksum): the file is corrupt");
  const bool byte_tok = s.tokenizer.rfind("keel-byte-tokenizer", 0) == 0;
  auto tok = LoadTokenizer(byte_tok ? "byte" : "bpe", s.tokenizer);
  if (!tok.ok()) return tok.status().Wrap(tok_path);
  if ((*tok)->vocab_size() > c.vocab) return bad(tok_path, "the tokenizer has more tokens than the model's vocab_size");

  s.state = {{"step", j.contains("keel_step") && j["keel_step"].is_number_integer() ? j["keel_step"].get<int64_t>() : 0},
             {"imported_from", dir}};
  return s;
}

}  // namespace keel
