// server.h: the HTTP front end of `keel serve` (cpp-httplib): OpenAI-compatible endpoints over an Engine.
//
//   POST /v1/completions, POST /v1/chat/completions   JSON, or server-sent events with "stream": true
//   GET  /v1/models                                    the served model
//   GET  /health                                       200 {"status":"ok"}, 503 {"status":"draining"} on shutdown,
//                                                      503 {"status":"failed"} once the device failed (Engine::health)
//   GET  /metrics                                      Prometheus text (serve/metrics.h)
//   GET  /                                             a small page to try the model (serve/web_page.h)
// With an API key, /v1/* needs "Authorization: Bearer <key>" (401 otherwise; the scheme name in any case);
// /, /health and /metrics are open.
// Every error is a JSON body in OpenAI's shape (http_api.h ErrorJson): 400 bad input, 401, 404 unknown route or
// model, 405 wrong method, 411 a body without Content-Length (chunked), 413 body over the limit, 415 a compressed
// body, 429 queue full, 503 shutting down or device failed, 500 the model produced no finite logit.
//
// A client that disconnects cancels its generation: handlers watch the request's socket for a hang-up while
// they wait (and streaming writes fail), then cancel the Generation so the engine frees the slot.
//
// Shutdown: BeginDrain() makes new completion requests (and /health) answer 503; WaitIdle() waits for the
// responses in flight to be written; Stop() closes the listener and joins the worker threads.
// Thread safety: BeginDrain/WaitIdle/Stop may be called from any thread; handlers run on the server's pool.
#pragma once
#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "core/status.h"

namespace keel {

class Engine;
class Tokenizer;
class ServeMetrics;

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;               // 0: any free port (see port())
  std::string api_key;           // empty: no authentication
  std::string model_name = "keel";
  size_t max_body_bytes = 1 << 20;
  int http_threads = 32;         // worker threads (each streaming or waiting request holds one)
  nlohmann::json model_meta;     // extra fields for /v1/models ("meta")
  // Set by a signal handler (SIGTERM): the server drains from the moment it is set, as after BeginDrain. Without
  // it, a request arriving between the signal and the caller's BeginDrain was queued behind the in-flight ones
  // and served, instead of refused with 503.
  const std::atomic<bool>* drain_flag = nullptr;
};

class HttpServer {
 public:
  HttpServer(Engine* engine, const Tokenizer* tokenizer, ServeMetrics* metrics, ServerOptions o);
  ~HttpServer();
  // Binds the listening socket (errors: address in use, bad host).
  Status Bind();
  int port() const;
  // Serves on a background thread until Stop().
  void Start();
  // True while the background thread is serving.
  bool running() const;
  void BeginDrain();
  // Waits until no completion request is in flight, or the deadline. Returns true if idle.
  bool WaitIdle(std::chrono::steady_clock::time_point deadline);
  void Stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace keel
