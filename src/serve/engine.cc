// engine.cc: the continuous-batching scheduler (see engine.h).
#include "serve/engine.h"

#include <algorithm>
#include <string_view>

#include "core/check.h"
#include "data/tokenizer.h"
#include "model/gpt.h"

namespace keel {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    default: return "";
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Generation

Generation::Update Generation::Wait(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait_for(l, timeout, [&] { return finished_ || !text_.empty() || !tokens_.empty(); });
  Update u;
  u.text.swap(text_);
  u.tokens.swap(tokens_);
  u.finished = finished_;
  u.reason = reason_;
  u.error = error_;
  u.prompt_tokens = prompt_tokens_;
  u.completion_tokens = completion_tokens_;
  return u;
}

void Generation::Cancel() { cancel_ = true; }

void Generation::Publish(const std::string& text, const std::vector<int32_t>& tokens, int completion_tokens) {
  {
    std::lock_guard<std::mutex> l(mu_);
    text_ += text;
    tokens_.insert(tokens_.end(), tokens.begin(), tokens.end());
    completion_tokens_ = completion_tokens;
  }
  cv_.notify_all();
}

void Generation::Finish(FinishReason reason, Status error, int completion_tokens) {
  {
    std::lock_guard<std::mutex> l(mu_);
    finished_ = true;
    reason_ = reason;
    error_ = std::move(error);
    completion_tokens_ = completion_tokens;
  }
  cv_.notify_all();
}

// ---------------------------------------------------------------------------------------------------------------
// Engine

namespace {

// Bytes at the end of s (after `from`) that begin an incomplete UTF-8 sequence, to hold back until it completes.
size_t IncompleteUtf8Tail(std::string_view s, size_t from) {
  const size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n - from; ++back) {
    const auto c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    size_t need = c >= 0xF0 && c <= 0xF4 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 && c <= 0xDF ? 2 : 1;
    if (c >= 0xF5) need = 1;
    return need > back ? back : 0;
  }
  return 0;
}

// Length of the longest suffix of s (after `from`) that is a proper prefix of stop.
size_t StopPrefixTail(const std::string& s, size_t from, const std::string& stop) {
  size_t avail = s.size() - from;
  for (size_t k = std::min(stop.size() - 1, avail); k > 0; --k)
    if (s.compare(s.size() - k, k, stop, 0, k) == 0) return k;
  return 0;
}

}  // namespace

Engine::Engine(GptModel* model, const Tokenizer* tok, const EngineOptions& o, ServeMetrics* metrics)
    : model_(model), tok_(tok), opts_(o), metrics_(metrics) {}

Result<std::unique_ptr<Engine>> Engine::Create(GptModel* model, const Tokenizer* tokenizer, const EngineOptions& o,
                                               ServeMetrics* metrics) {
  const GptConfig& c = model->config();
  if (o.parallel < 1 || o.parallel > 4096) return InvalidArgument("--parallel must be in [1, 4096]");
  if (o.queue < 0 || o.queue > (1 << 20)) return InvalidArgument("--queue must be in [0, 1048576]");
  if (o.prefill_chunk < 1 || o.prefill_chunk > 65536) return InvalidArgument("the prefill chunk must be in [1, 65536]");
  const int ctx = o.ctx == 0 ? c.ctx : o.ctx;
  if (ctx < 2 || ctx > c.ctx)
    return InvalidArgument("--ctx " + std::to_string(o.ctx) + " must be in [2, " + std::to_string(c.ctx) +
                           "] (the model's context)");
  if (tokenizer->vocab_size() > c.vocab) return InvalidArgument("the tokenizer's vocabulary exceeds the model's");
  std::unique_ptr<Engine> e(new Engine(model, tokenizer, o, metrics));
  e->ctx_ = ctx;
  e->vocab_ = std::min(c.vocab, tokenizer->vocab_size());
  KEEL_ASSIGN_OR_RETURN(e->state_, DecodeState::Create(model, o.parallel, ctx, o.parallel + o.prefill_chunk,
                                                          o.weight_dtype, /*repack=*/true, o.half_kv));
  e->slots_.resize(static_cast<size_t>(o.parallel));
  if (metrics) metrics->SetSlots(o.parallel);
  e->thread_ = std::thread([p = e.get()] { p->Loop(); });
  return e;
}

Engine::~Engine() { Shutdown(std::chrono::steady_clock::now()); }

int Engine::queued() const {
  std::lock_guard<std::mutex> l(mu_);
  return static_cast<int>(queue_.size());
}

std::shared_ptr<Generation> Engine::Submit(GenerationRequest request, SubmitStatus* status, std::string* error) {
  auto fail = [&](SubmitStatus s, std::string msg) -> std::shared_ptr<Generation> {
    *status = s;
    if (error) *error = std::move(msg);
    return nullptr;
  };
  const int n = static_cast<int>(request.prompt.size());
  if (n < 1) return fail(SubmitStatus::kInvalid, "the prompt must hold at least one token");
  if (n >= ctx_)
    return fail(SubmitStatus::kInvalid, "the prompt is " + std::to_string(n) + " tokens; the context holds " +
                                            std::to_string(ctx_) + " (prompt and completion together)");
  for (int32_t t : request.prompt)
    if (t < 0 || t >= model_->config().vocab) return fail(SubmitStatus::kInvalid, "prompt token out of range");
  if (request.max_tokens < 0) return fail(SubmitStatus::kInvalid, "max_tokens must be >= 0");
  if (Status v = ValidateSampling(request.sampling); !v.ok()) return fail(SubmitStatus::kInvalid, v.message());
  // An empty stop string would match at once (and StopPrefixTail assumes at least one byte).
  for (const auto& st : request.stop)
    if (st.empty()) return fail(SubmitStatus::kInvalid, "stop strings must not be empty");
  auto gen = std::make_shared<Generation>();
  gen->prompt_tokens_ = n;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!failed_.ok()) {
      if (metrics_) metrics_->CountRejected("device_failed");
      return fail(SubmitStatus::kFailed, "the model's device failed: " + failed_.message());
    }
    if (!accepting_) {
      if (metrics_) metrics_->CountRejected("shutting_down");
      return fail(SubmitStatus::kShuttingDown, "the server is shutting down");
    }
    // Requests beyond the free slots wait in the queue; `queue` bounds how many may wait.
    const int free_slots = opts_.parallel - active_.load() - placing_;
    if (static_cast<int>(queue_.size()) >= opts_.queue + std::max(0, free_slots)) {
      if (metrics_) metrics_->CountRejected("queue_full");
      return fail(SubmitStatus::kQueueFull, "the server is busy: " + std::to_string(queue_.size()) +
                                                " requests are waiting (--queue " + std::to_string(opts_.queue) +
                                                "); retry later");
    }
    queue_.push_back(Pending{gen, std::move(request), std::chrono::steady_clock::now()});
    ++busy_;
    if (metrics_) metrics_->SetQueueDepth(static_cast<int>(queue_.size()));
  }
  cv_.notify_all();
  *status = SubmitStatus::kOk;
  return gen;
}

Status Engine::health() const {
  std::lock_guard<std::mutex> l(mu_);
  return failed_;
}

void Engine::BeginShutdown() {
  std::lock_guard<std::mutex> l(mu_);
  accepting_ = false;
}

void Engine::Shutdown(std::chrono::steady_clock::time_point deadline) {
  std::call_once(shutdown_once_, [&] {
    std::unique_lock<std::mutex> l(mu_);
    accepting_ = false;
    idle_cv_.wait_until(l, deadline, [&] { return busy_ == 0; });
    if (busy_ > 0) {
      // Past the deadline: the scheduler cancels whatever is still queued or running before its next step.
      for (auto& p : queue_) p.gen->Cancel();
      shutdown_cancel_ = true;
    }
    stop_ = true;
    l.unlock();
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  });
}

namespace {

size_t CommonPrefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  const size_t n = std::min(a.size(), b.size());
  size_t i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}

}  // namespace

int Engine::PlaceInSlot(const std::vector<int32_t>& prompt, int* reused) {
  *reused = 0;
  // At least the prompt's last token is fed: its logits give the first generated token.
  const size_t cap = prompt.size() - 1;
  int dst = -1;
  size_t dst_len = 0;
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].gen) continue;
    if (!opts_.prompt_cache) {
      dst = static_cast<int>(i);
      break;
    }
    // The longest shared prefix; among equals the least recently used slot (one never used first).
    const size_t len = std::min(cap, CommonPrefix(slots_[i].kv, prompt));
    if (dst < 0 || len > dst_len ||
        (len == dst_len && slots_[i].released < slots_[static_cast<size_t>(dst)].released)) {
      dst = static_cast<int>(i);
      dst_len = len;
    }
  }
  if (dst < 0) return -1;
  Slot& d = slots_[static_cast<size_t>(dst)];
  if (!opts_.prompt_cache) {
    d.kv.clear();
    return dst;
  }
  // A longer prefix in another slot (busy or free: the positions below its kv's end are written and stay so
  // until that slot is reused) is copied over.
  int src = dst;
  size_t src_len = dst_len;
  for (size_t i = 0; i < slots_.size(); ++i) {
    const size_t len = std::min(cap, CommonPrefix(slots_[i].kv, prompt));
    if (len > src_len) {
      src = static_cast<int>(i);
      src_len = len;
    }
  }
  if (src != dst) state_->CopyPositions(src, dst, static_cast<int>(src_len));
  d.kv.assign(prompt.begin(), prompt.begin() + static_cast<std::ptrdiff_t>(src_len));
  *reused = static_cast<int>(src_len);
  return dst;
}

void Engine::Admit(Slot& s, Pending p, int reused) {
  s.gen = std::move(p.gen);
  s.req = std::move(p.req);
  s.rng = Rng(s.req.sampling.seed);
  s.fed = reused;
  s.next = 0;
  s.generated = 0;
  s.text.clear();
  s.published = 0;
  s.new_tokens.clear();
  s.max_stop = 0;
  for (const auto& st : s.req.stop) s.max_stop = std::max(s.max_stop, st.size());
  s.submitted = p.submitted;
  s.order = next_order_++;
  if (metrics_) {
    metrics_->AddPromptTokens(static_cast<int64_t>(s.req.prompt.size()));
    metrics_->AddCachedPromptTokens(reused);
  }
  // From placing to active in one step under the lock: Submit() counts free slots as parallel - active - placing,
  // and a request counted in both for a moment (during a later request's long prefix copy) answered 429 wrongly.
  std::lock_guard<std::mutex> l(mu_);
  active_ += 1;
  --placing_;
}

void Engine::FinishSlot(Slot& s, FinishReason reason, Status error) {
  if (reason != FinishReason::kCancelled) {
    // Flush everything (a trailing partial UTF-8 sequence included).
    s.gen->Publish(s.text.substr(s.published), s.new_tokens, s.generated);
    s.published = s.text.size();
    s.new_tokens.clear();
  } else if (metrics_) {
    // A client's cancel or the shutdown deadline is a cancellation; the model's or the device's failure is not.
    if (error.code() == Code::kInternal || error.code() == Code::kAborted) metrics_->CountFailed();
    else metrics_->CountCancelled();
  }
  s.gen->Finish(reason, std::move(error), s.generated);
  s.gen.reset();
  s.released = next_order_++;
  active_ -= 1;
  std::lock_guard<std::mutex> l(mu_);
  if (--busy_ == 0) idle_cv_.notify_all();
}

void Engine::PublishSafe(Slot& s) {
  size_t hold = 0;
  for (const auto& st : s.req.stop) hold = std::max(hold, StopPrefixTail(s.text, s.published, st));
  size_t end = s.text.size() - hold;
  end -= IncompleteUtf8Tail(std::string_view(s.text).substr(0, end), s.published);  // no copy: runs per token
  if (end > s.published || !s.new_tokens.empty()) {
    s.gen->Publish(s.text.substr(s.published, end - s.published), s.new_tokens, s.generated);
    s.published = std::max(s.published, end);
    s.new_tokens.clear();
  }
}

bool Engine::OnToken(Slot& s, int32_t token) {
  if (s.generated == 0 && metrics_)
    metrics_->ObserveTimeToFirstToken(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - s.submitted).count());
  if (token == tok_->eos_id()) {
    FinishSlot(s, FinishReason::kStop);
    return true;
  }
  s.generated += 1;
  s.new_tokens.push_back(token);
  if (metrics_) metrics_->AddGeneratedTokens(1);
  const std::string piece = tok_->DecodePiece(token);
  s.text += piece;
  // A match must end inside the new piece; search from just before it. The earliest match wins.
  size_t cut = std::string::npos;
  for (const auto& st : s.req.stop) {
    size_t from = s.text.size() > piece.size() + st.size() ? s.text.size() - piece.size() - st.size() : 0;
    size_t at = s.text.find(st, from);
    if (at != std::string::npos) cut = std::min(cut, at);
  }
  if (cut != std::string::npos) {
    s.text.resize(std::max(cut, s.published));
    FinishSlot(s, FinishReason::kStop);
    return true;
  }
  // The token just sampled sits at position prompt + generated - 1; another one needs a free position after it.
  const int next_pos = static_cast<int>(s.req.prompt.size()) + s.generated;
  if (s.generated >= s.req.max_tokens || next_pos >= ctx_) {
    FinishSlot(s, FinishReason::kLength);
    return true;
  }
  PublishSafe(s);
  s.next = token;
  return false;
}

void Engine::Loop() {
  if (opts_.threads > 0) model_->backend()->SetThreads(opts_.threads);
  const int P = opts_.parallel;
  std::vector<int32_t> toks, poss, rows_slot, logit_rows, logit_slot;
  toks.reserve(static_cast<size_t>(state_->max_rows()));
  poss.reserve(toks.capacity());
  rows_slot.reserve(toks.capacity());
  std::vector<int> prefilling;
  auto window_start = std::chrono::steady_clock::now();
  int64_t window_tokens = 0;
  std::vector<Pending> admitting;
  for (;;) {
    std::vector<Pending> cancelled_pending;
    bool cancel_all = false;
    {
      std::unique_lock<std::mutex> l(mu_);
      // Requests cancelled while queued end without ever taking a slot.
      for (auto it = queue_.begin(); it != queue_.end();) {
        if (it->gen->cancel_requested()) {
          cancelled_pending.push_back(std::move(*it));
          it = queue_.erase(it);
        } else {
          ++it;
        }
      }
      // Queued requests take the free slots (placed below, outside the lock).
      size_t free_slots = 0;
      for (const auto& s : slots_) free_slots += s.gen ? 0 : 1;
      while (!queue_.empty() && admitting.size() < free_slots) {
        admitting.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      placing_ = static_cast<int>(admitting.size());  // Submit() counts them as taken slots until admitted
      if (metrics_) {
        metrics_->SetQueueDepth(static_cast<int>(queue_.size()));
        metrics_->SetActiveSlots(active_.load());
      }
      cancel_all = shutdown_cancel_;
      if (active_.load() == 0 && queue_.empty() && cancelled_pending.empty() && admitting.empty()) {
        if (stop_) break;
        // Idle: the throughput gauge decays to 0 after a second without work.
        if (!cv_.wait_for(l, std::chrono::seconds(1), [&] { return stop_ || !queue_.empty(); }) && metrics_)
          metrics_->SetTokensPerSecond(0);
        window_start = std::chrono::steady_clock::now();
        window_tokens = 0;
        continue;
      }
    }
    // Placing a request may copy a long cached prefix (2 x layers x positions x dim floats): outside the lock, so
    // Submit() and the HTTP threads do not wait for it. Only this thread touches the slots and the KV cache.
    for (auto& p : admitting) {
      int reused = 0;
      const int i = PlaceInSlot(p.req.prompt, &reused);
      KEEL_CHECK(i >= 0, "Engine: no free slot for a request taken from the queue");
      Admit(slots_[static_cast<size_t>(i)], std::move(p), reused);
    }
    admitting.clear();  // (Admit took each one off placing_)
    if (metrics_) metrics_->SetActiveSlots(active_.load());
    for (auto& p : cancelled_pending) {
      if (metrics_) metrics_->CountCancelled();
      p.gen->Finish(FinishReason::kCancelled,
                    cancel_all ? Unavailable("the server is shutting down") : Status::Ok(), 0);
      std::lock_guard<std::mutex> l(mu_);
      if (--busy_ == 0) idle_cv_.notify_all();
    }
    // Cancelled sequences free their slots before the step.
    bool freed = false;
    for (auto& s : slots_) {
      if (!s.gen) continue;
      if (cancel_all) s.gen->Cancel();
      if (s.gen->cancel_requested()) {
        FinishSlot(s, FinishReason::kCancelled,
                   cancel_all ? Unavailable("the server is shutting down") : Status::Ok());
        freed = true;
      } else if (s.req.max_tokens == 0) {
        FinishSlot(s, FinishReason::kLength);
        freed = true;
      }
    }
    if (freed && !cancel_all) {  // a queued request takes the freed slot now, not a step later
      std::lock_guard<std::mutex> l(mu_);
      if (!queue_.empty()) continue;
    }
    // One batch: decode rows first (one per sequence past its prompt), then prompt chunks, oldest first.
    toks.clear();
    poss.clear();
    rows_slot.clear();
    logit_rows.clear();
    logit_slot.clear();
    prefilling.clear();
    for (int i = 0; i < P; ++i) {
      Slot& s = slots_[static_cast<size_t>(i)];
      if (!s.gen) continue;
      const int n = static_cast<int>(s.req.prompt.size());
      if (s.fed < n) {
        prefilling.push_back(i);
        continue;
      }
      logit_rows.push_back(static_cast<int32_t>(toks.size()));
      logit_slot.push_back(i);
      toks.push_back(s.next);
      poss.push_back(n + s.generated - 1);
      rows_slot.push_back(i);
      s.kv.resize(static_cast<size_t>(n + s.generated - 1));
      s.kv.push_back(s.next);
    }
    std::sort(prefilling.begin(), prefilling.end(),
              [&](int a, int b) { return slots_[static_cast<size_t>(a)].order < slots_[static_cast<size_t>(b)].order; });
    int budget = opts_.prefill_chunk;
    for (int i : prefilling) {
      if (budget == 0) break;
      Slot& s = slots_[static_cast<size_t>(i)];
      const int n = static_cast<int>(s.req.prompt.size());
      const int take = std::min(budget, n - s.fed);
      s.kv.resize(static_cast<size_t>(s.fed));
      for (int k = 0; k < take; ++k) {
        toks.push_back(s.req.prompt[static_cast<size_t>(s.fed)]);
        poss.push_back(s.fed);
        rows_slot.push_back(i);
        s.kv.push_back(toks.back());
        ++s.fed;
      }
      budget -= take;
      if (s.fed == n) {
        logit_rows.push_back(static_cast<int32_t>(toks.size() - 1));
        logit_slot.push_back(i);
      }
    }
    if (toks.empty()) continue;
    const auto t_step = std::chrono::steady_clock::now();
    const std::vector<float>& logits =
        state_->StepRows(toks.data(), poss.data(), rows_slot.data(), static_cast<int>(toks.size()),
                         logit_rows.data(), static_cast<int>(logit_rows.size()));
    const auto t_sample = std::chrono::steady_clock::now();
    // Counted before the tokens go out, so that a client that has its last token sees this step in /metrics.
    if (metrics_)
      metrics_->AddEngineStep(static_cast<int>(toks.size()), std::chrono::duration<double>(t_sample - t_step).count());
    // A failed device gives garbage (a CUDA backend's downloads read NaN after its sticky error): nothing of this
    // step is used. Every generation ends with the device's error and the engine refuses new work for good.
    if (Status dev = opts_.device_check ? opts_.device_check() : model_->backend()->Sync(); !dev.ok()) {
      const Status err(Code::kAborted, "the model's device failed: " + dev.message());
      std::fprintf(stderr, "keel serve: %s; every request fails from now on\n", err.message().c_str());
      std::fflush(stderr);
      std::vector<Pending> queued;
      {
        std::lock_guard<std::mutex> l(mu_);
        failed_ = dev;
        for (auto& p : queue_) queued.push_back(std::move(p));
        queue_.clear();
        if (metrics_) metrics_->SetQueueDepth(0);
      }
      for (auto& s : slots_)
        if (s.gen) FinishSlot(s, FinishReason::kCancelled, err);
      for (auto& p : queued) {
        if (metrics_) metrics_->CountFailed();
        p.gen->Finish(FinishReason::kCancelled, err, 0);
        std::lock_guard<std::mutex> l(mu_);
        if (--busy_ == 0) idle_cv_.notify_all();
      }
      continue;
    }
    const size_t V = static_cast<size_t>(model_->config().vocab);
    for (size_t r = 0; r < logit_slot.size(); ++r) {
      Slot& s = slots_[static_cast<size_t>(logit_slot[r])];
      int32_t next = SampleToken(logits.data() + r * V, vocab_, s.req.sampling, s.rng);
      if (next < 0) {  // this sequence only: the others' rows are independent (batch-invariant kernels)
        FinishSlot(s, FinishReason::kCancelled,
                   Internal("the model produced no finite logit for this sequence (its weights are not usable)"));
        continue;
      }
      OnToken(s, next);
      ++window_tokens;
    }
    if (metrics_) {
      metrics_->AddSamplingSeconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - t_sample).count());
      metrics_->SetActiveSlots(active_.load());
      auto now = std::chrono::steady_clock::now();
      double dt = std::chrono::duration<double>(now - window_start).count();
      if (dt >= 1.0) {
        metrics_->SetTokensPerSecond(static_cast<double>(window_tokens) / dt);
        window_start = now;
        window_tokens = 0;
      }
    }
    if (opts_.step_delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(opts_.step_delay_ms));
  }
  if (metrics_) {
    metrics_->SetActiveSlots(0);
    metrics_->SetQueueDepth(0);
  }
}

}  // namespace keel
