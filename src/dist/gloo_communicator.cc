// gloo_communicator.cc: Communicator over gloo::rendezvous::Context with the TCP transport.
//
// Nothing here lets a Gloo exception escape: every call into Gloo is wrapped by Guard(), which turns
// gloo::IoException (peer closed, timeout), gloo::EnforceNotMet and anything else into a Status.
//
// Abort and its limits: Gloo 0.5 has no call that wakes an operation blocked on a peer (Context::closeConnections
// closes the sockets but leaves a waiting operation asleep until its timeout). So when the mesh is formed we find
// this member's sockets of the group by address — the accepted side's local address is our pair's listening
// address, the connecting side's peer address is the peer's listening address for us — and Abort() calls
// shutdown(2) on them. Gloo's event loop then sees end-of-file, fails the pair, and the waiting operation
// throws within milliseconds. Before each shutdown the socket's addresses are checked again, so a descriptor
// number that Gloo closed and the process reused for something else is left alone (a reuse by another
// connection between the same two addresses in that instant is the remaining, theoretical, race). If the
// sockets could not be found (e.g. /proc is not mounted), Abort() still marks the communicator dead, so the
// next call fails at once and an in-flight one fails at its timeout.
#include "dist/gloo_communicator.h"
#include "dist/sigpipe.h"

#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <mutex>
#include <vector>

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/common/logging.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/address.h>
#include <gloo/transport/tcp/device.h>

namespace keel {
namespace {

// Gloo's messages start with "[/path/file.cc:123] "; keep the part a user can act on.
std::string Clean(std::string m) {
  if (!m.empty() && m[0] == '[') {
    size_t close = m.find("] ");
    if (close != std::string::npos && close < 200) m = m.substr(close + 2);
  }
  while (!m.empty() && (m.back() == '\n' || m.back() == ' ')) m.pop_back();
  return m;
}

std::string Seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%gs", s);
  return buf;
}

// Gloo's store interface over a keel Store: waits are polled against our own deadline (the stock stores block
// on get() with a fixed 30 s default), failures are thrown as gloo::IoException for Gloo to propagate.
class GlooStoreAdapter final : public gloo::rendezvous::Store {
 public:
  GlooStoreAdapter(std::shared_ptr<keel::Store> store, double timeout_s, const std::atomic<bool>* abort)
      : store_(std::move(store)), timeout_s_(timeout_s), abort_(abort) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    Status s = store_->Set(key, std::string_view(data.data(), data.size()));
    if (!s.ok()) throw gloo::IoException(s.message());
  }
  std::vector<char> get(const std::string& key) override {
    auto v = WaitGet(*store_, key, timeout_s_, "group key '" + key + "' (a member has not joined)", abort_);
    if (!v.ok()) throw gloo::IoException(v.status().message());
    return std::vector<char>(v->begin(), v->end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, std::chrono::milliseconds(0)); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds&) override {
    for (const auto& k : keys) (void)get(k);
  }

 private:
  std::shared_ptr<keel::Store> store_;
  double timeout_s_;
  const std::atomic<bool>* abort_;
};

bool SameAddr(const sockaddr_storage& a, const sockaddr_storage& b) {
  if (a.ss_family != b.ss_family) return false;
  if (a.ss_family == AF_INET) {
    auto& x = reinterpret_cast<const sockaddr_in&>(a);
    auto& y = reinterpret_cast<const sockaddr_in&>(b);
    return x.sin_port == y.sin_port && std::memcmp(&x.sin_addr, &y.sin_addr, sizeof(x.sin_addr)) == 0;
  }
  if (a.ss_family == AF_INET6) {
    auto& x = reinterpret_cast<const sockaddr_in6&>(a);
    auto& y = reinterpret_cast<const sockaddr_in6&>(b);
    return x.sin6_port == y.sin6_port && std::memcmp(&x.sin6_addr, &y.sin6_addr, sizeof(x.sin6_addr)) == 0;
  }
  return false;
}

// Our sockets of the group: local address one of ours (accepted side) or peer address one of theirs
// (connecting side), and connected.
struct SocketMatcher {
  std::vector<sockaddr_storage> local, remote;
  bool Matches(int fd) const {
    sockaddr_storage self{}, peer{};
    socklen_t ls = sizeof(self), lp = sizeof(peer);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&self), &ls) != 0) return false;
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &lp) != 0) return false;
    for (const auto& a : local)
      if (SameAddr(a, self)) return true;
    for (const auto& a : remote)
      if (SameAddr(a, peer)) return true;
    return false;
  }
  std::vector<int> Scan() const {
    std::vector<int> fds;
    DIR* d = opendir("/proc/self/fd");
    if (!d) return fds;
    const int dir_fd = dirfd(d);
    while (dirent* e = readdir(d)) {
      char* end = nullptr;
      long fd = std::strtol(e->d_name, &end, 10);
      if (*end != 0 || end == e->d_name || fd == dir_fd) continue;
      struct stat st;
      if (fstat(static_cast<int>(fd), &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
      if (!Matches(static_cast<int>(fd))) continue;
      // A socket whose peer already closed it is not one of this mesh's (a leftover of an abandoned earlier
      // group between the same addresses): adopting it would make PeerSocketClosed fail every operation.
      pollfd p{static_cast<int>(fd), POLLRDHUP, 0};
      if (::poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR))) continue;
      fds.push_back(static_cast<int>(fd));
    }
    closedir(d);
    return fds;
  }
};

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(std::shared_ptr<gloo::rendezvous::Context> ctx, double timeout_s, SocketMatcher matcher,
                   std::vector<int> fds)
      : ctx_(std::move(ctx)),
        timeout_(std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000))),
        timeout_s_(timeout_s),
        matcher_(std::move(matcher)),
        fds_(std::move(fds)) {}

  ~GlooCommunicator() override {
    // Tear down under the guard too: Gloo's destructors should not throw, but nothing may escape here.
    try {
      ctx_.reset();
    } catch (...) {
    }
  }

  int rank() const override { return ctx_ ? ctx_->rank : 0; }
  int size() const override { return ctx_ ? ctx_->size : 1; }

  Status AllreduceSum(int64_t* data, size_t n) override { return Allreduce(data, n, false, "allreduce(int64)"); }
  Status AllreduceSum(float* data, size_t n) override { return Allreduce(data, n, false, "allreduce(float)"); }
  Status AllreduceSum(double* data, size_t n) override { return Allreduce(data, n, false, "allreduce(double)"); }
  Status AllreduceMax(double* data, size_t n) override { return Allreduce(data, n, true, "allreduce-max(double)"); }

  Status Broadcast(void* data, size_t bytes, int root) override {
    if (root < 0 || root >= size()) return InvalidArgument("broadcast: root " + std::to_string(root) + " out of range");
    return Guard("broadcast", [&] {
      if (bytes == 0) return;
      gloo::BroadcastOptions opts(ctx_);
      auto* p = static_cast<uint8_t*>(data);
      if (rank() == root) opts.setInput(p, bytes);
      opts.setOutput(p, bytes);
      opts.setRoot(root);
      opts.setTimeout(timeout_);
      gloo::broadcast(opts);
    });
  }

  Status Allgather(const void* in, void* out, size_t bytes) override {
    return Guard("allgather", [&] {
      if (bytes == 0) return;
      if (size() == 1) {
        if (in != out) std::memmove(out, in, bytes);
        return;
      }
      // Gloo's allgather reads its input from a registered buffer; copy so `in` may be const or alias `out`.
      std::vector<uint8_t> input(static_cast<const uint8_t*>(in), static_cast<const uint8_t*>(in) + bytes);
      gloo::AllgatherOptions opts(ctx_);
      opts.setInput(input.data(), bytes);
      opts.setOutput(static_cast<uint8_t*>(out), bytes * static_cast<size_t>(size()));
      opts.setTimeout(timeout_);
      gloo::allgather(opts);
    });
  }

  Status Barrier() override {
    return Guard("barrier", [&] {
      gloo::BarrierOptions opts(ctx_);
      opts.setTimeout(timeout_);
      gloo::barrier(opts);
    });
  }

  void Abort() override {
    if (aborted_.exchange(true)) return;
    for (int fd : fds_)
      if (matcher_.Matches(fd)) ::shutdown(fd, SHUT_RDWR);
  }

 private:
  template <typename T>
  Status Allreduce(T* data, size_t n, bool max, const char* what) {
    return Guard(what, [&] {
      if (n == 0) return;
      gloo::AllreduceOptions opts(ctx_);
      opts.setOutput(data, n);
      opts.setInput(data, n);
      opts.setReduceFunction(max ? static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::max<T>)
                                 : static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<T>));
      opts.setTimeout(timeout_);
      gloo::allreduce(opts);
    });
  }

  // True when one of the group's sockets shows that its peer is gone: the peer closed or shut down its end (its
  // process exited, or it aborted the group), or Gloo already tore the pair down (the descriptor is closed or now
  // names something else). A healthy group never closes a pair's socket, so this fires for a lost peer; the one
  // theoretical exception is a leftover socket of an abandoned earlier group between the same addresses that
  // Scan() adopted and whose peer closes it later (the group then fails an operation and re-forms).
  // Checked before every operation: a lost peer then fails the next collective at once. Otherwise Gloo notices
  // it inside the operation — normally within milliseconds, but a FIN that arrived while no operation was posted
  // could leave the next send waiting for the whole --comm-timeout (seen once in dist_gloo_test under load).
  bool PeerSocketClosed() const {
    for (int fd : fds_) {
      pollfd p{fd, POLLRDHUP, 0};
      if (::poll(&p, 1, 0) < 0) continue;
      if ((p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) || !matcher_.Matches(fd)) return true;
    }
    return false;
  }

  template <typename F>
  Status Guard(const char* what, F&& f) {
    if (aborted_.load()) return Aborted(std::string(what) + ": the communicator was aborted");
    if (!sticky_.ok()) return sticky_;
    if (!ctx_) return Internal(std::string(what) + ": no context");
    if (PeerSocketClosed()) {
      sticky_ = Unavailable(std::string(what) + " (rank " + std::to_string(rank()) + " of " + std::to_string(size()) +
                            "): lost a peer (its connection was closed before this operation)");
      return sticky_;
    }
    std::string err;
    bool timed_out = false;
    try {
      f();
      return Status::Ok();
    } catch (const gloo::IoException& e) {
      err = Clean(e.what());
      timed_out = err.find("Timed out") != std::string::npos || err.find("timed out") != std::string::npos;
    } catch (const gloo::EnforceNotMet& e) {
      err = Clean(e.what());
    } catch (const std::exception& e) {
      err = Clean(e.what());
    } catch (...) {
      err = "unknown error";
    }
    const std::string prefix = std::string(what) + " (rank " + std::to_string(rank()) + " of " +
                               std::to_string(size()) + ")";
    if (aborted_.load()) sticky_ = Aborted(prefix + ": aborted");
    else if (timed_out)
      sticky_ = Timeout(prefix + ": no progress within --comm-timeout " + Seconds(timeout_s_) +
                        " (a peer died or hung?): " + err);
    else sticky_ = Unavailable(prefix + ": lost a peer (it exited or its connection broke): " + err);
    return sticky_;
  }

  std::shared_ptr<gloo::rendezvous::Context> ctx_;
  std::chrono::milliseconds timeout_;
  double timeout_s_;
  SocketMatcher matcher_;
  std::vector<int> fds_;
  std::atomic<bool> aborted_{false};
  Status sticky_;
};

// Builds the TCP device; errors name the address.
Result<std::shared_ptr<gloo::transport::Device>> MakeDevice(const GlooOptions& o) {
  gloo::transport::tcp::attr attr;
  std::string what;
  if (!o.iface.empty()) {
    attr.iface = o.iface;
    what = "network interface " + o.iface;
  } else {
    attr.hostname = o.hostname;
    if (attr.hostname.empty()) {
      char host[256] = {0};
      if (gethostname(host, sizeof(host) - 1) == 0) attr.hostname = host;
    }
    what = attr.hostname;
  }
  try {
    return gloo::transport::tcp::CreateDevice(attr);
  } catch (const gloo::EnforceNotMet& e) {
    return Unavailable("cannot bind to " + what + " (--host/--iface): " + Clean(e.what()));
  } catch (const std::exception& e) {
    return Unavailable("cannot bind to " + what + " (--host/--iface): " + Clean(e.what()));
  } catch (...) {
    return Unavailable("cannot bind to " + what + " (--host/--iface)");
  }
}

}  // namespace

Result<std::unique_ptr<Communicator>> ConnectGlooCommunicator(std::shared_ptr<Store> store, int rank, int size,
                                                              const GlooOptions& options,
                                                              const std::atomic<bool>* abort) {
  if (size < 1 || rank < 0 || rank >= size)
    return InvalidArgument("rank " + std::to_string(rank) + " of " + std::to_string(size) + " is out of range");
  // Whole milliseconds, at least 1 (0 ms is Gloo's "no timeout"), and small enough for the int64 conversions.
  if (!(options.timeout_s >= 0.001 && options.timeout_s <= 1e9))
    return InvalidArgument("--comm-timeout must be in [0.001, 1e9] seconds");
  IgnoreSigpipe();  // a write to a dead peer must fail the collective, not kill this member (sigpipe.h)
  KEEL_ASSIGN_OR_RETURN(auto dev, MakeDevice(options));
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(options.timeout_s * 1000));
  std::shared_ptr<gloo::rendezvous::Context> ctx;
  SocketMatcher matcher;
  std::string where = "forming the group (rank " + std::to_string(rank) + " of " + std::to_string(size) + ", " +
                      store->Describe() + ")";
  try {
    ctx = std::make_shared<gloo::rendezvous::Context>(rank, size);
    // The context's timeout is the pairs' timeout, which Gloo multiplies by 5 for the initial connect and
    // otherwise uses only in sync mode (we run async and pass every operation its own timeout): a fifth
    // bounds the connect by --comm-timeout too.
    ctx->setTimeout(std::max(std::chrono::milliseconds(1), timeout / 5));
    GlooStoreAdapter adapter(store, options.timeout_s, abort);
    ctx->connectFullMesh(adapter, dev);
    // Addresses for Abort(): ours (one listening address per pair) and the peers' listening addresses for us.
    for (int i = 0; i < size; ++i) {
      if (i == rank) continue;
      auto& pair = ctx->getPair(i);
      const auto& self = dynamic_cast<const gloo::transport::tcp::Address&>(pair->address());
      matcher.local.push_back(self.getSockaddr());
      std::vector<char> all = adapter.get(std::to_string(i));
      const size_t n = all.size() / static_cast<size_t>(size - 1);
      const size_t idx = static_cast<size_t>(rank > i ? rank - 1 : rank);
      std::vector<char> mine(all.begin() + static_cast<std::ptrdiff_t>(idx * n),
                             all.begin() + static_cast<std::ptrdiff_t>((idx + 1) * n));
      matcher.remote.push_back(gloo::transport::tcp::Address(mine).getSockaddr());
    }
  } catch (const gloo::IoException& e) {
    std::string m = Clean(e.what());
    if (abort && abort->load()) return Aborted(where + ": aborted");
    // "Timed out ..." from a collective's wait, "Connect timeout ..." from a pair's connect (a peer stopped
    // while the group forms).
    bool timed_out = m.find("imed out") != std::string::npos || m.find("timeout") != std::string::npos;
    return timed_out ? Timeout(where + ": " + m) : Unavailable(where + ": " + m);
  } catch (const std::exception& e) {
    return Unavailable(where + ": " + Clean(e.what()));
  } catch (...) {
    return Unavailable(where + ": unknown error");
  }
  std::vector<int> fds = size > 1 ? matcher.Scan() : std::vector<int>();
  return std::unique_ptr<Communicator>(
      std::make_unique<GlooCommunicator>(std::move(ctx), options.timeout_s, std::move(matcher), std::move(fds)));
}

}  // namespace keel
