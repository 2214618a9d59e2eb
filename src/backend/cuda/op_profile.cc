// op_profile.cc: OpProfiler (op_profile.h) — CUDA events around the backend's ops, read back in batches.
#include "backend/cuda/op_profile.h"

#include <algorithm>
#include <cstdio>
#include <utility>

namespace keel::cuda {

OpProfiler::~OpProfiler() {
  cudaStreamSynchronize(stream_);
  for (auto& p : pending_) {
    cudaEventDestroy(p.start);
    cudaEventDestroy(p.stop);
  }
  for (cudaEvent_t e : free_) cudaEventDestroy(e);
  cudaGetLastError();
}

cudaEvent_t OpProfiler::Take() {
  if (!free_.empty()) {
    cudaEvent_t e = free_.back();
    free_.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  if (cudaEventCreate(&e) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return e;
}

OpProfiler::Scope::Scope(OpProfiler* p, const char* name, int table) : p_(p), name_(name), table_(table) {
  if (!p_) return;
  start_ = p_->Take();
  if (start_ && cudaEventRecord(start_, p_->stream_) != cudaSuccess) {
    cudaGetLastError();
    p_->free_.push_back(start_);
    start_ = nullptr;
  }
}

OpProfiler::Scope::~Scope() {
  if (p_ && start_) p_->Finish(name_, table_, start_);
}

void OpProfiler::Finish(const char* name, int table, cudaEvent_t start) {
  cudaEvent_t stop = Take();
  if (!stop || cudaEventRecord(stop, stream_) != cudaSuccess) {
    cudaGetLastError();
    free_.push_back(start);
    if (stop) free_.push_back(stop);
    return;
  }
  pending_.push_back({name, table, start, stop});
  if (pending_.size() >= 4096) Flush();
}

void OpProfiler::Flush() {
  if (pending_.empty()) return;
  cudaStreamSynchronize(stream_);
  for (auto& p : pending_) {
    float ms = 0;
    if (cudaEventElapsedTime(&ms, p.start, p.stop) == cudaSuccess) {
      Total& t = totals_[p.table][p.name];
      ++t.calls;
      t.ms += ms;
    }
    free_.push_back(p.start);
    free_.push_back(p.stop);
  }
  cudaGetLastError();
  pending_.clear();
}

std::string OpProfiler::Report() {
  Flush();
  std::string out;
  char line[256];
  for (int table = 0; table < 2; ++table) {
    std::vector<std::pair<std::string, Total>> rows(totals_[table].begin(), totals_[table].end());
    if (rows.empty()) continue;
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
    double all = 0;
    for (const auto& r : rows) all += r.second.ms;
    std::snprintf(line, sizeof(line), "%s (device time, %.1f ms in all)\n%-34s %9s %11s %11s %7s\n",
                  table == 0 ? "CUDA ops" : "of which cuBLAS GEMMs", all, "name", "calls", "total ms", "ms/call",
                  "share");
    out += line;
    for (const auto& [name, t] : rows) {
      std::snprintf(line, sizeof(line), "%-34s %9lld %11.2f %11.4f %6.1f%%\n", name.c_str(), t.calls, t.ms,
                    t.ms / static_cast<double>(t.calls), all > 0 ? 100.0 * t.ms / all : 0.0);
      out += line;
    }
  }
  return out;
}

}  // namespace keel::cuda
