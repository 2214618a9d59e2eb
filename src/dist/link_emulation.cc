// link_emulation.cc: byte counting and slow-link emulation around a Communicator (see link_emulation.h).
#include "dist/link_emulation.h"

#include <algorithm>
#include <chrono>
#include <thread>

namespace keel {

int CeilLog2(int n) {
  int r = 0;
  while ((1 << r) < n) ++r;
  return r;
}

uint64_t AllreduceSentBytes(int n, uint64_t payload) {
  if (n <= 1) return 0;
  return 2 * static_cast<uint64_t>(n - 1) * payload / static_cast<uint64_t>(n);
}

uint64_t AllgatherSentBytes(int n, uint64_t block) { return n <= 1 ? 0 : static_cast<uint64_t>(n - 1) * block; }

uint64_t BroadcastSentBytes(int n, int rank, int root, uint64_t payload) {
  if (n <= 1) return 0;
  // Binomial tree on ranks relative to the root: member r sends to r + 2^k for every 2^k > r with r + 2^k < n.
  const int r = (rank - root + n) % n;
  uint64_t children = 0;
  for (int k = 1; k < 2 * n; k <<= 1)
    if (k > r && r + k < n) ++children;
  return children * payload;
}

double LinkDelaySeconds(const LinkLimit& link, uint64_t sent_bytes, int rounds) {
  double s = 0;
  if (link.mbit > 0) s += static_cast<double>(sent_bytes) * 8.0 / (link.mbit * 1e6);
  if (link.latency_ms > 0) s += rounds * link.latency_ms / 1e3;
  return s;
}

namespace {

class MeteredCommunicator final : public Communicator {
 public:
  MeteredCommunicator(std::shared_ptr<Communicator> inner, std::shared_ptr<WireStats> stats, LinkLimit link)
      : inner_(std::move(inner)), stats_(std::move(stats)), link_(link) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  Status AllreduceSum(int64_t* d, size_t n) override { return Reduce(inner_->AllreduceSum(d, n), n * 8); }
  Status AllreduceSum(float* d, size_t n) override { return Reduce(inner_->AllreduceSum(d, n), n * 4); }
  Status AllreduceSum(double* d, size_t n) override { return Reduce(inner_->AllreduceSum(d, n), n * 8); }
  Status AllreduceMax(double* d, size_t n) override { return Reduce(inner_->AllreduceMax(d, n), n * 8); }
  Status Broadcast(void* data, size_t bytes, int root) override {
    Status s = inner_->Broadcast(data, bytes, root);
    return After(s, BroadcastSentBytes(size(), rank(), root, bytes), CeilLog2(size()));
  }
  Status Allgather(const void* in, void* out, size_t bytes) override {
    Status s = inner_->Allgather(in, out, bytes);
    return After(s, AllgatherSentBytes(size(), bytes), size() - 1);
  }
  Status Barrier() override {
    Status s = inner_->Barrier();
    return After(s, 8ull * static_cast<uint64_t>(CeilLog2(size())), CeilLog2(size()));
  }
  void Abort() override {
    aborted_.store(true);
    inner_->Abort();
  }

 private:
  Status Reduce(Status s, uint64_t payload) { return After(s, AllreduceSentBytes(size(), payload), 2 * (size() - 1)); }
  Status After(Status s, uint64_t sent, int rounds) {
    // A failed collective is not counted: how much of it went out before the peer was lost is unknown. Nor is
    // an empty one, which the communicator returns without running (the barrier sends its 8 bytes).
    if (size() <= 1 || !s.ok() || sent == 0) return s;
    stats_->bytes_sent += sent;
    stats_->collectives += 1;
    if (!link_.active()) return s;
    const double delay = LinkDelaySeconds(link_, sent, rounds);
    const auto start = std::chrono::steady_clock::now();
    const auto until = start + std::chrono::duration<double>(delay);
    // Sliced, so Abort() ends it within ~5 ms.
    while (!aborted_.load() && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::min(std::chrono::duration<double>(0.005),
                                           std::chrono::duration<double>(until - std::chrono::steady_clock::now())));
    const double slept = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    stats_->emulated_us += static_cast<uint64_t>(std::min(delay, slept) * 1e6);
    if (aborted_.load()) return Aborted("collective: the communicator was aborted");
    return s;
  }

  std::shared_ptr<Communicator> inner_;
  std::shared_ptr<WireStats> stats_;
  LinkLimit link_;
  std::atomic<bool> aborted_{false};
};

}  // namespace

std::shared_ptr<Communicator> MakeMeteredCommunicator(std::shared_ptr<Communicator> inner,
                                                      std::shared_ptr<WireStats> stats, LinkLimit link) {
  return std::make_shared<MeteredCommunicator>(std::move(inner), std::move(stats), link);
}

}  // namespace keel
