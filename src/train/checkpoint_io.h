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
#include <functional>
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
// or incomplete newer one adds a line to *warnings). with_optimizer=false skips the moments. Beyond the checksums
// (which a hand-edited, re-signed file passes), the contents are checked: state.json's fields have their types
// and ranges (ValidateTrainingState), and every parameter and moment is finite (a diverged run's checkpoint
// cannot be trained, sampled or exported). Errors are kCorrupt/kInvalidArgument naming the file.
Result<TrainingSnapshot> LoadSnapshot(const std::string& path, bool with_optimizer, std::vector<std::string>* warnings,
                                      std::string* loaded_dir = nullptr);

// state.json's known fields, where present, have the types and ranges keel writes ("step", a non-negative integer,
// is required); `where` names the file in the error.
Status ValidateTrainingState(const nlohmann::json& state, const std::string& where);

// kInvalidArgument "<where>: tensor 'NAME' has a non-finite value (...)" for the first parameter of s (laid out
// as ParamLayout(s.config)) that is inf or NaN, or "... has a value beyond what its export type stores" for one
// whose magnitude exceeds largest_storable(tensor) (the exporters pass 65504 for a tensor they write as f16, and
// 65504 x 127 for Q8_0, whose block scale is an f16: beyond, the file would hold inf). Both exporters call it,
// and `keel sample` / `keel serve` on load (without a bound: finiteness only).
Status CheckFiniteParams(const TrainingSnapshot& s, const std::string& where,
                         const std::function<double(const ParamTensor&)>& largest_storable = {});

// Decodes parameters from a safetensors blob written by EncodeSnapshot (also used by import).
Result<TrainingSnapshot> DecodeModelFile(const std::string& source_name, std::string bytes);

}  // namespace keel
