// export.cc: format dispatch for export and import.
#include "export/export.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <functional>

#include "core/env.h"
#include "export/gguf.h"
#include "export/gguf_model.h"
#include "export/hf_export.h"
#include "formats/checkpoint.h"

namespace keel {

Result<ExportDtype> ParseExportDtype(const std::string& s) {
  std::string l = s;
  std::transform(l.begin(), l.end(), l.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  if (l == "f32") return ExportDtype::kF32;
  if (l == "f16") return ExportDtype::kF16;
  if (l == "q8_0") return ExportDtype::kQ8_0;
  return InvalidArgument("--dtype \"" + s + "\" is not one of f32, f16, q8_0");
}

const char* ExportDtypeName(ExportDtype d) {
  switch (d) {
    case ExportDtype::kF32: return "f32";
    case ExportDtype::kF16: return "f16";
    case ExportDtype::kQ8_0: return "q8_0";
  }
  return "?";
}

Status ExportModel(const TrainingSnapshot& s, const std::string& out, const ExportOptions& o) {
  if (out.empty()) return InvalidArgument("--out must not be empty");
  if (o.format != "gguf" && o.format != "safetensors")
    return InvalidArgument("--format \"" + o.format + "\" is not one of gguf, safetensors");
  if (o.format == "gguf" && DefaultEnv()->IsDir(out))
    return InvalidArgument(out + ": is a directory (gguf export writes one file)");
  // Only an earlier keel GGUF export is replaced (as only an earlier keel export directory is): --out naming
  // someone's notes.txt, or another tool's model, must not cost them the file.
  if (o.format == "gguf" && DefaultEnv()->Exists(out)) {
    auto existing = DetectExportFormat(out) == "gguf" ? GgufFile::Open(out) : Result<GgufFile>(NotFound(out));
    if (!existing.ok() || !existing->FindKey("keel.config"))
      return InvalidArgument(out + ": exists and is not a GGUF file keel exported; not overwriting it (pick a new --out)");
  }
  if (o.format == "safetensors" && !o.name.empty())
    return InvalidArgument("--name sets GGUF's general.name; the safetensors export has no such field");
  Status st = o.format == "gguf" ? ExportGguf(s, out, o.dtype, o.name) : ExportHfSafetensors(s, out, o.dtype);
  // A file-system failure names the path keel was writing (a unique temporary beside OUT); say which flag.
  return st.code() == Code::kIo ? st.Wrap("cannot write --out " + out) : st;
}

std::string DetectExportFormat(const std::string& path) {
  Env* env = DefaultEnv();
  if (env->IsDir(path)) {
    if (!IsCheckpointDir(path) && env->Exists(JoinPath(path, "config.json")) &&
        env->Exists(JoinPath(path, "model.safetensors")))
      return "safetensors";
    return "";
  }
  if (!env->Exists(path)) return "";
  auto m = env->Map(path);
  if (!m.ok() || m->size() < 4) return "";
  return std::equal(m->data(), m->data() + 4, reinterpret_cast<const uint8_t*>("GGUF")) ? "gguf" : "";
}

namespace {

// Why the existing non-directory path is not a model keel can load (DetectExportFormat found no GGUF magic).
Status NotAModelFile(const std::string& path) {
  auto size = DefaultEnv()->FileSize(path);
  if (!size.ok()) return size.status();
  const bool st = path.size() >= 12 && path.compare(path.size() - 12, 12, ".safetensors") == 0;
  return InvalidArgument(path + ": not a GGUF file (" +
                         (*size < 4 ? "too short: " + std::to_string(*size) + " bytes" : std::string("bad magic")) +
                         (st ? "); for a safetensors model pass its directory (a Hugging Face export or a keel "
                               "checkpoint), not the file"
                             : "); expected a GGUF file, a Hugging Face export directory, or a checkpoint or run "
                               "directory"));
}

}  // namespace

Result<TrainingSnapshot> LoadExportedModel(const std::string& path, std::vector<std::string>* warnings) {
  const std::string fmt = DetectExportFormat(path);
  if (fmt == "gguf") return ImportGguf(path, warnings);
  if (fmt == "safetensors") return ImportHfSafetensors(path, warnings);
  Env* env = DefaultEnv();
  if (!env->Exists(path)) return NotFound(path + ": no such file or directory");
  if (!env->IsDir(path)) return NotAModelFile(path);
  return InvalidArgument(path + ": neither a GGUF file nor a Hugging Face export directory");
}

Result<TrainingSnapshot> LoadModelForInference(const std::string& path, std::vector<std::string>* warnings) {
  if (!DetectExportFormat(path).empty()) return LoadExportedModel(path, warnings);
  Env* env = DefaultEnv();
  if (env->Exists(path) && !env->IsDir(path)) return NotAModelFile(path);
  // Half a Hugging Face export (one of its two files): say which is missing, not "no checkpoints".
  if (env->IsDir(path) && !IsCheckpointDir(path)) {
    const bool cfg = env->Exists(JoinPath(path, "config.json")), st = env->Exists(JoinPath(path, "model.safetensors"));
    if (cfg != st)
      return InvalidArgument(path + ": a Hugging Face export needs config.json and model.safetensors; " +
                             (cfg ? "model.safetensors" : "config.json") + " is missing");
  }
  return LoadSnapshot(path, false, warnings);
}

}  // namespace keel
