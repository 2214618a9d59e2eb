// metrics.cc: Prometheus text rendering of the serving metrics.
#include "serve/metrics.h"

#include <charconv>
#include <cstdio>

namespace keel {

namespace {

// The shortest text that reads back as v: bucket bounds print as written (le="0.1", not 0.10000000000000001),
// so queries that match on le find them.
std::string Num(double v) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

void Header(std::string* out, const char* name, const char* type, const char* help) {
  *out += "# HELP ";
  *out += name;
  *out += ' ';
  *out += help;
  *out += "\n# TYPE ";
  *out += name;
  *out += ' ';
  *out += type;
  *out += '\n';
}

// Label values are route names and reasons chosen by the server; escape anyway.
std::string Escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '\\' || c == '"') o += '\\';
    if (c == '\n') {
      o += "\\n";
      continue;
    }
    o += c;
  }
  return o;
}

std::vector<double> LatencyBuckets() {
  return {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double v) {
  std::lock_guard<std::mutex> l(mu_);
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  counts_[i] += 1;
  sum_ += v;
  count_ += 1;
}

uint64_t Histogram::count() const {
  std::lock_guard<std::mutex> l(mu_);
  return count_;
}

void Histogram::Render(const std::string& name, std::string* out) const {
  std::lock_guard<std::mutex> l(mu_);
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    *out += name + "_bucket{le=\"" + Num(bounds_[i]) + "\"} " + std::to_string(cum) + "\n";
  }
  cum += counts_.back();
  *out += name + "_bucket{le=\"+Inf\"} " + std::to_string(cum) + "\n";
  *out += name + "_sum " + Num(sum_) + "\n";
  *out += name + "_count " + std::to_string(count_) + "\n";
}

ServeMetrics::ServeMetrics() : ttft_(LatencyBuckets()), duration_(LatencyBuckets()) {}

void ServeMetrics::CountRequest(const std::string& endpoint, int status) {
  std::lock_guard<std::mutex> l(mu_);
  requests_[{endpoint, status}] += 1;
}

void ServeMetrics::CountRejected(const std::string& reason) {
  std::lock_guard<std::mutex> l(mu_);
  rejected_[reason] += 1;
}

void ServeMetrics::AddEngineStep(int rows, double forward_seconds) {
  engine_steps_ += 1;
  engine_rows_ += rows;
  forward_seconds_.fetch_add(forward_seconds);
}

void ServeMetrics::AddSamplingSeconds(double seconds) { sampling_seconds_.fetch_add(seconds); }

std::string ServeMetrics::Render() const {
  std::string out;
  Header(&out, "keel_requests_total", "counter", "HTTP requests by endpoint and status code.");
  {
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& [k, v] : requests_)
      out += "keel_requests_total{endpoint=\"" + Escape(k.first) + "\",status=\"" + std::to_string(k.second) +
             "\"} " + std::to_string(v) + "\n";
  }
  Header(&out, "keel_prompt_tokens_total", "counter", "Prompt tokens admitted for generation.");
  out += "keel_prompt_tokens_total " + std::to_string(prompt_tokens_.load()) + "\n";
  Header(&out, "keel_prompt_tokens_cached_total", "counter",
         "Prompt tokens whose keys and values were reused from the prompt cache instead of computed.");
  out += "keel_prompt_tokens_cached_total " + std::to_string(cached_prompt_tokens_.load()) + "\n";
  Header(&out, "keel_generation_tokens_total", "counter", "Tokens generated.");
  out += "keel_generation_tokens_total " + std::to_string(generated_tokens_.load()) + "\n";
  Header(&out, "keel_requests_cancelled_total", "counter",
         "Generations cancelled (client disconnect or shutdown deadline).");
  out += "keel_requests_cancelled_total " + std::to_string(cancelled_.load()) + "\n";
  Header(&out, "keel_requests_failed_total", "counter",
         "Generations ended by a failure of the model (no finite logit) or of its device.");
  out += "keel_requests_failed_total " + std::to_string(failed_.load()) + "\n";
  Header(&out, "keel_requests_rejected_total", "counter", "Generations refused (queue full, shutting down, device failed).");
  {
    std::lock_guard<std::mutex> l(mu_);
    for (const char* reason : {"queue_full", "shutting_down", "device_failed"}) {
      auto it = rejected_.find(reason);
      out += std::string("keel_requests_rejected_total{reason=\"") + reason + "\"} " +
             std::to_string(it == rejected_.end() ? 0 : it->second) + "\n";
    }
  }
  Header(&out, "keel_generation_tokens_per_second", "gauge", "Tokens generated per second (last ~1 s window).");
  out += "keel_generation_tokens_per_second " + Num(tokens_per_s_.load()) + "\n";
  Header(&out, "keel_queue_depth", "gauge", "Requests waiting for a slot.");
  out += "keel_queue_depth " + std::to_string(queue_depth_.load()) + "\n";
  Header(&out, "keel_active_slots", "gauge", "Sequences being generated.");
  out += "keel_active_slots " + std::to_string(active_slots_.load()) + "\n";
  Header(&out, "keel_slots", "gauge", "Decoding slots (--parallel).");
  out += "keel_slots " + std::to_string(slots_.load()) + "\n";
  Header(&out, "keel_engine_steps_total", "counter", "Batched forward steps of the engine.");
  out += "keel_engine_steps_total " + std::to_string(engine_steps_.load()) + "\n";
  Header(&out, "keel_engine_step_rows_total", "counter", "Rows carried by the steps (decode rows + prompt rows).");
  out += "keel_engine_step_rows_total " + std::to_string(engine_rows_.load()) + "\n";
  Header(&out, "keel_engine_forward_seconds_total", "counter", "Seconds spent in the steps' forward passes.");
  out += "keel_engine_forward_seconds_total " + Num(forward_seconds_.load()) + "\n";
  Header(&out, "keel_engine_sampling_seconds_total", "counter", "Seconds spent sampling the steps' logits and handing the tokens to their requests.");
  out += "keel_engine_sampling_seconds_total " + Num(sampling_seconds_.load()) + "\n";
  Header(&out, "keel_time_to_first_token_seconds", "histogram",
         "Seconds from the submission of a request (queue wait included) to its first generated token.");
  ttft_.Render("keel_time_to_first_token_seconds", &out);
  Header(&out, "keel_request_duration_seconds", "histogram",
         "Seconds from the arrival of a completion request to its last byte.");
  duration_.Render("keel_request_duration_seconds", &out);
  return out;
}

}  // namespace keel
