// events.h: RUN_DIR/events.jsonl — one JSON object per line for every fault and every recovery action
// (injected faults, members lost and how they were detected, generations formed, steps aborted and redone,
// state transfers, repairs, quarantines, restarts, and one "commit" line per step).
//
// Every line has "t" (Unix time, seconds, the writer's clock), "event", and the writer's "uid"/"rank" when it
// is a worker. Several processes append to the same file: each line is one write(2) on an O_APPEND
// descriptor, so lines never interleave on a local filesystem. Failures to write are ignored (events are a
// record, not a dependency). Thread safety: Emit() may be called from any thread.
#pragma once
#include <cstdint>
#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

namespace keel {

class EventLog {
 public:
  EventLog() = default;
  ~EventLog();
  EventLog(const EventLog&) = delete;
  EventLog& operator=(const EventLog&) = delete;
  // Appends to path (created on the first event after its directory exists); an empty path disables the log.
  void Open(const std::string& path);
  bool is_open() const { return !path_.empty(); }
  // Identity stamped on every line (worker events).
  void SetIdentity(int64_t uid, int rank);
  // Appends {"t", "event", "uid"?, "rank"?, ...fields}.
  void Emit(const std::string& event, nlohmann::json fields = nlohmann::json::object());

  static double Now();  // Unix time in seconds

 private:
  std::mutex mu_;
  std::string path_;
  int fd_ = -1;
  int64_t uid_ = -1;
  int rank_ = -1;
};

}  // namespace keel
