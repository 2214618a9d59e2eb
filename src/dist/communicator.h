// communicator.h: collectives between the members of a training group (after Gloo's context/algorithm split).
//
// Contract: every operation either completes on all members or returns a non-ok Status on the members that
// observe the failure (a dead or stalled peer is a normal event: kUnavailable / kTimeout / kAborted), within the
// timeout the implementation was created with — nothing blocks forever. After a failure the communicator is
// unusable ("sticky" errors, as in Gloo); the membership layer builds a new one for the next generation.
// Abort() may be called from another thread (a heartbeat watchdog) to make an in-flight operation fail fast.
// Thread safety: one thread issues operations; Abort() is safe from any thread.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "core/status.h"

namespace keel {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual Status AllreduceSum(int64_t* data, size_t n) = 0;
  virtual Status AllreduceSum(float* data, size_t n) = 0;
  virtual Status AllreduceSum(double* data, size_t n) = 0;
  virtual Status AllreduceMax(double* data, size_t n) = 0;
  virtual Status Broadcast(void* data, size_t bytes, int root) = 0;
  // Gathers `bytes` from every member into out (size() * bytes, rank order).
  virtual Status Allgather(const void* in, void* out, size_t bytes) = 0;
  virtual Status Barrier() = 0;
  virtual void Abort() = 0;
};

// The single-member communicator: every collective is the identity.
std::unique_ptr<Communicator> MakeLocalCommunicator();

}  // namespace keel
