// env.cc: the POSIX implementation of Env (files through open/write/fsync/rename, mmap, steady clock).
#include "core/env.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <random>

namespace keel {

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    if (data_ && size_) munmap(const_cast<void*>(data_), size_);
    data_ = o.data_;
    size_ = o.size_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

MappedFile::~MappedFile() {
  if (data_ && size_) munmap(const_cast<void*>(data_), size_);
}

namespace {

std::string Errno(const std::string& what, const std::string& path) {
  return path + ": " + what + ": " + std::strerror(errno);
}

// How many random names CreateUnique* tries before giving up (each collision is one in 62^6 by chance).
constexpr int kUniqueNameTries = 100;

// Six random characters from [0-9A-Za-z] for temporary names: a per-process random seed, a counter and the pid
// (so a forked child does not repeat its parent's names), mixed by splitmix64. Thread-safe.
std::string RandomSuffix() {
  static const uint64_t seed = [] {
    std::random_device rd;
    return (uint64_t{rd()} << 32) ^ rd() ^
           static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }();
  static std::atomic<uint64_t> counter{0};
  uint64_t x = seed + (counter.fetch_add(1) + 1) * 0x9E3779B97F4A7C15ull + (static_cast<uint64_t>(::getpid()) << 40);
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  static const char kChars[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
  std::string out(6, '0');
  for (char& c : out) {
    c = kChars[x % 62];
    x /= 62;
  }
  return out;
}

Status TooManyNames(const std::string& prefix) {
  return IoError(prefix + "XXXXXX: cannot create a unique temporary name (" + std::to_string(kUniqueNameTries) +
                 " tries)");
}

// Writes all of data to fd, fsyncs and closes it (always closed, also on failure).
Status WriteAllAndClose(int fd, const std::string& path, std::string_view data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      Status s = IoError(Errno("write failed", path));
      ::close(fd);
      return s;
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    Status s = IoError(Errno("fsync failed", path));
    ::close(fd);
    return s;
  }
  if (::close(fd) != 0) return IoError(Errno("close failed", path));
  return Status::Ok();
}

class PosixEnv final : public Env {
 public:
  Result<std::string> ReadFile(const std::string& path) override {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? NotFound(Errno("cannot open", path)) : IoError(Errno("cannot open", path));
    std::string out;
    char buf[1 << 16];
    for (;;) {
      ssize_t n = ::read(fd, buf, sizeof(buf));
      if (n < 0) {
        if (errno == EINTR) continue;
        Status s = IoError(Errno("read failed", path));
        ::close(fd);
        return s;
      }
      if (n == 0) break;
      out.append(buf, static_cast<size_t>(n));
    }
    ::close(fd);
    return out;
  }

  Status WriteFile(const std::string& path, std::string_view data) override {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return IoError(Errno("cannot create", path));
    return WriteAllAndClose(fd, path, data);
  }

  Result<std::string> CreateUniqueFile(const std::string& prefix, std::string_view data) override {
    for (int attempt = 0; attempt < kUniqueNameTries; ++attempt) {
      const std::string path = prefix + RandomSuffix();
      // O_EXCL: never opens an existing file, and (with O_CREAT) never follows a symlink at path.
      int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
      if (fd < 0) {
        if (errno == EEXIST) continue;
        return IoError(Errno("cannot create", path));
      }
      Status s = WriteAllAndClose(fd, path, data);
      if (!s.ok()) {
        ::unlink(path.c_str());  // ours: created above with O_EXCL
        return s;
      }
      return path;
    }
    return TooManyNames(prefix);
  }

  Result<std::string> CreateUniqueDir(const std::string& prefix) override {
    for (int attempt = 0; attempt < kUniqueNameTries; ++attempt) {
      const std::string path = prefix + RandomSuffix();
      if (::mkdir(path.c_str(), 0777) == 0) return path;
      if (errno != EEXIST) return IoError(Errno("cannot create directory", path));
    }
    return TooManyNames(prefix);
  }

  Result<uint64_t> FileSize(const std::string& path) override {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0)
      return errno == ENOENT ? NotFound(Errno("cannot stat", path)) : IoError(Errno("cannot stat", path));
    return static_cast<uint64_t>(st.st_size);
  }

  Status Rename(const std::string& from, const std::string& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0) return IoError(Errno("cannot rename to " + to, from));
    return Status::Ok();
  }

  Status SyncDir(const std::string& dir) override {
    int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return IoError(Errno("cannot open directory", dir));
    int rc = ::fsync(fd);
    ::close(fd);
    if (rc != 0) return IoError(Errno("fsync failed", dir));
    return Status::Ok();
  }

  // Every directory this call creates is made durable in its parent (fsync of the parent), so that a file
  // committed under a new directory (a run's first checkpoint) does not vanish with the directory's own entry.
  // Best effort: a parent that cannot be opened or fsynced (write-only, a filesystem without directory fsync)
  // does not undo or fail the creation.
  Status CreateDirs(const std::string& path) override {
    std::filesystem::path p = std::filesystem::path(path).lexically_normal();
    if (!p.has_filename()) p = p.parent_path();  // "a/b/" -> "a/b"
    std::vector<std::filesystem::path> created;  // innermost first
    for (auto q = p; !q.empty() && !Exists(q.string()); q = q.parent_path()) {
      created.push_back(q);
      if (q == q.parent_path()) break;
    }
    std::error_code ec;
    std::filesystem::create_directories(path, ec);
    if (ec) return IoError(path + ": cannot create directory: " + ec.message());
    for (auto it = created.rbegin(); it != created.rend(); ++it) (void)SyncDir(it->parent_path().string());
    return Status::Ok();
  }

  Status RemoveAll(const std::string& path) override {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    if (ec) return IoError(path + ": cannot remove: " + ec.message());
    return Status::Ok();
  }

  bool Exists(const std::string& path) override {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
  }

  bool IsDir(const std::string& path) override {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
  }

  Result<std::vector<std::string>> ListDir(const std::string& dir) override {
    DIR* d = ::opendir(dir.c_str());
    if (!d) return errno == ENOENT ? NotFound(Errno("cannot list", dir)) : IoError(Errno("cannot list", dir));
    std::vector<std::string> names;
    while (dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n != "." && n != "..") names.push_back(n);
    }
    ::closedir(d);
    std::sort(names.begin(), names.end());
    return names;
  }

  Result<MappedFile> Map(const std::string& path) override {
    // O_NONBLOCK: a FIFO in a file's place (a data shard, a tokenizer) is refused below instead of blocking the
    // open until some writer turns up. It changes nothing for a regular file.
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return errno == ENOENT ? NotFound(Errno("cannot open", path)) : IoError(Errno("cannot open", path));
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      Status s = IoError(Errno("stat failed", path));
      ::close(fd);
      return s;
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      return IoError(path + ": not a regular file");
    }
    size_t size = static_cast<size_t>(st.st_size);
    if (size == 0) {
      ::close(fd);
      return MappedFile();
    }
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) return IoError(Errno("mmap failed", path));
    return MappedFile(p, size);
  }

  double NowSeconds() override {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
  }
};

PosixEnv* PosixSingleton() {
  static PosixEnv env;
  return &env;
}
Env* g_env = nullptr;

}  // namespace

Env* DefaultEnv() { return g_env ? g_env : PosixSingleton(); }
void SetDefaultEnv(Env* env) { g_env = env; }

Result<uint64_t> Env::FileSize(const std::string& path) {
  KEEL_ASSIGN_OR_RETURN(MappedFile m, Map(path));
  return static_cast<uint64_t>(m.size());
}

Result<std::string> Env::CreateUniqueFile(const std::string& prefix, std::string_view data) {
  for (int attempt = 0; attempt < kUniqueNameTries; ++attempt) {
    const std::string path = prefix + RandomSuffix();
    if (Exists(path)) continue;
    Status s = WriteFile(path, data);
    if (!s.ok()) {
      if (Exists(path)) (void)RemoveAll(path);  // the partial file this call created
      return s;
    }
    return path;
  }
  return TooManyNames(prefix);
}

Result<std::string> Env::CreateUniqueDir(const std::string& prefix) {
  for (int attempt = 0; attempt < kUniqueNameTries; ++attempt) {
    const std::string path = prefix + RandomSuffix();
    if (Exists(path)) continue;
    KEEL_RETURN_IF_ERROR(CreateDirs(path));
    return path;
  }
  return TooManyNames(prefix);
}

Status WriteFileAtomic(const std::string& path, std::string_view data) {
  Env* env = DefaultEnv();
  KEEL_ASSIGN_OR_RETURN(const std::string tmp, env->CreateUniqueFile(path + ".tmp.", data));
  if (Status s = env->Rename(tmp, path); !s.ok()) {
    (void)env->RemoveAll(tmp);  // the temporary created above, nothing else
    return s;
  }
  return env->SyncDir(DirName(path));
}

std::string JoinPath(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (a.back() == '/') return a + b;
  return a + "/" + b;
}

Status CheckCanCreateDir(Env* env, const std::string& path, const std::string& what) {
  if (env->Exists(path)) return Status::Ok();
  for (std::string p = DirName(path);; p = DirName(p)) {
    if (env->Exists(p)) {
      if (!env->IsDir(p)) return InvalidArgument(what + ": cannot be created: " + p + " is not a directory");
      return Status::Ok();
    }
    if (p == "/" || p == ".") return Status::Ok();
  }
}

std::string DirName(const std::string& path) {
  auto pos = path.find_last_of('/');
  if (pos == std::string::npos) return ".";
  if (pos == 0) return "/";
  return path.substr(0, pos);
}

std::string BaseName(const std::string& path) {
  auto pos = path.find_last_of('/');
  return pos == std::string::npos ? path : path.substr(pos + 1);
}

}  // namespace keel
