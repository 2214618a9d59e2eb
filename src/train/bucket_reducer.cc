// bucket_reducer.cc: the communication thread behind BucketReducer.
#include "train/bucket_reducer.h"

namespace keel {

BucketReducer::BucketReducer(Communicator* comm) : comm_(comm), thread_([this] { Loop(); }) {}

BucketReducer::~BucketReducer() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void BucketReducer::Push(Job j) {
  {
    std::lock_guard<std::mutex> l(mu_);
    queue_.push_back(j);
    ++pending_;
    bytes_ += j.n * (j.i64 ? sizeof(int64_t) : sizeof(float));
  }
  cv_.notify_all();
}

Status BucketReducer::Wait() {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [this] { return pending_ == 0; });
  Status s = error_;
  error_ = Status::Ok();
  return s;
}

void BucketReducer::Loop() {
  std::unique_lock<std::mutex> l(mu_);
  for (;;) {
    cv_.wait(l, [this] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_ and nothing left
    Job j = queue_.front();
    queue_.pop_front();
    bool skip = !error_.ok();
    l.unlock();
    Status s;
    if (!skip) s = j.i64 ? comm_->AllreduceSum(j.i64, j.n) : comm_->AllreduceSum(j.f32, j.n);
    l.lock();
    if (!s.ok() && error_.ok()) error_ = s;
    --pending_;
    cv_.notify_all();
  }
}

}  // namespace keel
