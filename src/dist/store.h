// store.h: the small key-value store that workers rendezvous through (after torch.distributed's Store):
// a directory of files (one machine, or a shared filesystem) or a Redis server (many machines).
//
// Contract: every call is bounded — the file store by the filesystem, the Redis store by its connect/command
// timeout (connection errors fail fast with a one-line message naming HOST:PORT; a connection found broken when
// reused is reopened once for GET, SET, DEL and SCAN, which are safe to send twice). Waiting for a key that peers
// will write is done by polling (WaitGet) against a deadline, never by a blocking call without one. Nothing
// throws. Keys are arbitrary printable strings ("gen/0/rank_1"); values are bytes.
// Thread safety: every store is safe for concurrent use (the Redis store serialises its connection).
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace keel {

class Store {
 public:
  virtual ~Store() = default;
  // Writes key (overwrites).
  virtual Status Set(const std::string& key, std::string_view value) = 0;
  // Writes key only if it does not exist; true when this call created it.
  virtual Result<bool> SetIfAbsent(const std::string& key, std::string_view value) = 0;
  // The value, or nullopt when the key does not exist (yet).
  virtual Result<std::optional<std::string>> TryGet(const std::string& key) = 0;
  // Atomically increments the counter at key (absent: 0) and returns the new value (1, 2, ...).
  virtual Result<int64_t> Increment(const std::string& key) = 0;
  // The counter's current value (absent: 0).
  virtual Result<int64_t> Counter(const std::string& key) = 0;
  // Removes every key of this store (its prefix / directory). Best effort; used when a job ends cleanly.
  virtual Status Clear() = 0;
  // "redis://host:port/job" or "file:///dir" — for messages; never contains a password.
  virtual std::string Describe() const = 0;
};

// A view of `base` with every key prefixed by "prefix/". Clear() removes only the prefixed keys.
std::shared_ptr<Store> MakePrefixStore(std::shared_ptr<Store> base, const std::string& prefix);

// A parsed rendezvous URL: file://PATH (PATH absolute, or relative as in file:rel/dir) or
// redis://[:PASSWORD@]HOST[:PORT]/JOB_ID (port defaults to 6379).
struct StoreUrl {
  enum Kind { kFile, kRedis } kind = kFile;
  std::string path;         // kFile: the directory
  std::string host;         // kRedis
  int port = 6379;
  std::string password;     // kRedis; empty = no AUTH
  std::string job;          // kRedis: the job id (keys live under "keel/<job>/"); kFile: the directory's base name
  std::string Redacted() const;  // the URL without the password
};
Result<StoreUrl> ParseStoreUrl(const std::string& url);

// Opens the store a URL names, rooted at the job: for Redis every key is under "keel/<job>/"; for a file URL
// the directory (created if missing) is the job. connect_timeout_s bounds connecting and each command.
Result<std::shared_ptr<Store>> OpenStore(const StoreUrl& url, double connect_timeout_s = 5);
Result<std::shared_ptr<Store>> OpenFileStore(const std::string& dir);

// Polls store until key exists or timeout_s passes (then kTimeout: "timed out after Ns waiting for <what>", or
// the store's last kUnavailable error if it was unreachable at the end), or until *abort becomes true (kAborted).
// An unreachable store is polled again like an absent key; other errors return at once. poll_s: the interval.
Result<std::string> WaitGet(Store& store, const std::string& key, double timeout_s, const std::string& what,
                            const std::atomic<bool>* abort = nullptr, double poll_s = 0.01);

}  // namespace keel
