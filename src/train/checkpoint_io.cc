// checkpoint_io.cc: encoding and decoding of training snapshots to checkpoint files.
#include "train/checkpoint_io.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

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
  // Every tensor present with its shape before anything is allocated: a (hand-edited, re-signed) config that claims
  // a huge model must fail here, not in a multi-terabyte allocation.
  const auto layout = ParamLayout(s.config);
  for (const auto& t : layout) {
    const TensorView* v = st->Find(t.name);
    if (!v) return Corrupt(source_name + ": missing tensor '" + t.name + "'");
    if (v->shape != t.shape) return Corrupt(source_name + ": tensor '" + t.name + "' has the wrong shape");
  }
  s.params.assign(NumParams(s.config), 0.0f);
  for (const auto& t : layout) {
    auto data = st->ReadF32(t.name);
    if (!data.ok()) return data.status();
    std::copy(data->begin(), data->end(), s.params.begin() + static_cast<std::ptrdiff_t>(t.offset));
  }
  return s;
}

namespace {

// One checkpoint directory, read (checksums verified), decoded and checked for content.
Result<TrainingSnapshot> LoadCheckpointDir(const std::string& dir, bool with_optimizer) {
  auto files = ReadCheckpoint(dir);
  if (!files.ok()) return files.status();
  auto& f = files.value();
  for (const char* need : {"model.safetensors", "state.json", "tokenizer.model"})
    if (!f.count(need)) return Corrupt(dir + ": checkpoint lacks " + need);
  KEEL_ASSIGN_OR_RETURN(TrainingSnapshot s, DecodeModelFile(dir + "/model.safetensors", std::move(f["model.safetensors"])));
  s.state = nlohmann::json::parse(f["state.json"], nullptr, false);
  if (s.state.is_discarded() || !s.state.is_object()) return Corrupt(dir + "/state.json: not a JSON object");
  KEEL_RETURN_IF_ERROR(ValidateTrainingState(s.state, dir + "/state.json"));
  if (Status fin = CheckFiniteParams(s, dir + "/model.safetensors"); !fin.ok()) return Corrupt(fin.message());
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
      for (size_t i = 0; i < out->size(); ++i)
        if (!std::isfinite((*out)[i]))
          return Corrupt(opath + ": tensor '" + name + "' has a non-finite value at element " + std::to_string(i));
      return Status::Ok();
    };
    KEEL_RETURN_IF_ERROR(moment("adam.m", &s.adam_m));
    KEEL_RETURN_IF_ERROR(moment("adam.v", &s.adam_v));
    if (o->Find("outer.momentum")) KEEL_RETURN_IF_ERROR(moment("outer.momentum", &s.outer_momentum));
  }
  return s;
}

}  // namespace

Result<TrainingSnapshot> LoadSnapshot(const std::string& path, bool with_optimizer, std::vector<std::string>* warnings,
                                      std::string* loaded_dir) {
  if (IsCheckpointDir(path)) {
    KEEL_ASSIGN_OR_RETURN(TrainingSnapshot s, LoadCheckpointDir(path, with_optimizer));
    if (loaded_dir) *loaded_dir = path;
    return s;
  }
  if (!DefaultEnv()->IsDir(path)) {
    if (DefaultEnv()->Exists(path)) return InvalidArgument(path + ": is a file, not a checkpoint or run directory");
    return NotFound(path + ": no such checkpoint or run directory");
  }
  // A run directory: the newest checkpoint that passes its checksums AND its content checks (non-finite values,
  // a malformed state, a missing optimizer file); each one skipped is a warning, as for a checksum failure.
  KEEL_ASSIGN_OR_RETURN(std::vector<CheckpointInfo> list, ListCheckpoints(path));
  std::map<std::string, Status> failed;
  for (const CheckpointInfo& c : list) {
    auto s = LoadCheckpointDir(c.dir, with_optimizer);
    if (s.ok()) {
      if (loaded_dir) *loaded_dir = c.dir;
      return s;
    }
    if (warnings) warnings->push_back("skipping " + s.status().message());
    failed[c.dir] = s.status();
  }
  // None usable. If none passes its checksums either: FindLatestValidCheckpoint's error (no checkpoints, a data
  // directory, all invalid); else the content error of the newest one that does (it says what is wrong).
  auto latest = FindLatestValidCheckpoint(path, nullptr);
  if (!latest.ok()) return latest.status();
  return failed.count(latest->dir) ? failed[latest->dir] : Internal(latest->dir + ": verified but not loaded");
}

Status ValidateTrainingState(const nlohmann::json& state, const std::string& where) {
  if (!state.is_object()) return Corrupt(where + ": not a JSON object");
  auto bad = [&](const std::string& key, const std::string& want) {
    return Corrupt(where + ": '" + key + "' must be " + want + " (got " + state[key].dump() + ")");
  };
  // Integers keel writes: step (required), data_offset, epoch and the option echoes. 2^53: exact in a double and far
  // beyond any run, so arithmetic on them cannot overflow.
  constexpr int64_t kMaxCount = int64_t{1} << 53;
  auto integer = [&](const char* key, int64_t lo, bool required) -> Status {
    if (!state.contains(key)) return required ? Corrupt(where + ": '" + key + "' is missing") : Status::Ok();
    const auto& v = state[key];
    // (A file's 0 or 7 parses as an unsigned number: the lower bound holds for both kinds.)
    if (!v.is_number_integer() ||
        (v.is_number_unsigned() &&
         (v.get<uint64_t>() < static_cast<uint64_t>(lo) || v.get<uint64_t>() > static_cast<uint64_t>(kMaxCount))) ||
        (!v.is_number_unsigned() && (v.get<int64_t>() < lo || v.get<int64_t>() > kMaxCount)))
      return bad(key, "an integer in [" + std::to_string(lo) + ", 2^53]");
    return Status::Ok();
  };
  KEEL_RETURN_IF_ERROR(integer("step", 0, true));
  for (const char* key : {"data_offset", "epoch", "steps", "warmup"}) KEEL_RETURN_IF_ERROR(integer(key, 0, false));
  for (const char* key : {"batch", "grad_accum"}) KEEL_RETURN_IF_ERROR(integer(key, 1, false));
  if (state.contains("seed") && !state["seed"].is_number_unsigned() &&
      !(state["seed"].is_number_integer() && state["seed"].get<int64_t>() >= 0))
    return bad("seed", "a non-negative integer");
  for (const char* key : {"data_fingerprint", "keel_version", "sync", "compress", "optimizer", "imported_from"})
    if (state.contains(key) && !state[key].is_string()) return bad(key, "a string");
  for (const auto& [key, allowed] : {std::pair<const char*, std::vector<std::string>>{"sync", {"ddp", "diloco"}},
                                     {"compress", {"none", "bf16", "int8"}},
                                     {"optimizer", {"adamw", "sgd"}}})
    if (state.contains(key) && std::find(allowed.begin(), allowed.end(), state[key].get<std::string>()) == allowed.end())
      return bad(key, "one of " + [&] {
        std::string l;
        for (const auto& a : allowed) l += (l.empty() ? "" : ", ") + a;
        return l;
      }());
  if (state.contains("deterministic") && !state["deterministic"].is_boolean()) return bad("deterministic", "true or false");
  if (state.contains("lr") && !(state["lr"].is_number() && std::isfinite(state["lr"].get<double>())))
    return bad("lr", "a finite number");
  for (const char* key : {"loss_stats", "diloco"}) {
    if (!state.contains(key)) continue;
    const auto& o = state[key];
    if (!o.is_object()) return bad(key, "an object");
    for (const auto& [k, v] : o.items()) {
      const bool count = k == "loss_n" || k == "inner_steps";
      const bool ok = count ? v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() <= kMaxCount
                            : v.is_number() && std::isfinite(v.get<double>());
      if (!ok)
        return Corrupt(where + ": '" + std::string(key) + "." + k + "' must be " +
                       (count ? "a non-negative integer" : "a finite number") + " (got " + v.dump() + ")");
    }
  }
  return Status::Ok();
}

Status CheckFiniteParams(const TrainingSnapshot& s, const std::string& where,
                         const std::function<double(const ParamTensor&)>& largest_storable) {
  const size_t n = s.params.size();
  for (const auto& t : ParamLayout(s.config)) {
    if (t.offset + t.size > n) break;  // the exporters report a mismatched buffer themselves
    const float* x = s.params.data() + t.offset;
    const double limit = largest_storable ? largest_storable(t) : HUGE_VAL;
    for (size_t i = 0; i < t.size; ++i) {
      if (std::isfinite(x[i])) {
        if (std::fabs(static_cast<double>(x[i])) <= limit) continue;
        char v[32], l[32];
        std::snprintf(v, sizeof v, "%g", static_cast<double>(x[i]));
        std::snprintf(l, sizeof l, "%g", limit);
        return InvalidArgument(where + ": tensor '" + t.name + "' has a value beyond what its reduced-precision " +
                               "copy stores (" + v + " at element " + std::to_string(i) + "; at most +-" + l +
                               " as f16 or q8_0): use --dtype f32");
      }
      return InvalidArgument(where + ": tensor '" + t.name + "' has a non-finite value (" +
                             (std::isnan(x[i]) ? "nan" : x[i] > 0 ? "inf" : "-inf") + " at element " +
                             std::to_string(i) + "): the model is broken (a diverged run?)");
    }
  }
  return Status::Ok();
}

}  // namespace keel
