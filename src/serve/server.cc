// server.cc: the HTTP layer of `keel serve` (see server.h).
#include "serve/server.h"

#include <dirent.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include <httplib.h>

#include "data/tokenizer.h"
#include "serve/engine.h"
#include "serve/http_api.h"
#include "serve/metrics.h"
#include "serve/web_page.h"

namespace keel {

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr auto kPollInterval = std::chrono::milliseconds(50);

// httplib::Server with a deeper listen backlog than the library's compiled-in 5 (a burst of clients would
// otherwise see SYN retransmits, a full second each).
class KeelHttplibServer : public httplib::Server {
 public:
  void RaiseBacklog(int n) {
    const socket_t s = svr_sock_;
    if (s != INVALID_SOCKET) ::listen(s, n);
  }
};

std::string NumericHost(const sockaddr_storage& a, socklen_t len, int* port) {
  char host[NI_MAXHOST], serv[NI_MAXSERV];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&a), len, host, sizeof host, serv, sizeof serv,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return "";
  *port = std::atoi(serv);
  return host;
}

// The descriptor of the connection a request arrived on, found by its address pair (cpp-httplib 0.11 does not
// hand it to handlers); -1 if not found. Valid while the handler (or its content provider) runs.
int FindConnectionFd(const httplib::Request& req) {
  DIR* d = opendir("/proc/self/fd");
  if (!d) return -1;
  int found = -1;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || fd == dirfd(d)) continue;
    struct stat st;
    if (fstat(static_cast<int>(fd), &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    sockaddr_storage local{}, peer{};
    socklen_t ll = sizeof local, pl = sizeof peer;
    if (getsockname(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&local), &ll) != 0) continue;
    if (getpeername(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&peer), &pl) != 0) continue;
    int lport = -1, pport = -1;
    NumericHost(local, ll, &lport);
    if (lport != req.local_port) continue;
    std::string phost = NumericHost(peer, pl, &pport);
    if (pport == req.remote_port && phost == req.remote_addr) {
      found = static_cast<int>(fd);
      break;
    }
  }
  closedir(d);
  return found;
}

// True once the peer has closed (or reset) the connection.
bool ClientGone(int fd) {
  if (fd < 0) return false;
  pollfd p{fd, POLLRDHUP, 0};
  if (poll(&p, 1, 0) <= 0) return false;
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

std::string RandomId(const char* prefix) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  char buf[40];
  std::snprintf(buf, sizeof buf, "%s%016llx", prefix, static_cast<unsigned long long>(rng()));
  return buf;
}

uint64_t RandomSeed() {
  thread_local std::mt19937_64 rng{std::random_device{}() ^ 0x9e3779b97f4a7c15ull};
  return rng();
}

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ (i < b.size() ? b[i] : 0));
  return diff == 0;
}

std::string RouteLabel(const std::string& path) {
  for (const char* p : {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"})
    if (path == p) return p;
  return "other";
}

void SetError(httplib::Response& res, int status, const std::string& message, const std::string& param = "",
              const std::string& code = "") {
  ErrorKind k = ErrorKindForStatus(status);
  res.status = status;
  res.set_content(DumpJson(ErrorJson(message, k.type, param, code.empty() ? k.code : code)), "application/json");
  // A refused client (queue full, shutting down) is asked to close its connection: kept alive, it would hold an HTTP
  // worker for the keep-alive timeout, and enough of them would starve /health and the requests behind them.
  if (status == 429 || status == 503) res.set_header("Connection", "close");
}

std::string SseEvent(const json& j) { return "data: " + DumpJson(j) + "\n\n"; }

}  // namespace

struct HttpServer::Impl {
  Engine* engine = nullptr;
  const Tokenizer* tok = nullptr;
  ServeMetrics* metrics = nullptr;
  ServerOptions opts;
  KeelHttplibServer svr;
  std::thread thread;
  std::atomic<bool> draining{false};
  bool Draining() const { return draining.load() || (opts.drain_flag && opts.drain_flag->load()); }
  std::atomic<bool> serving{false};
  int port = -1;
  std::mutex mu;
  std::condition_variable idle_cv;
  int inflight = 0;

  void Enter() {
    std::lock_guard<std::mutex> l(mu);
    ++inflight;
  }
  void Leave() {
    std::lock_guard<std::mutex> l(mu);
    if (--inflight == 0) idle_cv.notify_all();
  }

  bool Authorized(const httplib::Request& req) const {
    if (opts.api_key.empty()) return true;
    const std::string h = req.get_header_value("Authorization");
    // The scheme name is case-insensitive (RFC 9110 11.1); the credentials are not.
    const std::string prefix = "bearer ";
    if (h.size() <= prefix.size()) return false;
    for (size_t i = 0; i < prefix.size(); ++i)
      if (std::tolower(static_cast<unsigned char>(h[i])) != prefix[i]) return false;
    return ConstantTimeEquals(h.substr(prefix.size()), opts.api_key);
  }

  void Routes();
  void HandleCompletion(const httplib::Request& req, httplib::Response& res, ApiEndpoint ep);
};

namespace {

// What a streaming response needs between calls of its content provider.
struct StreamState {
  std::shared_ptr<Generation> gen;
  CompletionRequest req;
  std::string id, model;
  int64_t created = 0;
  int fd = -1;
  Clock::time_point start;
  bool sent_role = false;
  bool at_start = true;  // chat: a leading space of the reply is dropped
};

// One call of a streaming response's content provider: waits up to kPollInterval for new text, writes it as an
// SSE event, and at the end the finish event (or an error event) and [DONE]. False ends the response (the
// client is gone or a write failed; the generation is cancelled).
bool StreamNext(StreamState* st, bool chat, httplib::DataSink& sink) {
  auto write = [&](const std::string& s) {
    if (!sink.write(s.data(), s.size())) {
      st->gen->Cancel();
      return false;
    }
    return true;
  };
  if (chat && !st->sent_role) {
    st->sent_role = true;
    if (!write(SseEvent(StreamChunk(st->req, st->id, st->created, st->model, "", true, "")))) return false;
  }
  Generation::Update u = st->gen->Wait(kPollInterval);
  std::string text = std::move(u.text);
  if (chat && st->at_start && !text.empty()) {
    if (text[0] == ' ') text.erase(0, 1);
    st->at_start = false;
  }
  if (!text.empty() || (!u.tokens.empty() && st->req.return_tokens)) {
    if (!write(SseEvent(StreamChunk(st->req, st->id, st->created, st->model, text, false, "",
                                    st->req.return_tokens ? &u.tokens : nullptr))))
      return false;
  }
  if (u.finished) {
    std::string tail;
    if (u.reason == FinishReason::kCancelled) {
      if (ClientGone(st->fd)) return false;
      const bool internal = u.error.code() == Code::kInternal;  // not a shutdown: the model failed this sequence
      const bool device = u.error.code() == Code::kAborted;     // the device failed (Engine::health())
      ErrorKind k = ErrorKindForStatus(internal ? 500 : 503);
      tail += SseEvent(ErrorJson(u.error.ok() ? "the generation was cancelled" : u.error.message(), k.type,
                                 "", internal ? k.code : device ? "device_failed" : "shutting_down"));
    } else {
      tail += SseEvent(StreamChunk(st->req, st->id, st->created, st->model, "", false,
                                   FinishReasonName(u.reason)));
      if (st->req.include_usage)
        tail += SseEvent(StreamUsageChunk(st->req, st->id, st->created, st->model,
                                          Usage{u.prompt_tokens, u.completion_tokens}));
    }
    tail += "data: [DONE]\n\n";
    if (!write(tail)) return false;
    sink.done();
    return true;
  }
  if (ClientGone(st->fd)) {
    st->gen->Cancel();
    return false;
  }
  return true;
}

}  // namespace

void HttpServer::Impl::HandleCompletion(const httplib::Request& req, httplib::Response& res, ApiEndpoint ep) {
  const Clock::time_point start = Clock::now();
  if (Draining()) {
    metrics->CountRejected("shutting_down");
    return SetError(res, 503, "the server is shutting down", "", "shutting_down");
  }
  if (!Authorized(req))
    return SetError(res, 401, "missing or invalid API key (send \"Authorization: Bearer <key>\")");
  std::string param;
  ParseOptions po{opts.model_name, tok->vocab_size()};
  auto parsed = ParseCompletionRequest(req.body, ep, po, &param);
  if (!parsed.ok())
    return SetError(res, parsed.status().code() == Code::kNotFound ? 404 : 400, parsed.status().message(), param,
                    parsed.status().code() == Code::kNotFound ? "model_not_found" : "");
  CompletionRequest r = std::move(parsed.value());
  const char* prompt_param = ep == ApiEndpoint::kCompletions ? "prompt" : "messages";
  GenerationRequest g;
  g.prompt = r.prompt_is_tokens ? r.prompt_tokens : tok->Encode(r.prompt);
  if (g.prompt.empty()) return SetError(res, 400, "the prompt must not be empty", prompt_param);
  const int ctx = engine->context();
  if (static_cast<int>(g.prompt.size()) >= ctx)
    return SetError(res, 400,
                    "the prompt is " + std::to_string(g.prompt.size()) + " tokens; this server's context holds " +
                        std::to_string(ctx) + " tokens for prompt and completion together",
                    prompt_param, "context_length_exceeded");
  g.sampling = r.sampling;
  if (!r.seed_given) g.sampling.seed = RandomSeed();
  g.max_tokens = r.max_tokens >= 0 ? r.max_tokens : ep == ApiEndpoint::kCompletions ? 16 : ctx;
  g.stop = ep == ApiEndpoint::kChatCompletions ? ChatStops(r.stop) : r.stop;

  // In flight from before the Submit: a shutdown's WaitIdle() must not see zero between an accepted request and
  // its response (it would stop the listener, and the stream would end without a byte). Released by the
  // response's own Leave() below, or here on every way out before that.
  Enter();
  struct Entered {
    Impl* impl;
    bool armed = true;
    ~Entered() {
      if (armed) impl->Leave();
    }
  } entered{this};
  SubmitStatus ss = SubmitStatus::kOk;
  std::string why;
  std::shared_ptr<Generation> gen = engine->Submit(std::move(g), &ss, &why);
  if (!gen) {
    switch (ss) {
      case SubmitStatus::kQueueFull: return SetError(res, 429, why);
      case SubmitStatus::kShuttingDown: return SetError(res, 503, why, "", "shutting_down");
      case SubmitStatus::kFailed: return SetError(res, 503, why, "", "device_failed");
      default: return SetError(res, 400, why, prompt_param);
    }
  }
  const int fd = FindConnectionFd(req);
  const std::string id = RandomId(ep == ApiEndpoint::kCompletions ? "cmpl-" : "chatcmpl-");
  const int64_t created = static_cast<int64_t>(std::time(nullptr));
  const bool chat = ep == ApiEndpoint::kChatCompletions;

  if (!r.stream) {
    entered.armed = false;  // Exit leaves
    // Leave() and a cancel on every way out, an exception (httplib answers 500) included: a leaked in-flight count
    // would hold every later WaitIdle() to its deadline, a leaked generation its slot. Cancelling a finished
    // generation does nothing.
    struct Exit {
      Impl* impl;
      std::shared_ptr<Generation> gen;
      ~Exit() {
        gen->Cancel();
        impl->Leave();
      }
    } exit{this, gen};
    std::string text;
    std::vector<int32_t> tokens;
    Generation::Update u;
    bool gone = false;
    for (;;) {
      u = gen->Wait(kPollInterval);
      text += u.text;
      tokens.insert(tokens.end(), u.tokens.begin(), u.tokens.end());
      if (u.finished) break;
      if (!gone && ClientGone(fd)) {
        gone = true;
        gen->Cancel();
      }
    }
    if (chat && !text.empty() && text[0] == ' ') text.erase(0, 1);
    if (u.reason == FinishReason::kCancelled) {
      if (u.error.code() == Code::kInternal) SetError(res, 500, u.error.message());
      else if (u.error.code() == Code::kAborted) SetError(res, 503, u.error.message(), "", "device_failed");
      else if (!u.error.ok()) SetError(res, 503, u.error.message(), "", "shutting_down");
      else SetError(res, 499, "the client closed the connection");
    } else {
      json body = CompletionResponse(r, id, created, opts.model_name, text, FinishReasonName(u.reason),
                                     Usage{u.prompt_tokens, u.completion_tokens},
                                     r.return_tokens ? &tokens : nullptr);
      res.set_content(DumpJson(body), "application/json");
      res.status = 200;
    }
    metrics->ObserveRequestDuration(std::chrono::duration<double>(Clock::now() - start).count());
    return;
  }

  auto st = std::make_shared<StreamState>();
  st->gen = gen;
  st->req = std::move(r);
  st->id = id;
  st->model = opts.model_name;
  st->created = created;
  st->fd = fd;
  st->start = start;
  entered.armed = false;  // the releaser below leaves
  res.status = 200;
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  res.set_chunked_content_provider(
      "text/event-stream",
      [st, chat](size_t, httplib::DataSink& sink) -> bool {
        // httplib calls this outside its exception handler: an exception here would terminate the server.
        try {
          return StreamNext(st.get(), chat, sink);
        } catch (...) {
          st->gen->Cancel();
          return false;
        }
      },
      [this, st](bool success) {
        if (!success) st->gen->Cancel();
        metrics->ObserveRequestDuration(std::chrono::duration<double>(Clock::now() - st->start).count());
        Leave();
      });
}


void HttpServer::Impl::Routes() {
  svr.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(WebPageHtml(), "text/html; charset=utf-8");
  });
  svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (Status h = engine->health(); !h.ok()) {
      res.status = 503;
      res.set_content(DumpJson(json{{"status", "failed"}, {"error", h.message()}}), "application/json");
      return;
    }
    if (Draining()) {
      res.status = 503;
      res.set_content(R"({"status":"draining"})", "application/json");
      return;
    }
    json j = {{"status", "ok"},
              {"slots", engine->slots()},
              {"active_slots", engine->active()},
              {"queue_depth", engine->queued()}};
    res.set_content(DumpJson(j), "application/json");
  });
  svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics->Render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  svr.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
    if (!Authorized(req))
      return SetError(res, 401, "missing or invalid API key (send \"Authorization: Bearer <key>\")");
    json m = {{"id", opts.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "keel"}};
    if (!opts.model_meta.is_null()) m["meta"] = opts.model_meta;
    res.set_content(DumpJson(json{{"object", "list"}, {"data", json::array({m})}}), "application/json");
  });
  svr.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    HandleCompletion(req, res, ApiEndpoint::kCompletions);
  });
  svr.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    HandleCompletion(req, res, ApiEndpoint::kChatCompletions);
  });
  // Runs after the headers and before httplib reads the body. httplib 0.11 applies --max-body only to a
  // Content-Length body: a chunked or unframed body would be read whole whatever its size, and a compressed one
  // inflated past the limit. So a body must come with a Content-Length and no Content-Encoding. A wrong method
  // on a known path is a 405 here, before any body is read. A rejected request's body stays unread, so the
  // connection closes after the answer (see the logger).
  svr.set_pre_routing_handler([](const httplib::Request& req, httplib::Response& res) {
    auto reject = [&](int status, const std::string& message) {
      SetError(res, status, message);
      res.set_header("Connection", "close");
      return httplib::Server::HandlerResponse::Handled;
    };
    static const std::map<std::string, std::string> kMethodOf = {
        {"/", "GET"},        {"/health", "GET"},         {"/metrics", "GET"},
        {"/v1/models", "GET"}, {"/v1/completions", "POST"}, {"/v1/chat/completions", "POST"}};
    if (auto it = kMethodOf.find(req.path); it != kMethodOf.end()) {
      const std::string& want = it->second;
      if (req.method != want && !(want == "GET" && req.method == "HEAD")) {
        res.set_header("Allow", want == "GET" ? "GET, HEAD" : want);
        return reject(405, "use " + want + " for " + req.path + " (got " + req.method + ")");
      }
    }
    const bool has_body = req.method == "POST" || req.method == "PUT" || req.method == "PATCH" ||
                          req.method == "DELETE";
    if (has_body || req.has_header("Transfer-Encoding")) {
      if (req.has_header("Transfer-Encoding"))
        return reject(411, "send the request body with a Content-Length header (Transfer-Encoding is not accepted)");
      const std::string enc = req.get_header_value("Content-Encoding");
      if (!enc.empty() && enc != "identity")
        return reject(415, "compressed request bodies are not accepted (Content-Encoding: " + enc + ")");
      if (has_body && !req.has_header("Content-Length"))
        return reject(411, "a " + req.method + " request needs a Content-Length header");
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  // Errors httplib produces itself (unknown route, body over the limit, malformed HTTP) get a JSON body too.
  svr.set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty() || res.is_chunked_content_provider_) return httplib::Server::HandlerResponse::Unhandled;
    std::string msg;
    switch (res.status) {
      case 404: msg = "no route for " + req.method + " " + req.path; break;
      case 413: msg = "the request body exceeds the server's limit"; break;
      case 400: msg = "malformed HTTP request"; break;
      default: msg = "HTTP error " + std::to_string(res.status); break;
    }
    ErrorKind k = ErrorKindForStatus(res.status);
    res.set_content(DumpJson(ErrorJson(msg, k.type, "", k.code)), "application/json");
    return httplib::Server::HandlerResponse::Handled;
  }));
  svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "internal error";
    try {
      if (ep) std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = std::string("internal error: ") + e.what();
    } catch (...) {
    }
    SetError(res, 500, what);
  });
  svr.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    metrics->CountRequest(RouteLabel(req.path), res.status);
    // httplib keeps a connection alive unless the *request* asked to close, and would parse a rejected request's
    // unread body as the next request. The logger runs after the answer is written: end our side of the
    // connection, so the client sees the answer and then end-of-stream.
    if (res.get_header_value("Connection") == "close")
      if (int fd = FindConnectionFd(req); fd >= 0) ::shutdown(fd, SHUT_WR);
  });
}

HttpServer::HttpServer(Engine* engine, const Tokenizer* tokenizer, ServeMetrics* metrics, ServerOptions o)
    : impl_(std::make_unique<Impl>()) {
  impl_->engine = engine;
  impl_->tok = tokenizer;
  impl_->metrics = metrics;
  impl_->opts = std::move(o);
  const int threads = std::max(4, impl_->opts.http_threads);
  impl_->svr.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  impl_->svr.set_payload_max_length(impl_->opts.max_body_bytes);
  impl_->svr.set_read_timeout(30, 0);
  // A write blocks only while the client reads nothing at all (its buffers and ours full); 10 s bounds how long
  // such a client holds a worker thread, and how long Stop() can wait for it after the drain deadline.
  impl_->svr.set_write_timeout(10, 0);
  impl_->svr.set_keep_alive_timeout(2);
  impl_->svr.set_tcp_nodelay(true);
  // SO_REUSEADDR only: httplib's default adds SO_REUSEPORT, which would let a second server bind the same port.
  impl_->svr.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });
  impl_->Routes();
}

HttpServer::~HttpServer() { Stop(); }

Status HttpServer::Bind() {
  const std::string& host = impl_->opts.host;
  if (impl_->opts.port == 0) {
    impl_->port = impl_->svr.bind_to_any_port(host);
    if (impl_->port < 0) return Unavailable("cannot bind " + host + " (any port)");
  } else {
    if (!impl_->svr.bind_to_port(host, impl_->opts.port))
      return Unavailable("cannot bind " + host + ":" + std::to_string(impl_->opts.port) +
                         " (address in use, or not an address of this machine?)");
    impl_->port = impl_->opts.port;
  }
  impl_->svr.RaiseBacklog(512);
  return Status::Ok();
}

int HttpServer::port() const { return impl_->port; }

void HttpServer::Start() {
  impl_->serving = true;
  impl_->thread = std::thread([this] {
    impl_->svr.listen_after_bind();
    impl_->serving = false;
  });
}

bool HttpServer::running() const { return impl_->serving.load(); }

void HttpServer::BeginDrain() { impl_->draining = true; }

bool HttpServer::WaitIdle(std::chrono::steady_clock::time_point deadline) {
  std::unique_lock<std::mutex> l(impl_->mu);
  return impl_->idle_cv.wait_until(l, deadline, [&] { return impl_->inflight == 0; });
}

void HttpServer::Stop() {
  if (!impl_ || !impl_->thread.joinable()) return;
  // stop() is a no-op until the listener runs; wait for it (or for the serving thread to have ended).
  while (impl_->serving && !impl_->svr.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (impl_->svr.is_running()) impl_->svr.stop();
  impl_->thread.join();
}

}  // namespace keel
