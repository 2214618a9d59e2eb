// checkpoint_io.h: what a keel training checkpoint holds and how it maps onto files.
//
// A checkpoint directory (written by formats/checkpoint.h: atomic, checksummed, COMMITTED marker last) holds
//   model.safetensors  parameters under keel's names (ParamLayout), metadata "config" = model config JSON
//   optim.safetensors  AdamW moments "adam.m" and "adam.v" (flat, in parameter-buffer order); diloco runs also
//                      "outer.momentum" (the outer optimizer's Nesterov momentum)
//   state.json         next step, seed, data fingerprint, training options, keel version, extra trainer state
//   tokenizer.model    the tokenizer the model was trained with
// Thread safety: pure functions of their inputs.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "formats/checkpoint.h"
#include "model/gpt_config.h"

namespace keel {

struct TrainingSnapshot {
  GptConfig config;
  std::vector<float> params;
  std::vector<float> adam_m, adam_v;  // empty when not loaded/saved
  std::vector<float> outer_momentum;  // diloco; empty when the checkpoint has none
  nlohmann::json state;               // at least {"step": next step to run}
  std::string tokenizer;              // tokenizer file bytes
};

// Borrowed host pointers to the state to save (so a checkpoint costs one encoded copy, not two).
struct SnapshotView {
  GptConfig config;
  const float* params = nullptr;
  const float* adam_m = nullptr;  // null: no optimizer file
  const float* adam_v = nullptr;
  const float* outer_momentum = nullptr;  // diloco (with adam_m): saved in optim.safetensors
  nlohmann::json state;
  std::string tokenizer;
};
Result<std::vector<CheckpointFile>> EncodeSnapshot(const SnapshotView& s);

// Loads from a checkpoint directory, or from a run directory (its newest valid checkpoint; each skipped corrupt
// or incomplete newer one adds a line to *warnings). with_optimizer=false skips the moments.
Result<TrainingSnapshot> LoadSnapshot(const std::string& path, bool with_optimizer, std::vector<std::string>* warnings,
                                      std::string* loaded_dir = nullptr);

// Decodes parameters from a safetensors blob written by EncodeSnapshot (also used by import).
Result<TrainingSnapshot> DecodeModelFile(const std::string& source_name, std::string bytes);

}  // namespace keel
