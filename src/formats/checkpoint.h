// checkpoint.h: crash-safe checkpoint directories (run_dir/ckpt-00000040/...), generic over content.
// The trainer decides which files go in; this layer makes a checkpoint either fully present and verified
// or ignored.
//
// On-disk protocol (WriteCheckpoint):
//   1. create run_dir/ckpt-XXXXXXXX.<pid>-<nonce>.tmp (this writer's own: two writers of one step each publish a
//      whole directory), write every file (each fsynced);
//   2. write MANIFEST.json ({"format":"keel-checkpoint","version":1,"step":N,
//      "files":[{"name","size","hash"}]}, hash = HashHex(Hash64(bytes))), fsync the directory; then ask the
//      caller's may_publish, if any (a veto removes the temp directory: nothing else changes);
//   3. if ckpt-XXXXXXXX already exists (re-saving a step), rename it to ckpt-XXXXXXXX.old;
//   4. rename .tmp to ckpt-XXXXXXXX, fsync run_dir;
//   5. write COMMITTED (the manifest's HashHex) inside it, fsync the directory;
//   6. delete the .old copy, stale ckpt-*.tmp dirs (not another process's of this step: it may be writing it),
//      and prune to keep_last valid checkpoints.
// A checkpoint is valid iff COMMITTED exists and equals the manifest's hash, and every listed file exists
// with the listed size and hash. A crash at any point leaves the previous valid checkpoints valid; a
// crash between 3 and 5 leaves the old copy as ckpt-XXXXXXXX.old, which ListCheckpoints still reports
// (after the plain name of the same step) so it can be resumed from.
//
// Errors: Status/Result, one line each, starting with the offending path. Verification failures are
// kCorrupt, a missing checkpoint kNotFound, file-system failures kIo (as the Env reports them).
// All file access goes through DefaultEnv().
// Thread safety: the functions are reentrant, but at most one process/thread may write checkpoints into a
// given run_dir at a time (they rename and delete each other's directories otherwise). Readers may run
// concurrently with a writer only on checkpoints the writer's pruning will not delete.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/status.h"

namespace keel {

struct CheckpointFile {
  std::string name;  // plain file name: non-empty, no '/', not "." / "..", not MANIFEST.json / COMMITTED
  std::string data;  // the file's bytes
};

struct CheckpointInfo {
  std::string dir;   // path of the checkpoint directory (run_dir joined with its name)
  int64_t step = 0;
};

// The directory name for a step: "ckpt-%08lld".
std::string CheckpointDirName(int64_t step);

// Writes a checkpoint of `step` (>= 0) under run_dir (created if missing) with the protocol above, then
// deletes stale ckpt-*.tmp dirs and prunes: walking newest step first, the first keep_last valid
// checkpoints are kept, as is anything (even invalid) newer than the last of them; everything older is
// deleted, except the checkpoint just written, which is never deleted. A .old copy whose plain
// same-step checkpoint is valid is deleted. keep_last <= 0 keeps all. Pruning verifies (reads and hashes)
// the checkpoints it walks past before the cut. If the checkpoint was committed but cleanup failed, the
// error says so ("<dir>: committed, but cleanup failed: ...") and the checkpoint is valid; with cleanup_error
// non-null that message goes there instead and the call returns Ok (a trainer warns and goes on).
// On error the previous checkpoints are untouched (a replaced same-step copy is restored or left as .old)
// and no new valid checkpoint exists.
// may_publish (optional) is asked once the files are written, just before step 3: a reason (non-empty) not to
// publish them removes the temp directory and returns kAborted with it, leaving every checkpoint as it was.
Status WriteCheckpoint(const std::string& run_dir, int64_t step, const std::vector<CheckpointFile>& files,
                       int keep_last, std::string* cleanup_error = nullptr,
                       const std::function<std::string()>& may_publish = nullptr);

// All ckpt-<digits> and ckpt-<digits>.old directories of run_dir (never .tmp), newest step first, a
// plain name before the .old of the same step. Does not verify. An absent run_dir gives an empty list.
Result<std::vector<CheckpointInfo>> ListCheckpoints(const std::string& run_dir);

// Whether ckpt_dir holds its COMMITTED marker (written last: without it the checkpoint was never committed).
// Does not verify anything else.
bool CheckpointCommitted(const std::string& ckpt_dir);

// Full verification (reads and hashes every file). Examples of errors:
//   "runs/x/ckpt-00000040: incomplete (no COMMITTED marker)"
//   "runs/x/ckpt-00000040/model.safetensors: checksum mismatch (file corrupt)"
//   "runs/x/ckpt-00000040/model.safetensors: size 1000, manifest says 2000 (truncated)"
Status VerifyCheckpoint(const std::string& ckpt_dir);

// Verifies while reading; returns file name -> bytes for every file of the manifest.
Result<std::map<std::string, std::string>> ReadCheckpoint(const std::string& ckpt_dir);

// The newest valid checkpoint. For each newer invalid one skipped, appends "skipping <reason>" (reason
// starts with the path) to *warnings when warnings is non-null. kNotFound if none is valid.
Result<CheckpointInfo> FindLatestValidCheckpoint(const std::string& run_dir, std::vector<std::string>* warnings);

// Deletes every checkpoint of run_dir (plain and .old) of a step above `step`, each through a .del.tmp name (a
// crash midway leaves no half-deleted directory under a checkpoint's name). After training rolled back to `step`
// they hold an abandoned trajectory that --resume would otherwise take for the newest state. Returns the first
// error; the directories it could not delete stay.
Status DeleteCheckpointsAfter(const std::string& run_dir, int64_t step);

// True if path contains MANIFEST.json or COMMITTED.
bool IsCheckpointDir(const std::string& path);

}  // namespace keel
