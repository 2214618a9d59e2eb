// checkpoint_io.cc: encoding and decoding of training snapshots to checkpoint files.
#include "train/checkpoint_io.h"

#include <map>

#include "core/env.h"
#include "formats/safetensors.h"

namespace keel {

Result<std::vector<CheckpointFile>> EncodeSnapshot(const SnapshotView& s) {
  std::vector<CheckpointFile> files;
  auto layout = ParamLayout(s.config);
  const size_t n = NumParams(s.config);
  std::vector<TensorView> views;
  for (const auto& t : layout)
    views.push_back({t.name, "F32", t.shape, s.params + t.offset, t.size * sizeof(float)});
  auto model = EncodeSafetensors(views, {{"config", s.config.ToJson().dump()}, {"format", "keel-gpt2"}});
  if (!model.ok()) return model.status();
  files.push_back({"model.safetensors", std::move(model).value()});
  if (s.adam_m) {
    std::vector<TensorView> ov = {{"adam.m", "F32", {static_cast<int64_t>(n)}, s.adam_m, n * sizeof(float)},
                                  {"adam.v", "F32", {static_cast<int64_t>(n)}, s.adam_v, n * sizeof(float)}};
    if (s.outer_momentum)
      ov.push_back({"outer.momentum", "F32", {static_cast<int64_t>(n)}, s.outer_momentum, n * sizeof(float)});
    auto optim = EncodeSafetensors(ov, {});
    if (!optim.ok()) return optim.status();
    files.push_back({"optim.safetensors", std::move(optim).value()});
  }
  // The state holds user strings (paths, e.g. imported_from) that need not be UTF-8: replace, never throw.
  files.push_back({"state.json", s.state.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n"});
  files.push_back({"tokenizer.model", s.tokenizer});
  return files;
}

Result<TrainingSnapshot> DecodeModelFile(const std::string& source_name, std::string bytes) {
  auto st = SafetensorsFile::FromBytes(std::move(bytes), source_name);  // its errors name source_name
  if (!st.ok()) return st.status();
  const auto& md = st->metadata();
  auto it = md.find("config");
  if (it == md.end()) return Corrupt(source_name + ": no model config in the safetensors metadata");
  auto j = nlohmann::json::parse(it->second, nullptr, false);
  if (j.is_discarded()) return Corrupt(source_name + ": model config metadata is not valid JSON");
  auto cfg = GptConfig::FromJson(j);
  if (!cfg.ok()) return cfg.status().Wrap(source_name);
  TrainingSnapshot s;
  s.config = cfg.value();
  s.params.assign(NumParams(s.config), 0.0f);
  for (const auto& t : ParamLayout(s.config)) {
    const TensorView* v = st->Find(t.name);
    if (!v) return Corrupt(source_name + ": missing tensor '" + t.name + "'");
    if (v->shape != t.shape) return Corrupt(source_name + ": tensor '" + t.name + "' has the wrong shape");
    auto data = st->ReadF32(t.name);
    if (!data.ok()) return data.status();
    std::copy(data->begin(), data->end(), s.params.begin() + static_cast<std::ptrdiff_t>(t.offset));
  }
  return s;
}

Result<TrainingSnapshot> LoadSnapshot(const std::string& path, bool with_optimizer, std::vector<std::string>* warnings,
                                      std::string* loaded_dir) {
  std::string dir = path;
  if (!IsCheckpointDir(path)) {
    if (!DefaultEnv()->IsDir(path)) {
      if (DefaultEnv()->Exists(path)) return InvalidArgument(path + ": is a file, not a checkpoint or run directory");
      return NotFound(path + ": no such checkpoint or run directory");
    }
    auto latest = FindLatestValidCheckpoint(path, warnings);
    if (!latest.ok()) return latest.status();
    dir = latest->dir;
  }
  auto files = ReadCheckpoint(dir);
  if (!files.ok()) return files.status();
  auto& f = files.value();
  for (const char* need : {"model.safetensors", "state.json", "tokenizer.model"})
    if (!f.count(need)) return Corrupt(dir + ": checkpoint lacks " + need);
  KEEL_ASSIGN_OR_RETURN(TrainingSnapshot s, DecodeModelFile(dir + "/model.safetensors", std::move(f["model.safetensors"])));
  s.state = nlohmann::json::parse(f["state.json"], nullptr, false);
  if (s.state.is_discarded() || !s.state.is_object() || !s.state.contains("step"))
    return Corrupt(dir + "/state.json: not a valid training state");
  s.tokenizer = std::move(f["tokenizer.model"]);
  if (with_optimizer) {
    if (!f.count("optim.safetensors")) return Corrupt(dir + ": checkpoint lacks optim.safetensors");
    const std::string opath = dir + "/optim.safetensors";
    auto o = SafetensorsFile::FromBytes(std::move(f["optim.safetensors"]), opath);
    if (!o.ok()) return o.status();
    // Each moment on its own: missing or undecodable (ReadF32's message names opath), or of the wrong size.
    auto moment = [&](const char* name, std::vector<float>* out) -> Status {
      auto r = o->ReadF32(name);
      if (!r.ok()) return Corrupt(r.status().message());
      if (r->size() != s.params.size())
        return Corrupt(opath + ": tensor '" + name + "' has " + std::to_string(r->size()) + " elements, the model " +
                       std::to_string(s.params.size()) + " parameters");
      *out = std::move(r).value();
      return Status::Ok();
    };
    KEEL_RETURN_IF_ERROR(moment("adam.m", &s.adam_m));
    KEEL_RETURN_IF_ERROR(moment("adam.v", &s.adam_v));
    if (o->Find("outer.momentum")) KEEL_RETURN_IF_ERROR(moment("outer.momentum", &s.outer_momentum));
  }
  if (loaded_dir) *loaded_dir = dir;
  return s;
}

}  // namespace keel
