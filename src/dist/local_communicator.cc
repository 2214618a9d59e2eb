// local_communicator.cc: the one-member Communicator used by single-process training.
#include <atomic>
#include <cstring>

#include "dist/communicator.h"

namespace keel {
namespace {

// Abort() is honoured as the contract says (communicator.h): every later operation fails at once, so an evicted
// one-member generation stops reducing instead of carrying on until the next check.
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  Status AllreduceSum(int64_t*, size_t) override { return Check(); }
  Status AllreduceSum(float*, size_t) override { return Check(); }
  Status AllreduceSum(double*, size_t) override { return Check(); }
  Status AllreduceMax(double*, size_t) override { return Check(); }
  Status Broadcast(void*, size_t, int) override { return Check(); }
  Status Allgather(const void* in, void* out, size_t bytes) override {
    KEEL_RETURN_IF_ERROR(Check());
    if (in != out) std::memcpy(out, in, bytes);
    return Status::Ok();
  }
  Status Barrier() override { return Check(); }
  void Abort() override { aborted_.store(true); }

 private:
  Status Check() const {
    return aborted_.load() ? Aborted("collective: the communicator was aborted") : Status::Ok();
  }
  std::atomic<bool> aborted_{false};
};

}  // namespace

std::unique_ptr<Communicator> MakeLocalCommunicator() { return std::make_unique<LocalCommunicator>(); }

}  // namespace keel
