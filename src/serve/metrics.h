// metrics.h: the counters, gauges and histograms `keel serve` exposes at GET /metrics in the Prometheus text
// exposition format (version 0.0.4). Metric names (all prefixed keel_):
//   requests_total{endpoint,status}         counter  HTTP requests by route ("other" for unknown paths) and status
//   prompt_tokens_total                      counter  prompt tokens admitted for generation
//   prompt_tokens_cached_total               counter  of those, tokens whose keys and values came from the prompt
//                                                     cache (an earlier sequence's KV slot) instead of a forward pass
//   generation_tokens_total                  counter  tokens generated
//   requests_cancelled_total                 counter  generations cancelled (client disconnect, shutdown deadline)
//   requests_failed_total                    counter  generations ended by a failure of the model (no finite
//                                                     logit) or of its device (Engine::health())
//   requests_rejected_total{reason}          counter  generations refused: queue_full, shutting_down, device_failed
//   generation_tokens_per_second             gauge    tokens generated per second over the last ~1 s window
//   queue_depth                              gauge    requests waiting for a slot
//   active_slots / slots                     gauge    sequences being generated / the slot count (--parallel)
//   time_to_first_token_seconds              histogram  from submission (queue wait included) to the first generated token
//   request_duration_seconds                 histogram  completion requests, from arrival until the response is
//                                                     complete (streams: the last event written; others: the body
//                                                     handed to the HTTP layer, before it is sent)
//   engine_steps_total                       counter  batched forward steps of the engine
//   engine_step_rows_total                   counter  rows those steps carried (decode rows + prompt chunk rows)
//   engine_forward_seconds_total             counter  time in the steps' forward passes
//   engine_sampling_seconds_total            counter  time sampling the steps' logits and handing the tokens to
//                                                     their requests (detokenising, stop strings, streaming)
// The engine_* counters profile batching: rows / steps is the mean batch, forward seconds / steps the mean step.
// Thread safety: every method may be called from any thread.
#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace keel {

class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void Observe(double v);
  // Appends the _bucket/_sum/_count lines of metric `name`.
  void Render(const std::string& name, std::string* out) const;
  uint64_t count() const;

 private:
  mutable std::mutex mu_;
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket (not cumulative), plus +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

class ServeMetrics {
 public:
  ServeMetrics();
  void CountRequest(const std::string& endpoint, int status);
  void AddPromptTokens(int64_t n) { prompt_tokens_ += n; }
  void AddCachedPromptTokens(int64_t n) { cached_prompt_tokens_ += n; }
  void AddGeneratedTokens(int64_t n) { generated_tokens_ += n; }
  void CountCancelled() { cancelled_ += 1; }
  void CountFailed() { failed_ += 1; }
  void CountRejected(const std::string& reason);
  void SetTokensPerSecond(double v) { tokens_per_s_ = v; }
  void SetQueueDepth(int n) { queue_depth_ = n; }
  void SetActiveSlots(int n) { active_slots_ = n; }
  void SetSlots(int n) { slots_ = n; }
  void ObserveTimeToFirstToken(double seconds) { ttft_.Observe(seconds); }
  void ObserveRequestDuration(double seconds) { duration_.Observe(seconds); }
  void AddEngineStep(int rows, double forward_seconds);  // right after the step, before its tokens go out
  void AddSamplingSeconds(double seconds);

  int64_t generated_tokens() const { return generated_tokens_; }
  int64_t cached_prompt_tokens() const { return cached_prompt_tokens_; }
  int64_t cancelled() const { return cancelled_; }
  int64_t failed() const { return failed_; }
  int active_slots() const { return active_slots_; }
  int queue_depth() const { return queue_depth_; }

  std::string Render() const;

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  std::map<std::string, uint64_t> rejected_;
  std::atomic<int64_t> prompt_tokens_{0}, cached_prompt_tokens_{0}, generated_tokens_{0}, cancelled_{0},
      failed_{0};
  std::atomic<int64_t> engine_steps_{0}, engine_rows_{0};
  std::atomic<double> forward_seconds_{0}, sampling_seconds_{0};
  std::atomic<double> tokens_per_s_{0};
  std::atomic<int> queue_depth_{0}, active_slots_{0}, slots_{0};
  Histogram ttft_, duration_;
};

}  // namespace keel
