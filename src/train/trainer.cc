// trainer.cc: the per-worker training loop — data, forward/backward per micro-batch, exact or fast gradient
// reduction, clipping + AdamW, validation, metrics, and asynchronous atomic checkpoints.
#include "train/trainer.h"

#include <cblas.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "core/env.h"
#include "core/hash.h"
#include "data/dataset.h"
#include "model/gpt.h"
#include "train/bucket_reducer.h"
#include "train/checkpoint_io.h"
#include "train/exact_sum.h"

namespace keel {

Status ValidateTrainOptions(const TrainOptions& o) {
  if (o.data_dir.empty()) return InvalidArgument("--data is required");
  if (o.out_dir.empty()) return InvalidArgument("--out is required");
  GptConfig m = o.model;
  if (m.vocab == 0) m.vocab = 1;  // 0 = take it from the data; checked again once the data is open
  KEEL_RETURN_IF_ERROR(m.Validate());
  if (o.batch <= 0) return InvalidArgument("--batch must be positive (got " + std::to_string(o.batch) + ")");
  if (o.grad_accum <= 0) return InvalidArgument("--grad-accum must be positive");
  if (o.deterministic && o.grad_accum > kMaxExactMicroBatches)
    return InvalidArgument("--grad-accum above " + std::to_string(kMaxExactMicroBatches) +
                           " is not supported in deterministic mode (use --fast)");
  if (o.steps <= 0) return InvalidArgument("--steps must be positive");
  if (!(o.optim.lr > 0.0f) || !std::isfinite(o.optim.lr)) return InvalidArgument("--lr must be a positive number");
  if (o.optim.warmup < 0) return InvalidArgument("--warmup must be >= 0");
  if (o.threads < 0) return InvalidArgument("--threads must be >= 0");
  if (o.eval_every < 0 || o.checkpoint_every < 0) return InvalidArgument("--eval-every/--checkpoint-every must be >= 0");
  if (o.keep < 0) return InvalidArgument("--keep must be >= 0");
  return Status::Ok();
}

double MeasureGemmPeakGflops() {
  const int n = 768;
  std::vector<float> a(static_cast<size_t>(n) * n, 0.5f), b(a), c(a.size());
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
  auto t0 = std::chrono::steady_clock::now();
  int reps = 6;
  for (int i = 0; i < reps; ++i)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 2.0 * n * n * n * reps / s / 1e9;
}

namespace {

// Writes checkpoints on a background thread from an in-memory snapshot taken at a step boundary, so training
// continues while the files are written. At most one write is in flight; Wait() joins it.
class AsyncCheckpointer {
 public:
  AsyncCheckpointer(std::string run_dir, int keep) : run_dir_(std::move(run_dir)), keep_(keep) {}
  ~AsyncCheckpointer() { (void)Wait(); }
  // files: the encoded checkpoint (an in-memory snapshot of one step boundary).
  Status Start(std::vector<CheckpointFile> files, int64_t step) {
    KEEL_RETURN_IF_ERROR(Wait());
    thread_ = std::thread([this, files = std::move(files), step]() {
      result_ = WriteCheckpoint(run_dir_, step, files, keep_);
    });
    return Status::Ok();
  }
  Status Wait() {
    if (thread_.joinable()) thread_.join();
    Status s = result_;
    result_ = Status::Ok();
    return s;
  }

 private:
  std::string run_dir_;
  int keep_;
  std::thread thread_;
  Status result_;
};

// The [offset, count) range of the flat parameter buffer that gradient-readiness group g covers.
std::pair<size_t, size_t> GroupRange(const std::vector<ParamTensor>& tensors, int group) {
  size_t lo = SIZE_MAX, hi = 0;
  for (const auto& t : tensors)
    if (t.group == group) {
      lo = std::min(lo, t.offset);
      hi = std::max(hi, t.offset + t.size);
    }
  return {lo, hi - lo};
}

void DefaultLog(const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); }

std::string Fmt(const char* fmt, double a) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), fmt, a);
  return buf;
}

std::string FormatDuration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  int t = static_cast<int>(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof(buf), "%dh%02dm", t / 3600, (t / 60) % 60);
  else std::snprintf(buf, sizeof(buf), "%dm%02ds", t / 60, t % 60);
  return buf;
}

// Keeps only the metrics lines of steps before `step` (a resumed run rewrites what came after its checkpoint).
void TruncateMetrics(const std::string& path, int64_t step) {
  auto text = DefaultEnv()->ReadFile(path);
  if (!text.ok()) return;
  std::string kept;
  size_t pos = 0;
  while (pos < text->size()) {
    size_t nl = text->find('\n', pos);
    if (nl == std::string::npos) nl = text->size();
    std::string line = text->substr(pos, nl - pos);
    pos = nl + 1;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.contains("step") && j["step"].is_number() && j["step"].get<int64_t>() < step)
      kept += line + "\n";
  }
  (void)WriteFileAtomic(path, kept);
}

}  // namespace

Result<TrainResult> Train(const TrainOptions& opt_in, Communicator* comm, const std::atomic<bool>* stop,
                          const std::function<void(const std::string&)>& log_in) {
  auto log = log_in ? log_in : DefaultLog;
  TrainOptions o = opt_in;
  KEEL_RETURN_IF_ERROR(ValidateTrainOptions(o));
  Env* env = DefaultEnv();
  const int rank = comm->rank(), world = comm->size();
  const bool leader = rank == 0;

  KEEL_ASSIGN_OR_RETURN(Dataset data, Dataset::Open(o.data_dir));
  const std::string tokenizer_bytes = data.tokenizer().Serialize();

  // Run directory: a fresh run must not overwrite someone else's; a resumed one continues its own.
  const std::string run_json_path = JoinPath(o.out_dir, "run.json");
  TrainingSnapshot resume_snap;
  bool resuming = false;
  int64_t start_step = 0;
  if (env->Exists(o.out_dir)) {
    if (!env->IsDir(o.out_dir)) return InvalidArgument("--out " + o.out_dir + ": exists and is not a directory");
    KEEL_ASSIGN_OR_RETURN(auto entries, env->ListDir(o.out_dir));
    bool is_run = env->Exists(run_json_path);
    if (!entries.empty() && !is_run)
      return InvalidArgument("--out " + o.out_dir + ": exists, is not empty and is not a keel run directory");
    if (is_run && !o.resume)
      return InvalidArgument("--out " + o.out_dir + ": already holds a training run (pass --resume to continue it, "
                             "or choose another --out)");
    if (is_run) {
      KEEL_ASSIGN_OR_RETURN(std::string run_text, env->ReadFile(run_json_path));
      auto run_json = nlohmann::json::parse(run_text, nullptr, false);
      if (run_json.is_discarded() || !run_json.is_object())
        return Corrupt(run_json_path + ": not valid JSON");
      if (run_json.value("data_fingerprint", "") != data.fingerprint())
        return InvalidArgument("--out " + o.out_dir + ": the run was trained on different data (fingerprint " +
                               run_json.value("data_fingerprint", "?") + ", --data has " + data.fingerprint() + ")");
      KEEL_ASSIGN_OR_RETURN(auto ckpts, ListCheckpoints(o.out_dir));
      if (!ckpts.empty()) {
        std::vector<std::string> warnings;
        std::string dir;
        KEEL_ASSIGN_OR_RETURN(resume_snap, LoadSnapshot(o.out_dir, true, &warnings, &dir));
        if (leader)
          for (const auto& w : warnings) log("warning: " + w);
        if (resume_snap.tokenizer != tokenizer_bytes)
          return InvalidArgument("--data " + o.data_dir + ": its tokenizer does not match the checkpoint's (" + dir + ")");
        const GptConfig& c = resume_snap.config;
        if (o.model.ctx > c.ctx)
          return InvalidArgument("--ctx " + std::to_string(o.model.ctx) + " is longer than the checkpoint's position "
                                 "table (" + std::to_string(c.ctx) + ")");
        if (o.model.layers != c.layers || o.model.heads != c.heads || o.model.dim != c.dim || o.model.ctx != c.ctx)
          return InvalidArgument("model flags (--layers/--heads/--dim/--ctx) differ from the checkpoint's " +
                                 c.ToJson().dump() + " in " + dir);
        start_step = resume_snap.state["step"].get<int64_t>();
        resuming = true;
        if (leader) log("resuming from " + dir + " at step " + std::to_string(start_step));
      }
    }
  }
  if (resuming) o.model.vocab = resume_snap.config.vocab;
  if (o.model.vocab == 0) o.model.vocab = data.vocab_size();
  if (o.model.vocab < data.vocab_size())
    return InvalidArgument("--vocab " + std::to_string(o.model.vocab) + " is smaller than the tokenizer's vocabulary (" +
                           std::to_string(data.vocab_size()) + ")");
  KEEL_RETURN_IF_ERROR(o.model.Validate());
  KEEL_RETURN_IF_ERROR(data.CheckContext(o.model.ctx));
  // Every member has inspected --out before rank 0 creates the run in it (else a member sharing the directory
  // could find rank 0's fresh run.json and refuse it as "already holds a training run").
  if (world > 1) KEEL_RETURN_IF_ERROR(comm->Barrier());
  if (leader && !resuming) {
    KEEL_RETURN_IF_ERROR(env->CreateDirs(o.out_dir));
    nlohmann::json run = {{"keel_version", KEEL_VERSION}, {"model", o.model.ToJson()},
                          {"data", o.data_dir}, {"data_fingerprint", data.fingerprint()}, {"seed", o.seed}};
    KEEL_RETURN_IF_ERROR(WriteFileAtomic(run_json_path, run.dump(2) + "\n"));
  }

  KEEL_ASSIGN_OR_RETURN(auto backend, MakeBackend(o.device, o.threads > 0 ? o.threads : static_cast<int>(std::thread::hardware_concurrency())));
  const int B = o.batch, T = o.model.ctx, M = o.grad_accum;
  KEEL_ASSIGN_OR_RETURN(auto model, GptModel::Create(o.model, backend.get(), B, T));
  KEEL_ASSIGN_OR_RETURN(auto adam, AdamW::Create(backend.get(), model->tensors()));
  const size_t P = model->num_params();
  if (resuming) {
    model->SetParamsFromHost(resume_snap.params);
    backend->Upload(adam->m(), resume_snap.adam_m.data(), P);
    backend->Upload(adam->v(), resume_snap.adam_v.data(), P);
  } else {
    model->InitWeights(o.seed);
  }
  // One source of truth for the initial state: broadcast from rank 0, then every member checks the hash.
  if (world > 1) {
    std::vector<float> host = model->ParamsToHost();
    KEEL_RETURN_IF_ERROR(comm->Broadcast(host.data(), P * sizeof(float), 0));
    model->SetParamsFromHost(host);
    uint64_t h = Hash64(host.data(), P * sizeof(float));
    std::vector<uint64_t> all(static_cast<size_t>(world));
    KEEL_RETURN_IF_ERROR(comm->Allgather(&h, all.data(), sizeof(h)));
    for (int r = 0; r < world; ++r)
      if (all[r] != all[0]) return Internal("rank " + std::to_string(r) + " holds different initial weights after broadcast");
  }

  const std::string metrics_path = JoinPath(o.out_dir, "metrics.jsonl");
  std::unique_ptr<std::ofstream> metrics;
  if (leader) {
    if (resuming) TruncateMetrics(metrics_path, start_step);
    metrics = std::make_unique<std::ofstream>(metrics_path, std::ios::app);
    if (!*metrics) return IoError(metrics_path + ": cannot open for appending");
  }
  const double peak = o.peak_gflops > 0 ? o.peak_gflops : (leader ? MeasureGemmPeakGflops() : 1.0);
  const double flops_per_token = TrainFlopsPerToken(o.model, T);
  const int64_t tokens_per_step = static_cast<int64_t>(B) * T * M;
  if (leader)
    log("model: " + std::to_string(o.model.layers) + " layers, " + std::to_string(o.model.heads) + " heads, dim " +
        std::to_string(o.model.dim) + ", ctx " + std::to_string(T) + ", vocab " + std::to_string(o.model.vocab) + ", " +
        Fmt("%.2fM", P / 1e6) + " params; " + std::to_string(world) + " worker(s); " +
        (o.deterministic ? "deterministic" : "fast") + " mode; gemm peak " + Fmt("%.0f GFLOP/s", peak));

  std::vector<int32_t> inputs(static_cast<size_t>(B) * T), targets(inputs.size());
  // Host views of the gradients, moments and parameters: the backend's own buffers when they are host memory,
  // staging copies otherwise.
  const bool host = backend->host_memory();
  std::vector<float> staging(host ? 0 : P);
  float* grads = host ? model->grads() : staging.data();
  // Deterministic mode sums micro-batch gradients in fixed point. With a single worker and a single
  // micro-batch the sum has one term, so the gradient is rounded through fixed point in place instead.
  const bool exact_in_place = o.deterministic && world == 1 && M == 1;
  std::vector<int64_t> exact(o.deterministic && !exact_in_place ? P : 0);
  AsyncCheckpointer ckpt(o.out_dir, o.keep);
  BucketReducer reducer(comm);
  auto encode_checkpoint = [&](int64_t next_step) -> Result<std::vector<CheckpointFile>> {
    std::vector<float> p_copy, m_copy, v_copy;
    const float *p = model->params(), *m = adam->m(), *v = adam->v();
    if (!host) {
      p_copy = model->ParamsToHost();
      m_copy.resize(P);
      v_copy.resize(P);
      backend->Download(m_copy.data(), adam->m(), P);
      backend->Download(v_copy.data(), adam->v(), P);
      p = p_copy.data(), m = m_copy.data(), v = v_copy.data();
    }
    SnapshotView s;
    s.config = o.model;
    s.params = p;
    s.adam_m = m;
    s.adam_v = v;
    s.state = {{"step", next_step}, {"seed", o.seed}, {"data_fingerprint", data.fingerprint()},
               {"keel_version", KEEL_VERSION}, {"deterministic", o.deterministic}, {"batch", B},
               {"grad_accum", M}, {"steps", o.steps}, {"lr", o.optim.lr}, {"warmup", o.optim.warmup}};
    s.tokenizer = tokenizer_bytes;
    return EncodeSnapshot(s);
  };

  TrainResult result;
  result.final_step = start_step;
  const auto t_start = std::chrono::steady_clock::now();
  double tokens_done = 0, loop_seconds = 0;
  int64_t steps_this_run = 0;
  const bool tty = isatty(STDERR_FILENO);
  for (int64_t step = start_step; step < o.steps; ++step) {
    auto t0 = std::chrono::steady_clock::now();
    // (1) this worker's micro-batches: i = rank, rank + world, ...
    double loss_sum = 0, nonfinite = 0;
    if (!exact.empty()) std::fill(exact.begin(), exact.end(), 0);
    model->ZeroGrads();
    // This worker's micro-batches of the step: i = rank, rank + world, ... (< M).
    std::vector<int> mine;
    for (int i = rank; i < M; i += world) mine.push_back(i);
    // During the last local backward each finished layer's bucket goes to the reducer at once, so
    // communication overlaps the rest of backward. One worker needs no communication at all.
    const bool overlap = world > 1;
    auto on_bucket_ready = [&](int group) {
      const auto [off, count] = GroupRange(model->tensors(), group);
      if (!host) backend->Download(grads + off, model->grads() + off, count);
      if (o.deterministic) {
        nonfinite += static_cast<double>(AddFixedPoint(exact.data() + off, grads + off, count));
        reducer.SubmitInt64(exact.data() + off, count);
      } else {
        reducer.SubmitFloat(grads + off, count);
      }
    };
    for (size_t k = 0; k < mine.size(); ++k) {
      const bool last_local = k + 1 == mine.size();
      data.TrainMicroBatch(o.seed, step, mine[k], B, T, inputs.data(), targets.data());
      if (o.deterministic) model->ZeroGrads();
      float loss = model->Forward(inputs.data(), targets.data(), B, T);
      if (overlap && last_local) {
        model->Backward(on_bucket_ready);
      } else {
        model->Backward();
        if (!exact.empty()) {
          if (!host) backend->Download(grads, model->grads(), P);
          nonfinite += static_cast<double>(AddFixedPoint(exact.data(), grads, P));
        }
      }
      loss_sum += loss;
      if (!std::isfinite(loss)) nonfinite += 1;
    }
    // (2) reduce gradients across workers; average over the global batch.
    if (overlap && mine.empty()) {
      // More workers than micro-batches: this one contributes zeros to every bucket.
      if (o.deterministic) reducer.SubmitInt64(exact.data(), P);
      else reducer.SubmitFloat(grads, P);
    }
    if (overlap) KEEL_RETURN_IF_ERROR(reducer.Wait());
    if (!host && !overlap) backend->Download(grads, model->grads(), P);
    if (exact_in_place) {
      nonfinite += static_cast<double>(RoundThroughFixedPoint(grads, P));
    } else if (o.deterministic) {
      FixedPointToFloat(grads, exact.data(), P, 1.0 / M);
    } else {
      const float inv = 1.0f / static_cast<float>(M);
      for (size_t j = 0; j < P; ++j) grads[j] *= inv;
    }
    double stats[3] = {loss_sum, nonfinite, (stop && stop->load()) ? 1.0 : 0.0};
    KEEL_RETURN_IF_ERROR(comm->AllreduceSum(stats, 3));
    const float loss = static_cast<float>(stats[0] / M);
    // (3) the update, only if every gradient is finite.
    double gnorm = 0;
    if (stats[1] > 0 || !std::isfinite(loss)) {
      if (leader) log("warning: step " + std::to_string(step) + ": non-finite loss or gradient; update skipped");
    } else {
      if (!host) backend->Upload(model->grads(), grads, P);
      gnorm = adam->Step(model->params(), model->grads(), step, o.optim);
    }
    auto t1 = std::chrono::steady_clock::now();
    const double dt = std::chrono::duration<double>(t1 - t0).count();
    tokens_done += static_cast<double>(tokens_per_step);
    loop_seconds += dt;
    ++steps_this_run;
    result.final_step = step + 1;
    result.last_loss = loss;

    // Validation.
    float val_loss = -1;
    const bool last = step + 1 == o.steps;
    if (o.eval_every > 0 && ((step + 1) % o.eval_every == 0 || last)) {
      int nb = std::min(o.eval_batches, data.NumValBatches(B, T));
      double vs[2] = {0, 0};
      for (int j = rank; j < nb; j += world) {
        data.ValBatch(j, B, T, inputs.data(), targets.data());
        vs[0] += model->Forward(inputs.data(), targets.data(), B, T);
        vs[1] += 1;
      }
      KEEL_RETURN_IF_ERROR(comm->AllreduceSum(vs, 2));
      if (vs[1] > 0) val_loss = static_cast<float>(vs[0] / vs[1]);
      result.last_val_loss = val_loss;
    }
    if (leader) {
      const double tok_s = tokens_per_step / dt;
      const double mfu = flops_per_token * tok_s / (peak * 1e9);
      const double avg_tok_s = tokens_done / loop_seconds;
      const double eta = (o.steps - step - 1) * tokens_per_step / avg_tok_s;
      nlohmann::json m = {{"step", step}, {"loss", loss}, {"lr", LearningRate(o.optim, step)}, {"grad_norm", gnorm},
                          {"tokens_per_s", tok_s}, {"mfu", mfu}, {"step_ms", dt * 1e3}, {"workers", world},
                          {"elapsed_s", std::chrono::duration<double>(t1 - t_start).count()}};
      if (val_loss >= 0) m["val_loss"] = val_loss;
      *metrics << m.dump() << "\n";
      metrics->flush();
      std::string line = "step " + std::to_string(step + 1) + "/" + std::to_string(o.steps) + " | loss " +
                         Fmt("%.4f", loss) + " | " + Fmt("%.0f tok/s", tok_s) + " | MFU " + Fmt("%.1f%%", 100 * mfu) +
                         " | ETA " + FormatDuration(eta);
      if (val_loss >= 0) {
        if (o.progress && tty) std::fprintf(stderr, "\r\033[K");
        log(line + " | val " + Fmt("%.4f", val_loss));
      } else if (o.progress && tty) {
        std::fprintf(stderr, "\r\033[K%s", line.c_str());
        std::fflush(stderr);
      } else if (o.progress && (step + 1) % 10 == 0) {
        log(line);
      }
    }
    // Checkpoint at the boundary (rank 0 writes; the state is identical on every member).
    const bool stop_now = stats[2] > 0 || (o.stop_after > 0 && steps_this_run >= o.stop_after);
    // --checkpoint-every 0 disables checkpoints (benchmarks), except the one a stop request asks for.
    const bool want_ckpt = stop_now || (o.checkpoint_every > 0 && (last || (step + 1) % o.checkpoint_every == 0));
    if (want_ckpt && leader) {
      KEEL_ASSIGN_OR_RETURN(auto files, encode_checkpoint(step + 1));
      KEEL_RETURN_IF_ERROR(ckpt.Start(std::move(files), step + 1));
    }
    if (stop_now && !last) {
      result.stopped_early = true;
      if (leader) {
        if (o.progress && tty) std::fprintf(stderr, "\n");
        log("stopping at step " + std::to_string(step + 1) + " (checkpoint written)");
      }
      break;
    }
  }
  if (leader && o.progress && tty) std::fprintf(stderr, "\n");
  KEEL_RETURN_IF_ERROR(ckpt.Wait());
  return result;
}

}  // namespace keel
