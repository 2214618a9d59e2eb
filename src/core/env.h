// env.h: the one seam through which libkeel touches files and the clock (after LevelDB's Env).
// Tests replace the default Env (SetDefaultEnv) to inject faults: failed writes, truncated files, a fake
// clock. Every function returns a Status naming the path on failure; none throws or exits.
// Thread safety: the default Env is safe for concurrent use; replacing it is not (do it before threads start).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace keel {

// A read-only memory-mapped file. Move-only; unmaps on destruction.
class MappedFile {
 public:
  MappedFile() = default;
  MappedFile(const void* data, size_t size) : data_(data), size_(size) {}
  MappedFile(MappedFile&& o) noexcept { *this = std::move(o); }
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();
  const uint8_t* data() const { return static_cast<const uint8_t*>(data_); }
  size_t size() const { return size_; }

 private:
  const void* data_ = nullptr;
  size_t size_ = 0;
};

class Env {
 public:
  virtual ~Env() = default;
  virtual Result<std::string> ReadFile(const std::string& path) = 0;
  // Writes and fsyncs path (not atomic by itself; see WriteFileAtomic).
  virtual Status WriteFile(const std::string& path, std::string_view data) = 0;
  virtual Status Rename(const std::string& from, const std::string& to) = 0;
  virtual Status SyncDir(const std::string& dir) = 0;
  // Creates path and any missing parents (Ok if it exists). PosixEnv fsyncs the parent of each directory it
  // creates (best effort), so the new entries survive a crash.
  virtual Status CreateDirs(const std::string& path) = 0;
  virtual Status RemoveAll(const std::string& path) = 0;
  virtual bool Exists(const std::string& path) = 0;
  virtual bool IsDir(const std::string& path) = 0;
  // Names (not paths) of the entries of dir, sorted.
  virtual Result<std::vector<std::string>> ListDir(const std::string& dir) = 0;
  virtual Result<MappedFile> Map(const std::string& path) = 0;
  // Size in bytes of the file at path, without reading it. The default maps the file (Map); PosixEnv stats it.
  virtual Result<uint64_t> FileSize(const std::string& path);
  // Creates a new file named prefix + a random suffix, which must not exist yet (never following or replacing
  // anything already there), writes and fsyncs data, and returns its path. On failure nothing is left behind.
  // The default builds on Exists/WriteFile (so fault-injecting Envs see the write); PosixEnv uses O_EXCL.
  virtual Result<std::string> CreateUniqueFile(const std::string& prefix, std::string_view data);
  // Creates a new empty directory named prefix + a random suffix (mkdtemp-style) and returns its path.
  // The default builds on Exists/CreateDirs; PosixEnv uses mkdir, which fails on any existing entry.
  virtual Result<std::string> CreateUniqueDir(const std::string& prefix);
  // Monotonic seconds, for timeouts and rates.
  virtual double NowSeconds() = 0;
};

Env* DefaultEnv();
// Replaces the process-wide Env (tests). Pass nullptr to restore the POSIX one. Not thread-safe.
void SetDefaultEnv(Env* env);

// Writes path atomically: write a new uniquely named path.tmp.XXXXXX (CreateUniqueFile), fsync, rename over
// path, fsync the directory. A crash leaves either the old file or the new one, never a mix; a failure removes
// the temporary it created and nothing else; concurrent writers never share a temporary.
Status WriteFileAtomic(const std::string& path, std::string_view data);

// A directory that does not exist yet can be created at path (its nearest existing ancestor is a directory);
// kInvalidArgument "<what>: cannot be created: ANCESTOR is not a directory" otherwise. Lets a command refuse an
// impossible output path before its expensive work rather than at the end.
Status CheckCanCreateDir(Env* env, const std::string& path, const std::string& what);

std::string JoinPath(const std::string& a, const std::string& b);
std::string DirName(const std::string& path);
std::string BaseName(const std::string& path);

}  // namespace keel
