// local_communicator.cc: the one-member Communicator used by single-process training.
#include <cstring>

#include "dist/communicator.h"

namespace keel {
namespace {

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  Status AllreduceSum(int64_t*, size_t) override { return Status::Ok(); }
  Status AllreduceSum(float*, size_t) override { return Status::Ok(); }
  Status AllreduceSum(double*, size_t) override { return Status::Ok(); }
  Status AllreduceMax(double*, size_t) override { return Status::Ok(); }
  Status Broadcast(void*, size_t, int) override { return Status::Ok(); }
  Status Allgather(const void* in, void* out, size_t bytes) override {
    if (in != out) std::memcpy(out, in, bytes);
    return Status::Ok();
  }
  Status Barrier() override { return Status::Ok(); }
  void Abort() override {}
};

}  // namespace

std::unique_ptr<Communicator> MakeLocalCommunicator() { return std::make_unique<LocalCommunicator>(); }

}  // namespace keel
