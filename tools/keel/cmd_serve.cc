// cmd_serve.cc: `keel serve CKPT` — an OpenAI-compatible HTTP inference server with continuous batching
// (src/serve/engine.h, src/serve/server.h; docs/serving.md).
#include <csignal>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <thread>

#include "backend/backend.h"
#include "data/tokenizer.h"
#include "elastic/fault_inject.h"
#include "export/export.h"
#include "model/gpt.h"
#include "serve/engine.h"
#include "serve/metrics.h"
#include "serve/server.h"
#include "tools/keel/cli_util.h"
#include "tools/keel/commands.h"

namespace keel::cli {

namespace {

std::string BaseName(std::string p) {
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  size_t slash = p.rfind('/');
  std::string base = slash == std::string::npos ? p : p.substr(slash + 1);
  if (base.size() > 5 && base.compare(base.size() - 5, 5, ".gguf") == 0) base.resize(base.size() - 5);
  return base;
}

}  // namespace

int RunServe(int argc, char** argv) {
  std::string ckpt, device = "cpu", model_name;
  ServerOptions so;
  EngineOptions eo;
  int threads = 0;
  double drain_timeout = 10.0;
  CLI::App app("Serve a model over HTTP (OpenAI-compatible completions and chat, streaming, a web page at /).",
               "serve");
  app.add_option("ckpt", ckpt,
                 "run directory (newest valid checkpoint), checkpoint directory, .gguf file or Hugging Face export "
                 "directory")
      ->required();
  app.add_option("--host", so.host, "address to bind")->capture_default_str();
  app.add_option("--port", so.port, "port to bind (0: any free port)")->capture_default_str();
  app.add_option("--api-key", so.api_key, "require \"Authorization: Bearer KEY\" on /v1/*");
  app.add_option("--parallel", eo.parallel, "sequences decoded together (KV-cache slots)")->capture_default_str();
  app.add_option("--ctx,-c", eo.ctx, "context per sequence, prompt and completion (0: the model's)")
      ->capture_default_str();
  app.add_option("--threads,-t", threads, "CPU threads (0: all cores)");
  app.add_option("--queue", eo.queue, "requests that may wait for a slot before 429")->capture_default_str();
  app.add_option("--model-name", model_name, "model id in the API (default: the checkpoint's directory or file name, without .gguf)");
  app.add_option("--prefill-chunk", eo.prefill_chunk, "prompt tokens fed per batched step")->capture_default_str();
  bool no_prompt_cache = false;
  app.add_flag("--no-prompt-cache", no_prompt_cache,
               "feed every prompt in full (by default a prompt's longest prefix still held in a KV slot is reused)");
  app.add_option("--max-body", so.max_body_bytes, "largest request body in bytes (413 beyond)")->capture_default_str();
  app.add_option("--drain-timeout", drain_timeout, "seconds in-flight requests get to finish on SIGTERM/SIGINT")
      ->capture_default_str();
  app.add_option("--device", device)->capture_default_str();
  std::string dtype = "f32";
  app.add_option("--dtype", dtype,
                 "weights used for decoding: f32, f16 (half the bytes per token: faster, memory-bound decode), or bf16 "
                 "(half the bytes, and inputs rounded to bf16: twice the arithmetic rate on AVX-512 BF16 CPUs)")
      ->capture_default_str();
  std::string kv_dtype = "f32";
  app.add_option("--kv-dtype", kv_dtype,
                 "KV cache values: f32, or f16 (half the bytes each decode step's attention reads, and half the "
                 "cache's memory, as llama.cpp's default cache type)")
      ->capture_default_str();
  // Testing aid (hidden): slows every engine step so tests can observe queueing, cancellation and draining.
  app.add_option("--debug-step-delay-ms", eo.step_delay_ms)->group("");
  // Fault injection (hidden; needs KEEL_ALLOW_FAULT_INJECTION=1): device-fail:step=S (elastic/fault_inject.h).
  std::string inject;
  app.add_option("--inject", inject)->group("");
  if (int rc = Parse(app, argc, argv); rc >= 0) return rc;
  if (so.port < 0 || so.port > 65535) return Fail("serve", InvalidArgument("--port must be in [0, 65535]"));
  if (threads < 0 || threads > kMaxThreads)
    return Fail("serve", InvalidArgument("--threads must be in [0, " + std::to_string(kMaxThreads) + "]"));
  // An empty key (an unset shell variable in --api-key "$KEY") would silently turn authentication off; an empty
  // --host bound [::1] and announced "http://:PORT", an empty --model-name fell back to the file name.
  if (Status s = CheckNotEmpty(app, {"--api-key", "--host", "--model-name"}); !s.ok()) return Fail("serve", s);
  // Upper bounds keep the sums below (slots + queue + threads) far from int overflow. Every waiting or streaming
  // request holds one HTTP worker thread (at most kMaxHttpThreads), so a queue longer than the workers left
  // over would not answer 429: the extra requests would wait unseen in the thread pool's own queue.
  constexpr int kMaxParallel = 256, kMaxHttpThreads = 1024, kSpareThreads = 16;
  if (eo.parallel < 1 || eo.parallel > kMaxParallel)
    return Fail("serve", InvalidArgument("--parallel must be in [1, " + std::to_string(kMaxParallel) + "]"));
  const int max_queue = kMaxHttpThreads - kSpareThreads - eo.parallel;
  if (eo.queue < 0 || eo.queue > max_queue)
    return Fail("serve", InvalidArgument("--queue must be in [0, " + std::to_string(max_queue) + "] with --parallel " +
                                         std::to_string(eo.parallel) + " (each waiting request holds an HTTP thread)"));
  if (eo.prefill_chunk < 1 || eo.prefill_chunk > 65536)
    return Fail("serve", InvalidArgument("--prefill-chunk must be in [1, 65536]"));
  if (so.max_body_bytes < 1024 || so.max_body_bytes > (size_t{1} << 30))
    return Fail("serve", InvalidArgument("--max-body must be in [1024, 1073741824]"));
  if (!(drain_timeout >= 0 && drain_timeout <= 86400))
    return Fail("serve", InvalidArgument("--drain-timeout must be in [0, 86400] seconds"));
  auto decode_dtype = ParseDecodeDtype(dtype);
  if (!decode_dtype.ok()) return Fail("serve", decode_dtype.status());
  eo.weight_dtype = *decode_dtype;
  auto half_kv = ParseKvDtype(kv_dtype);
  if (!half_kv.ok()) return Fail("serve", half_kv.status());
  eo.half_kv = *half_kv;
  eo.prompt_cache = !no_prompt_cache;
  std::shared_ptr<FaultInjector> injector;
  if (!inject.empty()) {
    auto specs = ParseFaultSpec(inject);
    if (!specs.ok()) return Fail("serve", specs.status());
    for (const FaultSpec& f : *specs)
      if (f.kind != FaultSpec::kDeviceFail)
        return Fail("serve", InvalidArgument(std::string("--inject: serve takes only device-fail faults, not ") +
                                             FaultKindName(f.kind)));
    auto fi = FaultInjector::Create(inject, 0, 1);
    if (!fi.ok()) return Fail("serve", fi.status());
    injector = std::move(*fi);
  }

  std::vector<std::string> warnings;
  auto snap = LoadModelForInference(ckpt, &warnings);
  for (const auto& w : warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  if (!snap.ok()) return Fail("serve", snap.status());
  if (Status s = CheckDecodeParams(*snap, ckpt, *decode_dtype); !s.ok()) return Fail("serve", s);
  const bool byte_tok = snap->tokenizer.rfind("keel-byte-tokenizer", 0) == 0;
  auto tok = LoadTokenizer(byte_tok ? "byte" : "bpe", snap->tokenizer);
  if (!tok.ok()) return Fail("serve", tok.status().Wrap(ckpt + ": tokenizer"));
  if ((*tok)->vocab_size() > snap->config.vocab)
    return Fail("serve", Corrupt(ckpt + ": tokenizer vocabulary does not match the model's"));
  if (eo.ctx != 0 && (eo.ctx < 2 || eo.ctx > snap->config.ctx))
    return Fail("serve", InvalidArgument("--ctx must be 0 (the model's context) or in [2, " +
                                         std::to_string(snap->config.ctx) + "] (the model's context)"));
  auto backend = MakeBackend(device, threads > 0 ? threads : 0);
  if (!backend.ok()) return Fail("serve", backend.status());
  eo.threads = threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency());
  auto model = GptModel::Create(snap->config, backend->get(), 1, 1);
  if (!model.ok()) return Fail("serve", model.status());
  (*model)->SetParamsFromHost(snap->params);
  snap->params.clear();
  snap->params.shrink_to_fit();

  if (injector) {
    Backend* be = backend->get();
    eo.device_check = [injector, be, step = int64_t{0}]() mutable -> Status {
      if (injector->DeviceFails(step++)) return IoError("injected device failure (--inject device-fail)");
      return be->Sync();
    };
  }
  ServeMetrics metrics;
  auto engine = Engine::Create(model->get(), tok->get(), eo, &metrics);
  if (!engine.ok()) return Fail("serve", engine.status());

  so.model_name = model_name.empty() ? BaseName(ckpt) : model_name;
  if (so.model_name.empty()) so.model_name = "keel";
  so.drain_flag = &StopFlag();
  so.http_threads = std::clamp(eo.parallel + eo.queue + kSpareThreads, kSpareThreads, kMaxHttpThreads);
  nlohmann::json meta = snap->config.ToJson();
  meta["serve_ctx"] = (*engine)->context();
  meta["parallel"] = eo.parallel;
  meta["tokenizer"] = (*tok)->type();
  so.model_meta = meta;

  std::signal(SIGPIPE, SIG_IGN);
  InstallStopHandlers();
  HttpServer server(engine->get(), tok->get(), &metrics, so);
  if (Status s = server.Bind(); !s.ok()) return Fail("serve", s);
  server.Start();
  std::fprintf(stderr, "keel serve: listening on http://%s:%d (model %s, %d slots x %d positions, %d threads)\n",
               so.host.c_str(), server.port(), so.model_name.c_str(), eo.parallel, (*engine)->context(),
               eo.threads);
  std::fflush(stderr);

  // A failed device (Engine::health()) ends the server with a non-zero exit, so a supervisor restarts it; its
  // /health answers 503 meanwhile.
  while (!StopFlag().load() && server.running() && (*engine)->health().ok())
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const Status health = (*engine)->health();
  const bool failed = !StopFlag().load() || !health.ok();
  std::fprintf(stderr, "keel serve: %s; finishing in-flight requests (up to %g s)\n",
               !health.ok() ? ("the model's device failed (" + health.message() + ")").c_str()
               : failed    ? "the listener stopped"
                           : "stopping",
               drain_timeout);
  std::fflush(stderr);
  server.BeginDrain();
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(drain_timeout * 1000.0));
  (*engine)->Shutdown(deadline);
  // Give handlers a moment to write the final bytes of what the engine finished (or cancelled).
  server.WaitIdle(std::max(deadline, std::chrono::steady_clock::now()) + std::chrono::seconds(2));
  // Stop() joins the HTTP workers. One still reading a request a client sends a byte at a time (each byte restarts
  // the read timeout), or writing to a client that never reads, would hold it without bound: after a few more
  // seconds keel exits without it (the engine is shut down; nothing is left to flush but that socket).
  std::promise<void> stopped;
  auto stopped_f = stopped.get_future();
  std::thread stopper([&] {
    server.Stop();
    stopped.set_value();
  });
  if (stopped_f.wait_for(std::chrono::seconds(5)) != std::future_status::ready) {
    std::fprintf(stderr, "keel serve: a connection is still open after the drain (a client that neither finishes "
                         "sending its request nor reads the response); exiting without it\n");
    std::fflush(nullptr);
    std::_Exit(failed || !(*engine)->health().ok() ? 1 : 0);
  }
  stopper.join();
  std::fprintf(stderr, "keel serve: stopped\n");
  return failed || !(*engine)->health().ok() ? 1 : 0;  // (a device may also fail during the drain)
}

}  // namespace keel::cli
