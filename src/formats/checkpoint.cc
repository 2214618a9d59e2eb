// checkpoint.cc: writing, verifying, listing and pruning crash-safe checkpoint directories.
// The protocol: write-to-.tmp, manifest, rename, COMMITTED marker; fallback to the newest valid one.
#include "formats/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>

#include "core/env.h"
#include "core/hash.h"

namespace keel {
namespace {

constexpr char kManifest[] = "MANIFEST.json";
constexpr char kCommitted[] = "COMMITTED";
constexpr char kFormat[] = "keel-checkpoint";
constexpr uint64_t kMaxManifestBytes = uint64_t{16} << 20;  // far above any real manifest (a few KB)

enum class DirKind { kNone, kPlain, kOld, kTmp };

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Classifies a run_dir entry name: ckpt-<digits>, ckpt-<digits>.old, or ckpt-*.tmp (any temp/trash).
DirKind ParseDirName(const std::string& name, int64_t* step) {
  if (name.rfind("ckpt-", 0) != 0) return DirKind::kNone;
  if (EndsWith(name, ".tmp")) return DirKind::kTmp;
  std::string digits = name.substr(5);
  DirKind kind = DirKind::kPlain;
  if (EndsWith(digits, ".old")) {
    digits.resize(digits.size() - 4);
    kind = DirKind::kOld;
  }
  if (digits.empty() || digits.size() > 18) return DirKind::kNone;
  int64_t v = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return DirKind::kNone;
    v = v * 10 + (c - '0');
  }
  *step = v;
  return kind;
}

bool ValidFileName(const std::string& n) {
  return !n.empty() && n != "." && n != ".." && n != kManifest && n != kCommitted &&
         n.find('/') == std::string::npos && n.find('\0') == std::string::npos;
}

std::string Trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

struct ManifestEntry {
  std::string name;
  uint64_t size = 0;
  std::string hash;
};

// Parses MANIFEST.json defensively (its bytes are already checked against COMMITTED, but a manifest
// from a buggy or hostile writer must still not escape the directory or crash us).
Result<std::vector<ManifestEntry>> ParseManifest(const std::string& path, const std::string& text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Corrupt(path + ": not a JSON object");
  auto fmt = j.find("format");
  if (fmt == j.end() || !fmt->is_string() || fmt->get<std::string>() != kFormat) {
    return Corrupt(path + ": not a keel checkpoint manifest (format is not \"keel-checkpoint\")");
  }
  auto files = j.find("files");
  if (files == j.end() || !files->is_array()) return Corrupt(path + ": missing \"files\" array");
  std::vector<ManifestEntry> out;
  std::set<std::string> seen;
  for (const auto& f : *files) {
    if (!f.is_object()) return Corrupt(path + ": file entry is not an object");
    auto n = f.find("name"), s = f.find("size"), h = f.find("hash");
    if (n == f.end() || !n->is_string() || s == f.end() || !s->is_number_unsigned() || h == f.end() ||
        !h->is_string()) {
      return Corrupt(path + ": file entry needs string name, unsigned size, string hash");
    }
    ManifestEntry e{n->get<std::string>(), s->get<uint64_t>(), h->get<std::string>()};
    if (!ValidFileName(e.name)) return Corrupt(path + ": invalid file name in manifest");
    if (!seen.insert(e.name).second) return Corrupt(path + ": duplicate file " + e.name);
    out.push_back(std::move(e));
  }
  return out;
}

Status SizeMismatch(const std::string& path, const ManifestEntry& e, uint64_t size) {
  return Corrupt(path + ": size " + std::to_string(size) + ", manifest says " + std::to_string(e.size) +
                 (size < e.size ? " (truncated)" : " (file corrupt)"));
}

// Checks one file's bytes against its manifest entry.
Status CheckFile(const std::string& path, const ManifestEntry& e, const void* data, size_t size) {
  if (size != e.size) return SizeMismatch(path, e, size);
  if (HashHex(Hash64(data, size)) != e.hash) return Corrupt(path + ": checksum mismatch (file corrupt)");
  return Status::Ok();
}

}  // namespace

bool CheckpointCommitted(const std::string& ckpt_dir) {
  return DefaultEnv()->Exists(JoinPath(ckpt_dir, kCommitted));
}

namespace {

// Full verification; with `out`, also returns the files' bytes (read once, checked as read).
Status VerifyImpl(const std::string& dir, std::map<std::string, std::string>* out) {
  Env* env = DefaultEnv();
  if (!env->IsDir(dir)) return NotFound(dir + ": no such checkpoint directory");
  // The marker and the manifest are small (a hash; a line per file): a huge one is not read into memory.
  for (const char* name : {kCommitted, kManifest}) {
    auto size = env->FileSize(JoinPath(dir, name));
    if (size.ok() && *size > kMaxManifestBytes)
      return Corrupt(JoinPath(dir, name) + ": " + std::to_string(*size) + " bytes, implausibly large (corrupt)");
  }
  Result<std::string> committed = env->ReadFile(JoinPath(dir, kCommitted));
  if (!committed.ok()) {
    if (committed.status().code() == Code::kNotFound) return Corrupt(dir + ": incomplete (no COMMITTED marker)");
    return committed.status();
  }
  const std::string mpath = JoinPath(dir, kManifest);
  Result<std::string> manifest = env->ReadFile(mpath);
  if (!manifest.ok()) {
    if (manifest.status().code() == Code::kNotFound) return Corrupt(dir + ": incomplete (no MANIFEST.json)");
    return manifest.status();
  }
  const std::string& mtext = manifest.value();
  if (Trim(committed.value()) != HashHex(Hash64(mtext.data(), mtext.size()))) {
    return Corrupt(dir + ": COMMITTED marker does not match MANIFEST.json (manifest corrupt)");
  }
  KEEL_ASSIGN_OR_RETURN(std::vector<ManifestEntry> entries, ParseManifest(mpath, mtext));
  for (const ManifestEntry& e : entries) {
    const std::string path = JoinPath(dir, e.name);
    // The size first, from the file system: a grown (or huge) file is rejected without reading it.
    Result<uint64_t> size = env->FileSize(path);
    if (!size.ok()) {
      if (size.status().code() == Code::kNotFound) return Corrupt(path + ": missing (listed in manifest)");
      return size.status();
    }
    if (*size != e.size) return SizeMismatch(path, e, *size);
    if (out) {
      Result<std::string> bytes = env->ReadFile(path);
      if (!bytes.ok()) {
        if (bytes.status().code() == Code::kNotFound) return Corrupt(path + ": missing (listed in manifest)");
        return bytes.status();
      }
      KEEL_RETURN_IF_ERROR(CheckFile(path, e, bytes->data(), bytes->size()));
      (*out)[e.name] = std::move(bytes).value();
    } else {
      Result<MappedFile> map = env->Map(path);
      if (!map.ok()) {
        if (map.status().code() == Code::kNotFound) return Corrupt(path + ": missing (listed in manifest)");
        return map.status();
      }
      KEEL_RETURN_IF_ERROR(CheckFile(path, e, map->data(), map->size()));
    }
  }
  return Status::Ok();
}

// Deletes a directory so that a crash midway never leaves a half-deleted checkpoint under a name that
// looks like one: rename to <name>.del.tmp (trash, cleaned by the next write), then remove. (Not
// <name>.tmp: for a ckpt-N directory that is the name of the checkpoint being built.)
Status DeleteDir(Env* env, const std::string& path) {
  std::string trash = path;
  if (!EndsWith(trash, ".tmp")) {
    trash += ".del.tmp";
    if (env->Exists(trash)) KEEL_RETURN_IF_ERROR(env->RemoveAll(trash));
    KEEL_RETURN_IF_ERROR(env->Rename(path, trash));
  }
  return env->RemoveAll(trash);
}

// Step 6 of the protocol: drop our .old copy, stale temp dirs, and prune.
Status Cleanup(Env* env, const std::string& run_dir, const std::string& final_dir, int keep_last) {
  Status first;
  auto note = [&first](const Status& s) {
    if (first.ok() && !s.ok()) first = s;
  };
  if (env->Exists(final_dir + ".old")) note(DeleteDir(env, final_dir + ".old"));
  Result<std::vector<std::string>> names = env->ListDir(run_dir);
  if (!names.ok()) return names.status();
  // Another process's temp directories of this step are left alone: it may be writing the same step now (the
  // ones of this process are failed earlier attempts: a process writes one checkpoint at a time).
  const std::string same_step = BaseName(final_dir) + ".", mine = same_step + std::to_string(::getpid()) + "-";
  for (const std::string& n : names.value()) {
    int64_t s = 0;
    if (ParseDirName(n, &s) == DirKind::kTmp && (n.rfind(same_step, 0) != 0 || n.rfind(mine, 0) == 0))
      note(env->RemoveAll(JoinPath(run_dir, n)));
  }
  if (keep_last > 0) {
    Result<std::vector<CheckpointInfo>> list = ListCheckpoints(run_dir);
    if (!list.ok()) return list.status();
    int valid = 0;
    std::set<int64_t> valid_plain;  // steps whose plain directory is valid (so their .old is redundant)
    for (const CheckpointInfo& c : list.value()) {
      const bool is_old = EndsWith(c.dir, ".old");
      if (c.dir == final_dir) {  // just written: known valid, never deleted
        ++valid;
        valid_plain.insert(c.step);
        continue;
      }
      if (is_old && valid_plain.count(c.step)) {
        note(DeleteDir(env, c.dir));
        continue;
      }
      if (valid >= keep_last) {
        note(DeleteDir(env, c.dir));
        continue;
      }
      if (VerifyCheckpoint(c.dir).ok()) {
        ++valid;
        if (!is_old) valid_plain.insert(c.step);
      }
    }
  }
  if (!first.ok()) note(env->SyncDir(run_dir));
  else first = env->SyncDir(run_dir);
  return first;
}

}  // namespace

std::string CheckpointDirName(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "ckpt-%08lld", static_cast<long long>(step));
  return buf;
}

Status WriteCheckpoint(const std::string& run_dir, int64_t step, const std::vector<CheckpointFile>& files,
                       int keep_last, std::string* cleanup_error, const std::function<std::string()>& may_publish) {
  Env* env = DefaultEnv();
  const std::string final_dir = JoinPath(run_dir, CheckpointDirName(step));
  if (step < 0) return InvalidArgument(final_dir + ": negative step " + std::to_string(step));
  std::set<std::string> seen;
  nlohmann::json listing = nlohmann::json::array();
  for (const CheckpointFile& f : files) {
    if (!ValidFileName(f.name)) return InvalidArgument(final_dir + ": invalid checkpoint file name '" + f.name + "'");
    if (!seen.insert(f.name).second) return InvalidArgument(final_dir + ": duplicate file name '" + f.name + "'");
    listing.push_back({{"name", f.name},
                       {"size", static_cast<uint64_t>(f.data.size())},
                       {"hash", HashHex(Hash64(f.data.data(), f.data.size()))}});
  }
  std::string manifest;
  try {
    manifest = nlohmann::json{{"format", kFormat}, {"version", 1}, {"step", step}, {"files", listing}}.dump(2) + "\n";
  } catch (const nlohmann::json::exception&) {
    return InvalidArgument(final_dir + ": a checkpoint file name is not valid UTF-8");
  }

  // 1-2: build everything in a temp directory of this writer's own (ckpt-N.<pid>-<nonce>.tmp): two writers of
  // one step (an elastic leader taken for dead while it was only stopped, and its successor) each publish a
  // complete directory, never a mix of the two.
  static std::atomic<uint64_t> nonce{0};
  char tag[64];
  std::snprintf(tag, sizeof(tag), ".%ld-%llx.tmp", static_cast<long>(::getpid()),
                static_cast<unsigned long long>(
                    nonce.fetch_add(1) ^
                    static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count())));
  const std::string tmp_dir = final_dir + tag;
  const std::string old_dir = final_dir + ".old";
  KEEL_RETURN_IF_ERROR(env->CreateDirs(run_dir));
  if (env->Exists(tmp_dir)) KEEL_RETURN_IF_ERROR(env->RemoveAll(tmp_dir));
  KEEL_RETURN_IF_ERROR(env->CreateDirs(tmp_dir));
  auto fail_tmp = [&](const Status& s) {
    (void)env->RemoveAll(tmp_dir);  // best effort; a leftover .tmp is ignored and cleaned later
    return s;
  };
  for (const CheckpointFile& f : files) {
    Status s = env->WriteFile(JoinPath(tmp_dir, f.name), f.data);
    if (!s.ok()) return fail_tmp(s);
  }
  if (Status s = env->WriteFile(JoinPath(tmp_dir, kManifest), manifest); !s.ok()) return fail_tmp(s);
  if (Status s = env->SyncDir(tmp_dir); !s.ok()) return fail_tmp(s);
  // The files are written (the long part): ask again whether to publish them at all.
  if (may_publish) {
    if (std::string why = may_publish(); !why.empty()) return fail_tmp(Aborted(final_dir + ": not published: " + why));
  }

  // 3: move an existing same-step checkpoint aside, keeping whichever copy is valid if both exist.
  if (env->Exists(final_dir)) {
    Status s;
    if (env->Exists(old_dir)) {
      if (VerifyCheckpoint(final_dir).ok()) {
        s = DeleteDir(env, old_dir);  // (crash-safe: never a half-deleted directory under the .old name)
        if (s.ok()) s = env->Rename(final_dir, old_dir);
      } else {
        s = DeleteDir(env, final_dir);
      }
    } else {
      s = env->Rename(final_dir, old_dir);
    }
    if (s.ok()) s = env->SyncDir(run_dir);
    if (!s.ok()) return fail_tmp(s);
  }

  // 4-5: publish and commit. On failure, remove the uncommitted directory and put the old copy back.
  auto fail_published = [&](const Status& s) {
    if (env->Exists(final_dir)) (void)DeleteDir(env, final_dir);
    if (!env->Exists(final_dir) && env->Exists(old_dir)) (void)env->Rename(old_dir, final_dir);
    (void)env->SyncDir(run_dir);
    return s;
  };
  if (Status s = env->Rename(tmp_dir, final_dir); !s.ok()) {
    (void)env->RemoveAll(tmp_dir);
    return fail_published(s);
  }
  if (Status s = env->SyncDir(run_dir); !s.ok()) return fail_published(s);
  const std::string marker = HashHex(Hash64(manifest.data(), manifest.size())) + "\n";
  if (Status s = env->WriteFile(JoinPath(final_dir, kCommitted), marker); !s.ok()) return fail_published(s);
  if (Status s = env->SyncDir(final_dir); !s.ok()) return fail_published(s);

  // 6: the checkpoint is durable and valid; the rest is housekeeping.
  Status s = Cleanup(env, run_dir, final_dir, keep_last);
  if (!s.ok()) {
    const std::string why = final_dir + ": committed, but cleanup failed: " + s.message();
    if (!cleanup_error) return Status(s.code(), why);
    *cleanup_error = why;
  }
  return Status::Ok();
}

Result<std::vector<CheckpointInfo>> ListCheckpoints(const std::string& run_dir) {
  Env* env = DefaultEnv();
  Result<std::vector<std::string>> names = env->ListDir(run_dir);
  if (!names.ok()) {
    if (names.status().code() == Code::kNotFound) return std::vector<CheckpointInfo>{};
    return names.status();
  }
  struct Entry {
    CheckpointInfo info;
    bool old;
  };
  std::vector<Entry> found;
  for (const std::string& n : names.value()) {
    int64_t step = 0;
    DirKind kind = ParseDirName(n, &step);
    if (kind != DirKind::kPlain && kind != DirKind::kOld) continue;
    std::string path = JoinPath(run_dir, n);
    if (!env->IsDir(path)) continue;
    found.push_back({{path, step}, kind == DirKind::kOld});
  }
  std::stable_sort(found.begin(), found.end(), [](const Entry& a, const Entry& b) {
    if (a.info.step != b.info.step) return a.info.step > b.info.step;
    return !a.old && b.old;
  });
  std::vector<CheckpointInfo> out;
  out.reserve(found.size());
  for (Entry& e : found) out.push_back(std::move(e.info));
  return out;
}

Status VerifyCheckpoint(const std::string& ckpt_dir) { return VerifyImpl(ckpt_dir, nullptr); }

Result<std::map<std::string, std::string>> ReadCheckpoint(const std::string& ckpt_dir) {
  std::map<std::string, std::string> out;
  KEEL_RETURN_IF_ERROR(VerifyImpl(ckpt_dir, &out));
  return out;
}

Status DeleteCheckpointsAfter(const std::string& run_dir, int64_t step) {
  Env* env = DefaultEnv();
  KEEL_ASSIGN_OR_RETURN(std::vector<CheckpointInfo> list, ListCheckpoints(run_dir));
  Status first;
  bool deleted = false;
  for (const CheckpointInfo& c : list) {
    if (c.step <= step) continue;
    Status s = DeleteDir(env, c.dir);
    if (first.ok() && !s.ok()) first = s;
    deleted |= s.ok();
  }
  if (deleted) {
    Status s = env->SyncDir(run_dir);
    if (first.ok()) first = s;
  }
  return first;
}

Result<CheckpointInfo> FindLatestValidCheckpoint(const std::string& run_dir, std::vector<std::string>* warnings) {
  KEEL_ASSIGN_OR_RETURN(std::vector<CheckpointInfo> list, ListCheckpoints(run_dir));
  for (const CheckpointInfo& c : list) {
    Status s = VerifyCheckpoint(c.dir);
    if (s.ok()) return c;
    if (warnings) warnings->push_back("skipping " + s.message());
  }
  if (list.empty()) {
    Env* env = DefaultEnv();
    if (env->Exists(JoinPath(run_dir, "meta.json")) && !env->Exists(JoinPath(run_dir, "run.json")))
      return NotFound(run_dir + ": a data directory (from keel prepare), not a run or checkpoint");
    return NotFound(run_dir + ": no checkpoints");
  }
  return NotFound(run_dir + ": no valid checkpoint (" + std::to_string(list.size()) + " found, all invalid)");
}

bool IsCheckpointDir(const std::string& path) {
  Env* env = DefaultEnv();
  return env->Exists(JoinPath(path, kManifest)) || env->Exists(JoinPath(path, kCommitted));
}

}  // namespace keel
