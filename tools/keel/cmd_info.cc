// cmd_info.cc: `keel info PATH` — what a data directory, run directory, checkpoint or export holds, checked.
#include <cstdio>

#include "core/env.h"
#include "data/dataset.h"
#include "data/tokenizer.h"
#include "export/export.h"
#include "formats/checkpoint.h"
#include "model/gpt_config.h"
#include "tools/keel/cli_util.h"
#include "tools/keel/commands.h"
#include "train/checkpoint_io.h"

namespace keel::cli {

namespace {

// Every file of a checkpoint: the checksums (VerifyCheckpoint), then what the checksums cannot vouch for (a
// hand-edited file re-signed, or a run that diverged): the tensors, moments and state.json decode and hold finite
// values of the right types (LoadSnapshot), and the tokenizer loads.
Result<TrainingSnapshot> CheckCheckpoint(const std::string& dir) {
  KEEL_RETURN_IF_ERROR(VerifyCheckpoint(dir));
  std::vector<std::string> warnings;
  KEEL_ASSIGN_OR_RETURN(TrainingSnapshot s, LoadSnapshot(dir, true, &warnings));
  const bool byte_tok = s.tokenizer.rfind("keel-byte", 0) == 0;
  auto tok = LoadTokenizer(byte_tok ? "byte" : "bpe", s.tokenizer);
  if (!tok.ok()) return Corrupt(dir + "/tokenizer.model: " + tok.status().message());
  return s;
}

// The model, state and tokenizer lines of a checkpoint or an export.
void PrintModel(const TrainingSnapshot& s) {
  std::printf("  model: %s, %.2fM parameters\n", s.config.ToJson().dump().c_str(), NumParams(s.config) / 1e6);
  std::printf("  state: %s\n", s.state.dump().c_str());
  std::printf("  tokenizer: %s, %zu bytes\n", s.tokenizer.rfind("keel-byte", 0) == 0 ? "byte" : "bpe",
              s.tokenizer.size());
}

int DescribeCheckpoint(const std::string& dir) {
  auto s = CheckCheckpoint(dir);
  std::printf("checkpoint %s: %s\n", dir.c_str(), s.ok() ? "valid" : ("INVALID: " + s.status().message()).c_str());
  if (!s.ok()) return 1;
  PrintModel(*s);
  return 0;
}

}  // namespace

int RunInfo(int argc, char** argv) {
  std::string path;
  CLI::App app("Describe a data directory, run directory, checkpoint, or a GGUF / Hugging Face export.", "info");
  app.add_option("path", path, "DATA_DIR, RUN_DIR, checkpoint directory, model.gguf or Hugging Face export folder")->required();
  if (int rc = Parse(app, argc, argv); rc >= 0) return rc;
  Env* env = DefaultEnv();
  if (!env->Exists(path)) return Fail("info", NotFound(path + ": no such file or directory"));
  if (IsCheckpointDir(path)) return DescribeCheckpoint(path);
  // An export (GGUF file, Hugging Face folder): decoded and checked as sample, serve and export would load it
  // (its keel.checksum, shapes, finite values, tokenizer).
  if (const std::string format = DetectExportFormat(path); !format.empty()) {
    std::vector<std::string> warnings;
    auto s = LoadExportedModel(path, &warnings);
    for (const auto& w : warnings) std::printf("warning: %s\n", w.c_str());
    std::printf("%s export %s: %s\n", format.c_str(), path.c_str(),
                s.ok() ? "valid" : ("INVALID: " + s.status().message()).c_str());
    if (!s.ok()) return 1;
    PrintModel(*s);
    return 0;
  }
  if (env->Exists(JoinPath(path, "meta.json"))) {
    auto j = ReadJsonFile(JoinPath(path, "meta.json"));
    if (!j.ok()) return Fail("info", j.status());
    // Open checks every file of the directory (shards' checksums and token ids, tokenizer, their agreement
    // with meta.json), so a truncated or corrupt shard is reported here rather than at training time.
    auto data = Dataset::Open(path);
    if (!data.ok()) {
      std::printf("data directory %s: INVALID: %s\n", path.c_str(), data.status().message().c_str());
      return 1;
    }
    std::printf("data directory %s: valid\n%s\n", path.c_str(), j->dump(2).c_str());
    return 0;
  }
  if (env->Exists(JoinPath(path, "run.json"))) {
    auto j = ReadJsonFile(JoinPath(path, "run.json"));
    if (!j.ok()) return Fail("info", j.status());
    std::printf("run directory %s\n%s\n", path.c_str(), j->dump(2).c_str());
    auto list = ListCheckpoints(path);
    if (!list.ok()) return Fail("info", list.status());
    std::printf("%zu checkpoint(s):\n", list->size());
    size_t invalid = 0;
    long long newest_valid = -1;
    for (const auto& c : *list) {
      Status v = CheckCheckpoint(c.dir).status();
      // A running trainer (--keep) may prune an old checkpoint between the listing and its check: gone is not
      // corrupt.
      if (!v.ok() && !env->Exists(c.dir)) {
        std::printf("  step %lld  %s  removed while checking (pruned by a running trainer)\n",
                    static_cast<long long>(c.step), c.dir.c_str());
        continue;
      }
      std::printf("  step %lld  %s  %s\n", static_cast<long long>(c.step), c.dir.c_str(),
                  v.ok() ? "valid" : ("INVALID: " + v.message()).c_str());
      if (!v.ok()) ++invalid;
      else if (newest_valid < 0) newest_valid = static_cast<long long>(c.step);
    }
    // An invalid checkpoint is corruption, or the incomplete copy a crash can leave beside a valid .old
    // (formats/checkpoint.h): exit 1 so scripts (`keel info RUN && ...`) notice, and say what sample, serve,
    // export and --resume load instead.
    if (invalid == 0) return 0;
    if (newest_valid >= 0)
      std::printf("%zu of %zu checkpoint(s) INVALID; sample, serve, export and --resume use step %lld\n", invalid,
                  list->size(), newest_valid);
    else
      std::printf("%zu of %zu checkpoint(s) INVALID; none is valid\n", invalid, list->size());
    return 1;
  }
  return Fail("info", InvalidArgument(path + ": not a keel data directory, run directory, checkpoint or export"));
}

}  // namespace keel::cli
