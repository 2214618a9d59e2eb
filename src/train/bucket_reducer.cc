// bucket_reducer.cc: the communication thread behind BucketReducer.
#include "train/bucket_reducer.h"

#include <chrono>

namespace keel {

BucketReducer::BucketReducer(std::shared_ptr<Communicator> comm) : st_(std::make_shared<State>()) {
  st_->comm = std::move(comm);
  thread_ = std::thread([st = st_] { Loop(st); });
}

BucketReducer::~BucketReducer() {
  bool detach;
  {
    std::lock_guard<std::mutex> l(st_->mu);
    st_->stop = true;
    // An operation still blocked in the communicator: let it end on its own (it holds the shared state).
    detach = st_->abandoned && st_->pending > 0;
  }
  st_->cv.notify_all();
  if (detach) thread_.detach();
  else thread_.join();
}

void BucketReducer::Push(Job j) {
  {
    std::lock_guard<std::mutex> l(st_->mu);
    st_->queue.push_back(std::move(j));
    ++st_->pending;
    const Job& b = st_->queue.back();
    st_->bytes += b.n * (b.i64 ? sizeof(int64_t) : sizeof(float));
  }
  st_->cv.notify_all();
}

Status BucketReducer::Wait(const std::function<bool()>& give_up) {
  std::unique_lock<std::mutex> l(st_->mu);
  for (;;) {
    if (st_->pending == 0) break;
    if (give_up) {
      st_->cv.wait_for(l, std::chrono::milliseconds(10), [this] { return st_->pending == 0; });
      if (st_->pending > 0 && give_up()) {
        st_->abandoned = true;
        st_->pending -= st_->queue.size();
        st_->queue.clear();  // queued work is skipped; the running operation is left to its timeout
        st_->error = Status::Ok();
        return Aborted("gave up on a collective that did not return after the group was aborted");
      }
    } else {
      st_->cv.wait(l, [this] { return st_->pending == 0; });
    }
  }
  Status s = st_->error;
  st_->error = Status::Ok();
  return s;
}

void BucketReducer::KeepAlive(std::shared_ptr<void> p) {
  std::lock_guard<std::mutex> l(st_->mu);
  st_->keep.push_back(std::move(p));
}

uint64_t BucketReducer::bytes_submitted() const {
  std::lock_guard<std::mutex> l(st_->mu);
  return st_->bytes;
}

bool BucketReducer::abandoned() const {
  std::lock_guard<std::mutex> l(st_->mu);
  return st_->abandoned;
}

void BucketReducer::Loop(std::shared_ptr<State> st) {
  std::unique_lock<std::mutex> l(st->mu);
  for (;;) {
    st->cv.wait(l, [&] { return st->stop || !st->queue.empty(); });
    if (st->queue.empty()) return;  // stop_ and nothing left
    Job j = std::move(st->queue.front());
    st->queue.pop_front();
    bool skip = !st->error.ok() || st->abandoned;
    l.unlock();
    Status s;
    if (!skip) {
      Communicator* c = st->comm.get();
      if (j.op) s = j.op(c);
      else s = j.i64 ? c->AllreduceSum(j.i64, j.n) : c->AllreduceSum(j.f32, j.n);
    }
    l.lock();
    if (!s.ok() && st->error.ok() && !st->abandoned) st->error = s;
    if (st->pending > 0) --st->pending;
    st->cv.notify_all();
    if (st->abandoned && st->pending == 0) return;
  }
}

}  // namespace keel
