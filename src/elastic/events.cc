// events.cc: the append-only events file.
#include "elastic/events.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>

namespace keel {

EventLog::~EventLog() {
  if (fd_ >= 0) ::close(fd_);
}

void EventLog::Open(const std::string& path) {
  std::lock_guard<std::mutex> l(mu_);
  if (fd_ >= 0) ::close(fd_);
  path_ = path;
  fd_ = path.empty() ? -1 : ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

void EventLog::SetIdentity(int64_t uid, int rank) {
  std::lock_guard<std::mutex> l(mu_);
  uid_ = uid;
  rank_ = rank;
}

double EventLog::Now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void EventLog::Emit(const std::string& event, nlohmann::json fields) {
  std::lock_guard<std::mutex> l(mu_);
  if (fd_ < 0 && !path_.empty()) fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) return;
  nlohmann::json j = {{"t", Now()}, {"event", event}};
  if (uid_ >= 0) j["uid"] = uid_;
  if (rank_ >= 0) j["rank"] = rank_;
  if (fields.is_object())
    for (auto& [k, v] : fields.items()) j[k] = v;
  std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  // One write() per line (O_APPEND keeps whole lines apart on a local filesystem); a short write (a full disk, a
  // signal) is completed rather than left without its newline, which would glue the next process's line to it.
  for (size_t off = 0; off < line.size();) {
    const ssize_t rv = ::write(fd_, line.data() + off, line.size() - off);
    if (rv < 0 && errno == EINTR) continue;
    if (rv <= 0) break;  // best effort: events are diagnostics, not state
    off += static_cast<size_t>(rv);
  }
}

}  // namespace keel
