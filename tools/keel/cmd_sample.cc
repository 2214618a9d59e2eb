// cmd_sample.cc: `keel sample` — generate text from a checkpoint (or run directory) with a KV cache.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <thread>

#include "backend/backend.h"
#include "data/tokenizer.h"
#include "export/export.h"
#include "model/gpt.h"
#include "serve/sampling.h"
#include "tools/keel/cli_util.h"
#include "tools/keel/commands.h"
#include "train/checkpoint_io.h"

namespace keel::cli {

int RunSample(int argc, char** argv) {
  std::string ckpt, prompt = "\n", device = "cpu";
  GenerateOptions g;
  int threads = 0, num_samples = 1;
  bool print_ids = false, timings = false;
  CLI::App app("Generate text from a trained model.", "sample");
  app.add_option("--ckpt", ckpt,
                 "run directory (newest valid checkpoint), checkpoint directory, .gguf file or Hugging Face export "
                 "directory (keel export)")
      ->required();
  app.add_option("--prompt,-p", prompt, "text to continue")->capture_default_str();
  app.add_option("-n,--n-predict", g.max_new_tokens, "tokens to generate (-1: until the context is full)")->capture_default_str();
  app.add_option("--temperature,--temp", g.sampling.temperature, "0 = greedy")->capture_default_str();
  app.add_option("--top-k", g.sampling.top_k, "0 = off")->capture_default_str();
  app.add_option("--top-p", g.sampling.top_p, "1 = off")->capture_default_str();
  app.add_option("--seed,-s", g.sampling.seed)->check(SeedValidator())->capture_default_str();
  app.add_option("--samples", num_samples, "independent samples (seeds seed, seed+1, ...)")->capture_default_str();
  app.add_option("--threads,-t", threads, "CPU threads (0: all cores)");
  app.add_option("--device", device)->capture_default_str();
  std::string dtype = "f32";
  app.add_option("--dtype", dtype,
                 "weights used for decoding: f32, f16, or bf16 (also rounds the products' inputs to bf16)")->capture_default_str();
  std::string kv_dtype = "f32";
  app.add_option("--kv-dtype", kv_dtype, "KV cache values: f32 or f16 (half the bytes attention reads)")
      ->capture_default_str();
  app.add_flag("--print-token-ids", print_ids, "also print the prompt and generated token ids to stderr");
  app.add_flag("--ignore-eos", g.ignore_eos, "do not stop at the end-of-text token");
  app.add_flag("--timings", timings, "print prompt and decode speed (tokens/s) to stderr, as llama.cpp does");
  if (int rc = Parse(app, argc, argv); rc >= 0) return rc;
  if (auto s = ValidateSampling(g.sampling); !s.ok()) return Fail("sample", s);
  // -n -1: until the context is full (or the end-of-text token), as llama.cpp's -n -1.
  if (g.max_new_tokens < -1) return Fail("sample", InvalidArgument("-n must be >= 0, or -1 (until the context is full)"));
  if (num_samples < 1 || num_samples > 1000000) return Fail("sample", InvalidArgument("--samples must be in [1, 1000000]"));
  if (threads < 0 || threads > kMaxThreads)
    return Fail("sample", InvalidArgument("--threads must be in [0, " + std::to_string(kMaxThreads) + "]"));
  auto decode_dtype = ParseDecodeDtype(dtype);
  if (!decode_dtype.ok()) return Fail("sample", decode_dtype.status());
  auto half_kv = ParseKvDtype(kv_dtype);
  if (!half_kv.ok()) return Fail("sample", half_kv.status());

  std::vector<std::string> warnings;
  auto snap = LoadModelForInference(ckpt, &warnings);
  for (const auto& w : warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  if (!snap.ok()) return Fail("sample", snap.status());
  if (Status s = CheckDecodeParams(*snap, ckpt, *decode_dtype); !s.ok()) return Fail("sample", s);
  const bool byte_tok = snap->tokenizer.rfind("keel-byte-tokenizer", 0) == 0;
  auto tok = LoadTokenizer(byte_tok ? "byte" : "bpe", snap->tokenizer);
  if (!tok.ok()) return Fail("sample", tok.status().Wrap(ckpt + ": tokenizer"));
  if ((*tok)->vocab_size() > snap->config.vocab)
    return Fail("sample", Corrupt(ckpt + ": tokenizer vocabulary does not match the model's"));
  auto backend = MakeBackend(device, threads > 0 ? threads : 0);
  if (!backend.ok()) return Fail("sample", backend.status());
  if (threads <= 0) (*backend)->SetThreads(static_cast<int>(std::thread::hardware_concurrency()));
  auto model = GptModel::Create(snap->config, backend->get(), 1, 1);
  if (!model.ok()) return Fail("sample", model.status());
  (*model)->SetParamsFromHost(snap->params);
  auto ids = (*tok)->Encode(prompt);
  if (ids.empty()) return Fail("sample", InvalidArgument("--prompt encodes to no tokens"));
  // Checked before anything is printed (Generate would refuse it only after the prompt was echoed).
  if (static_cast<int>(ids.size()) >= snap->config.ctx)
    return Fail("sample", InvalidArgument("--prompt is " + std::to_string(ids.size()) + " tokens; the model's context holds " +
                                          std::to_string(snap->config.ctx) + " (prompt and new tokens together)"));
  // One decode state for every sample (repacking the weights is the slow part of creating one); each sample
  // starts again at position 0, and attention reads only the positions that sample wrote.
  auto state = DecodeState::Create(model->get(), 1, snap->config.ctx, 0, *decode_dtype, /*repack=*/true,
                                   *half_kv);
  if (!state.ok()) return Fail("sample", state.status());
  if (g.max_new_tokens < 0) g.max_new_tokens = snap->config.ctx - static_cast<int>(ids.size());
  // Output that did not reach stdout (a full disk under `> file`, a closed pipe's EPIPE) is an error, not exit 0.
  auto stdout_failed = [] {
    const bool bad = std::fflush(stdout) != 0 || std::ferror(stdout);
    return bad ? Fail("sample", IoError(std::string("cannot write the output to stdout: ") + std::strerror(errno))) : 0;
  };
  for (int s = 0; s < num_samples; ++s) {
    GenerateOptions gs = g;
    gs.sampling.seed = g.sampling.seed + static_cast<uint64_t>(s);
    if (num_samples > 1) std::printf("--- sample %d ---\n", s + 1);
    std::fwrite(prompt.data(), 1, prompt.size(), stdout);
    // Timings: the prompt phase ends when the first new token is out; each later token is one decode step.
    using Clock = std::chrono::steady_clock;
    const auto t0 = Clock::now();
    Clock::time_point t_first;
    int pieces = 0;
    auto out = Generate(**state, **tok, ids, gs, [&](const std::string& piece) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
      if (pieces++ == 0) t_first = Clock::now();
      return true;
    });
    std::printf("\n");
    const auto t_end = Clock::now();
    if (int rc = stdout_failed(); rc != 0) return rc;
    if (!out.ok()) return Fail("sample", out.status());
    if (static_cast<int>(out->size()) < g.max_new_tokens && static_cast<int>(ids.size() + out->size()) >= snap->config.ctx)
      std::fprintf(stderr, "note: stopped after %zu of -n %d tokens: the model's context (%d tokens) is full\n",
                   out->size(), g.max_new_tokens, snap->config.ctx);
    if (timings && pieces > 0) {
      // Tokens, not text pieces: a token with no text of its own (a control token, part of a UTF-8 character)
      // is decoded all the same. (t_last - t_first would miss tokens after the last piece: until t_end.)
      const int decoded = static_cast<int>(out->size()) - 1;
      const double prompt_s = std::chrono::duration<double>(t_first - t0).count();
      const double decode_s = std::chrono::duration<double>(t_end - t_first).count();
      std::fprintf(stderr, "timings: prompt %zu tokens + first token in %.1f ms; decode %d tokens in %.3f s = %.2f tokens/s\n",
                   ids.size(), prompt_s * 1e3, decoded, decode_s, decode_s > 0 ? decoded / decode_s : 0.0);
    }
    if (print_ids) {
      std::string line = "prompt ids:";
      for (int32_t id : ids) line += " " + std::to_string(id);
      line += "\ngenerated ids:";
      for (int32_t id : *out) line += " " + std::to_string(id);
      std::fprintf(stderr, "%s\n", line.c_str());
    }
  }
  return stdout_failed();
}

}  // namespace keel::cli
