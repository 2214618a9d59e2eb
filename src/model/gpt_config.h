// gpt_config.h: the GPT-2 model configuration and its parameter layout (names, shapes, offsets in one flat
// buffer). The layout is layer-contiguous — [wte, wpe, h.0.*, h.1.*, ..., lnf] — so the gradients of one layer
// form one contiguous range, which is what bucketed gradient reduction sends.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/status.h"

namespace keel {

// What GptConfig::Validate calls each field in its errors: the flags by default, or the keys of the file the
// config was read from (a checkpoint's metadata, an import's config.json or GGUF keys), so that a bad file is
// not reported as a flag the user never passed.
struct GptConfigNames {
  const char* layers = "--layers";
  const char* heads = "--heads";
  const char* dim = "--dim";
  const char* ctx = "--ctx";
  const char* vocab = "--vocab";
};
// The keys of keel's own model config JSON (ToJson / FromJson).
inline constexpr GptConfigNames kGptConfigJsonNames{"layers", "heads", "dim", "ctx", "vocab"};

struct GptConfig {
  int layers = 4;
  int heads = 4;
  int dim = 256;
  int ctx = 256;     // context length = rows of the position table
  int vocab = 4096;

  // Errors name the offending field as `names` says, e.g. "--dim 100 is not divisible by --heads 3" (flags) or
  // "heads must be positive (got 0)" (kGptConfigJsonNames); callers with a file prefix its path.
  Status Validate(const GptConfigNames& names = {}) const;
  nlohmann::json ToJson() const;
  // Errors name the JSON keys ("model config: heads must be positive (got 0)"), never flags.
  static Result<GptConfig> FromJson(const nlohmann::json& j);
  bool operator==(const GptConfig&) const = default;
};

struct ParamTensor {
  std::string name;             // e.g. "h.3.attn.qkv.weight"
  std::vector<int64_t> shape;
  size_t offset = 0;            // in floats, into the flat parameter buffer
  size_t size = 0;              // in floats
  bool decay = false;           // AdamW weight decay applies (matrices and embeddings; not biases, LN gains)
  int group = 0;                // gradient-readiness group: 0 = embeddings, 1+l = layer l, L+1 = final LN
};

// The tensors of a config in buffer order.
std::vector<ParamTensor> ParamLayout(const GptConfig& c);
size_t NumParams(const GptConfig& c);

// Training FLOPs per token, llm.c's formula 6N + 6*L*C*T (N excludes the position table).
double TrainFlopsPerToken(const GptConfig& c, int T);

}  // namespace keel
