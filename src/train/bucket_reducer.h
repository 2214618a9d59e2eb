// bucket_reducer.h: overlaps gradient communication with backward. The trainer submits each gradient bucket
// (a contiguous range of the flat gradient buffer — one layer, see ParamTensor::group) as soon as backward has
// finalised it; a communication thread allreduces buckets in submission order while backward continues.
//
// Contract: Submit() is called from the training thread only; Wait() blocks until every submitted bucket is
// reduced and returns the first error (after an error the remaining buckets are skipped — the communicator is
// dead anyway). While buckets are in flight the training thread must not issue other collectives on the same
// communicator. The destructor waits.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>

#include "dist/communicator.h"

namespace keel {

class BucketReducer {
 public:
  explicit BucketReducer(Communicator* comm);
  ~BucketReducer();
  BucketReducer(const BucketReducer&) = delete;
  BucketReducer& operator=(const BucketReducer&) = delete;

  void SubmitInt64(int64_t* data, size_t n) { Push({data, nullptr, n}); }
  void SubmitFloat(float* data, size_t n) { Push({nullptr, data, n}); }
  Status Wait();
  // Bytes handed to allreduce since construction (the payload, not counting the algorithm's own traffic).
  uint64_t bytes_submitted() const { return bytes_; }

 private:
  struct Job {
    int64_t* i64;
    float* f32;
    size_t n;
  };
  void Push(Job j);
  void Loop();

  Communicator* comm_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  size_t pending_ = 0;
  bool stop_ = false;
  Status error_;
  uint64_t bytes_ = 0;
  std::thread thread_;
};

}  // namespace keel
