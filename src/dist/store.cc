// store.cc: the file, Redis and prefix stores, URL parsing and bounded waits.
#include "dist/store.h"

#include <dirent.h>
#include <fcntl.h>
#include <hiredis.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "core/env.h"
#include "dist/sigpipe.h"

namespace keel {
namespace {

std::string Errno(int e) { return std::strerror(e); }

// ---------------------------------------------------------------------------------------------------------
// File store: one file per key in a directory. Writes go to a temporary file first, then rename (Set) or link
// (SetIfAbsent: link(2) fails with EEXIST atomically, also on NFS), so readers never see half a value.

constexpr char kKeyFilePrefix[] = "k.";  // only files with this prefix are keys (Clear removes only those)

std::string EncodeKey(const std::string& key) {
  static const char* hex = "0123456789abcdef";
  std::string out = kKeyFilePrefix;
  for (unsigned char c : key) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

class FileStore final : public Store {
 public:
  explicit FileStore(std::string dir) : dir_(std::move(dir)) {}

  Status Set(const std::string& key, std::string_view value) override {
    KEEL_ASSIGN_OR_RETURN(std::string tmp, WriteTemp(value));
    const std::string path = Path(key);
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      int e = errno;
      ::unlink(tmp.c_str());
      return IoError("rendezvous store " + path + ": rename: " + Errno(e));
    }
    return Status::Ok();
  }

  Result<bool> SetIfAbsent(const std::string& key, std::string_view value) override {
    KEEL_ASSIGN_OR_RETURN(std::string tmp, WriteTemp(value));
    const std::string path = Path(key);
    int rv = ::link(tmp.c_str(), path.c_str());
    int e = errno;
    // NFS: a lost reply to link() is retried by the client and answered EEXIST although this call made the link.
    // The temporary's link count tells (the open(2) man page's recipe): 2 means the key is this call's.
    struct stat st;
    const bool ours = rv != 0 && e == EEXIST && ::stat(tmp.c_str(), &st) == 0 && st.st_nlink == 2;
    ::unlink(tmp.c_str());
    if (rv == 0 || ours) return true;
    if (e == EEXIST) return false;
    return IoError("rendezvous store " + path + ": link: " + Errno(e));
  }

  Result<std::optional<std::string>> TryGet(const std::string& key) override {
    const std::string path = Path(key);
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      if (errno == ENOENT) return std::optional<std::string>();
      // ESTALE: another machine replaced the file (NFS) while this one held its old handle; EIO, ETIMEDOUT: a
      // soft mount's server did not answer. Unavailable, as a Redis server that does not answer: callers poll
      // again (WaitGet) or redo their pass (membership) rather than take a live peer's record for absent.
      if (errno == ESTALE || errno == EIO || errno == ETIMEDOUT)
        return Unavailable("rendezvous store " + path + ": open: " + Errno(errno));
      return IoError("rendezvous store " + path + ": open: " + Errno(errno));
    }
    std::string out;
    char buf[4096];
    for (;;) {
      ssize_t n = ::read(fd, buf, sizeof(buf));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        int e = errno;
        ::close(fd);
        if (e == ESTALE || e == EIO || e == ETIMEDOUT)
          return Unavailable("rendezvous store " + path + ": read: " + Errno(e));
        return IoError("rendezvous store " + path + ": read: " + Errno(e));
      }
      if (n == 0) break;
      out.append(buf, static_cast<size_t>(n));
    }
    ::close(fd);
    return std::optional<std::string>(std::move(out));
  }

  Result<int64_t> Increment(const std::string& key) override {
    // Claims key#1, key#2, ... in turn; the first claim this caller wins is its value. Counters here are small
    // (node counts), so the linear scan is cheap, and it needs nothing but atomic link(2).
    for (int64_t n = 1; n < 1000000; ++n) {
      KEEL_ASSIGN_OR_RETURN(bool won, SetIfAbsent(key + "#" + std::to_string(n), ""));
      if (won) return n;
    }
    return Internal("rendezvous store counter " + key + " overflowed");
  }

  Result<int64_t> Counter(const std::string& key) override {
    int64_t n = 0;
    for (;;) {
      struct stat st;
      const std::string path = Path(key + "#" + std::to_string(n + 1));
      if (::stat(path.c_str(), &st) != 0) {
        if (errno == ENOENT) break;
        // Not the end of the claims, only an unanswered stat (NFS): a count that stopped here would hide every
        // later claim (every later member) for this pass.
        return Unavailable("rendezvous store " + path + ": stat: " + Errno(errno));
      }
      ++n;
    }
    return n;
  }

  Status Clear() override {
    DIR* d = ::opendir(dir_.c_str());
    if (!d) return Status::Ok();
    std::vector<std::string> names;
    while (dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n.rfind(kKeyFilePrefix, 0) == 0 || n.rfind(".tmp.", 0) == 0) names.push_back(n);
    }
    ::closedir(d);
    for (const auto& n : names) ::unlink((dir_ + "/" + n).c_str());
    ::rmdir(dir_.c_str());  // only succeeds when nothing else lives there
    return Status::Ok();
  }

  std::string Describe() const override { return "file://" + dir_; }

 private:
  std::string Path(const std::string& key) const { return dir_ + "/" + EncodeKey(key); }

  Result<std::string> WriteTemp(std::string_view value) {
    static std::atomic<uint64_t> counter{0};
    thread_local std::mt19937_64 rng{std::random_device{}()};
    std::string tmp = dir_ + "/.tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++) + "." +
                      std::to_string(rng() & 0xffffff);
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return IoError("rendezvous store " + dir_ + ": cannot create a file: " + Errno(errno));
    size_t off = 0;
    while (off < value.size()) {
      ssize_t n = ::write(fd, value.data() + off, value.size() - off);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        int e = errno;
        ::close(fd);
        ::unlink(tmp.c_str());
        return IoError("rendezvous store " + dir_ + ": write: " + Errno(e));
      }
      off += static_cast<size_t>(n);
    }
    ::close(fd);
    return tmp;
  }

  std::string dir_;
};

// ---------------------------------------------------------------------------------------------------------
// Redis store over hiredis: connect and every command bounded by a timeout, AUTH when the URL has a password,
// keys under "keel/<job>/" so that many jobs can share one server. A connection that failed is re-opened by
// the next call (once); the failing call reports the error.

struct ReplyDeleter {
  void operator()(redisReply* r) const {
    if (r) freeReplyObject(r);
  }
};
using Reply = std::unique_ptr<redisReply, ReplyDeleter>;

class RedisStore final : public Store {
 public:
  RedisStore(StoreUrl url, double timeout_s) : url_(std::move(url)), timeout_s_(timeout_s) {
    prefix_ = "keel/" + url_.job + "/";
  }
  ~RedisStore() override {
    if (ctx_) redisFree(ctx_);
  }

  // Connects, authenticates and checks the server answers. Errors are one line naming the server.
  Status Connect() {
    std::lock_guard<std::mutex> lock(mu_);
    return ConnectLocked();
  }

  Status Set(const std::string& key, std::string_view value) override {
    KEEL_ASSIGN_OR_RETURN(Reply r, Command({"SET", prefix_ + key, std::string(value)}));
    return Status::Ok();
  }

  Result<bool> SetIfAbsent(const std::string& key, std::string_view value) override {
    KEEL_ASSIGN_OR_RETURN(Reply r, Command({"SETNX", prefix_ + key, std::string(value)}));
    if (r->type != REDIS_REPLY_INTEGER) return Unavailable(Where() + ": unexpected reply to SETNX");
    return r->integer == 1;
  }

  Result<std::optional<std::string>> TryGet(const std::string& key) override {
    KEEL_ASSIGN_OR_RETURN(Reply r, Command({"GET", prefix_ + key}));
    if (r->type == REDIS_REPLY_NIL) return std::optional<std::string>();
    if (r->type != REDIS_REPLY_STRING) return Unavailable(Where() + ": unexpected reply to GET");
    return std::optional<std::string>(std::string(r->str, r->len));
  }

  Result<int64_t> Increment(const std::string& key) override {
    KEEL_ASSIGN_OR_RETURN(Reply r, Command({"INCR", prefix_ + key}));
    if (r->type != REDIS_REPLY_INTEGER) return Unavailable(Where() + ": unexpected reply to INCR");
    return static_cast<int64_t>(r->integer);
  }

  Result<int64_t> Counter(const std::string& key) override {
    KEEL_ASSIGN_OR_RETURN(auto v, TryGet(key));
    if (!v) return int64_t{0};
    return static_cast<int64_t>(std::strtoll(v->c_str(), nullptr, 10));
  }

  Status Clear() override {
    // The job id is restricted to [A-Za-z0-9._-] (ParseStoreUrl), so the prefix has no glob characters.
    std::string cursor = "0";
    for (int guard = 0; guard < 100000; ++guard) {
      KEEL_ASSIGN_OR_RETURN(Reply r, Command({"SCAN", cursor, "MATCH", prefix_ + "*", "COUNT", "1000"}));
      if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) return Unavailable(Where() + ": unexpected reply to SCAN");
      cursor.assign(r->element[0]->str, r->element[0]->len);
      const redisReply* keys = r->element[1];
      if (keys->elements > 0) {
        std::vector<std::string> del = {"DEL"};
        for (size_t i = 0; i < keys->elements; ++i) del.emplace_back(keys->element[i]->str, keys->element[i]->len);
        KEEL_ASSIGN_OR_RETURN(Reply d, Command(del));
      }
      if (cursor == "0") break;
    }
    return Status::Ok();
  }

  std::string Describe() const override { return url_.Redacted(); }

 private:
  std::string Where() const { return "rendezvous " + url_.Redacted(); }

  Status ConnectLocked() {
    if (ctx_) return Status::Ok();
    timeval tv;
    tv.tv_sec = static_cast<time_t>(timeout_s_);
    tv.tv_usec = static_cast<suseconds_t>((timeout_s_ - static_cast<double>(tv.tv_sec)) * 1e6);
    redisContext* c = redisConnectWithTimeout(url_.host.c_str(), url_.port, tv);
    if (!c) return Unavailable("cannot reach " + Where() + ": out of memory");
    if (c->err) {
      std::string e = c->errstr;
      redisFree(c);
      return Unavailable("cannot reach " + Where() + ": " + e);
    }
    redisSetTimeout(c, tv);
    ctx_ = c;
    if (!url_.password.empty()) {
      auto r = RawCommand({"AUTH", url_.password});
      if (!r.ok()) return Drop(r.status());
      if ((*r)->type == REDIS_REPLY_ERROR) {
        std::string e((*r)->str, (*r)->len);
        return Drop(InvalidArgument(Where() + ": authentication failed (" + e + ")"));
      }
    }
    auto r = RawCommand({"PING"});
    if (!r.ok()) return Drop(r.status());
    if ((*r)->type == REDIS_REPLY_ERROR) {
      std::string e((*r)->str, (*r)->len);
      if (e.rfind("NOAUTH", 0) == 0)
        return Drop(InvalidArgument(Where() + ": the server requires a password (redis://:PASSWORD@HOST:PORT/JOB)"));
      return Drop(Unavailable(Where() + ": " + e));
    }
    return Status::Ok();
  }

  Status Drop(Status s) {
    if (ctx_) redisFree(ctx_);
    ctx_ = nullptr;
    return s;
  }

  // One command on the current connection; a transport error drops the connection.
  Result<Reply> RawCommand(const std::vector<std::string>& args) {
    std::vector<const char*> argv;
    std::vector<size_t> lens;
    for (const auto& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    void* p = redisCommandArgv(ctx_, static_cast<int>(argv.size()), argv.data(), lens.data());
    last_timed_out_ = false;
    if (!p) {
      std::string e = ctx_->errstr[0] ? ctx_->errstr : "connection lost";
      if (ctx_->err == REDIS_ERR_IO && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        e = "no reply within " + std::to_string(static_cast<int>(timeout_s_ + 0.5)) + "s";
        last_timed_out_ = true;
      }
      (void)Drop(Status::Ok());
      return Unavailable(Where() + ": " + args[0] + ": " + e);
    }
    return Reply(static_cast<redisReply*>(p));
  }

  Result<Reply> Command(const std::vector<std::string>& args) {
    std::lock_guard<std::mutex> lock(mu_);
    const bool reused = ctx_ != nullptr;
    KEEL_RETURN_IF_ERROR(ConnectLocked());
    Result<Reply> sent = RawCommand(args);
    // A connection that broke while idle (the server's idle timeout, a restart, a NAT or load balancer cutting
    // it) fails the first command sent on it although the server is fine: an idempotent command goes once more
    // on a new connection. Not SETNX or INCR (the lost reply may be of one that was carried out), and not after
    // a timeout (a slow server would only be asked twice).
    const bool idempotent = args[0] == "GET" || args[0] == "SET" || args[0] == "SCAN" || args[0] == "DEL";
    if (!sent.ok() && reused && idempotent && !last_timed_out_) {
      KEEL_RETURN_IF_ERROR(ConnectLocked());
      sent = RawCommand(args);
    }
    KEEL_ASSIGN_OR_RETURN(Reply r, std::move(sent));
    if (r->type == REDIS_REPLY_ERROR) {
      std::string e(r->str, r->len);
      if (e.rfind("NOAUTH", 0) == 0)
        return InvalidArgument(Where() + ": the server requires a password (redis://:PASSWORD@HOST:PORT/JOB)");
      return Unavailable(Where() + ": " + args[0] + ": " + e);
    }
    return Result<Reply>(std::move(r));
  }

  StoreUrl url_;
  double timeout_s_;
  std::string prefix_;
  std::mutex mu_;
  redisContext* ctx_ = nullptr;
  bool last_timed_out_ = false;  // the last RawCommand failed for want of a reply in time (guarded by mu_)
};

// ---------------------------------------------------------------------------------------------------------

class PrefixStore final : public Store {
 public:
  PrefixStore(std::shared_ptr<Store> base, std::string prefix) : base_(std::move(base)), prefix_(prefix + "/") {}
  Status Set(const std::string& key, std::string_view value) override { return base_->Set(prefix_ + key, value); }
  Result<bool> SetIfAbsent(const std::string& key, std::string_view value) override {
    return base_->SetIfAbsent(prefix_ + key, value);
  }
  Result<std::optional<std::string>> TryGet(const std::string& key) override { return base_->TryGet(prefix_ + key); }
  Result<int64_t> Increment(const std::string& key) override { return base_->Increment(prefix_ + key); }
  Result<int64_t> Counter(const std::string& key) override { return base_->Counter(prefix_ + key); }
  Status Clear() override { return Status::Ok(); }  // the base owns the keys; clearing it clears these
  std::string Describe() const override { return base_->Describe() + " (" + prefix_ + ")"; }

 private:
  std::shared_ptr<Store> base_;
  std::string prefix_;
};

bool ValidJobId(const std::string& s) {
  if (s.empty() || s.size() > 200) return false;
  for (unsigned char c : s)
    if (!(std::isalnum(c) || c == '-' || c == '_' || c == '.')) return false;
  return true;
}

}  // namespace

std::shared_ptr<Store> MakePrefixStore(std::shared_ptr<Store> base, const std::string& prefix) {
  return std::make_shared<PrefixStore>(std::move(base), prefix);
}

std::string StoreUrl::Redacted() const {
  if (kind == kFile) return "file://" + path;
  const std::string h = host.find(':') != std::string::npos ? "[" + host + "]" : host;  // IPv6
  return "redis://" + std::string(password.empty() ? "" : ":***@") + h + ":" + std::to_string(port) + "/" + job;
}

Result<StoreUrl> ParseStoreUrl(const std::string& url) {
  StoreUrl u;
  // Error messages never show a password: everything up to the userinfo's '@' is replaced. (A job id and a host
  // hold no '@', so the last one ends the userinfo; the password itself may hold '/'.)
  std::string shown = url;
  if (url.rfind("redis://", 0) == 0 && url.rfind('@') != std::string::npos)
    shown = "redis://:***@" + url.substr(url.rfind('@') + 1);
  const std::string usage = "--rdzv " + shown + ": expected file://PATH or redis://[:PASSWORD@]HOST[:PORT]/JOB_ID";
  if (url.rfind("file:", 0) == 0) {
    u.kind = StoreUrl::kFile;
    std::string rest = url.substr(5);
    if (rest.rfind("//", 0) == 0) rest = rest.substr(2);  // file:///abs -> /abs ; file://rel -> rel
    if (rest.empty()) return InvalidArgument(usage);
    while (rest.size() > 1 && rest.back() == '/') rest.pop_back();
    u.path = rest;
    u.job = BaseName(rest);
    return u;
  }
  if (url.rfind("redis://", 0) != 0) return InvalidArgument(usage);
  u.kind = StoreUrl::kRedis;
  std::string rest = url.substr(8);
  const size_t last_at = rest.rfind('@');
  size_t slash = rest.find('/', last_at == std::string::npos ? 0 : last_at + 1);
  if (slash == std::string::npos) return InvalidArgument(usage + " (the JOB_ID is missing)");
  std::string authority = rest.substr(0, slash);
  u.job = rest.substr(slash + 1);
  if (!ValidJobId(u.job))
    return InvalidArgument("--rdzv: job id '" + u.job + "' must be 1-200 characters of A-Z a-z 0-9 . _ -");
  size_t at = authority.rfind('@');
  if (at != std::string::npos) {
    std::string userinfo = authority.substr(0, at);
    authority = authority.substr(at + 1);
    size_t colon = userinfo.find(':');
    // redis://:PASSWORD@ (Redis 5 style) or redis://default:PASSWORD@ (ACL user "default" only).
    u.password = colon == std::string::npos ? userinfo : userinfo.substr(colon + 1);
    if (colon != std::string::npos && colon > 0 && userinfo.substr(0, colon) != "default")
      return InvalidArgument("--rdzv: only the default Redis user is supported (redis://:PASSWORD@HOST:PORT/JOB)");
  }
  std::string host = authority, port;
  if (!authority.empty() && authority[0] == '[') {  // [v6addr]:port
    size_t close = authority.find(']');
    if (close == std::string::npos) return InvalidArgument(usage);
    host = authority.substr(1, close - 1);
    if (close + 1 < authority.size()) {
      if (authority[close + 1] != ':') return InvalidArgument(usage);
      port = authority.substr(close + 2);
      if (port.empty()) return InvalidArgument("--rdzv: bad port ''");
    }
  } else {
    size_t colon = authority.rfind(':');
    if (colon != std::string::npos) {
      if (authority.find(':') != colon) return InvalidArgument(usage + " (an IPv6 address goes in brackets: [::1]:6379)");
      host = authority.substr(0, colon);
      port = authority.substr(colon + 1);
      if (port.empty()) return InvalidArgument("--rdzv: bad port ''");
    }
  }
  if (host.empty()) return InvalidArgument(usage + " (the HOST is missing)");
  u.host = host;
  if (!port.empty()) {
    char* end = nullptr;
    long p = std::strtol(port.c_str(), &end, 10);
    if (port.find_first_not_of("0123456789") != std::string::npos || *end != 0 || p <= 0 || p > 65535)
      return InvalidArgument("--rdzv: bad port '" + port + "'");
    u.port = static_cast<int>(p);
  }
  return u;
}

Result<std::shared_ptr<Store>> OpenFileStore(const std::string& dir) {
  KEEL_RETURN_IF_ERROR(DefaultEnv()->CreateDirs(dir));
  if (!DefaultEnv()->IsDir(dir)) return IoError("rendezvous store " + dir + ": not a directory");
  return std::shared_ptr<Store>(std::make_shared<FileStore>(dir));
}

Result<std::shared_ptr<Store>> OpenStore(const StoreUrl& url, double connect_timeout_s) {
  if (url.kind == StoreUrl::kFile) return OpenFileStore(url.path);
  IgnoreSigpipe();  // a Redis server that went away must be an error, not a SIGPIPE (sigpipe.h)
  auto s = std::make_shared<RedisStore>(url, connect_timeout_s > 0 ? connect_timeout_s : 5);
  KEEL_RETURN_IF_ERROR(s->Connect());
  return std::shared_ptr<Store>(std::move(s));
}

Result<std::string> WaitGet(Store& store, const std::string& key, double timeout_s, const std::string& what,
                            const std::atomic<bool>* abort, double poll_s) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  double sleep_s = poll_s;
  Status unavailable;
  for (;;) {
    // An unreachable store (a restart, a network blip) is polled again until the deadline, as an absent key is.
    Result<std::optional<std::string>> v = store.TryGet(key);
    if (!v.ok() && v.status().code() != Code::kUnavailable) return v.status();
    if (v.ok() && *v) return std::move(**v);
    unavailable = v.ok() ? Status::Ok() : v.status();
    if (abort && abort->load()) return Aborted("aborted while waiting for " + what);
    if (Clock::now() >= deadline) {
      if (!unavailable.ok()) return unavailable;
      char buf[32];
      std::snprintf(buf, sizeof(buf), "%gs", timeout_s);
      return Timeout("timed out after " + std::string(buf) + " waiting for " + what + " (" + store.Describe() + ")");
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(sleep_s));
    sleep_s = std::min(sleep_s * 1.5, 0.1);
  }
}

}  // namespace keel
