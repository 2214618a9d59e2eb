// trainer_support.cc: the training loop's stateless helpers (see trainer_support.h).
#include "train/trainer_support.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "core/env.h"

namespace keel::trainer_support {

// The [offset, count) range of the flat parameter buffer that gradient-readiness group g covers.
std::pair<size_t, size_t> GroupRange(const std::vector<ParamTensor>& tensors, int group) {
  size_t lo = SIZE_MAX, hi = 0;
  for (const auto& t : tensors)
    if (t.group == group) {
      lo = std::min(lo, t.offset);
      hi = std::max(hi, t.offset + t.size);
    }
  return {lo, hi - lo};
}

void DefaultLog(const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); }

std::string Fmt(const char* fmt, double a) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), fmt, a);
  return buf;
}

std::string FormatDuration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  if (s >= 3.6e8) return ">99999h";  // beyond int's seconds, and beyond any use
  int t = static_cast<int>(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof(buf), "%dh%02dm", t / 3600, (t / 60) % 60);
  else std::snprintf(buf, sizeof(buf), "%dm%02ds", t / 60, t % 60);
  return buf;
}

std::string UidList(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';  // (not `"," + to_string`: GCC 12 reports a false -Wrestrict for it)
    s += std::to_string(v[i]);
  }
  return "[" + s + "]";
}

// Keeps only the metrics lines of steps before `step` (a resumed run rewrites what came after its checkpoint).
void TruncateMetrics(const std::string& path, int64_t step) {
  auto text = DefaultEnv()->ReadFile(path);
  if (!text.ok()) return;
  // A line torn by a failed write (a full disk) is cut off in place first: that needs no free space, where the
  // rewrite below needs a whole copy (and the next line appended to the fragment would be lost with it).
  if (!text->empty() && text->back() != '\n') {
    const size_t keep = text->rfind('\n') == std::string::npos ? 0 : text->rfind('\n') + 1;
    if (::truncate(path.c_str(), static_cast<off_t>(keep)) == 0) text->resize(keep);
  }
  std::string kept;
  size_t pos = 0;
  bool dropped = false;
  while (pos < text->size()) {
    size_t nl = text->find('\n', pos);
    if (nl == std::string::npos) nl = text->size();
    std::string line = text->substr(pos, nl - pos);
    pos = nl + 1;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.contains("step") && j["step"].is_number() && j["step"].get<int64_t>() < step)
      kept += line + "\n";
    else
      dropped = true;
  }
  if (dropped) (void)WriteFileAtomic(path, kept);
}

size_t CountNonFinite(const float* g, size_t n) {
  size_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad)
  for (size_t i = 0; i < n; ++i) bad += !std::isfinite(g[i]);
  return bad;
}

// A checkpoint left half-written (fault injection). `published`: the worst moment of a crash, after the rename
// and before the COMMITTED marker: ckpt-N/ holds every file, the first one cut in half, and no marker (the loader
// must skip it). Otherwise the state in the middle of the file writes: this process's temp directory
// (ckpt-N.<pid>-0.tmp, the writer's own name pattern, which its next write cleans up) with the first file cut.
void WriteTruncatedCheckpoint(const std::string& run_dir, int64_t step, const std::vector<CheckpointFile>& files,
                              bool published) {
  std::string name = CheckpointDirName(step);
  if (!published) {  // (appended piecewise: GCC 12 warns falsely, -Wrestrict, on the one-expression form)
    name += '.';
    name += std::to_string(::getpid());
    name += "-0.tmp";
  }
  const std::string dir = JoinPath(run_dir, name);
  (void)DefaultEnv()->CreateDirs(dir);
  for (size_t i = 0; i < files.size() && (published || i == 0); ++i)
    (void)DefaultEnv()->WriteFile(JoinPath(dir, files[i].name),
                                  std::string_view(files[i].data.data(), i == 0 ? files[i].data.size() / 2
                                                                                : files[i].data.size()));
}

}  // namespace keel::trainer_support
