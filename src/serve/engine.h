// engine.h: the continuous-batching generation engine behind `keel serve`.
//
// One scheduler thread owns the model and a DecodeState with `parallel` KV-cache slots. Each iteration it
//   1. drops cancelled requests, and moves queued requests (FIFO) into free slots;
//   2. builds one batch of rows: one row per decoding sequence (its last token) plus up to `prefill_chunk`
//      prompt tokens of sequences still reading their prompt (chunked prefill, oldest request first);
//   3. runs ONE batched forward step (DecodeState::StepRows) and samples the next token of every sequence whose
//      prompt is complete, with that request's sampling parameters and its own Rng (seeded as keel sample
//      seeds it, so a request reproduces `keel sample` with the same seed);
//   4. publishes new text, and frees the slots of finished or cancelled sequences.
// New requests thus join between steps, and a slot is reused as soon as its sequence ends.
//
// Prompt cache (on by default, as llama.cpp's server and vLLM's prefix caching): a slot keeps the keys and values
// of its last sequence after it ends. A new request goes to the free slot whose kept tokens share the longest
// prefix with its prompt (among equals the one released longest ago), and if another slot, busy or free, shares a longer
// one, those positions are copied from it (DecodeState::CopyPositions). Only the rest of the prompt is fed, at
// least its last token (whose logits give the first generated token). Keys and values are a function of the
// tokens at and before their position, and with the repacked decode matrices (CPU with AVX2) a row does not
// depend on the other rows of its step, so a cached prefix gives the same bits as feeding it again; elsewhere
// the difference is the rounding that batching already brings.
//
// Text is published without ever revealing part of a stop string (a tail that could still grow into one is
// held back) or a partial UTF-8 sequence (held back until complete; flushed as is at the end). A matched stop
// string and everything after it are dropped. The end-of-sequence token (if the tokenizer has one) ends a
// generation with finish reason "stop", as does a stop string; max_tokens or the end of the context gives
// "length".
//
// A failed device (Engine::health()) ends every generation with its error and refuses new ones: the server then
// answers 503 and exits non-zero, so that a supervisor restarts it or takes it out of rotation.
//
// Thread safety: Submit(), BeginShutdown(), Shutdown() and the accessors may be called from any thread; a
// Generation's methods from any thread (typically the HTTP handler that submitted it). The model passed to
// Create() must not be used by anyone else while the engine lives.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "core/hash.h"
#include "core/status.h"
#include "serve/metrics.h"
#include "serve/sampling.h"

namespace keel {

class GptModel;
class DecodeState;
class Tokenizer;

struct EngineOptions {
  int parallel = 4;        // KV-cache slots: sequences decoded together in one batched step
  int ctx = 0;             // positions per slot (0: the model's context)
  int queue = 64;          // requests that may wait for a slot; beyond that Submit() answers kQueueFull
  int prefill_chunk = 64;  // prompt tokens fed per step across all sequences (>= 1)
  int threads = 0;         // backend threads, set on the scheduler thread (0: leave the backend's setting)
  int step_delay_ms = 0;   // testing aid: sleep this long after every step
  WeightDtype weight_dtype = WeightDtype::kF32;  // decode copy of the weight matrices (--dtype; see DecodeState)
  bool half_kv = false;  // keys and values cached as IEEE f16 (--kv-dtype f16; see DecodeState)
  bool prompt_cache = true;   // reuse the keys and values of a prompt's longest cached prefix (see above)
  // Called after every step to learn whether the device still works (default: the backend's Sync(), which
  // returns a CUDA backend's sticky error; the CPU's never fails). Tests inject a device loss through it.
  std::function<Status()> device_check = nullptr;
};

struct GenerationRequest {
  std::vector<int32_t> prompt;  // 1 .. ctx-1 tokens
  SamplingParams sampling;
  int max_tokens = 16;          // >= 0
  std::vector<std::string> stop;
};

enum class FinishReason { kNone, kStop, kLength, kCancelled };
const char* FinishReasonName(FinishReason r);  // "", "stop", "length", "cancelled"

// One request's generation, shared by the engine (producer) and the submitter (consumer).
class Generation {
 public:
  struct Update {
    std::string text;             // text published since the previous Wait()
    std::vector<int32_t> tokens;  // token ids generated since the previous Wait() (stop-string tokens included)
    bool finished = false;
    FinishReason reason = FinishReason::kNone;
    Status error;                 // set when the engine cancelled the generation itself (shutdown deadline)
    int prompt_tokens = 0, completion_tokens = 0;
  };
  // Waits up to `timeout` for something new; returns what is new (possibly nothing). After the update that
  // reports finished, later calls return finished with no text.
  Update Wait(std::chrono::milliseconds timeout);
  // Requests cancellation (e.g. the client went away); the engine frees the slot before its next step.
  void Cancel();
  bool cancel_requested() const { return cancel_.load(); }

 private:
  friend class Engine;
  void Publish(const std::string& text, const std::vector<int32_t>& tokens, int completion_tokens);
  void Finish(FinishReason reason, Status error, int completion_tokens);

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::string text_;
  std::vector<int32_t> tokens_;
  bool finished_ = false;
  FinishReason reason_ = FinishReason::kNone;
  Status error_;
  int prompt_tokens_ = 0, completion_tokens_ = 0;
  std::atomic<bool> cancel_{false};
};

// kFailed: the engine's device failed (see Engine::health()); nothing more can be generated.
enum class SubmitStatus { kOk, kQueueFull, kShuttingDown, kInvalid, kFailed };

class Engine {
 public:
  // Allocates the KV cache (parallel x ctx positions) and starts the scheduler thread. metrics may be null.
  static Result<std::unique_ptr<Engine>> Create(GptModel* model, const Tokenizer* tokenizer, const EngineOptions& o,
                                                ServeMetrics* metrics);
  ~Engine();  // Shutdown(now)

  // Queues a request. On kOk returns the Generation; otherwise null, with *error describing why.
  std::shared_ptr<Generation> Submit(GenerationRequest request, SubmitStatus* status, std::string* error);
  // From now on Submit() answers kShuttingDown; running and queued generations continue.
  void BeginShutdown();
  // BeginShutdown(), waits until every generation has finished or `deadline` passed, cancels what is left
  // (their error: "the server is shutting down") and stops the scheduler thread. Idempotent.
  void Shutdown(std::chrono::steady_clock::time_point deadline);

  // Ok while the device works. After a step whose device check failed (a lost GPU, an ECC error: a CUDA
  // backend's errors are sticky), every active and queued generation ends with that error, Submit() answers
  // kFailed, and this returns the error for good: the server reports itself unhealthy and exits.
  Status health() const;

  int context() const { return ctx_; }
  int slots() const { return opts_.parallel; }
  int active() const { return active_.load(); }
  int queued() const;

 private:
  struct Slot {
    std::shared_ptr<Generation> gen;  // null: free
    GenerationRequest req;
    Rng rng{0};
    int fed = 0;          // prompt tokens fed
    int32_t next = 0;     // token to feed next (decode phase)
    int generated = 0;
    std::string text;     // generated text so far (truncated at a stop string)
    size_t published = 0; // bytes of text published
    std::vector<int32_t> new_tokens;
    size_t max_stop = 0;
    std::chrono::steady_clock::time_point submitted;
    uint64_t order = 0;   // admission order (prefill priority)
    // Tokens whose keys and values this slot's KV cache holds at positions 0..kv.size()-1. Kept after the
    // sequence ends: the prompt cache.
    std::vector<int32_t> kv;
    uint64_t released = 0;  // when its last sequence ended (0: never used): the prompt cache evicts the oldest
  };
  struct Pending {
    std::shared_ptr<Generation> gen;
    GenerationRequest req;
    std::chrono::steady_clock::time_point submitted;
  };

  Engine(GptModel* model, const Tokenizer* tok, const EngineOptions& o, ServeMetrics* metrics);
  void Loop();
  // Picks the free slot for a prompt (the prompt cache's choice, or the first free one) and fills its KV cache
  // with the longest cached prefix of the prompt; returns the slot index and sets *reused to the prompt tokens
  // that need no feeding. -1: no free slot.
  int PlaceInSlot(const std::vector<int32_t>& prompt, int* reused);
  void Admit(Slot& s, Pending p, int reused);
  // Handles a sampled token; returns true if the sequence finished (its slot is then freed).
  bool OnToken(Slot& s, int32_t token);
  void FinishSlot(Slot& s, FinishReason reason, Status error = Status::Ok());
  void PublishSafe(Slot& s);

  GptModel* model_;
  const Tokenizer* tok_;
  EngineOptions opts_;
  ServeMetrics* metrics_;
  int ctx_ = 0;
  int vocab_ = 0;  // sampled ids are < vocab_ (the tokenizer's vocabulary; a padded model never emits the rest)
  std::unique_ptr<DecodeState> state_;
  std::vector<Slot> slots_;  // owned by the scheduler thread
  uint64_t next_order_ = 1;  // admission and release stamps (0: a slot never used, taken first)

  mutable std::mutex mu_;
  std::condition_variable cv_;       // scheduler wake-up: new work or stop
  std::condition_variable idle_cv_;  // Shutdown(): everything finished
  std::deque<Pending> queue_;
  bool accepting_ = true;
  bool stop_ = false;
  bool shutdown_cancel_ = false;  // past the shutdown deadline: cancel everything
  Status failed_;                 // the device failed (see health())
  std::atomic<int> active_{0};
  int busy_ = 0;  // active + queued, under mu_
  int placing_ = 0;  // taken from the queue, not yet admitted (under mu_)
  std::thread thread_;
  std::once_flag shutdown_once_;
};

}  // namespace keel
