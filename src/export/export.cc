// export.cc: format dispatch for export and import.
#include "export/export.h"

#include <algorithm>
#include <cctype>

#include "core/env.h"
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
  if (o.format == "gguf") {
    if (DefaultEnv()->IsDir(out)) return InvalidArgument(out + ": is a directory (gguf export writes one file)");
    return ExportGguf(s, out, o.dtype, o.name);
  }
  if (o.format == "safetensors") return ExportHfSafetensors(s, out, o.dtype);
  return InvalidArgument("--format \"" + o.format + "\" is not one of gguf, safetensors");
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

Result<TrainingSnapshot> LoadExportedModel(const std::string& path, std::vector<std::string>* warnings) {
  const std::string fmt = DetectExportFormat(path);
  if (fmt == "gguf") return ImportGguf(path, warnings);
  if (fmt == "safetensors") return ImportHfSafetensors(path, warnings);
  if (!DefaultEnv()->Exists(path)) return NotFound(path + ": no such file or directory");
  return InvalidArgument(path + ": neither a GGUF file nor a Hugging Face export directory");
}

Result<TrainingSnapshot> LoadModelForInference(const std::string& path, std::vector<std::string>* warnings) {
  if (!DetectExportFormat(path).empty()) return LoadExportedModel(path, warnings);
  return LoadSnapshot(path, false, warnings);
}

}  // namespace keel
