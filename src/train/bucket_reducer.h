// bucket_reducer.h: the training loop's communication thread. It overlaps gradient communication with backward
// (the trainer submits each gradient bucket — a contiguous range of the flat gradient buffer, one layer, see
// ParamTensor::group — as soon as backward has finalised it, and the thread allreduces buckets in submission
// order while backward continues), and it runs every other collective of the loop (Run), so that the training
// thread only ever waits on a condition variable — a wait it can give up.
//
// Contract: Submit/Run are called from the training thread only; Wait() blocks until every queued operation is
// done and returns the first error (after an error the remaining ones are skipped — the communicator is dead
// anyway). Wait(give_up) also returns (kAborted) once give_up() holds while operations are still in flight: the
// elastic trainer gives up on a generation its watchdog declared dead when Communicator::Abort() did not wake a
// blocked collective. An operation left in flight keeps the communicator (shared ownership) and whatever
// KeepAlive() was given until it ends on its own (its timeout); the destructor then detaches the thread instead
// of joining it. While operations are in flight the training thread must not issue collectives itself.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "dist/communicator.h"

namespace keel {

class BucketReducer {
 public:
  explicit BucketReducer(std::shared_ptr<Communicator> comm);
  ~BucketReducer();
  BucketReducer(const BucketReducer&) = delete;
  BucketReducer& operator=(const BucketReducer&) = delete;

  void SubmitInt64(int64_t* data, size_t n) { Push({data, nullptr, n, nullptr}); }
  void SubmitFloat(float* data, size_t n) { Push({nullptr, data, n, nullptr}); }
  // Queues any collective on the communicator (run on the communication thread, in order).
  void Submit(std::function<Status(Communicator*)> op) { Push({nullptr, nullptr, 0, std::move(op)}); }
  // Submit + Wait.
  Status Run(std::function<Status(Communicator*)> op, const std::function<bool()>& give_up = nullptr) {
    Submit(std::move(op));
    return Wait(give_up);
  }
  Status Wait(const std::function<bool()>& give_up = nullptr);
  // Keeps p alive as long as an operation that may still write into it is in flight (see the contract).
  void KeepAlive(std::shared_ptr<void> p);
  // Bytes handed to allreduce since construction (the payload, not counting the algorithm's own traffic).
  uint64_t bytes_submitted() const;
  // True once a Wait gave up with operations in flight.
  bool abandoned() const;

 private:
  struct Job {
    int64_t* i64;
    float* f32;
    size_t n;
    std::function<Status(Communicator*)> op;
  };
  struct State {
    std::shared_ptr<Communicator> comm;
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Job> queue;
    size_t pending = 0;
    bool stop = false;
    bool abandoned = false;
    Status error;
    uint64_t bytes = 0;
    std::vector<std::shared_ptr<void>> keep;
  };
  void Push(Job j);
  static void Loop(std::shared_ptr<State> st);

  std::shared_ptr<State> st_;
  std::thread thread_;
};

}  // namespace keel
