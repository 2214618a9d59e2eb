// export.h: making keel models portable — export to GGUF (llama.cpp) and to Hugging Face GPT-2 safetensors
// directories, and loading such exports back as a TrainingSnapshot (for `keel sample --ckpt model.gguf`).
//
// Formats (see gguf_model.h and hf_export.h for the exact mapping):
//   gguf         one file, llama.cpp architecture "gpt2", dtype f32, f16 or q8_0 (1-D tensors and the position
//                table stay F32, as llama.cpp's converter keeps them); keel's tokenizer file is embedded
//                verbatim (key keel.tokenizer) so an import reproduces the tokenizer exactly.
//   safetensors  a directory: config.json (GPT2Config), model.safetensors (GPT2LMHeadModel names, Conv1D
//                [in, out] weights), tokenizer.model, tokenizer_config.json; dtype f32 or f16.
// Both writers are atomic: a failure leaves no partial output (and an earlier export at the same path intact).
//
// Errors are one line and name the offending file. Import treats files as hostile input.
// Thread safety: pure functions of their arguments (file-system effects aside).
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "core/status.h"
#include "train/checkpoint_io.h"

namespace keel {

enum class ExportDtype { kF32, kF16, kQ8_0 };
// "f32" | "f16" | "q8_0" (case-insensitive).
Result<ExportDtype> ParseExportDtype(const std::string& s);
const char* ExportDtypeName(ExportDtype d);

struct ExportOptions {
  std::string format = "gguf";  // "gguf" or "safetensors"
  ExportDtype dtype = ExportDtype::kF32;
  std::string name;             // general.name (GGUF); default "keel-gpt2"
};

// Writes s to out (a file for gguf; a directory for safetensors, where "DIR/" means DIR). Refuses a model with a
// non-finite parameter (inf would turn a whole Q8_0 block into NaN, and NaN would quantize silently to 0).
Status ExportModel(const TrainingSnapshot& s, const std::string& out, const ExportOptions& o);

// The f16 and Q8_0 bounds above.
inline constexpr double kF16Max = 65504.0;
inline constexpr double kQ8_0Max = 65504.0 * 127.0;

// "gguf" for a file starting with the GGUF magic, "safetensors" for a directory holding config.json and
// model.safetensors that is not a keel checkpoint directory, "" otherwise.
std::string DetectExportFormat(const std::string& path);

// Loads a GGUF file or an HF safetensors directory written by ExportModel (parameters dequantized to float32,
// names mapped back to keel's layout, tokenizer bytes restored). Non-fatal findings (an untied output.weight
// that differs from the embedding, an unexpected LayerNorm epsilon) are appended to *warnings.
// state = {"step": the exported step or 0, "imported_from": path}.
Result<TrainingSnapshot> LoadExportedModel(const std::string& path, std::vector<std::string>* warnings = nullptr);

// LoadExportedModel for exports, LoadSnapshot(path, with_optimizer=false) for checkpoints and run directories.
// A file that exists but is neither is reported as such ("not a GGUF file (bad magic)"), not as missing.
Result<TrainingSnapshot> LoadModelForInference(const std::string& path, std::vector<std::string>* warnings);

}  // namespace keel
