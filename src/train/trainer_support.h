// trainer_support.h: helpers of the training loop (train/trainer.cc) that need none of its state — the
// asynchronous checkpoint writer, log formatting, metrics-file trimming, the gradient-readiness group ranges —
// kept apart so that trainer.cc holds the step protocol itself. Internal to the trainer.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "model/gpt_config.h"
#include "train/checkpoint_io.h"

namespace keel::trainer_support {

using Clock = std::chrono::steady_clock;

inline double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Encodes and writes checkpoints on a background thread, so training continues while they are encoded and
// written. The view may borrow the live training buffers: the training thread calls WaitEncoded() before it
// next modifies them (the optimizer step, a state transfer), which normally finds the encoding long finished
// (it overlaps the next step's forward/backward, which only read the parameters). At most one write is in
// flight; Wait() joins it.
class AsyncCheckpointer {
 public:
  // warn: where a failed cleanup after a committed checkpoint (pruning, stale temporaries) is reported, from the
  // thread that calls Wait(); the checkpoint is valid, so it is not an error.
  AsyncCheckpointer(std::string run_dir, int keep, std::function<void(const std::string&)> warn = nullptr)
      : run_dir_(std::move(run_dir)), keep_(keep), warn_(std::move(warn)) {}
  ~AsyncCheckpointer() {  // no warning from here: warn_ may refer to an owner being destroyed
    if (thread_.joinable()) thread_.join();
  }
  // before_write (may be empty) runs on the writer thread with the encoded files first (fault injection).
  // may_publish (may be empty) is asked on the writer thread just before the checkpoint goes to disk: a reason
  // (non-empty) not to write it after all skips the write (reported through warn), e.g. an elastic leader
  // evicted while a freeze held it in the middle of the write, whose group may have rolled back meanwhile.
  Status Start(SnapshotView view, int64_t step,
               std::function<void(const std::vector<CheckpointFile>&)> before_write = nullptr,
               std::function<std::string()> may_publish = nullptr) {
    KEEL_RETURN_IF_ERROR(Wait());
    {
      std::lock_guard<std::mutex> l(mu_);
      encoded_ = false;
    }
    thread_ = std::thread([this, view = std::move(view), step, before_write = std::move(before_write),
                           may_publish = std::move(may_publish)]() {
      auto files = EncodeSnapshot(view);
      {
        std::lock_guard<std::mutex> l(mu_);
        encoded_ = true;
      }
      cv_.notify_all();
      if (!files.ok()) {
        result_ = files.status();
        return;
      }
      if (before_write) before_write(*files);
      // Asked before the write and again before publishing (a freeze during the file writes, the long part).
      if (may_publish) {
        if (std::string why = may_publish(); !why.empty()) {
          cleanup_error_ = "the checkpoint of step " + std::to_string(step) + " is not written: " + why;
          skipped_ = true;
          return;
        }
      }
      Status w = WriteCheckpoint(run_dir_, step, *files, keep_, &cleanup_error_, may_publish);
      if (w.code() == Code::kAborted && may_publish) {
        cleanup_error_ = "the checkpoint of step " + std::to_string(step) + " is not written: " + w.message();
        skipped_ = true;
        return;
      }
      result_ = w;
    });
    return Status::Ok();
  }
  // The borrowed buffers are free again (returns at once when no encoding is in progress).
  void WaitEncoded() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [this] { return encoded_; });
  }
  Status Wait() {
    if (thread_.joinable()) thread_.join();
    Status s = result_;
    result_ = Status::Ok();
    last_skipped_ = std::exchange(skipped_, false);
    if (!cleanup_error_.empty() && warn_) warn_("warning: " + cleanup_error_);
    cleanup_error_.clear();
    return s;
  }
  // After Wait(): the last write was skipped (may_publish gave a reason): nothing was written, although Wait()
  // returned Ok.
  bool last_write_skipped() const { return last_skipped_; }

 private:
  std::string run_dir_;
  int keep_;
  std::function<void(const std::string&)> warn_;
  std::string cleanup_error_;  // written by the writer thread, read after join
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool encoded_ = true;
  Status result_;
  bool skipped_ = false;       // written by the writer thread, read after join
  bool last_skipped_ = false;
};

// The [offset, count) range of the flat parameter buffer that gradient-readiness group g covers.
std::pair<size_t, size_t> GroupRange(const std::vector<ParamTensor>& tensors, int group);
void DefaultLog(const std::string& line);
std::string Fmt(const char* fmt, double a);  // snprintf of one number
std::string FormatDuration(double s);       // "1h02m", "3m05s"
std::string UidList(const std::vector<int64_t>& v);  // "[1,2,3]"
// Keeps only the metrics lines of steps before `step` (a resumed run rewrites what came after its checkpoint).
void TruncateMetrics(const std::string& path, int64_t step);
size_t CountNonFinite(const float* g, size_t n);
// A checkpoint left half-written, as a crash during WriteCheckpoint leaves it (fault injection): published, the
// renamed ckpt-N/ without its COMMITTED marker; otherwise this process's temp directory in mid-write.
void WriteTruncatedCheckpoint(const std::string& run_dir, int64_t step, const std::vector<CheckpointFile>& files,
                              bool published);

}  // namespace keel::trainer_support
