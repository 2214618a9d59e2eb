// export_hf_test.cc: the Hugging Face GPT-2 safetensors export (layout, round trip, atomic replacement), its
// independent check in PyTorch (tests/hf_export_check.py reads the files with HF's names and Conv1D layout), and
// `keel export` / `keel sample --ckpt <export>` end to end.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/env.h"
#include "export/export.h"
#include "export/gguf.h"
#include "export/hf_export.h"
#include "export_test_util.h"
#include "formats/checkpoint.h"
#include "formats/safetensors.h"
#include "test_util.h"

namespace keel {
namespace {

using testing::Logits;
using testing::MakeSnapshot;
using testing::RelError;
using testing::RunCommand;
using testing::RunKeel;
using testing::DirEntries;
using testing::TempDir;
using testing::TestTokens;

GptConfig Tiny() {
  GptConfig c;
  c.layers = 2;
  c.heads = 2;
  c.dim = 32;
  c.ctx = 16;
  return c;
}

TEST(HfExport, LayoutAndRoundTrip) {
  TempDir tmp;
  auto s = MakeSnapshot("bpe", Tiny(), 3, 11);
  const std::string dir = tmp / "hf";
  ASSERT_TRUE(ExportModel(s, dir, {"safetensors", ExportDtype::kF32, ""}).ok());
  EXPECT_EQ(DetectExportFormat(dir), "safetensors");
  EXPECT_EQ(testing::DirEntries(tmp.path()), std::vector<std::string>{"hf"});  // no staging directory left
  auto cfg = nlohmann::json::parse(DefaultEnv()->ReadFile(dir + "/config.json").value());
  EXPECT_EQ(cfg["model_type"], "gpt2");
  EXPECT_EQ(cfg["architectures"][0], "GPT2LMHeadModel");
  EXPECT_EQ(cfg["n_layer"], 2);
  EXPECT_EQ(cfg["n_head"], 2);
  EXPECT_EQ(cfg["n_embd"], 32);
  EXPECT_EQ(cfg["n_positions"], 16);
  EXPECT_EQ(cfg["n_ctx"], 16);
  EXPECT_EQ(cfg["vocab_size"], s.config.vocab);
  EXPECT_EQ(cfg["activation_function"], "gelu_new");
  EXPECT_EQ(cfg["layer_norm_epsilon"], 1e-5);
  EXPECT_EQ(cfg["tie_word_embeddings"], true);
  EXPECT_EQ(cfg["bos_token_id"], 1);
  EXPECT_EQ(cfg["eos_token_id"], 2);
  EXPECT_EQ(DefaultEnv()->ReadFile(dir + "/tokenizer.model").value(), s.tokenizer);
  auto tc = nlohmann::json::parse(DefaultEnv()->ReadFile(dir + "/tokenizer_config.json").value());
  EXPECT_EQ(tc["tokenizer_class"], "LlamaTokenizer");
  EXPECT_EQ(tc["add_bos_token"], false);

  auto st = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->metadata().at("format"), "pt");
  EXPECT_EQ(st->tensors().size(), ParamLayout(s.config).size());
  EXPECT_EQ(st->Find("lm_head.weight"), nullptr);
  EXPECT_EQ(st->Find("transformer.h.1.attn.c_attn.weight")->shape, (std::vector<int64_t>{32, 96}));
  EXPECT_EQ(st->Find("transformer.h.1.mlp.c_proj.weight")->shape, (std::vector<int64_t>{128, 32}));
  // Conv1D layout: c_attn.weight[i][o] == keel qkv.weight[o][i].
  auto w = st->ReadF32("transformer.h.0.attn.c_attn.weight").value();
  const ParamTensor* qkv = nullptr;
  auto layout = ParamLayout(s.config);
  for (const auto& t : layout)
    if (t.name == "h.0.attn.qkv.weight") qkv = &t;
  ASSERT_NE(qkv, nullptr);
  for (int o : {0, 5, 95})
    for (int i : {0, 7, 31}) EXPECT_EQ(w[i * 96 + o], s.params[qkv->offset + o * 32 + i]);

  std::vector<std::string> warnings;
  auto back = LoadExportedModel(dir, &warnings);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_TRUE(warnings.empty());
  EXPECT_EQ(back->config, s.config);
  EXPECT_EQ(back->params, s.params);
  EXPECT_EQ(back->tokenizer, s.tokenizer);
  EXPECT_EQ(back->state["step"], 7);

  // Re-exporting replaces the earlier export atomically; f16 round trip has a small error.
  ASSERT_TRUE(ExportModel(s, dir, {"safetensors", ExportDtype::kF16, ""}).ok());
  EXPECT_EQ(testing::DirEntries(tmp.path()), std::vector<std::string>{"hf"});  // the old copy and staging gone
  auto half = LoadExportedModel(dir, nullptr);
  ASSERT_TRUE(half.ok()) << half.status().ToString();
  const auto tokens = TestTokens(16, s.config.vocab);
  const double rel = RelError(Logits(*half, tokens), Logits(s, tokens));
  EXPECT_GT(rel, 0.0);
  EXPECT_LT(rel, 2e-3);
}

TEST(HfExport, ErrorsAndRefusals) {
  TempDir tmp;
  auto s = MakeSnapshot("byte", Tiny(), 0, 12);
  EXPECT_EQ(ExportModel(s, tmp / "q", {"safetensors", ExportDtype::kQ8_0, ""}).code(), Code::kInvalidArgument);
  EXPECT_FALSE(DefaultEnv()->Exists(tmp / "q"));
  // A directory that is not an export is never replaced.
  ASSERT_TRUE(DefaultEnv()->CreateDirs(tmp / "precious").ok());
  testing::WriteText(tmp / "precious/notes.txt", "keep");
  Status st = ExportModel(s, tmp / "precious", {"safetensors", ExportDtype::kF32, ""});
  EXPECT_EQ(st.code(), Code::kInvalidArgument);
  EXPECT_EQ(DefaultEnv()->ReadFile(tmp / "precious/notes.txt").value(), "keep");
  for (const std::string& e : testing::DirEntries(tmp.path())) EXPECT_NE(e.rfind("precious.", 0), 0u) << e;
  // Nor is a Hugging Face model folder (it has a config.json too), nor a keel export the user added files to.
  ASSERT_TRUE(DefaultEnv()->CreateDirs(tmp / "hfmodel").ok());
  testing::WriteText(tmp / "hfmodel/config.json", "{\"model_type\": \"gpt2\"}");
  testing::WriteText(tmp / "hfmodel/pytorch_model.bin", "weights");
  st = ExportModel(s, tmp / "hfmodel", {"safetensors", ExportDtype::kF32, ""});
  EXPECT_EQ(st.code(), Code::kInvalidArgument);
  EXPECT_NE(st.message().find("not an earlier keel export"), std::string::npos) << st.message();
  EXPECT_EQ(DefaultEnv()->ReadFile(tmp / "hfmodel/pytorch_model.bin").value(), "weights");
  ASSERT_TRUE(ExportModel(s, tmp / "mine", {"safetensors", ExportDtype::kF32, ""}).ok());
  testing::WriteText(tmp / "mine/README.md", "my notes");
  st = ExportModel(s, tmp / "mine", {"safetensors", ExportDtype::kF32, ""});
  EXPECT_EQ(st.message(), tmp / "mine" + ": holds 'README.md', which keel's export does not write; not overwriting it");
  EXPECT_EQ(DefaultEnv()->ReadFile(tmp / "mine/README.md").value(), "my notes");

  // GGUF: a directory or a file that is not GGUF is never replaced; an earlier GGUF file is.
  EXPECT_EQ(ExportModel(s, tmp / "precious", {"gguf", ExportDtype::kF32, ""}).message(),
            tmp / "precious" + ": is a directory (gguf export writes one file)");
  testing::WriteText(tmp / "notes.txt", "keep");
  EXPECT_EQ(ExportModel(s, tmp / "notes.txt", {"gguf", ExportDtype::kF32, ""}).message(),
            tmp / "notes.txt" + ": exists and is not a GGUF file keel exported; not overwriting it (pick a new --out)");
  EXPECT_EQ(DefaultEnv()->ReadFile(tmp / "notes.txt").value(), "keep");
  const std::string other = EncodeGguf({{"general.architecture", GgufValue::Str("llama")}}, {}).value();
  testing::WriteText(tmp / "other.gguf", other);  // another tool's model
  EXPECT_EQ(ExportModel(s, tmp / "other.gguf", {"gguf", ExportDtype::kF32, ""}).code(), Code::kInvalidArgument);
  EXPECT_EQ(DefaultEnv()->ReadFile(tmp / "other.gguf").value(), other);
  ASSERT_TRUE(ExportModel(s, tmp / "m.gguf", {"gguf", ExportDtype::kF32, ""}).ok());
  EXPECT_TRUE(ExportModel(s, tmp / "m.gguf", {"gguf", ExportDtype::kF16, ""}).ok());
  EXPECT_EQ(ExportModel(s, tmp / "named", {"safetensors", ExportDtype::kF32, "x"}).message(),
            "--name sets GGUF's general.name; the safetensors export has no such field");

  // Byte tokenizer export and import; then damaged exports give one-line errors naming the file.
  const std::string dir = tmp / "hf";
  ASSERT_TRUE(ExportModel(s, dir, {"safetensors", ExportDtype::kF32, ""}).ok());
  auto back = LoadExportedModel(dir, nullptr);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->params, s.params);
  auto cfg = nlohmann::json::parse(DefaultEnv()->ReadFile(dir + "/config.json").value());
  EXPECT_TRUE(cfg["bos_token_id"].is_null());
  auto expect_error = [&](const std::string& file, const std::string& part) {
    auto r = LoadExportedModel(dir, nullptr);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().message().rfind(dir + "/" + file, 0), 0u) << r.status().message();
    EXPECT_NE(r.status().message().find(part), std::string::npos) << r.status().message();
  };
  // A flipped byte in the tensor data or the tokenizer fails the export's checksums.
  const std::string st_bytes = DefaultEnv()->ReadFile(dir + "/model.safetensors").value();
  std::string flipped = st_bytes;
  flipped[flipped.size() - 3] ^= 0x10;
  testing::WriteText(dir + "/model.safetensors", flipped);
  expect_error("model.safetensors", "checksum mismatch (keel_checksum)");
  testing::WriteText(dir + "/model.safetensors", st_bytes);
  const std::string tok_bytes = DefaultEnv()->ReadFile(dir + "/tokenizer.model").value();
  testing::WriteText(dir + "/tokenizer.model", tok_bytes + " ");
  expect_error("tokenizer.model", "checksum mismatch");
  testing::WriteText(dir + "/tokenizer.model", tok_bytes);
  ASSERT_TRUE(LoadExportedModel(dir, nullptr).ok());
  {  // An export of an older keel (no keel_checksum): loads, with a warning that it is not verified.
    auto st = SafetensorsFile::Open(dir + "/model.safetensors");
    ASSERT_TRUE(st.ok());
    auto plain = EncodeSafetensors(st->tensors(), {{"format", "pt"}});
    ASSERT_TRUE(plain.ok());
    const std::string bytes = *plain;
    st = SafetensorsFile::Open(tmp / "unused");  // release the mapping before rewriting the file
    testing::WriteText(dir + "/model.safetensors", bytes);
    std::vector<std::string> warnings;
    auto old = LoadExportedModel(dir, &warnings);
    ASSERT_TRUE(old.ok()) << old.status().ToString();
    EXPECT_EQ(old->params, s.params);
    ASSERT_EQ(warnings.size(), 1u);
    EXPECT_EQ(warnings[0], dir + "/model.safetensors: no keel_checksum (exported by an older keel): the tensor data "
                                 "is not verified");
    testing::WriteText(dir + "/model.safetensors", st_bytes);
  }
  auto cfg2 = cfg;
  cfg2["activation_function"] = "relu";
  testing::WriteText(dir + "/config.json", cfg2.dump());
  expect_error("config.json", "activation_function");
  cfg2 = cfg;
  cfg2["n_embd"] = 64;  // keel's own copy of the config disagrees (config.json has no checksum)
  testing::WriteText(dir + "/config.json", cfg2.dump());
  expect_error("config.json", "disagree with keel_config");
  cfg2 = cfg;
  cfg2["n_layer"] = cfg["n_layer"].get<int>() + 1;
  testing::WriteText(dir + "/config.json", cfg2.dump());
  expect_error("config.json", "disagree with keel_config");
  cfg2 = cfg;
  cfg2["n_embd"] = 64;  // without keel_config (another tool's config.json): the shapes no longer match
  cfg2.erase("keel_config");
  testing::WriteText(dir + "/config.json", cfg2.dump());
  expect_error("model.safetensors", "has shape");
  cfg2 = cfg;
  cfg2["n_layer"] = "two";
  testing::WriteText(dir + "/config.json", cfg2.dump());
  expect_error("config.json", "n_layer");
  cfg2 = cfg;
  cfg2["model_type"] = 5;
  testing::WriteText(dir + "/config.json", cfg2.dump());
  expect_error("config.json", "model_type");
}

// `--out DIR/` is DIR (the staging directory goes beside it, not inside), and the user's own DIR.tmp and DIR.old
// are never touched: only a uniquely named staging directory is created and removed.
TEST(HfExport, TrailingSlashAndUsersTmpAndOldDirsSurvive) {
  TempDir tmp;
  auto s = MakeSnapshot("byte", Tiny(), 0, 15);
  const std::string dir = tmp / "hf";
  for (const char* mine : {"hf.tmp", "hf.old"}) {
    ASSERT_TRUE(DefaultEnv()->CreateDirs(tmp / mine).ok());
    testing::WriteText(tmp / mine + std::string("/notes.txt"), mine);
  }
  Status st = ExportModel(s, dir + "/", {"safetensors", ExportDtype::kF32, ""});
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(DetectExportFormat(dir), "safetensors");
  st = ExportModel(s, dir + "//", {"safetensors", ExportDtype::kF16, ""});  // replaces the first export
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_TRUE(ExportModel(s, dir, {"safetensors", ExportDtype::kF32, ""}).ok());
  auto back = LoadExportedModel(dir + "/", nullptr);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->params, s.params);
  EXPECT_EQ(DirEntries(tmp.path()), (std::vector<std::string>{"hf", "hf.old", "hf.tmp"}));
  EXPECT_EQ(DirEntries(dir), (std::vector<std::string>{"config.json", "model.safetensors", "tokenizer.model",
                                                    "tokenizer_config.json"}));
  for (const char* mine : {"hf.tmp", "hf.old"})
    EXPECT_EQ(DefaultEnv()->ReadFile(tmp / mine + std::string("/notes.txt")).value(), mine);
}

// inf would make a Q8_0 block scale inf (every value NaN) and NaN would quantize to 0 silently: every export
// refuses a non-finite parameter, naming the tensor, and writes nothing.
TEST(ExportRefusals, NonFiniteWeights) {
  TempDir tmp;
  auto s = MakeSnapshot("byte", Tiny(), 0, 16);
  const ParamTensor* qkv = nullptr;
  const auto layout = ParamLayout(s.config);
  for (const auto& t : layout)
    if (t.name == "h.1.attn.qkv.weight") qkv = &t;
  ASSERT_NE(qkv, nullptr);
  for (float bad : {INFINITY, -INFINITY, NAN}) {
    auto b = s;
    b.params[qkv->offset + 40] = bad;
    for (const ExportOptions& o : std::vector<ExportOptions>{{"gguf", ExportDtype::kQ8_0, ""},
                                                             {"gguf", ExportDtype::kF16, ""},
                                                             {"gguf", ExportDtype::kF32, ""},
                                                             {"safetensors", ExportDtype::kF32, ""},
                                                             {"safetensors", ExportDtype::kF16, ""}}) {
      SCOPED_TRACE(o.format + " " + ExportDtypeName(o.dtype) + " " + std::to_string(bad));
      Status st = ExportModel(b, tmp / "out", o);
      EXPECT_EQ(st.code(), Code::kInvalidArgument) << st.ToString();
      EXPECT_NE(st.message().find("tensor 'h.1.attn.qkv.weight' has a non-finite value"), std::string::npos)
          << st.message();
      EXPECT_EQ(st.message().find('\n'), std::string::npos);
      EXPECT_TRUE(DirEntries(tmp.path()).empty());
    }
  }
  // Finite but beyond what f16 (+-65504) or a Q8_0 block (whose scale is an f16: +-65504 x 127) stores: those
  // exports would hold inf. A tensor written as F32 keeps it (GGUF keeps vectors and wpe in F32).
  auto big = s;
  big.params[qkv->offset + 7] = -1e5f;
  for (const ExportOptions& o : std::vector<ExportOptions>{{"gguf", ExportDtype::kF16, ""},
                                                           {"safetensors", ExportDtype::kF16, ""}}) {
    Status st = ExportModel(big, tmp / "out", o);
    EXPECT_NE(st.message().find("tensor 'h.1.attn.qkv.weight' has a value beyond what its reduced-precision copy stores "
                                "(-100000 at element 7; at most +-65504 as f16 or q8_0)"),
              std::string::npos) << st.message();
    EXPECT_TRUE(DirEntries(tmp.path()).empty());
  }
  EXPECT_TRUE(ExportModel(big, tmp / "out.gguf", {"gguf", ExportDtype::kF32, ""}).ok());
  ASSERT_TRUE(DefaultEnv()->RemoveAll(tmp / "out.gguf").ok());
  const bool q8_rows = s.config.dim % 32 == 0;  // qkv is Q8_0 only when its rows are whole blocks
  Status q8 = ExportModel(big, tmp / "out.gguf", {"gguf", ExportDtype::kQ8_0, ""});
  EXPECT_EQ(q8.ok(), q8_rows) << q8.ToString();
  big.params[qkv->offset + 7] = -1e7f;
  q8 = ExportModel(big, tmp / "out2.gguf", {"gguf", ExportDtype::kQ8_0, ""});
  EXPECT_NE(q8.message().find("has a value beyond what its reduced-precision copy stores"), std::string::npos) << q8.message();
  auto vec = s;  // a vector (LayerNorm gain) stays F32 in GGUF, so f16 GGUF keeps a large value there
  for (const auto& t : layout)
    if (t.name == "h.0.ln1.weight") vec.params[t.offset] = 1e5f;
  EXPECT_TRUE(ExportModel(vec, tmp / "vec.gguf", {"gguf", ExportDtype::kF16, ""}).ok());
}

// A file that exists but is not a model says so (not "no such checkpoint or run directory").
TEST(ExportRefusals, NonModelFilesAreNamedNotMissing) {
  TempDir tmp;
  testing::WriteText(tmp / "empty.gguf", "");
  testing::WriteText(tmp / "short.gguf", "GGU");
  testing::WriteText(tmp / "ggml.gguf", "ggml\x01\x02\x03\x04 not gguf");
  auto s = MakeSnapshot("byte", Tiny(), 0, 17);
  ASSERT_TRUE(ExportModel(s, tmp / "hf", {"safetensors", ExportDtype::kF32, ""}).ok());
  const std::string st_file = tmp / "hf/model.safetensors";
  for (const auto& [path, why] : std::vector<std::pair<std::string, std::string>>{
           {tmp / "empty.gguf", "too short"}, {tmp / "short.gguf", "too short"}, {tmp / "ggml.gguf", "bad magic"},
           {st_file, "pass its directory"}}) {
    SCOPED_TRACE(path);
    for (const auto& r : {LoadModelForInference(path, nullptr), LoadExportedModel(path, nullptr)}) {
      ASSERT_FALSE(r.ok());
      const std::string& m = r.status().message();
      EXPECT_EQ(m.rfind(path + ": not a GGUF file (", 0), 0u) << m;
      EXPECT_NE(m.find(why), std::string::npos) << m;
      EXPECT_EQ(m.find("no such"), std::string::npos) << m;
      EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    }
  }
  auto snap = LoadSnapshot(st_file, false, nullptr);
  ASSERT_FALSE(snap.ok());
  EXPECT_EQ(snap.status().message(), st_file + ": is a file, not a checkpoint or run directory");
  auto missing = LoadModelForInference(tmp / "nope.gguf", nullptr);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), Code::kNotFound);
}

// The export read back by an independent PyTorch GPT-2 that uses HF's names and Conv1D layout.
TEST(HfExport, PyTorchReadsTheExportAndMatchesKeelLogits) {
  if (RunCommand("/usr/bin/python3 -c 'import torch, numpy'").exit_code != 0)
    KEEL_SKIP_UNLESS_REQUIRED("/usr/bin/python3 cannot import torch and numpy");
  TempDir tmp;
  auto s = MakeSnapshot("bpe", Tiny(), 5, 13);
  const std::string dir = tmp / "hf";
  ASSERT_TRUE(ExportModel(s, dir, {"safetensors", ExportDtype::kF32, ""}).ok());
  const auto tokens = TestTokens(16, s.config.vocab);
  const auto logits = Logits(s, tokens);
  std::ofstream(tmp / "tokens.i32", std::ios::binary)
      .write(reinterpret_cast<const char*>(tokens.data()), static_cast<std::streamsize>(tokens.size() * 4));
  std::ofstream(tmp / "logits.f32", std::ios::binary)
      .write(reinterpret_cast<const char*>(logits.data()), static_cast<std::streamsize>(logits.size() * 4));
  auto r = RunCommand("/usr/bin/python3 " KEEL_SOURCE_DIR "/tests/hf_export_check.py " + dir + " " +
                      (tmp / "tokens.i32") + " " + (tmp / "logits.f32"));
  std::printf("%s", r.output.c_str());
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

// keel export + keel sample on the exports reproduce the checkpoint's greedy continuation.
TEST(ExportCli, ExportThenSampleFromGgufAndHf) {
  TempDir tmp;
  auto s = MakeSnapshot("bpe", Tiny(), 2, 14);
  SnapshotView view;
  view.config = s.config;
  view.params = s.params.data();
  view.state = s.state;
  view.tokenizer = s.tokenizer;
  auto files = EncodeSnapshot(view);
  ASSERT_TRUE(files.ok());
  ASSERT_TRUE(WriteCheckpoint(tmp / "run", 7, *files, 0).ok());
  const std::string run = tmp / "run";
  auto sample = [&](const std::string& ckpt) {
    return RunKeel("sample --ckpt " + ckpt + " --prompt 'the quick' -n 12 --temperature 0 --threads 1 --print-token-ids");
  };
  auto ref = sample(run);
  ASSERT_EQ(ref.exit_code, 0) << ref.output;
  ASSERT_NE(ref.output.find("generated ids:"), std::string::npos) << ref.output;

  auto e1 = RunKeel("export " + run + " --format gguf --out " + (tmp / "m.gguf"));
  ASSERT_EQ(e1.exit_code, 0) << e1.output;
  EXPECT_NE(e1.output.find("wrote"), std::string::npos);
  auto g = sample(tmp / "m.gguf");
  ASSERT_EQ(g.exit_code, 0) << g.output;
  EXPECT_EQ(g.output, ref.output);

  auto e2 = RunKeel("export " + (tmp / "m.gguf") + " --format safetensors --out " + (tmp / "hf"));
  ASSERT_EQ(e2.exit_code, 0) << e2.output;
  auto h = sample(tmp / "hf");
  ASSERT_EQ(h.exit_code, 0) << h.output;
  EXPECT_EQ(h.output, ref.output);

  auto e3 = RunKeel("export " + run + " --format gguf --dtype q8_0 --out " + (tmp / "q.gguf"));
  ASSERT_EQ(e3.exit_code, 0) << e3.output;
  EXPECT_EQ(e3.output.find("note:"), std::string::npos) << e3.output;  // dim 32: every matrix is Q8_0
  auto q = sample(tmp / "q.gguf");
  EXPECT_EQ(q.exit_code, 0) << q.output;

  // One-line errors.
  auto bad = RunKeel("export " + run + " --format onnx --out " + (tmp / "x"));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("--format \"onnx\" is not one of gguf, safetensors"), std::string::npos) << bad.output;
  auto bad2 = RunKeel("export " + run + " --dtype q4 --out " + (tmp / "x"));
  EXPECT_NE(bad2.exit_code, 0);
  EXPECT_NE(bad2.output.find("--dtype"), std::string::npos) << bad2.output;
  testing::WriteText(tmp / "junk.gguf", "GGUF\3\0\0\0garbage");
  auto bad3 = RunKeel("sample --ckpt " + (tmp / "junk.gguf"));
  EXPECT_NE(bad3.exit_code, 0);
  EXPECT_NE(bad3.output.find("junk.gguf: "), std::string::npos) << bad3.output;
  EXPECT_EQ(bad3.output.find('\n'), bad3.output.size() - 1) << bad3.output;
}

}  // namespace
}  // namespace keel
