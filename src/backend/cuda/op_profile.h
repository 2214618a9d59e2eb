// op_profile.h: per-op device time of the CUDA backend (KEEL_CUDA_PROFILE=1), the profile a GPU session reads to
// see where a training step's time goes without an external profiler (the lent GPU machines have ncu but no nsys).
//
// Each op of CudaBackend opens a Scope: a CUDA event is recorded on the backend's stream before and after the op's
// launches, so a scope measures the op's device time (including any gap the host leaves between its launches).
// GEMMs get scopes of their own in a second table (their share of each op). Event pairs are read back when the
// backend synchronises anyway (Sync, Download) or once 4096 are pending, so profiling adds no synchronisation of
// its own in a training step. Report() formats both tables, largest first. Profiling errors are ignored (they
// never become the backend's error). Not thread-safe: one backend, one thread, like the backend itself.
#pragma once
#include <cuda_runtime_api.h>

#include <map>
#include <string>
#include <vector>

namespace keel::cuda {

class OpProfiler {
 public:
  explicit OpProfiler(cudaStream_t stream) : stream_(stream) {}
  ~OpProfiler();
  OpProfiler(const OpProfiler&) = delete;
  OpProfiler& operator=(const OpProfiler&) = delete;

  // table 0: ops; table 1: GEMMs (counted inside their op too).
  class Scope {
   public:
    Scope(OpProfiler* p, const char* name, int table);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    OpProfiler* p_;
    const char* name_;
    int table_;
    cudaEvent_t start_ = nullptr;
  };

  // Reads back the pending event pairs (synchronises the stream first).
  void Flush();
  // The two tables as text (calls, total ms, ms per call, share); flushes first.
  std::string Report();

 private:
  struct Pending {
    const char* name;
    int table;
    cudaEvent_t start, stop;
  };
  struct Total {
    long long calls = 0;
    double ms = 0;
  };
  cudaEvent_t Take();
  void Finish(const char* name, int table, cudaEvent_t start);

  cudaStream_t stream_;
  std::vector<cudaEvent_t> free_;
  std::vector<Pending> pending_;
  std::map<std::string, Total> totals_[2];
};

}  // namespace keel::cuda
