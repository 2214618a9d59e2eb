// trainer.cc: the per-worker training loop — option checks, set-up (data, model, backend, resume), the loop and
// the step protocol's driver (Trainer::RunStep: quorum, compute, reduce, commit vote, apply; docs/step-protocol.md)
// with its quorum step, and the public entry points Train / TrainElastic. The Trainer class is declared in
// train/trainer_impl.h; steps (2)-(5) live in trainer_step.cc, the state handling in trainer_state.cc, and the
// run directory's checkpoints (end of job, reload from disk, cleanup) in trainer_run_dir.cc.
#include "train/trainer.h"

#include "train/trainer_impl.h"

#include <thread>
#include <tuple>

namespace keel {

Status ValidateTrainOptions(const TrainOptions& o) {
  if (o.data_dir.empty()) return InvalidArgument("--data is required");
  if (o.out_dir.empty()) return InvalidArgument("--out is required");
  GptConfig m = o.model;
  if (m.vocab == 0) m.vocab = 1;  // 0 = take it from the data; checked again once the data is open
  KEEL_RETURN_IF_ERROR(m.Validate());
  if (o.batch <= 0) return InvalidArgument("--batch must be positive (got " + std::to_string(o.batch) + ")");
  if (o.grad_accum <= 0) return InvalidArgument("--grad-accum must be positive");
  // Every mode plans, holds and votes on a step's micro-batches in 128-bit sets (MicroSet, VoteRecord), and the
  // fixed-point sum has headroom for 2^7 of them.
  if (o.grad_accum > kMaxExactMicroBatches)
    return InvalidArgument("--grad-accum must be at most " + std::to_string(kMaxExactMicroBatches) + " (got " +
                           std::to_string(o.grad_accum) + ")");
  if (o.steps <= 0) return InvalidArgument("--steps must be positive");
  if (!(o.optim.lr > 0.0f) || !std::isfinite(o.optim.lr)) return InvalidArgument("--lr must be a positive number");
  if (o.optim.warmup < 0) return InvalidArgument("--warmup must be >= 0");
  if (o.threads < 0 || o.threads > kMaxThreads)
    return InvalidArgument("--threads must be in [0, " + std::to_string(kMaxThreads) + "]");
  if (!(o.optim.weight_decay >= 0) || !std::isfinite(o.optim.weight_decay))
    return InvalidArgument("--weight-decay must be a number >= 0");
  if (!(o.optim.grad_clip >= 0) || !std::isfinite(o.optim.grad_clip))
    return InvalidArgument("--grad-clip must be a number >= 0 (0: off)");
  if (o.eval_batches < 1) return InvalidArgument("--eval-batches must be >= 1");
  if (o.stop_after < 0) return InvalidArgument("--stop-after must be >= 0 (0: never)");
  if (!(o.optim.min_lr_frac >= 0 && o.optim.min_lr_frac <= 1))
    return InvalidArgument("--min-lr-frac must be in [0, 1]");
  if (!(o.peak_gflops >= 0) || !std::isfinite(o.peak_gflops)) return InvalidArgument("--peak-gflops must be >= 0");
  if (o.eval_every < 0 || o.checkpoint_every < 0) return InvalidArgument("--eval-every/--checkpoint-every must be >= 0");
  if (o.keep < 0) return InvalidArgument("--keep must be >= 0");
  if (o.check_every < 0) return InvalidArgument("--check-every must be >= 0");
  if (!(o.verify_fraction >= 0 && o.verify_fraction <= 1)) return InvalidArgument("--verify-fraction must be in [0, 1]");
  if (o.verify_fraction > 0 && !o.deterministic)
    return InvalidArgument("--verify-fraction compares gradients bit for bit: it needs deterministic mode (not --fast)");
  if (!(o.spike_factor >= 0)) return InvalidArgument("--spike-factor must be >= 0");
  if (o.spike_factor > 0 && o.check_every == 0)
    return InvalidArgument("--spike-factor rolls back to the snapshot kept every --check-every steps: it needs "
                           "--check-every > 0");
  if (o.quarantine_after < 1) return InvalidArgument("--quarantine-after must be >= 1");
  if (o.quarantine_floor < 1) return InvalidArgument("--quarantine-floor must be >= 1");
  if (!(o.straggler_evict == 0 || o.straggler_evict > 1)) return InvalidArgument("--straggler-evict must be 0 or > 1");
  KEEL_RETURN_IF_ERROR(ValidateSyncOptions(o));
  return Status::Ok();
}

double MeasureGemmPeakGflops(Backend* device) {
  // Through the backend's own GEMM (the CPU's tiled, multi-threaded one by default): the peak keel's kernels
  // can reach here. A device backend gets a larger product (1024^3 is a few microseconds on a GPU) and is
  // synchronised before the clock is read.
  std::unique_ptr<Backend> cpu;
  Backend* be = device;
  if (!be) {
    cpu = MakeCpuBackend(omp_get_max_threads());
    be = cpu.get();
  }
  const bool host = be->host_memory();
  const int n = host ? 1024 : 4096, reps = host ? 2 : 10;
  const size_t nn = static_cast<size_t>(n) * n;
  std::vector<float> init(nn);
  for (size_t i = 0; i < nn; ++i) init[i] = 0.25f + static_cast<float>((i * 2654435761u) % 1000) * 1e-3f;  // not zeros
  float *a = nullptr, *b = nullptr, *c = nullptr;
  auto ra = be->Alloc(nn), rb = be->Alloc(nn), rc = be->Alloc(nn);
  double best = 0;
  if (ra.ok() && rb.ok() && rc.ok()) {
    a = *ra, b = *rb, c = *rc;
    be->Upload(a, init.data(), nn);
    be->Upload(b, init.data(), nn);
    be->MatmulForward(c, a, b, nullptr, n, n, n);
    // The best of several short trials: on a shared machine one slow trial would make every MFU look too high.
    for (int trial = 0; trial < 5 && be->Sync().ok(); ++trial) {
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < reps; ++i) be->MatmulForward(c, a, b, nullptr, n, n, n);
      if (!be->Sync().ok()) break;
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, 2.0 * n * n * static_cast<double>(n) * reps / s / 1e9);
    }
  }
  for (auto* r : {&ra, &rb, &rc})
    if (r->ok()) be->Free(r->value());
  return best;
}

Status CheckOutDirForNewOrResumedRun(Env* env, const std::string& out_dir, bool resume) {
  if (!env->Exists(out_dir)) {
    // It is created at the first metrics line or checkpoint: say now, not then, if it cannot be.
    return CheckCanCreateDir(env, out_dir, "--out " + out_dir);
  }
  if (!env->IsDir(out_dir)) return InvalidArgument("--out " + out_dir + ": exists and is not a directory");
  KEEL_ASSIGN_OR_RETURN(auto entries, env->ListDir(out_dir));
  const bool is_run = env->Exists(JoinPath(out_dir, "run.json"));
  // An elastic job's workers log events before the first commit writes run.json: a job that died that early
  // left a directory holding only keel's own logs, which --resume takes over. (Not a plain start: the same
  // directory is what a live job looks like while it waits for its workers, and two jobs must not share it.)
  const bool only_logs = std::all_of(entries.begin(), entries.end(), [](const std::string& e) {
    return e == "events.jsonl" || e == "metrics.jsonl";
  });
  if (!entries.empty() && !is_run && only_logs && !resume)
    return InvalidArgument("--out " + out_dir + ": holds only the logs of a job that has not committed a step (it "
                           "ended early, or is still starting): pass --resume to continue it there, or choose "
                           "another --out");
  if (!entries.empty() && !is_run && !only_logs)
    return InvalidArgument("--out " + out_dir + ": exists, is not empty and is not a keel run directory");
  if (is_run && !resume)
    return InvalidArgument("--out " + out_dir + ": already holds a training run (pass --resume to continue it, "
                           "or choose another --out)");
  return Status::Ok();
}

namespace trainer_support {

// ---- set-up ---------------------------------------------------------------------------------------------

// True when no listed checkpoint carries its COMMITTED marker: none was ever committed (a crash between the
// rename and the marker of the run's first write), so there is nothing to resume from.
bool NoneCommitted(const std::vector<CheckpointInfo>& ckpts) {
  for (const auto& c : ckpts)
    if (CheckpointCommitted(c.dir)) return false;
  return true;
}

Status Trainer::InspectRunDir() {
  // A fresh run must not overwrite someone else's; a resumed one continues its own. --resume with nothing to
  // resume starts a new run (so one command line both starts and continues a job), and says so.
  const Dataset& data = *data_;
  const auto fresh = [&](const std::string& why) {
    if (o_.resume && o_.launch_rank == 0) log_("--resume: " + why + ": starting a new run");
    return Status::Ok();
  };
  KEEL_RETURN_IF_ERROR(CheckOutDirForNewOrResumedRun(env_, o_.out_dir, o_.resume));
  if (!env_->Exists(o_.out_dir)) return fresh("--out " + o_.out_dir + " does not exist");
  if (!env_->Exists(run_json_path_)) return fresh("--out " + o_.out_dir + " holds no run yet");
  KEEL_ASSIGN_OR_RETURN(std::string run_text, env_->ReadFile(run_json_path_));
  auto run_json = nlohmann::json::parse(run_text, nullptr, false);
  if (run_json.is_discarded()) return Corrupt(run_json_path_ + ": not valid JSON");
  if (!run_json.is_object()) return Corrupt(run_json_path_ + ": expected a JSON object");
  // A hand-edited run.json: a number or null here made nlohmann's value() throw out of keel.
  if (!run_json.contains("data_fingerprint") || !run_json["data_fingerprint"].is_string())
    return Corrupt(run_json_path_ + ": data_fingerprint is missing or not a string");
  const std::string run_fp = run_json["data_fingerprint"].get<std::string>();
  if (run_fp != data.fingerprint())
    return InvalidArgument("--out " + o_.out_dir + ": the run was trained on different data (fingerprint " + run_fp +
                           ", --data has " + data.fingerprint() + ")");
  KEEL_ASSIGN_OR_RETURN(auto ckpts, ListCheckpoints(o_.out_dir));
  if (ckpts.empty()) return fresh("--out " + o_.out_dir + " holds no checkpoint yet");
  // A crash while the first checkpoint was being committed (renamed into place, no marker yet): as if it had come
  // a moment earlier, when only its .tmp existed.
  if (NoneCommitted(ckpts)) return fresh("--out " + o_.out_dir + " holds no committed checkpoint yet");
  std::vector<std::string> warnings;
  std::string dir;
  KEEL_ASSIGN_OR_RETURN(resume_snap_, LoadSnapshot(o_.out_dir, true, &warnings, &dir));
  if (o_.launch_rank == 0)
    for (const auto& w : warnings) log_("warning: " + w);
  if (resume_snap_.tokenizer != tokenizer_bytes_)
    return InvalidArgument("--data " + o_.data_dir + ": its tokenizer does not match the checkpoint's (" + dir + ")");
  KEEL_RETURN_IF_ERROR(CheckSnapshotData(resume_snap_, dir));
  const GptConfig& c = resume_snap_.config;
  // --vocab 0 (the default) means "the data's"; a resume then takes the checkpoint's.
  const bool vocab_differs = o_.model.vocab != 0 && o_.model.vocab != c.vocab;
  if (o_.model.layers != c.layers || o_.model.heads != c.heads || o_.model.dim != c.dim || o_.model.ctx != c.ctx ||
      vocab_differs) {
    const std::string why =
        o_.model.ctx > c.ctx ? "--ctx " + std::to_string(o_.model.ctx) + " is longer than the checkpoint's position table ("
                                   + std::to_string(c.ctx) + ")"
                             : "model flags (--layers/--heads/--dim/--ctx/--vocab) differ from the checkpoint's";
    return InvalidArgument(why + ": resume with --layers " + std::to_string(c.layers) + " --heads " +
                           std::to_string(c.heads) + " --dim " + std::to_string(c.dim) + " --ctx " +
                           std::to_string(c.ctx) + (vocab_differs ? " --vocab " + std::to_string(c.vocab) : "") +
                           " (" + dir + ")");
  }
  // The seed and the batch shape choose every micro-batch's data (dataset.h), so a resume with other values
  // would silently train on another data stream than the run it continues: refuse, naming the value to pass.
  // (Checkpoints from before these fields were stored have none to compare.)
  for (const auto& [flag, key, mine] : {std::tuple<std::string, std::string, nlohmann::json>{"--seed", "seed", o_.seed},
                                        {"--batch", "batch", o_.batch},
                                        {"--grad-accum", "grad_accum", o_.grad_accum},
                                        // The other optimizer would silently take over these moments (AdamW's,
                                        // or SGD's zeros).
                                        {"--optimizer", "optimizer", o_.optimizer}}) {
    const nlohmann::json& theirs = resume_snap_.state.value(key, nlohmann::json());
    auto show = [](const nlohmann::json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); };
    if ((theirs.is_number_integer() || theirs.is_string()) && theirs != mine)
      return InvalidArgument(flag + " " + show(mine) + " differs from the run's " + show(theirs) + " (" + dir +
                             "): pass " + flag + " " + show(theirs) + " to continue it, or choose another --out");
  }
  // Settings a resume may change on purpose (a new learning rate for the rest of a run), but which a forgotten
  // flag changes silently: say so, since the continuation is then not the run's own.
  if (o_.launch_rank == 0)
    for (const auto& [flag, key, mine] :
         {std::tuple<std::string, std::string, nlohmann::json>{"--lr", "lr", o_.optim.lr},
          {"--warmup", "warmup", o_.optim.warmup},
          {"--deterministic", "deterministic", o_.deterministic},
          {"--sync", "sync", o_.sync},
          {"--compress", "compress", o_.compress}}) {
      const nlohmann::json& theirs = resume_snap_.state.value(key, nlohmann::json());
      const bool comparable = theirs.is_number() ? mine.is_number() : theirs.type() == mine.type();
      if (theirs.is_null() || !comparable || theirs == mine) continue;
      auto show = [](const nlohmann::json& v) {
        if (v.is_number_float()) return Fmt("%g", v.get<double>());
        return v.is_string() ? v.get<std::string>() : v.dump();
      };
      log_("warning: " + flag + " " + show(mine) + " differs from the run's " + show(theirs) + " (" + dir +
           "): the run goes on with the new value (pass " + flag + " " + show(theirs) + " to continue it as it was)");
    }
  start_step_ = resume_snap_.state["step"].get<int64_t>();
  if (resume_snap_.state.contains("data_offset") && resume_snap_.state["data_offset"].is_number_integer())
    resume_data_offset_ = resume_snap_.state["data_offset"].get<int64_t>();
  resuming_ = true;
  if (o_.launch_rank == 0) log_("resuming from " + dir + " at step " + std::to_string(start_step_));
  return Status::Ok();
}

Status Trainer::Open() {
  KEEL_ASSIGN_OR_RETURN(Dataset data, Dataset::Open(o_.data_dir));
  data_.emplace(std::move(data));
  tokenizer_bytes_ = data_->tokenizer().Serialize();
  run_json_path_ = JoinPath(o_.out_dir, "run.json");
  const bool joiner = elastic_ && elastic_->joined_running_job();
  if (!joiner) KEEL_RETURN_IF_ERROR(InspectRunDir());
  if (resuming_) o_.model.vocab = resume_snap_.config.vocab;
  // A joiner (a restarted worker) skips the run-directory inspection that gave the others the checkpoint's
  // vocabulary for --vocab 0: it takes the one the run recorded, so that its model has the group's size.
  if (joiner && o_.model.vocab == 0 && env_->Exists(run_json_path_)) {
    auto text = env_->ReadFile(run_json_path_);
    const auto run = text.ok() ? nlohmann::json::parse(*text, nullptr, false) : nlohmann::json();
    if (run.is_object() && run.contains("model") && run["model"].is_object() && run["model"].contains("vocab") &&
        run["model"]["vocab"].is_number_integer())
      o_.model.vocab = run["model"]["vocab"].get<int>();
  }
  if (o_.model.vocab == 0) o_.model.vocab = data_->vocab_size();
  if (o_.model.vocab < data_->vocab_size())
    return InvalidArgument("--vocab " + std::to_string(o_.model.vocab) + " is smaller than the tokenizer's vocabulary (" +
                           std::to_string(data_->vocab_size()) + ")");
  KEEL_RETURN_IF_ERROR(o_.model.Validate());
  KEEL_RETURN_IF_ERROR(data_->CheckContext(o_.model.ctx));

  KEEL_ASSIGN_OR_RETURN(backend_, MakeBackend(o_.device, o_.threads > 0 ? o_.threads
                                                                        : static_cast<int>(std::thread::hardware_concurrency())));
  B_ = o_.batch, T_ = o_.model.ctx, M_ = o_.grad_accum;
  KEEL_ASSIGN_OR_RETURN(model_, GptModel::Create(o_.model, backend_.get(), B_, T_));
  KEEL_ASSIGN_OR_RETURN(adam_, AdamW::Create(backend_.get(), model_->tensors()));
  P_ = model_->num_params();
  KEEL_ASSIGN_OR_RETURN(codec_, ParseCodec(o_.compress));
  KEEL_ASSIGN_OR_RETURN(optim_kind_, ParseOptimizer(o_.optimizer));
  if (o_.sync == "diloco")
    diloco_ = std::make_unique<Diloco>(DilocoConfig{o_.inner_steps, o_.outer_lr, o_.outer_momentum, codec_}, P_);
  host_ = backend_->host_memory();
  staging_.resize(host_ ? 0 : P_);
  grads_host_ = host_ ? model_->grads() : staging_.data();
  inputs_.resize(static_cast<size_t>(B_) * T_);
  targets_.resize(inputs_.size());
  in_place_ = !elastic_ && static_comm_->size() == 1 && M_ == 1 && o_.deterministic && !diloco_ &&
              codec_ == Codec::kNone;
  if (o_.deterministic && !in_place_ && !diloco_) acc_.assign(P_, 0);  // (diloco sums in its own buffer)
  ckpt_ = std::make_unique<AsyncCheckpointer>(o_.out_dir, o_.keep, [this](const std::string& w) { log_(w); });
  flops_per_token_ = TrainFlopsPerToken(o_.model, T_);
  tokens_per_step_ = static_cast<int64_t>(B_) * T_ * M_;
  tty_ = isatty(STDERR_FILENO);
  if (!joiner) KEEL_RETURN_IF_ERROR(LoadInitialState());
  return Status::Ok();
}

Status Trainer::LoadInitialState() {
  ckpt_->WaitEncoded();
  const bool resuming = resuming_;
  if (resuming_) {
    model_->SetParamsFromHost(resume_snap_.params);
    backend_->Upload(adam_->m(), resume_snap_.adam_m.data(), P_);
    backend_->Upload(adam_->v(), resume_snap_.adam_v.data(), P_);
    if (diloco_) {
      if (resume_snap_.outer_momentum.size() == P_)
        std::memcpy(diloco_->momentum(), resume_snap_.outer_momentum.data(), P_ * sizeof(float));
      else
        std::fill(diloco_->momentum(), diloco_->momentum() + P_, 0.0f);  // from a ddp checkpoint
    }
    const nlohmann::json& stats = resume_snap_.state.value("loss_stats", nlohmann::json());
    loss_mean_ = loss_var_ = 0;
    loss_n_ = 0;
    if (stats.is_object() && stats.value("loss_n", nlohmann::json()).is_number_integer() &&
        stats.value("loss_mean", nlohmann::json()).is_number() && stats.value("loss_var", nlohmann::json()).is_number()) {
      loss_mean_ = stats["loss_mean"].get<double>();
      loss_var_ = stats["loss_var"].get<double>();
      loss_n_ = stats["loss_n"].get<int64_t>();
    }
    step_ = start_step_;
    data_offset_ = resume_data_offset_;
    resume_snap_ = TrainingSnapshot();  // free the copies
  } else {
    model_->InitWeights(o_.seed);
    if (backend_->host_memory()) {  // no P-sized temporary (0.5 GB at GPT-2 small)
      std::fill(adam_->m(), adam_->m() + P_, 0.0f);
      std::fill(adam_->v(), adam_->v() + P_, 0.0f);
    } else {
      std::vector<float> zero(P_, 0.0f);
      backend_->Upload(adam_->m(), zero.data(), P_);
      backend_->Upload(adam_->v(), zero.data(), P_);
    }
    if (diloco_) std::fill(diloco_->momentum(), diloco_->momentum() + P_, 0.0f);
    step_ = 0;
    data_offset_ = 0;
  }
  epoch_ = 0;
  has_state_ = true;
  ++moments_version_;
  // Not part of a checkpoint (docs/step-protocol.md): a group reloaded from disk measures speeds and counts
  // strikes afresh, the same on members that survived and members that restarted.
  speed_.clear();
  strikes_.v.clear();
  // A spike right after a resume rolls back to the checkpoint's state (a verified state: every file's checksum
  // was checked): the snapshot of the uninterrupted run, taken at a --check-every step before the checkpoint,
  // is not in the checkpoint. From the next --check-every step on, snapshots are the same in both runs.
  if (resuming && o_.spike_factor > 0) TakeSnapshot();
  return Status::Ok();
}

void Trainer::Emit(const std::string& event, nlohmann::json fields) {
  if (!events_->is_open()) events_->Open(JoinPath(o_.out_dir, "events.jsonl"));
  events_->Emit(event, std::move(fields));
}

// ---- the training loop ------------------------------------------------------------------------------------

Result<TrainResult> Trainer::Run(Communicator* static_comm, ElasticGroup* elastic) {
  static_comm_ = static_comm;
  elastic_ = elastic;
  if (!elastic_) {
    o_.launch_rank = static_comm_->rank();
    o_.launch_world = static_comm_->size();
  } else if (elastic_->events()) {
    events_ = elastic_->events();
  }
  KEEL_RETURN_IF_ERROR(ValidateTrainOptions(o_));
  // The cosine decay ends at the run's last step (--steps), as documented. It used to stay at OptimConfig's
  // default of 1000 steps whatever --steps was, so a shorter run never decayed its learning rate.
  o_.optim.total_steps = o_.steps;
  // The group's watchdog holds a raw pointer to the generation's communicator, which this Trainer owns: on every
  // way out of Run (errors and --stop-after included, not only the last step) it must forget it, or a peer
  // leaving later would make the heartbeat thread abort a freed communicator.
  struct UnwatchOnExit {
    ElasticGroup* group;
    ~UnwatchOnExit() {
      if (group) group->Unwatch();
    }
  } unwatch_on_exit{elastic_};
  uid_ = elastic_ ? elastic_->uid() : static_comm_->rank();
  KEEL_RETURN_IF_ERROR(Open());
  if (elastic_) {
    // (Compressed: every member's encoded block goes to every other through an allgather; trainer_step's
    // CompressedSum sends 8 bytes of header with it.)
    const double block = codec_ == Codec::kNone ? 0.0 : 8.0 + static_cast<double>(EncodedBytes(codec_, P_));
    elastic_->SetPayloadBytes(static_cast<double>(P_) * (o_.deterministic ? 8 : 4), block);
  }
  KEEL_ASSIGN_OR_RETURN(inject_, FaultInjector::Create(o_.inject, o_.launch_rank, o_.launch_world));
  if (inject_) {  // (parsed already by Create: a fault training never fires is refused, not ignored)
    const auto specs = ParseFaultSpec(o_.inject);
    for (const FaultSpec& f : specs.value())
      if (f.kind == FaultSpec::kDeviceFail)
        return InvalidArgument("--inject: device-fail is a keel serve fault; training does not inject it");
  }
  if (inject_) {
    inject_->SetEvents(events_);
    if (elastic_) inject_->SetClaim([this](const std::string& id) { return elastic_->Claim("inject/" + id); });
    double mbit = 0, latency_ms = 0;
    if (inject_->LinkLimit(&mbit, &latency_ms)) link_ = LinkLimit{mbit, latency_ms};
  }
  events_->SetIdentity(elastic_ ? uid_ : -1, o_.launch_rank);
  if (elastic_ && !events_->is_open()) events_->Open(JoinPath(o_.out_dir, "events.jsonl"));
  // Launch rank 0 measures the GEMM peak (for MFU; alone, so the measurement is not shared with the others);
  // elastic members adopt the largest measurement in the group's state sync, whoever leads.
  const bool joiner = elastic_ && elastic_->joined_running_job();
  // A device backend (the GPU): its own GEMM's peak at the precision it runs.
  peak_ = o_.peak_gflops > 0 ? o_.peak_gflops
                             : (o_.launch_rank == 0 && !joiner ? MeasureGemmPeakGflops(host_ ? nullptr : backend_.get())
                                                              : 0.0);
  // One worker, one micro-batch, deterministic, on a device: the gradient is rounded where it lies (no 2 x P
  // floats through the host per step). Fault injection and cross-checks read the gradient on the host.
  device_round_ = in_place_ && !host_ && !inject_ && o_.verify_fraction <= 0 &&
                  backend_->SupportsOp(Op::kRoundThroughFixedPoint);
  if (o_.launch_rank == 0 && !(elastic_ && elastic_->joined_running_job()))
    log_("model: " + std::to_string(o_.model.layers) + " layers, " + std::to_string(o_.model.heads) + " heads, dim " +
         std::to_string(o_.model.dim) + ", ctx " + std::to_string(T_) + ", vocab " + std::to_string(o_.model.vocab) +
         ", " + Fmt("%.2fM", P_ / 1e6) + " params; " +
         std::to_string(elastic_ ? o_.launch_world : static_comm_->size()) + " worker(s)" +
         (elastic_ ? " (elastic: " + elastic_->options().t.Describe() + ")" : std::string()) + "; " +
         (o_.deterministic ? "deterministic" : "fast") + " mode; gemm peak " + Fmt("%.0f GFLOP/s", peak_) +
         (diloco_ ? "; diloco: " + std::to_string(o_.inner_steps) + " inner steps per round, outer lr " +
                        Fmt("%g", o_.outer_lr) + Fmt(", momentum %g", o_.outer_momentum)
                  : std::string()) +
         (codec_ != Codec::kNone ? "; --compress " + o_.compress : std::string()));
  result_.final_step = step_;
  t_start_ = Clock::now();
  for (;;) {
    while (!finished_) {
      KEEL_ASSIGN_OR_RETURN(bool more, RunStep());
      if (!more) break;
    }
    if (!elastic_ || finished_ || step_ < o_.steps) break;
    KEEL_RETURN_IF_ERROR(FinishElasticJob());
    // A re-form while finishing can bring back an unfinished state (a rollback's newer epoch): train on.
    if (finished_ || step_ >= o_.steps || result_.stopped_early) break;
  }
  if (leader() && o_.progress && tty_) std::fprintf(stderr, "\n");
  KEEL_RETURN_IF_ERROR(ckpt_->Wait());
  KEEL_RETURN_IF_ERROR(deferred_ckpt_error_);
  if (leader()) DropAbandonedAfterCommit();
  result_.wire_bytes = wire_->bytes_sent.load();
  result_.steps_this_run = steps_this_run_;
  log_("wire: " + Fmt("%.3f MB", result_.wire_bytes / 1e6) + " sent by this worker in " +
         std::to_string(wire_->collectives.load()) + " collectives over " + std::to_string(steps_this_run_) +
         (diloco_ ? " outer rounds" : " steps") + " (" + o_.sync + ", --compress " + o_.compress + ")" +
         (link_.active() ? "; link emulation " + Fmt("%.0f Mbit/s", link_.mbit) + Fmt(", %.0f ms", link_.latency_ms) +
                               Fmt(": %.1f s of delays", wire_->emulated_us.load() / 1e6)
                         : std::string()));
  // (Not a member that was stopped, nor one evicted meanwhile: its view of who leads is stale.)
  if (elastic_ && leader() && step_ >= o_.steps && !result_.stopped_early) {
    auto evicted = elastic_->EvictedSince(gen_no_, elastic_->uid());
    if (!(evicted.ok() && *evicted)) (void)elastic_->MarkDone(step_);
  }
  // A member that stopped early tells the members still waiting for a generation (store key "stopped"): without
  // it, a stop committed by only part of the group (a peer lost in the vote) left the rest waiting below
  // --min-workers for ever.
  if (elastic_ && result_.stopped_early) (void)elastic_->MarkStopped(step_);
  // Every member of a group logs it (tests compare the members with each other and with a one-process run).
  if ((elastic_ ? has_state_ : size_ > 1) && step_ >= o_.steps)
    log_("final state: step " + std::to_string(step_) + ", hash " + HashHex(StateHash()));
  result_.final_step = step_;
  return result_;
}

// The step protocol (docs/step-protocol.md). Each attempt: (1) quorum, (2) compute, (3) reduce, (4) vote,
// (5) apply. Any failure before (5) aborts the attempt on every member; the step is redone — by a re-formed
// group when the failure was a member's (crash, hang, eviction), by the same group otherwise — with the
// micro-batches redistributed (holdings that are still valid are kept, so only lost work is recomputed).
// Returns false when training ends (finished, stopped, or the job is done) instead of committing a step.
Result<bool> Trainer::RunStep() {
  const auto t0 = Clock::now();
  // attempt counts this member's attempts at the step (reported); gen_attempt counts the group's attempts in the
  // current generation, which every member agrees on (a joiner admitted mid-step starts at 0 with the others), for
  // what must be identical across members: the cross-check plan and the keys of the collectives they wait in.
  int gen_attempt = 0;
  int64_t attempt_gen = -1;
  for (int attempt = 0;; ++attempt) {
    // (1) Quorum: the members agree on the generation (a new one first synchronises the training state, so
    //     they also agree on the step: the newest state wins, joiners receive it here).
    KEEL_ASSIGN_OR_RETURN(bool have_group, Quorum());
    if (!have_group) return false;
    if (step_ >= o_.steps) return false;
    gen_attempt = gen_no_ == attempt_gen ? gen_attempt + 1 : 0;
    attempt_gen = gen_no_;
    if (elastic_ && elastic_->generation_dead()) {
      KEEL_RETURN_IF_ERROR(GroupFailed(Aborted(elastic_->dead_reason())));
      continue;
    }
    // (2) Compute this member's share: the micro-batches of the step that no member holds yet.
    const Plan plan = MakePlan(gen_attempt, attempt);
    const auto t_compute = Clock::now();
    Compute(plan);
    const auto t_reduce = Clock::now();
    // (3) Reduce (started during (2): buckets go out as backward finishes them). Bounded: a dead member fails
    //     it at once, a hung one via the heartbeat watchdog's Abort, a collective every member is stuck in via
    //     the same watchdog, anything else at the collective backstop.
    std::string wait_key = "g";  // (appended, not "g" + ...: GCC 12 warns falsely (-Wrestrict) on that form)
    wait_key += std::to_string(gen_no_) + "/s" + std::to_string(step_) + "/a" + std::to_string(gen_attempt);
    if (elastic_) elastic_->SetWaiting(wait_key + "/reduce");
    Status reduced = FinishReduce();
    if (elastic_) elastic_->SetWaiting("");
    if (!reduced.ok()) {
      KEEL_RETURN_IF_ERROR(GroupFailed(reduced));
      continue;
    }
    // (4) Commit vote: every member reports what it contributed and its checks (non-finite values, parameter
    //     and state hashes, cross-checked gradients); the outcome is a pure function of the gathered votes.
    const auto t_vote = Clock::now();
    std::vector<VoteRecord> records;
    if (elastic_) elastic_->SetWaiting(wait_key + "/vote");
    auto vote = VoteOnStep(&records);
    if (elastic_) elastic_->SetWaiting("");
    if (!vote.ok()) {
      KEEL_RETURN_IF_ERROR(GroupFailed(vote.status()));
      continue;
    }
    if (!vote->commit) {
      KEEL_RETURN_IF_ERROR(Abort(*vote, records, attempt));
      continue;
    }
    // (5) Only now: the optimizer step.
    const auto t_apply = Clock::now();
    const double gnorm = Apply(*vote, records);
    phase_ms_ = {std::chrono::duration<double>(t_reduce - t_compute).count() * 1e3,
                 std::chrono::duration<double>(t_vote - t_reduce).count() * 1e3,
                 std::chrono::duration<double>(t_apply - t_vote).count() * 1e3, Since(t_apply) * 1e3};
    return AfterCommit(*vote, gnorm, Since(t0), attempt + 1);
  }
}

// (1) Quorum.
Result<bool> Trainer::Quorum() {
  for (;;) {
    if (need_group_) {
      if (!elastic_) {
        if (comm_) return Internal("a static group cannot re-form");
        comm_ = static_comm_;
        comm_sp_ = Meter(std::shared_ptr<Communicator>(static_comm_, [](Communicator*) {}));  // not ours
        comm_ = comm_sp_.get();
        index_ = comm_->rank();
        size_ = comm_->size();
        members_.clear();
        for (int r = 0; r < size_; ++r) members_.push_back(r);
        gen_no_ = 0;
      } else {
        elastic_->SetProgress(step_, epoch_, has_state_);
        if (reducer_ && reducer_->abandoned()) {
          // A collective of the old group is still blocked (its communicator did not wake on Abort): it keeps
          // the old buffers; this member continues with new ones.
          red_ = std::make_shared<std::vector<int64_t>>();
          redf_ = std::make_shared<std::vector<float>>();
          cred_ = std::make_shared<std::vector<float>>();
          ef_ = std::make_shared<ErrorFeedback>();  // it may still be encoding into the old one
          if (diloco_) diloco_->ResetFeedback();
        }
        reducer_.reset();
        elastic_->Unwatch();
        comm_ = nullptr;
        // A voluntary re-form keeps the old sockets open until the new group exists (members still finishing
        // the last collective of the committed step must not see them close); a failed group is dropped.
        std::shared_ptr<Communicator> old_comm = std::move(comm_sp_);
        if (!voluntary_) old_comm.reset();
        gen_ = Generation();
        auto g = elastic_->NextGeneration(stop_, voluntary_);
        old_comm.reset();
        if (!g.ok()) {
          if (g.status().code() == Code::kAborted && stop_ && stop_->load()) {
            result_.stopped_early = true;
            finished_ = true;
            return false;
          }
          return g.status();
        }
        if (g->done) {
          log_("the job has finished; nothing left to do");
          finished_ = true;
          return false;
        }
        if (g->stopped) {
          log_("another member stopped the job (a stop request); stopping too");
          result_.stopped_early = true;
          finished_ = true;
          return false;
        }
        gen_ = std::move(*g);
        uid_ = elastic_->uid();
        comm_sp_ = Meter(std::shared_ptr<Communicator>(std::move(gen_.comm)));
        comm_ = comm_sp_.get();
        elastic_->WatchCommunicator(comm_);  // the watchdog's abort also ends an emulated link's sleep
        index_ = gen_.index;
        size_ = static_cast<int>(gen_.members.size());
        members_ = gen_.members;
        gen_no_ = gen_.gen;
        log_("generation " + std::to_string(gen_no_) + ": members " + UidList(members_) + ", this is member " +
             std::to_string(uid_) + ", formed in " + Fmt("%.0f ms", gen_.formed_s * 1e3));
      }
      reducer_ = std::make_unique<BucketReducer>(comm_sp_);
      if (size_ > 1 && !diloco_) {
        if (codec_ != Codec::kNone) redf_->resize(P_), cred_->resize(P_);
        else if (o_.deterministic) red_->resize(P_);
        else redf_->resize(P_);
      }
      reducer_->KeepAlive(red_);
      reducer_->KeepAlive(redf_);
      reducer_->KeepAlive(cred_);
      reducer_->KeepAlive(ef_);
      need_group_ = false;
      voluntary_ = false;
      need_sync_ = true;
      uid_ = elastic_ ? elastic_->uid() : uid_;
    }
    if (need_sync_) {
      Status s = SyncState();
      // This member's model does not match the group's (see TransferState): no re-form can fix that.
      if (s.code() == Code::kInvalidArgument) return s;
      if (!s.ok()) {
        KEEL_RETURN_IF_ERROR(GroupFailed(s));
        continue;
      }
      if (elastic_) {
        elastic_->SetProgress(step_, epoch_, has_state_);
        Emit("generation", {{"gen", gen_no_}, {"members", members_}, {"index", index_}, {"step", step_},
                            {"formed_ms", gen_.formed_s * 1e3}});
      }
    }
    return true;
  }
}

std::function<bool()> Trainer::GiveUp() {
  if (!elastic_) return nullptr;
  const double after = std::min(1.0, 0.5 * elastic_->options().t.hang_s);
  return [this, after] { return elastic_->generation_dead() && elastic_->dead_for() > after; };
}

Status Trainer::Collective(std::function<Status(Communicator*)> op) { return reducer_->Run(std::move(op), GiveUp()); }

Status Trainer::GroupFailed(const Status& why, bool counted) {
  if (!counted) ++result_.attempts_failed;
  if (!elastic_) return why;
  log_("step " + std::to_string(step_ + 1) + ": attempt failed in generation " + std::to_string(gen_no_) + ": " +
       why.message() + "; re-forming");
  Emit("attempt_failed", {{"step", step_}, {"gen", gen_no_}, {"reason", why.message()}});
  if (faults_pending_since_step_ < 0) {
    faults_pending_since_step_ = step_;
    fault_t_ = EventLog::Now();
  }
  if (comm_) comm_->Abort();  // the peers waiting on this member fail at once instead of at a timeout
  // A non-finite micro-batch of this attempt left its finite part in the gradient sum (the fixed-point sum skips
  // only the non-finite elements; a fast-mode sum takes all of it), which only the vote would have cleared: the
  // holdings kept for the next attempt must not carry it, so they go (this member computes its share again).
  if (!bad_.Empty()) ClearHoldings();
  need_group_ = true;
  voluntary_ = false;
  return Status::Ok();
}

}  // namespace trainer_support


Result<TrainResult> Train(const TrainOptions& o, Communicator* comm, const std::atomic<bool>* stop,
                          const std::function<void(const std::string&)>& log) {
  trainer_support::Trainer t(o, stop, log);
  return t.Run(comm, nullptr);
}

Result<TrainResult> TrainElastic(const TrainOptions& o, ElasticGroup* group, const std::atomic<bool>* stop,
                                 const std::function<void(const std::string&)>& log) {
  trainer_support::Trainer t(o, stop, log);
  return t.Run(nullptr, group);
}

}  // namespace keel
