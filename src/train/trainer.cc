// trainer.cc: the per-worker training loop — data, forward/backward per micro-batch, exact or fast gradient
// reduction, clipping + AdamW, validation, metrics, asynchronous atomic checkpoints — organised around the step
// protocol of docs/step-protocol.md (Trainer::RunStep): quorum, compute, reduce, commit vote, apply.
#include "train/trainer.h"

#include <omp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "core/env.h"
#include "core/hash.h"
#include "data/dataset.h"
#include "dist/compress.h"
#include "dist/link_emulation.h"
#include "elastic/events.h"
#include "elastic/fault_inject.h"
#include "elastic/membership.h"
#include "elastic/quorum.h"
#include "model/gpt.h"
#include "train/bucket_reducer.h"
#include "train/checkpoint_io.h"
#include "train/diloco.h"
#include "train/trainer_support.h"
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
  if (o.check_every < 0) return InvalidArgument("--check-every must be >= 0");
  if (!(o.verify_fraction >= 0 && o.verify_fraction <= 1)) return InvalidArgument("--verify-fraction must be in [0, 1]");
  if (o.verify_fraction > 0 && !o.deterministic)
    return InvalidArgument("--verify-fraction compares gradients bit for bit: it needs deterministic mode (not --fast)");
  if (!(o.spike_factor >= 0)) return InvalidArgument("--spike-factor must be >= 0");
  if (o.quarantine_after < 1) return InvalidArgument("--quarantine-after must be >= 1");
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

namespace {

using namespace trainer_support;  // NOLINT: the loop's own helpers (train/trainer_support.h)

// ---------------------------------------------------------------------------------------------------------
// Trainer: one worker's training, step by step.

class Trainer {
 public:
  Trainer(const TrainOptions& o, const std::atomic<bool>* stop, std::function<void(const std::string&)> log)
      : o_(o), stop_(stop), log_(log ? std::move(log) : DefaultLog) {}

  Result<TrainResult> Run(Communicator* static_comm, ElasticGroup* elastic);

 private:
  // Set-up.
  Status Open();
  Status InspectRunDir();
  Status LoadInitialState();
  Status LoadStateFromDisk();
  void EnsureRunDir();

  // The step protocol.
  Result<bool> RunStep();
  Result<bool> Quorum();
  struct Plan {
    int attempt = 0;
    MicroSet mine;
    std::vector<VerifyTask> verify;
    std::vector<MicroSet> assigned;
  };
  Plan MakePlan(int attempt);
  void Compute(const Plan& plan);
  void ComputeRound(const Plan& plan);  // diloco: the inner phase (train/diloco.h)
  void SubmitCompressed(size_t off, size_t count, const float* g);
  std::shared_ptr<Communicator> Meter(std::shared_ptr<Communicator> c);
  // The step counter passed a multiple of `every` with the last commit (a diloco round advances it by H).
  bool Crossed(int64_t every) const { return every > 0 && step_ / every != (step_ - last_advance_) / every; }
  Status FinishReduce();
  Result<VoteOutcome> VoteOnStep(std::vector<VoteRecord>* records);
  Status Abort(const VoteOutcome& v, const std::vector<VoteRecord>& records, int attempt);
  double Apply(const VoteOutcome& v, const std::vector<VoteRecord>& records);
  Result<bool> AfterCommit(const VoteOutcome& v, double gnorm, double dt, int attempts);
  Status GroupFailed(const Status& why);
  // Runs a collective on the communication thread; elastic members give up on it (kAborted) when the watchdog
  // aborted the group and it still has not returned shortly after.
  Status Collective(std::function<Status(Communicator*)> op);
  std::function<bool()> GiveUp();

  // State.
  Status SyncState(int depth = 0);
  Status TransferState(int source, const std::vector<int>& receivers, uint64_t expect_hash, const std::string& why);
  nlohmann::json AuxJson() const;
  void InstallAux(const nlohmann::json& a);
  uint64_t ParamsHash();
  uint64_t StateHash();
  void TakeSnapshot();
  bool RestoreSnapshot();
  void ClearHoldings();
  bool CheckStep() const { return o_.check_every > 0 && step_ % o_.check_every == 0; }
  float* Params() { return model_->params(); }
  // Host copies of the three state buffers (the backend's own when host memory).
  void StateToHost(std::vector<float>* p, std::vector<float>* m, std::vector<float>* v);
  void StateFromHost(const float* p, const float* m, const float* v);
  bool leader() const { return index_ == 0; }
  void Emit(const std::string& event, nlohmann::json fields = nlohmann::json::object());
  SnapshotView CheckpointView(int64_t next_step);

  TrainOptions o_;
  const std::atomic<bool>* stop_;
  std::function<void(const std::string&)> log_;
  Env* env_ = DefaultEnv();

  std::optional<Dataset> data_;
  std::string tokenizer_bytes_;
  std::string run_json_path_;
  bool resuming_ = false;
  TrainingSnapshot resume_snap_;
  int64_t start_step_ = 0;
  int64_t resume_data_offset_ = 0;

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<GptModel> model_;
  std::unique_ptr<AdamW> adam_;
  size_t P_ = 0;
  int B_ = 0, T_ = 0, M_ = 1;
  bool host_ = true;
  std::vector<float> staging_;   // host gradients when the backend's memory is not host memory
  float* grads_host_ = nullptr;
  std::vector<int32_t> inputs_, targets_;
  // Deterministic mode: acc_ = this member's sum of its held micro-batches (fixed point); red_ = the copy that
  // is allreduced in place (so a failed reduce leaves the holdings intact). Fast mode: the model's gradient
  // buffer accumulates the holdings; redf_ is the copy allreduced.
  // The reduce copies are shared with the communication thread: one a given-up collective may still write
  // into stays with it, and the next group gets fresh ones.
  std::vector<int64_t> acc_;
  std::shared_ptr<std::vector<int64_t>> red_ = std::make_shared<std::vector<int64_t>>();
  std::shared_ptr<std::vector<float>> redf_ = std::make_shared<std::vector<float>>();
  bool in_place_ = false;        // one static member, one micro-batch: round the gradient in place (no buffers)
  bool device_round_ = false;    // in_place_ on a device backend: round it on the device (no host round trip)
  // Slow links (docs/diloco.md): compression of the exchange (error feedback local to this member; the
  // decoded sum comes back in cred_), the diloco outer loop, and the byte meter every collective goes through.
  Codec codec_ = Codec::kNone;
  OptimizerKind optim_kind_ = OptimizerKind::kAdamW;
  std::shared_ptr<ErrorFeedback> ef_ = std::make_shared<ErrorFeedback>();
  std::shared_ptr<std::vector<float>> cred_ = std::make_shared<std::vector<float>>();
  std::unique_ptr<Diloco> diloco_;
  std::shared_ptr<WireStats> wire_ = std::make_shared<WireStats>();
  LinkLimit link_;
  uint64_t wire_mark_ = 0;       // wire_->bytes_sent at the last commit
  int64_t last_advance_ = 1;     // steps the last commit advanced (diloco: the round's inner steps)

  // The training state every member agrees on (it travels with state transfers; hashed into StateHash).
  bool has_state_ = false;
  uint64_t committed_hash_ = 0;  // ParamsHash() when this member last committed or installed state (elastic; 0: unknown)
  int64_t step_ = 0, epoch_ = 0, data_offset_ = 0;
  double loss_mean_ = 0, loss_var_ = 0;
  int64_t loss_n_ = 0;
  StrikeBook strikes_;
  std::map<int64_t, double> speed_;     // uid -> running seconds per micro-batch (straggler shares)
  std::map<int64_t, int> slow_streak_;  // uid -> consecutive steps beyond --straggler-evict
  std::vector<std::pair<int, int64_t>> data_bad_;  // this step's non-finite (micro-batch, uid) results

  // Holdings: micro-batches of step held_step_ whose gradients are in acc_ (valid while params are unchanged).
  MicroSet held_;
  int64_t held_step_ = -1, held_epoch_ = -1;
  double held_loss_[128] = {};
  std::vector<MicroSet> group_held_;   // every member's holdings (agreed)
  std::vector<MicroSet> avoid_;        // per member: micro-batches not to give it again this step
  std::vector<int> last_counts_;       // the last full-step split (for the "shares" event)
  // This attempt.
  MicroSet bad_;
  int computed_ = 0;
  double compute_s_ = 0;
  std::vector<std::pair<int, uint64_t>> verify_hashes_;

  struct Snapshot {
    bool valid = false;
    int64_t step = 0, epoch = 0;
    std::vector<float> p, m, v;
    nlohmann::json aux;
  } snap_;

  // The group.
  Communicator* static_comm_ = nullptr;
  ElasticGroup* elastic_ = nullptr;
  Generation gen_;
  std::shared_ptr<Communicator> comm_sp_;  // shared with the communication thread (see BucketReducer)
  Communicator* comm_ = nullptr;
  int index_ = 0, size_ = 1;
  int64_t gen_no_ = 0;
  int64_t uid_ = 0;
  std::vector<int64_t> members_;
  bool need_group_ = true, voluntary_ = false, need_sync_ = true, finished_ = false;
  std::unique_ptr<BucketReducer> reducer_;
  std::unique_ptr<FaultInjector> inject_;
  EventLog own_events_;
  EventLog* events_ = &own_events_;  // the membership's when elastic (one identity, one file)
  int64_t faults_pending_since_step_ = -1;  // a fault is being recovered from (for the "recovered" event)
  double fault_t_ = 0;

  // Output. The checkpoint copies outlive the writer (declared first, destroyed last).
  std::vector<float> ckpt_p_, ckpt_m_, ckpt_v_;
  std::unique_ptr<AsyncCheckpointer> ckpt_;
  std::unique_ptr<std::ofstream> metrics_;
  bool run_dir_ready_ = false;
  double peak_ = 1;
  double flops_per_token_ = 0;
  int64_t tokens_per_step_ = 0;
  TrainResult result_;
  std::vector<double> phase_ms_;  // the committed attempt: compute, reduce wait, vote, apply
  int64_t steps_this_run_ = 0;
  double tokens_done_ = 0, loop_seconds_ = 0;
  bool tty_ = false;
  Clock::time_point t_start_ = Clock::now();
};

// ---- set-up ---------------------------------------------------------------------------------------------

Status Trainer::InspectRunDir() {
  // A fresh run must not overwrite someone else's; a resumed one continues its own.
  const Dataset& data = *data_;
  if (!env_->Exists(o_.out_dir)) return Status::Ok();
  if (!env_->IsDir(o_.out_dir)) return InvalidArgument("--out " + o_.out_dir + ": exists and is not a directory");
  KEEL_ASSIGN_OR_RETURN(auto entries, env_->ListDir(o_.out_dir));
  bool is_run = env_->Exists(run_json_path_);
  if (!entries.empty() && !is_run)
    return InvalidArgument("--out " + o_.out_dir + ": exists, is not empty and is not a keel run directory");
  if (is_run && !o_.resume)
    return InvalidArgument("--out " + o_.out_dir + ": already holds a training run (pass --resume to continue it, "
                           "or choose another --out)");
  if (!is_run) return Status::Ok();
  KEEL_ASSIGN_OR_RETURN(std::string run_text, env_->ReadFile(run_json_path_));
  auto run_json = nlohmann::json::parse(run_text, nullptr, false);
  if (run_json.is_discarded() || !run_json.is_object()) return Corrupt(run_json_path_ + ": not valid JSON");
  if (run_json.value("data_fingerprint", "") != data.fingerprint())
    return InvalidArgument("--out " + o_.out_dir + ": the run was trained on different data (fingerprint " +
                           run_json.value("data_fingerprint", "?") + ", --data has " + data.fingerprint() + ")");
  KEEL_ASSIGN_OR_RETURN(auto ckpts, ListCheckpoints(o_.out_dir));
  if (ckpts.empty()) return Status::Ok();
  std::vector<std::string> warnings;
  std::string dir;
  KEEL_ASSIGN_OR_RETURN(resume_snap_, LoadSnapshot(o_.out_dir, true, &warnings, &dir));
  if (o_.launch_rank == 0)
    for (const auto& w : warnings) log_("warning: " + w);
  if (resume_snap_.tokenizer != tokenizer_bytes_)
    return InvalidArgument("--data " + o_.data_dir + ": its tokenizer does not match the checkpoint's (" + dir + ")");
  const GptConfig& c = resume_snap_.config;
  if (o_.model.ctx > c.ctx)
    return InvalidArgument("--ctx " + std::to_string(o_.model.ctx) + " is longer than the checkpoint's position "
                           "table (" + std::to_string(c.ctx) + ")");
  if (o_.model.layers != c.layers || o_.model.heads != c.heads || o_.model.dim != c.dim || o_.model.ctx != c.ctx)
    return InvalidArgument("model flags (--layers/--heads/--dim/--ctx) differ from the checkpoint's " +
                           c.ToJson().dump() + " in " + dir);
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
  ckpt_ = std::make_unique<AsyncCheckpointer>(o_.out_dir, o_.keep);
  flops_per_token_ = TrainFlopsPerToken(o_.model, T_);
  tokens_per_step_ = static_cast<int64_t>(B_) * T_ * M_;
  tty_ = isatty(STDERR_FILENO);
  if (!joiner) KEEL_RETURN_IF_ERROR(LoadInitialState());
  return Status::Ok();
}

Status Trainer::LoadInitialState() {
  ckpt_->WaitEncoded();
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
  return Status::Ok();
}

// Every member of the group joined a running job and nobody holds state (the whole job was lost and
// restarted): the state comes from the newest valid checkpoint, or fresh weights if there is none.
Status Trainer::LoadStateFromDisk() {
  auto ckpts = ListCheckpoints(o_.out_dir);
  if (ckpts.ok() && !ckpts->empty()) {
    std::vector<std::string> warnings;
    std::string dir;
    auto snap = LoadSnapshot(o_.out_dir, true, &warnings, &dir);
    if (snap.ok()) {
      for (const auto& w : warnings) log_("warning: " + w);
      if (snap->tokenizer != tokenizer_bytes_ || snap->config.vocab != o_.model.vocab || snap->params.size() != P_)
        return InvalidArgument(dir + ": does not match this job's model or data");
      resume_snap_ = std::move(*snap);
      start_step_ = resume_snap_.state["step"].get<int64_t>();
      resume_data_offset_ = 0;
      if (resume_snap_.state.contains("data_offset") && resume_snap_.state["data_offset"].is_number_integer())
        resume_data_offset_ = resume_snap_.state["data_offset"].get<int64_t>();
      resuming_ = true;
      log_("no live member holds the training state: loading " + dir + " (step " + std::to_string(start_step_) + ")");
      return LoadInitialState();
    }
  }
  log_("no live member holds the training state and there is no checkpoint: starting from fresh weights");
  resuming_ = false;
  return LoadInitialState();
}

void Trainer::EnsureRunDir() {
  if (run_dir_ready_) return;
  if (leader() && !env_->Exists(run_json_path_)) {
    (void)env_->CreateDirs(o_.out_dir);
    nlohmann::json run = {{"keel_version", KEEL_VERSION}, {"model", o_.model.ToJson()},
                          {"data", o_.data_dir}, {"data_fingerprint", data_->fingerprint()}, {"seed", o_.seed}};
    (void)WriteFileAtomic(run_json_path_, run.dump(2) + "\n");
  }
  if (env_->IsDir(o_.out_dir)) run_dir_ready_ = true;
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
  if (elastic_ && M_ > 128) return InvalidArgument("elastic training supports up to 128 micro-batches per step");
  if (elastic_ && o_.grad_accum > 128)
    return InvalidArgument("--grad-accum above 128 is not supported in elastic mode");
  uid_ = elastic_ ? elastic_->uid() : static_comm_->rank();
  KEEL_RETURN_IF_ERROR(Open());
  if (elastic_) elastic_->SetPayloadBytes(static_cast<double>(P_) * (o_.deterministic ? 8 : 4));
  KEEL_ASSIGN_OR_RETURN(inject_, FaultInjector::Create(o_.inject, o_.launch_rank, o_.launch_world));
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
  while (!finished_) {
    KEEL_ASSIGN_OR_RETURN(bool more, RunStep());
    if (!more) break;
  }
  if (leader() && o_.progress && tty_) std::fprintf(stderr, "\n");
  KEEL_RETURN_IF_ERROR(ckpt_->Wait());
  result_.wire_bytes = wire_->bytes_sent.load();
  if (leader() || link_.active())
    log_("wire: " + Fmt("%.3f MB", result_.wire_bytes / 1e6) + " sent by this worker in " +
         std::to_string(wire_->collectives.load()) + " collectives over " + std::to_string(steps_this_run_) +
         (diloco_ ? " outer rounds" : " steps") + " (" + o_.sync + ", --compress " + o_.compress + ")" +
         (link_.active() ? "; link emulation " + Fmt("%.0f Mbit/s", link_.mbit) + Fmt(", %.0f ms", link_.latency_ms) +
                               Fmt(": %.1f s of delays", wire_->emulated_us.load() / 1e6)
                         : std::string()));
  if (elastic_ && leader() && step_ >= o_.steps) (void)elastic_->MarkDone(step_);
  if (elastic_ && has_state_ && step_ >= o_.steps)
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
  for (int attempt = 0;; ++attempt) {
    // (1) Quorum: the members agree on the generation (a new one first synchronises the training state, so
    //     they also agree on the step: the newest state wins, joiners receive it here).
    KEEL_ASSIGN_OR_RETURN(bool have_group, Quorum());
    if (!have_group) return false;
    if (step_ >= o_.steps) return false;
    if (elastic_ && elastic_->generation_dead()) {
      KEEL_RETURN_IF_ERROR(GroupFailed(Aborted(elastic_->dead_reason())));
      continue;
    }
    // (2) Compute this member's share: the micro-batches of the step that no member holds yet.
    const Plan plan = MakePlan(attempt);
    const auto t_compute = Clock::now();
    Compute(plan);
    const auto t_reduce = Clock::now();
    // (3) Reduce (started during (2): buckets go out as backward finishes them). Bounded: a dead member fails
    //     it at once, a hung one via the heartbeat watchdog's Abort, a collective every member is stuck in via
    //     the same watchdog, anything else at the collective backstop.
    const std::string wait_key = "g" + std::to_string(gen_no_) + "/s" + std::to_string(step_) + "/a" +
                                 std::to_string(attempt);
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
        gen_ = std::move(*g);
        uid_ = elastic_->uid();
        comm_sp_ = Meter(std::shared_ptr<Communicator>(std::move(gen_.comm)));
        comm_ = comm_sp_.get();
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

Status Trainer::GroupFailed(const Status& why) {
  ++result_.attempts_failed;
  if (!elastic_) return why;
  log_("step " + std::to_string(step_ + 1) + ": attempt failed in generation " + std::to_string(gen_no_) + ": " +
       why.message() + "; re-forming");
  Emit("attempt_failed", {{"step", step_}, {"gen", gen_no_}, {"reason", why.message()}});
  if (faults_pending_since_step_ < 0) {
    faults_pending_since_step_ = step_;
    fault_t_ = EventLog::Now();
  }
  if (comm_) comm_->Abort();  // the peers waiting on this member fail at once instead of at a timeout
  need_group_ = true;
  voluntary_ = false;
  return Status::Ok();
}

// ---- (2) compute -------------------------------------------------------------------------------------------

Trainer::Plan Trainer::MakePlan(int attempt) {
  Plan p;
  p.attempt = attempt;
  if (static_cast<int>(group_held_.size()) != size_) group_held_.assign(static_cast<size_t>(size_), MicroSet{});
  if (static_cast<int>(avoid_.size()) != size_) avoid_.assign(static_cast<size_t>(size_), MicroSet{});
  group_held_[static_cast<size_t>(index_)] = held_;
  // Straggler shares: inverse of each member's running time per micro-batch, relative to the fastest — for
  // members more than 1.5x slower (below that, timing noise would only reshuffle an even split).
  std::vector<double> shares(static_cast<size_t>(size_), 1.0);
  double fastest = 0;
  for (int64_t u : members_) {
    auto it = speed_.find(u);
    if (it != speed_.end() && it->second > 0) fastest = fastest > 0 ? std::min(fastest, it->second) : it->second;
  }
  if (fastest > 0)
    for (int k = 0; k < size_; ++k) {
      auto it = speed_.find(members_[static_cast<size_t>(k)]);
      if (it != speed_.end() && it->second > 1.5 * fastest)
        shares[static_cast<size_t>(k)] = std::max(0.05, fastest / it->second);
    }
  p.assigned = AssignMicroBatches(M_, group_held_, shares, avoid_);
  // diloco: a redone round goes ahead with the pseudo-gradients already held; inner work a lost member did is
  // not redone (docs/diloco.md).
  if (diloco_ && std::any_of(group_held_.begin(), group_held_.end(), [](const MicroSet& h) { return !h.Empty(); }))
    for (auto& a : p.assigned) a = MicroSet{};
  p.mine = p.assigned[static_cast<size_t>(index_)];
  // Record when straggler shares change how a full step is split (the leader, on fresh attempts).
  if (leader() && attempt == 0 && elastic_) {
    std::vector<int> counts;
    for (const auto& a : p.assigned) counts.push_back(a.Count());
    if (counts != last_counts_) {
      if (!last_counts_.empty() || std::any_of(shares.begin(), shares.end(), [](double x) { return x < 0.95; })) {
        Emit("shares", {{"step", step_}, {"members", members_}, {"micro_batches", counts}, {"shares", shares}});
        log_("step " + std::to_string(step_ + 1) + ": micro-batches per member " + UidList(std::vector<int64_t>(
                 counts.begin(), counts.end())) + " (members " + UidList(members_) + ", by measured speed)");
      }
      last_counts_ = counts;
    }
  }
  if (o_.deterministic && o_.verify_fraction > 0)
    p.verify = PickVerifications(o_.seed, step_, attempt, o_.verify_fraction, p.assigned);
  return p;
}

void Trainer::Compute(const Plan& plan) {
  if (diloco_) return ComputeRound(plan);
  const auto t0 = Clock::now();
  const int64_t step = step_;
  const int64_t data_step = step_ + data_offset_;
  bad_ = MicroSet{};
  computed_ = 0;
  verify_hashes_.clear();
  if (held_step_ != step_ || held_epoch_ != epoch_) {
    ClearHoldings();
    held_step_ = step_;
    held_epoch_ = epoch_;
  }
  if (inject_) {
    ckpt_->WaitEncoded();
    inject_->FlipParamBit(step, Params(), host_ ? P_ : 0);
  }
  // Tasks: cross-checks this member verifies (computed, hashed, not summed) first, then its own micro-batches;
  // the last one's backward feeds the reducer bucket by bucket.
  struct Task {
    int micro;
    bool sum;
    bool hash;
  };
  std::vector<Task> tasks;
  for (const auto& v : plan.verify)
    if (v.verifier == index_) tasks.push_back({v.micro, false, true});
  for (int i = 0; i < M_; ++i) {
    if (!plan.mine.Has(i)) continue;
    bool hash = false;
    for (const auto& v : plan.verify) hash |= v.owner == index_ && v.micro == i;
    tasks.push_back({i, true, hash});
  }
  int last_sum = -1;
  for (size_t k = 0; k < tasks.size(); ++k)
    if (tasks[k].sum) last_sum = static_cast<int>(k);
  const bool overlap = size_ > 1;
  const int groups = o_.model.layers + 2;
  auto host_grads = [&](size_t off, size_t count) -> float* {
    if (!host_) backend_->Download(staging_.data() + off, model_->grads() + off, count);
    return grads_host_ + off;
  };
  // Deterministic mode: the bucket of the holdings' sum goes out as a copy (a failed reduce keeps acc_).
  auto submit = [&](size_t off, size_t count) {
    if (codec_ != Codec::kNone) {
      FixedPointToFloat(redf_->data() + off, acc_.data() + off, count, 1.0);
      return SubmitCompressed(off, count, redf_->data() + off);
    }
    std::memcpy(red_->data() + off, acc_.data() + off, count * sizeof(int64_t));
    reducer_->SubmitInt64(red_->data() + off, count);
  };
  bool first_sum = true;
  if (!o_.deterministic && held_.Empty()) model_->ZeroGrads();
  // Injected deaf collective: the communication thread blocks where Abort cannot reach it; the training thread
  // must give up waiting once the watchdog has aborted the group.
  double deaf_s = 0;
  if (inject_ && elastic_ && size_ > 1 && inject_->DeafCollective(step, &deaf_s))
    reducer_->Submit([deaf_s](Communicator*) {
      std::this_thread::sleep_for(std::chrono::duration<double>(deaf_s));
      return Status::Ok();
    });
  // Injected stall: this member is in the reduce (it says so in its heartbeat) but sends nothing, as if its
  // collective never returned; it resumes when its watchdog aborts the generation (or after the stall).
  double stall_s = 0;
  if (inject_ && elastic_ && inject_->StallCollective(step, &stall_s)) {
    elastic_->SetWaiting("g" + std::to_string(gen_no_) + "/s" + std::to_string(step_) + "/a" +
                         std::to_string(plan.attempt) + "/reduce");
    const auto until = Clock::now() + std::chrono::duration<double>(stall_s);
    while (Clock::now() < until && !elastic_->generation_dead())
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  for (size_t k = 0; k < tasks.size(); ++k) {
    const Task& t = tasks[k];
    const auto tm = Clock::now();
    data_->TrainMicroBatch(o_.seed, data_step, t.micro, B_, T_, inputs_.data(), targets_.data());
    if (o_.deterministic || !t.sum) model_->ZeroGrads();
    const float loss = model_->Forward(inputs_.data(), targets_.data(), B_, T_);
    size_t nonfinite = std::isfinite(loss) ? 0 : 1;
    if (overlap && t.sum && static_cast<int>(k) == last_sum) {
      bool corrupt_tried = false;
      model_->Backward([&](int group) {
        const auto [off, count] = GroupRange(model_->tensors(), group);
        float* g = host_grads(off, count);
        if (inject_ && first_sum && !corrupt_tried) {
          corrupt_tried = true;
          inject_->CorruptGradient(step, g, count);
        }
        if (o_.deterministic) {
          nonfinite += AddFixedPoint(acc_.data() + off, g, count);
          submit(off, count);
        } else {
          nonfinite += CountNonFinite(g, count);
          std::memcpy(redf_->data() + off, g, count * sizeof(float));
          if (codec_ != Codec::kNone) SubmitCompressed(off, count, redf_->data() + off);
          else reducer_->SubmitFloat(redf_->data() + off, count);
        }
      });
    } else {
      model_->Backward();
      if (device_round_ && t.sum && !t.hash) {
        // A device error counts as a bad micro-batch here (the update is skipped); it surfaces at the next Sync.
        auto r = backend_->RoundThroughFixedPoint(model_->grads(), P_);
        nonfinite += r.ok() ? r.value() : 1;
      } else {
        float* g = host_grads(0, P_);
        if (t.sum && inject_ && first_sum) inject_->CorruptGradient(step, g, P_);
        if (t.hash) verify_hashes_.push_back({t.micro, Hash64(g, P_ * sizeof(float))});
        if (t.sum) {
          if (in_place_) nonfinite += RoundThroughFixedPoint(g, P_);
          else if (o_.deterministic) nonfinite += AddFixedPoint(acc_.data(), g, P_);
          else nonfinite += CountNonFinite(g, P_);
        }
      }
    }
    if (t.hash && overlap && t.sum && static_cast<int>(k) == last_sum)
      verify_hashes_.push_back({t.micro, Hash64(grads_host_, P_ * sizeof(float))});
    if (t.sum) {
      ++computed_;
      const bool was_first = first_sum;
      first_sum = false;
      if (nonfinite > 0) {
        bad_.Set(t.micro);
      } else {
        held_.Set(t.micro);
        held_loss_[t.micro] = loss * (inject_ && was_first ? inject_->LossFactor(step) : 1.0);
      }
      if (inject_) inject_->AfterMicroBatch(step);
    }
    if (inject_) {
      inject_->SlowDown(step, Since(tm));
    }
  }
  // A member with nothing to compute still contributes its holdings (or zeros), bucket by bucket in the same
  // order as backward reports them, so every member issues the same sequence of collectives.
  if (overlap && last_sum < 0) {
    for (int group = groups - 1; group >= 0; --group) {
      const auto [off, count] = GroupRange(model_->tensors(), group);
      if (count == 0) continue;
      if (o_.deterministic) submit(off, count);
      else {
        float* g = host_grads(off, count);
        std::memcpy(redf_->data() + off, g, count * sizeof(float));
        if (codec_ != Codec::kNone) SubmitCompressed(off, count, redf_->data() + off);
        else reducer_->SubmitFloat(redf_->data() + off, count);
      }
    }
  }
  compute_s_ = Since(t0);
}

// diloco's compute phase: the inner steps of the round on this member's share of each step's micro-batches
// (nothing when it already holds a pseudo-gradient for this round), then the pseudo-gradient exchange is
// queued on the communication thread.
void Trainer::ComputeRound(const Plan& plan) {
  const auto t0 = Clock::now();
  bad_ = MicroSet{};
  computed_ = 0;
  verify_hashes_.clear();
  if (held_step_ != step_ || held_epoch_ != epoch_) {
    ClearHoldings();
    held_step_ = step_;
    held_epoch_ = epoch_;
  }
  ckpt_->WaitEncoded();  // the inner steps modify parameters and moments a checkpoint may be encoding
  if (inject_) inject_->FlipParamBit(step_, Params(), P_);
  std::vector<int> micros;
  for (int i = 0; i < M_; ++i)
    if (plan.mine.Has(i)) micros.push_back(i);
  double micro_s = 0;  // forward/backward time only: the per-step optimizer cost is the same for every share
  if (!micros.empty()) {
    Diloco::InnerFns f;
    f.micro_batch = [&](int64_t s, int micro) {
      const auto tm = Clock::now();
      data_->TrainMicroBatch(o_.seed, s + data_offset_, micro, B_, T_, inputs_.data(), targets_.data());
      model_->ZeroGrads();
      const float loss = model_->Forward(inputs_.data(), targets_.data(), B_, T_);
      model_->Backward();
      if (inject_) {  // faults are scheduled by global (inner) step
        inject_->CorruptGradient(s, grads_host_, P_);
        inject_->AfterMicroBatch(s);
        inject_->SlowDown(s, Since(tm));
      }
      micro_s += Since(tm);
      return loss;
    };
    f.update = [&](int64_t s) {
      (void)OptimizerStep(optim_kind_, adam_.get(), Params(), grads_host_, model_->tensors(), s, o_.optim);
    };
    const auto r = diloco_->RunInner(Params(), grads_host_, o_.deterministic, step_,
                                     diloco_->RoundSteps(step_, o_.steps), micros, f);
    computed_ = r.micro_batches;
    for (int i : micros) {
      if (r.nonfinite) {
        bad_.Set(i);
      } else {
        held_.Set(i);
        held_loss_[i] = r.loss[i];
      }
    }
  }
  if (micros.empty() && !held_.Empty() && plan.attempt > 0)
    log_("round at step " + std::to_string(step_ + 1) + ": attempt " + std::to_string(plan.attempt + 1) +
         " reuses this member's pseudo-gradient (inner steps not redone)");
  if (size_ > 1) reducer_->Submit(diloco_->MakeExchange(!held_.Empty()));
  compute_s_ = computed_ > 0 ? micro_s : Since(t0);  // the straggler statistic: seconds per micro-batch
}

// A compressed bucket (ddp --compress): g (a buffer the reducer keeps alive) is encoded with this member's
// error feedback, allgathered and decoded into cred_ on the communication thread.
void Trainer::SubmitCompressed(size_t off, size_t count, const float* g) {
  auto ef = ef_;
  auto out = cred_;
  const Codec codec = codec_;
  reducer_->Submit([ef, out, codec, g, off, count](Communicator* c) {
    return CompressedSum(c, codec, g, off, count, ef.get(), out->data() + off);
  });
}

std::shared_ptr<Communicator> Trainer::Meter(std::shared_ptr<Communicator> c) {
  return MakeMeteredCommunicator(std::move(c), wire_, link_);
}

void Trainer::ClearHoldings() {
  held_ = MicroSet{};
  if (diloco_) diloco_->DropHolding();
  if (!acc_.empty()) std::fill(acc_.begin(), acc_.end(), 0);
  if (!o_.deterministic && model_) model_->ZeroGrads();
}

// ---- (3) reduce ------------------------------------------------------------------------------------------

Status Trainer::FinishReduce() {
  if (size_ <= 1) return Status::Ok();
  return reducer_->Wait(GiveUp());
}

// ---- (4) vote ----------------------------------------------------------------------------------------------

Result<VoteOutcome> Trainer::VoteOnStep(std::vector<VoteRecord>* records) {
  VoteRecord r;
  r.uid = uid_;
  r.gen = gen_no_;
  r.epoch = epoch_;
  r.step = step_;
  // Compared between members only (elastic/quorum.cc): one member alone skips hashing P floats (and, on a
  // device, copying them to the host) every step.
  r.params_hash = size_ > 1 ? ParamsHash() : 0;
  r.committed_hash = committed_hash_;
  r.state_hash = CheckStep() ? StateHash() : 0;
  r.held = held_;
  r.bad = bad_;
  const bool want_stop = (stop_ && stop_->load()) || (o_.stop_after > 0 && steps_this_run_ + 1 >= o_.stop_after);
  if (want_stop) r.flags |= kFlagStop;
  if (elastic_ && elastic_->joiners_waiting()) r.flags |= kFlagJoiners;
  r.computed = computed_;
  r.compute_s = compute_s_;
  for (const auto& [mb, h] : verify_hashes_) {
    if (r.n_verify >= kMaxVerify) break;
    r.verify_micro[r.n_verify] = mb;
    r.verify_hash[r.n_verify] = h;
    ++r.n_verify;
  }
  for (int i = 0; i < M_; ++i)
    if (held_.Has(i)) r.loss[i] = held_loss_[i];
  records->assign(static_cast<size_t>(size_), VoteRecord{});
  if (size_ > 1) {
    auto in = std::make_shared<VoteRecord>(r);
    auto out = std::make_shared<std::vector<VoteRecord>>(static_cast<size_t>(size_));
    KEEL_RETURN_IF_ERROR(Collective([in, out](Communicator* c) {
      return c->Allgather(in.get(), out->data(), sizeof(VoteRecord));
    }));
    *records = *out;
  } else {
    (*records)[0] = r;
  }
  VoteConfig c;
  c.M = M_;
  c.quarantine_after = o_.quarantine_after;
  c.partial = diloco_ != nullptr;
  return DecideCommit(*records, c, &strikes_, &data_bad_);
}

// A vote that did not commit: every member takes the same actions (the outcome is identical everywhere).
Status Trainer::Abort(const VoteOutcome& v, const std::vector<VoteRecord>& records, int attempt) {
  ++result_.attempts_failed;
  if (faults_pending_since_step_ < 0) {
    faults_pending_since_step_ = step_;
    fault_t_ = EventLog::Now();
  }
  if (leader()) {
    for (const auto& n : v.notes) log_("step " + std::to_string(step_ + 1) + ": " + n);
    if (v.notes.empty()) log_("step " + std::to_string(step_ + 1) + ": not committed: " + v.reason);
    nlohmann::json f = {{"step", step_}, {"attempt", attempt}, {"gen", gen_no_}, {"reason", v.reason},
                        {"notes", v.notes}};
    for (const auto& [k, mb] : v.bad) {
      Emit("nan", {{"step", step_}, {"member", members_[static_cast<size_t>(k)]}, {"micro_batch", mb}});
    }
    for (int k : v.repair) Emit("sdc", {{"step", step_}, {"member", members_[static_cast<size_t>(k)]}, {"action", "repair"}});
    if (v.rollback) Emit("sdc", {{"step", step_}, {"action", "rollback"}});
    for (int k : v.quarantine) Emit("quarantine", {{"step", step_}, {"member", members_[static_cast<size_t>(k)]}});
    Emit("abort", f);
  }
  if (v.resync) {
    if (!elastic_) return Internal("members disagree on the step: " + v.reason);
    return GroupFailed(Aborted(v.reason));
  }
  // Holdings after this attempt, for every member (agreed).
  group_held_.assign(static_cast<size_t>(size_), MicroSet{});
  for (int k = 0; k < size_; ++k) group_held_[static_cast<size_t>(k)] = records[static_cast<size_t>(k)].held;
  for (int k : v.clear_holdings) {
    group_held_[static_cast<size_t>(k)] = MicroSet{};
    if (k == index_) ClearHoldings();
  }
  if (static_cast<int>(avoid_.size()) != size_) avoid_.assign(static_cast<size_t>(size_), MicroSet{});
  for (const auto& [k, mb] : v.avoid)
    if (k >= 0 && k < size_) avoid_[static_cast<size_t>(k)].Set(mb);
  // Quarantine: the member leaves for good; the others re-form without it.
  if (!v.quarantine.empty()) {
    const bool me = std::find(v.quarantine.begin(), v.quarantine.end(), index_) != v.quarantine.end();
    if (!elastic_)
      return Aborted("member " + std::to_string(members_[static_cast<size_t>(v.quarantine[0])]) +
                     " was quarantined after repeated faults; a static group cannot continue without it (use "
                     "--min-workers for elastic training)");
    if (me) {
      log_("this worker is quarantined after repeated faults (" + v.reason + "); leaving the job");
      Emit("quarantined", {{"step", step_}, {"reason", v.reason}});
      elastic_->Leave("quarantined");
      return Aborted("quarantined after repeated faults: " + v.reason);
    }
    need_group_ = true;
    voluntary_ = false;
    return Status::Ok();
  }
  // Silent corruption: the minority takes the majority's state (the same group, no re-form).
  if (!v.repair.empty()) {
    Status s = TransferState(v.source, v.repair, 0, "repair");
    if (!s.ok()) return GroupFailed(s);
  }
  if (v.rollback) {
    const bool restored = RestoreSnapshot();
    log_("step " + std::to_string(step_ + 1) + ": rolled back to the verified snapshot of step " +
         std::to_string(restored ? step_ : snap_.step) + (restored ? "" : " (this member has none: it will receive it)"));
    need_sync_ = true;
    Status s = SyncState();
    if (!s.ok()) return GroupFailed(s);
  }
  return Status::Ok();
}

// ---- (5) apply -----------------------------------------------------------------------------------------------

double Trainer::Apply(const VoteOutcome& v, const std::vector<VoteRecord>& records) {
  double gnorm = 0;
  // Loss spike: instead of this update, return to the snapshot and skip the data window that led here.
  const double dev = std::sqrt(std::max(0.0, loss_var_));
  const bool spike = o_.spike_factor > 0 && loss_n_ >= 20 && snap_.valid && !v.skip_update &&
                     v.loss > loss_mean_ + o_.spike_factor * std::max(dev, 1e-3);
  if (spike) {
    const int64_t spike_step = step_;
    const int64_t skip = step_ + 1 - snap_.step;
    const int64_t old_offset = data_offset_;
    // Every member takes the same decision (agreed state); one without a snapshot receives the state of one
    // that restored (the new epoch outranks it) in the sync that follows.
    const bool restored = RestoreSnapshot();  // step_, epoch_ (bumped), data_offset_, statistics
    if (restored) data_offset_ += skip;
    (void)old_offset;
    need_sync_ = true;
    log_("step " + std::to_string(spike_step + 1) + ": loss spike (" + Fmt("%.4f", v.loss) + " vs running mean " +
         Fmt("%.4f", loss_mean_) + "): rolled back to step " + std::to_string(step_) + " and skipping " +
         std::to_string(skip) + " step(s) of data");
    if (leader()) Emit("spike", {{"step", spike_step}, {"loss", v.loss}, {"rollback_to", step_}, {"skip", skip}});
    return -1;
  }
  if (v.skip_update) {
    if (leader())
      log_("warning: step " + std::to_string(step_ + 1) + ": the data gives a non-finite loss or gradient; update skipped");
    if (leader()) Emit("data_fault", {{"step", step_}});
  } else {
    if (CheckStep()) TakeSnapshot();  // the state the vote just verified (before this update)
    ckpt_->WaitEncoded();             // a checkpoint being encoded from these buffers
    const int64_t* sum = size_ > 1 ? red_->data() : acc_.data();
    if (diloco_) {
      gnorm = diloco_->ApplyOuter(Params(), size_ > 1);
    } else if (codec_ != Codec::kNone && size_ > 1) {
      const float inv = 1.0f / static_cast<float>(M_);
      for (size_t j = 0; j < P_; ++j) grads_host_[j] = (*cred_)[j] * inv;
      ef_->Commit();
    } else if (o_.deterministic && !in_place_) {
      FixedPointToFloat(grads_host_, sum, P_, 1.0 / M_);
    } else if (!o_.deterministic) {
      const float inv = 1.0f / static_cast<float>(M_);
      const float* src = size_ > 1 ? redf_->data() : grads_host_;
      if (!host_ && size_ <= 1) backend_->Download(staging_.data(), model_->grads(), P_);
      for (size_t j = 0; j < P_; ++j) grads_host_[j] = src[j] * inv;
    }
    if (!diloco_) {
      if (!host_ && !device_round_) backend_->Upload(model_->grads(), grads_host_, P_);
      gnorm = OptimizerStep(optim_kind_, adam_.get(), model_->params(), model_->grads(), model_->tensors(), step_,
                            o_.optim);
    }
    // What this member's parameters must still hash to at the next vote: a member whose memory changes them
    // in between names itself as the corrupted one (the vote can then repair a group of two without a rollback).
    if (elastic_) committed_hash_ = ParamsHash();
    // Running loss statistics (spike detection).
    const double a = loss_n_ < 20 ? 1.0 / static_cast<double>(loss_n_ + 1) : 0.05;
    const double d = v.loss - loss_mean_;
    loss_mean_ += a * d;
    loss_var_ = (1 - a) * (loss_var_ + a * d * d);
    ++loss_n_;
  }
  // Straggler statistics: running seconds per micro-batch of every member that computed this attempt.
  for (const auto& r : records) {
    if (r.computed <= 0) continue;
    const double x = r.compute_s / r.computed;
    auto it = speed_.find(r.uid);
    if (it == speed_.end()) speed_[r.uid] = x;
    else it->second = 0.8 * it->second + 0.2 * x;
  }
  for (auto it = speed_.begin(); it != speed_.end();)
    it = std::find(members_.begin(), members_.end(), it->first) == members_.end() ? speed_.erase(it) : std::next(it);
  last_advance_ = diloco_ ? diloco_->RoundSteps(step_, o_.steps) : 1;
  step_ += last_advance_;
  ClearHoldings();
  held_step_ = step_;
  group_held_.assign(static_cast<size_t>(size_), MicroSet{});
  avoid_.assign(static_cast<size_t>(size_), MicroSet{});
  data_bad_.clear();
  return gnorm;
}

Result<bool> Trainer::AfterCommit(const VoteOutcome& v, double gnorm, double dt, int attempts) {
  if (gnorm < 0) return true;  // rolled back (loss spike): nothing was committed
  const int64_t step = step_ - 1;  // the step just committed
  if (elastic_) elastic_->SetProgress(step_, epoch_, has_state_);
  tokens_done_ += static_cast<double>(tokens_per_step_ * last_advance_);
  const uint64_t wire_now = wire_->bytes_sent.load();
  const uint64_t wire_step = wire_now - wire_mark_;
  wire_mark_ = wire_now;
  result_.wire_bytes = wire_now;
  loop_seconds_ += dt;
  ++steps_this_run_;
  result_.final_step = step_;
  result_.last_loss = static_cast<float>(v.loss);
  const bool last = step_ >= o_.steps;
  // Validation.
  float val_loss = -1;
  if (o_.eval_every > 0 && (Crossed(o_.eval_every) || last)) {
    int nb = std::min(o_.eval_batches, data_->NumValBatches(B_, T_));
    double vs[2] = {0, 0};
    for (int j = index_; j < nb; j += size_) {
      data_->ValBatch(j, B_, T_, inputs_.data(), targets_.data());
      vs[0] += model_->Forward(inputs_.data(), targets_.data(), B_, T_);
      vs[1] += 1;
    }
    auto sums = std::make_shared<std::array<double, 2>>(std::array<double, 2>{vs[0], vs[1]});
    Status s = size_ > 1 ? Collective([sums](Communicator* c) { return c->AllreduceSum(sums->data(), 2); })
                         : Status::Ok();
    vs[0] = (*sums)[0], vs[1] = (*sums)[1];
    if (!s.ok()) {
      KEEL_RETURN_IF_ERROR(GroupFailed(s));
    } else if (vs[1] > 0) {
      val_loss = static_cast<float>(vs[0] / vs[1]);
      result_.last_val_loss = val_loss;
    }
  }
  // Checkpoint at the boundary (the leader writes; the state is identical on every member).
  const bool stop_now = v.stop;
  double ckpt_stall_ms = -1;
  const bool want_ckpt = stop_now || (o_.checkpoint_every > 0 && (last || Crossed(o_.checkpoint_every)));
  if (want_ckpt && leader()) {
    EnsureRunDir();
    const auto t_ckpt = Clock::now();
    KEEL_RETURN_IF_ERROR(ckpt_->Wait());  // the previous write (normally finished long ago)
    if (!host_) StateToHost(&ckpt_p_, &ckpt_m_, &ckpt_v_);  // host memory: encoded from the live buffers
    std::function<void(const std::vector<CheckpointFile>&)> before_write;
    bool then_kill = true;
    if (inject_ && inject_->TruncateCheckpoint(step_, &then_kill)) {
      before_write = [dir = o_.out_dir, step = step_, then_kill](const std::vector<CheckpointFile>& files) {
        WriteTruncatedCheckpoint(dir, step, files);  // as a crash in the middle of the write leaves it
        if (then_kill) ::raise(SIGKILL);
        for (;;) std::this_thread::sleep_for(std::chrono::seconds(3600));
      };
    }
    KEEL_RETURN_IF_ERROR(ckpt_->Start(CheckpointView(step_), step_, std::move(before_write)));
    // The training thread's share of an asynchronous checkpoint (waiting for the previous write; device
    // backends: copying the state to the host): the stall it adds to this step.
    ckpt_stall_ms = Since(t_ckpt) * 1e3;
  }
  if (leader()) {
    EnsureRunDir();
    if (!metrics_) {
      const std::string path = JoinPath(o_.out_dir, "metrics.jsonl");
      TruncateMetrics(path, step);
      metrics_ = std::make_unique<std::ofstream>(path, std::ios::app);
      if (!*metrics_) return IoError(path + ": cannot open for appending");
    }
    const double tok_s = static_cast<double>(tokens_per_step_ * last_advance_) / dt;
    // peak_ is one worker's (its --threads); the group's tokens/s come from size_ such workers.
    const double mfu = peak_ > 0 ? flops_per_token_ * tok_s / (peak_ * size_ * 1e9) : 0.0;
    const double avg_tok_s = tokens_done_ / loop_seconds_;
    const double eta = (o_.steps - step_) * tokens_per_step_ / avg_tok_s;
    nlohmann::json m = {{"step", step}, {"loss", v.loss}, {"lr", LearningRate(o_.optim, step)}, {"grad_norm", gnorm},
                        {"tokens_per_s", tok_s}, {"mfu", mfu}, {"step_ms", dt * 1e3}, {"workers", size_},
                        {"elapsed_s", Since(t_start_)}};
    if (elastic_) m["gen"] = gen_no_, m["attempts"] = attempts;
    m["wire_bytes"] = wire_step;         // sent by this member (the leader) since the last commit
    m["wire_bytes_total"] = wire_now;
    if (diloco_) m["inner_steps"] = last_advance_;
    if (phase_ms_.size() == 4)
      m["phase_ms"] = {{"compute", phase_ms_[0]}, {"reduce_wait", phase_ms_[1]}, {"vote", phase_ms_[2]},
                       {"apply", phase_ms_[3]}};
    if (val_loss >= 0) m["val_loss"] = val_loss;
    if (ckpt_stall_ms >= 0) m["checkpoint_stall_ms"] = ckpt_stall_ms;
    *metrics_ << m.dump() << "\n";
    metrics_->flush();
    nlohmann::json ev = {{"step", step}, {"gen", gen_no_}, {"members", size_}, {"attempts", attempts},
                         {"step_ms", dt * 1e3}, {"loss", v.loss}};
    if (faults_pending_since_step_ >= 0) ev["recovered"] = true;
    if (elastic_ || attempts > 1) Emit("commit", ev);
    std::string line = "step " + std::to_string(step_) + "/" + std::to_string(o_.steps) + " | loss " +
                       Fmt("%.4f", v.loss) + " | " + Fmt("%.0f tok/s", tok_s) + " | MFU " + Fmt("%.1f%%", 100 * mfu) +
                       " | ETA " + FormatDuration(eta);
    if (elastic_)
      line += " | members " + std::to_string(size_) + "/" + std::to_string(o_.launch_world) + " gen " +
              std::to_string(gen_no_);
    if (attempts > 1) line += " | redone x" + std::to_string(attempts - 1);
    if (val_loss >= 0) {
      if (o_.progress && tty_) std::fprintf(stderr, "\r\033[K");
      log_(line + " | val " + Fmt("%.4f", val_loss));
    } else if (o_.progress && tty_) {
      std::fprintf(stderr, "\r\033[K%s", line.c_str());
      std::fflush(stderr);
    } else if (o_.progress && (Crossed(10) || attempts > 1)) {
      log_(line);
    }
  } else {
    metrics_.reset();  // a member that becomes leader later reopens (and trims) the file
  }
  faults_pending_since_step_ = -1;
  if (stop_now && !last) {
    result_.stopped_early = true;
    if (leader()) {
      if (o_.progress && tty_) std::fprintf(stderr, "\n");
      log_("stopping at step " + std::to_string(step_) + " (checkpoint written)");
    }
    return false;
  }
  if (last) {
    if (elastic_) elastic_->Unwatch();  // peers leaving now is the end of the job, not a fault
    return false;
  }
  // Admit joiners / drop a quarantined member: every member leaves this generation at this boundary.
  if (elastic_ && (v.joiners || v.reform)) {
    need_group_ = true;
    voluntary_ = true;
  }
  // Straggler eviction: a member persistently slower than --straggler-evict x the median leaves.
  if (elastic_ && o_.straggler_evict > 1 && size_ > 1) {
    std::vector<double> xs;
    for (int64_t u : members_)
      if (speed_.count(u)) xs.push_back(speed_[u]);
    if (xs.size() == members_.size()) {
      std::vector<double> sorted = xs;
      std::sort(sorted.begin(), sorted.end());
      const double median = sorted[sorted.size() / 2];
      for (size_t k = 0; k < members_.size(); ++k) {
        int& streak = slow_streak_[members_[k]];
        streak = xs[k] > o_.straggler_evict * median ? streak + 1 : 0;
        if (streak >= 5) {
          if (static_cast<int>(k) == index_) {
            log_("this worker is " + Fmt("%.1fx", xs[k] / median) + " slower than the median for 5 steps; leaving "
                 "(--straggler-evict)");
            Emit("straggler", {{"step", step}, {"factor", xs[k] / median}, {"action", "evicted"}});
            elastic_->Leave("quarantined");
            // Not restarted by its launcher (a slow machine stays slow): the same exit status as a quarantine.
            return Aborted("quarantined as a straggler: " + Fmt("%.1fx", xs[k] / median) +
                           " slower than the median for 5 steps (--straggler-evict)");
          }
        }
      }
    }
  }
  return true;
}

// ---- state: hashes, transfers, snapshots ---------------------------------------------------------------------

nlohmann::json Trainer::AuxJson() const {
  nlohmann::json strikes = nlohmann::json::array();
  for (const auto& s : strikes_.v) strikes.push_back({s.uid, s.kind, s.count, s.last_step});
  nlohmann::json speed = nlohmann::json::array();
  for (const auto& [u, x] : speed_) speed.push_back({u, x});
  return {{"step", step_}, {"epoch", epoch_}, {"data_offset", data_offset_}, {"loss_mean", loss_mean_},
          {"loss_var", loss_var_}, {"loss_n", loss_n_}, {"strikes", strikes}, {"speed", speed}};
}

void Trainer::InstallAux(const nlohmann::json& a) {
  step_ = a.value("step", step_);
  epoch_ = a.value("epoch", epoch_);
  data_offset_ = a.value("data_offset", data_offset_);
  loss_mean_ = a.value("loss_mean", 0.0);
  loss_var_ = a.value("loss_var", 0.0);
  loss_n_ = a.value("loss_n", int64_t{0});
  strikes_.v.clear();
  if (a.contains("strikes"))
    for (const auto& s : a["strikes"])
      if (s.is_array() && s.size() == 4)
        strikes_.v.push_back({s[0].get<int64_t>(), s[1].get<int>(), s[2].get<int>(), s[3].get<int64_t>()});
  speed_.clear();
  if (a.contains("speed"))
    for (const auto& s : a["speed"])
      if (s.is_array() && s.size() == 2) speed_[s[0].get<int64_t>()] = s[1].get<double>();
}

void Trainer::StateToHost(std::vector<float>* p, std::vector<float>* m, std::vector<float>* v) {
  p->resize(P_);
  m->resize(P_);
  v->resize(P_);
  if (host_) std::memcpy(p->data(), model_->params(), P_ * sizeof(float));
  else *p = model_->ParamsToHost();
  backend_->Download(m->data(), adam_->m(), P_);
  backend_->Download(v->data(), adam_->v(), P_);
}

void Trainer::StateFromHost(const float* p, const float* m, const float* v) {
  ckpt_->WaitEncoded();
  if (host_) {
    if (p != model_->params()) std::memcpy(model_->params(), p, P_ * sizeof(float));
  } else {
    model_->SetParamsFromHost(std::vector<float>(p, p + P_));
  }
  backend_->Upload(adam_->m(), m, P_);
  backend_->Upload(adam_->v(), v, P_);
}

uint64_t Trainer::ParamsHash() {
  if (host_) return Hash64(model_->params(), P_ * sizeof(float));
  std::vector<float> p = model_->ParamsToHost();
  return Hash64(p.data(), P_ * sizeof(float));
}

uint64_t Trainer::StateHash() {
  const std::string aux = AuxJson().dump();
  if (diloco_) return diloco_->StateHash(Params(), aux);  // inner moments are per member (docs/diloco.md)
  if (host_ && backend_->host_memory()) {
    uint64_t h = Hash64(model_->params(), P_ * sizeof(float), 1);
    h = Hash64(adam_->m(), P_ * sizeof(float), h);
    h = Hash64(adam_->v(), P_ * sizeof(float), h);
    return Hash64(aux.data(), aux.size(), h);
  }
  std::vector<float> p, m, v;
  StateToHost(&p, &m, &v);
  uint64_t h = Hash64(p.data(), P_ * sizeof(float), 1);
  h = Hash64(m.data(), P_ * sizeof(float), h);
  h = Hash64(v.data(), P_ * sizeof(float), h);
  return Hash64(aux.data(), aux.size(), h);
}

void Trainer::TakeSnapshot() {
  // Nothing restores it for one static worker without spike detection (a rollback needs members that disagree):
  // skip the host copy of parameters and Adam moments (1.5 GB at GPT-2 small, more than the rest of the run).
  if (!elastic_ && size_ <= 1 && o_.spike_factor <= 0) return;
  StateToHost(&snap_.p, &snap_.m, &snap_.v);
  if (diloco_) diloco_->Snapshot();
  snap_.aux = AuxJson();
  snap_.step = step_;
  snap_.epoch = epoch_;
  snap_.valid = true;
}

// Back to the snapshot (with a new epoch, so the restored state outranks newer ones). False when this member
// has none (it then holds no state and receives it from a member that restored).
bool Trainer::RestoreSnapshot() {
  const int64_t new_epoch = epoch_ + 1;
  ClearHoldings();
  held_step_ = -1;
  if (!snap_.valid) {
    has_state_ = false;
    epoch_ = new_epoch;
    return false;
  }
  StateFromHost(snap_.p.data(), snap_.m.data(), snap_.v.data());
  ef_->Reset();  // the residual belongs to the abandoned lineage
  if (diloco_) {
    diloco_->Restore();
    diloco_->ResetFeedback();
  }
  InstallAux(snap_.aux);
  epoch_ = new_epoch;
  snap_.epoch = new_epoch;
  snap_.aux["epoch"] = new_epoch;
  has_state_ = true;
  return true;
}

// State synchronisation at the start of a group: gather (epoch, step, hash, holdings) from every member; the
// newest state (most common hash among the newest) is the source; whoever differs receives it.
Status Trainer::SyncState(int depth) {
  SyncRecord mine;
  mine.uid = uid_;
  mine.epoch = epoch_;
  mine.step = step_;
  mine.has_state = has_state_ ? 1 : 0;
  mine.state_hash = has_state_ ? StateHash() : 0;
  mine.held = held_;
  mine.held_epoch = held_epoch_;
  mine.held_step = held_step_;
  mine.peak_gflops = peak_;
  std::vector<SyncRecord> all(static_cast<size_t>(size_));
  if (size_ > 1) {
    auto in = std::make_shared<SyncRecord>(mine);
    auto out = std::make_shared<std::vector<SyncRecord>>(static_cast<size_t>(size_));
    KEEL_RETURN_IF_ERROR(Collective([in, out](Communicator* c) {
      return c->Allgather(in.get(), out->data(), sizeof(SyncRecord));
    }));
    all = *out;
  } else {
    all[0] = mine;
  }
  SyncPlan plan = PlanSync(all);
  for (const auto& r : all) peak_ = std::max(peak_, r.peak_gflops);
  if (plan.source < 0) {
    if (depth > 0) return Internal("no member holds training state after loading it");
    KEEL_RETURN_IF_ERROR(LoadStateFromDisk());
    return SyncState(depth + 1);
  }
  const bool receiver = std::find(plan.receivers.begin(), plan.receivers.end(), index_) != plan.receivers.end();
  if (!plan.receivers.empty()) KEEL_RETURN_IF_ERROR(TransferState(plan.source, plan.receivers, plan.state_hash, "sync"));
  group_held_ = plan.held;
  avoid_.assign(static_cast<size_t>(size_), MicroSet{});
  if (receiver || group_held_[static_cast<size_t>(index_)].Empty()) {
    ClearHoldings();
    held_step_ = step_;
    held_epoch_ = epoch_;
  } else {
    held_ = group_held_[static_cast<size_t>(index_)];
  }
  if (receiver) data_bad_.clear();
  need_sync_ = false;
  EnsureRunDir();
  if (!snap_.valid) TakeSnapshot();  // a verified state (every member's hash agrees with the source's)
  if (elastic_ && has_state_) committed_hash_ = ParamsHash();  // agreed state: what the next vote must find
  return Status::Ok();
}

// Sends the training state of member `source` to `receivers` over the group (every member takes part in the
// broadcasts; non-receivers discard the bytes). Checksummed end to end: the receivers recompute the state hash
// and compare it with the source's.
Status Trainer::TransferState(int source, const std::vector<int>& receivers, uint64_t expect_hash,
                              const std::string& why) {
  const auto t0 = Clock::now();
  const bool me_src = index_ == source;
  const bool me_recv = std::find(receivers.begin(), receivers.end(), index_) != receivers.end();
  struct Header {
    uint64_t magic;
    uint64_t aux_len;
    uint64_t hash;
    uint64_t params;
  } h{0x4B45454C53594E43ull, 0, 0, P_};
  std::string aux;
  if (me_src) {
    aux = AuxJson().dump();
    h.aux_len = aux.size();
    h.hash = StateHash();
  }
  {
    auto hb = std::make_shared<Header>(h);
    KEEL_RETURN_IF_ERROR(Collective([hb, source](Communicator* c) { return c->Broadcast(hb.get(), sizeof(Header), source); }));
    h = *hb;
  }
  if (h.magic != 0x4B45454C53594E43ull || h.params != P_ || h.aux_len > (1u << 24))
    return Corrupt("state transfer from member " + std::to_string(members_[static_cast<size_t>(source)]) +
                   ": malformed header");
  {
    auto ab = std::make_shared<std::string>(aux);
    ab->resize(h.aux_len);
    KEEL_RETURN_IF_ERROR(Collective([ab, source](Communicator* c) { return c->Broadcast(ab->data(), ab->size(), source); }));
    aux = *ab;
  }
  if (me_recv) ckpt_->WaitEncoded();
  // Host memory: the source sends from, and receivers receive into, the model's and optimizer's own buffers;
  // the other members receive into one scratch buffer. Device memory goes through host copies.
  std::vector<float> p, m, v, scratch;
  float* bufs[3];
  if (host_ && (me_src || me_recv)) {
    bufs[0] = model_->params(), bufs[1] = adam_->m(), bufs[2] = adam_->v();
  } else if (host_) {
    scratch.resize(P_);
    bufs[0] = bufs[1] = bufs[2] = scratch.data();
  } else {
    if (me_src) StateToHost(&p, &m, &v);
    p.resize(P_), m.resize(P_), v.resize(P_);
    bufs[0] = p.data(), bufs[1] = m.data(), bufs[2] = v.data();
  }
  // (A given-up broadcast could in principle still write into these buffers; in practice nothing arrives on a
  // group every peer has aborted, and a receiver holds no state until it verifies a later transfer.)
  for (float* b : bufs)
    KEEL_RETURN_IF_ERROR(Collective([b, this, source](Communicator* c) { return c->Broadcast(b, P_ * sizeof(float), source); }));
  if (diloco_) {  // the outer momentum (host memory: diloco runs on the CPU backend)
    float* b = (me_src || me_recv) ? diloco_->momentum() : bufs[0];
    KEEL_RETURN_IF_ERROR(Collective([b, this, source](Communicator* c) { return c->Broadcast(b, P_ * sizeof(float), source); }));
    if (me_recv) diloco_->ResetFeedback();
  }
  if (me_recv) {
    if (!host_) StateFromHost(p.data(), m.data(), v.data());
    auto a = nlohmann::json::parse(aux, nullptr, false);
    if (!a.is_object()) {
      has_state_ = false;
      return Corrupt("state transfer: malformed trainer state");
    }
    InstallAux(a);
    has_state_ = true;
    const uint64_t got = StateHash();
    if (got != h.hash || (expect_hash != 0 && got != expect_hash)) {
      has_state_ = false;
      return Corrupt("state transfer from member " + std::to_string(members_[static_cast<size_t>(source)]) +
                     ": checksum mismatch (received " + HashHex(got) + ", sent " + HashHex(h.hash) + ")");
    }
    committed_hash_ = ParamsHash();
    ClearHoldings();
    held_step_ = step_;
    held_epoch_ = epoch_;
    ef_->Reset();         // error feedback starts over with the received state
    snap_.valid = false;  // this member's snapshot (if any) is of an older lineage
    log_("received the training state (step " + std::to_string(step_) + ") from member " +
         std::to_string(members_[static_cast<size_t>(source)]) + " (" + why + ", " +
         Fmt("%.1f MB", (3.0 * P_ * sizeof(float) + aux.size()) / 1e6) + ", checksum " + HashHex(got) + " verified, " +
         Fmt("%.0f ms", Since(t0) * 1e3) + ")");
  }
  if (me_src) {
    std::vector<int64_t> to;
    for (int k : receivers) to.push_back(members_[static_cast<size_t>(k)]);
    Emit("state_transfer", {{"why", why}, {"step", step_}, {"to", to}, {"bytes", 3.0 * P_ * sizeof(float) + aux.size()},
                            {"ms", Since(t0) * 1e3}, {"hash", HashHex(h.hash)}});
  }
  return Status::Ok();
}

// The checkpoint of the current state, encoded on the writer thread: from the live buffers on host memory
// (the trainer waits for the encoding before it modifies them), from ckpt_p_/m_/v_ copies otherwise.
SnapshotView Trainer::CheckpointView(int64_t next_step) {
  SnapshotView s;
  s.config = o_.model;
  s.params = host_ ? model_->params() : ckpt_p_.data();
  s.adam_m = host_ ? adam_->m() : ckpt_m_.data();
  s.adam_v = host_ ? adam_->v() : ckpt_v_.data();
  if (diloco_) s.outer_momentum = diloco_->momentum();
  s.state = {{"step", next_step}, {"seed", o_.seed}, {"data_fingerprint", data_->fingerprint()},
             {"keel_version", KEEL_VERSION}, {"deterministic", o_.deterministic}, {"batch", B_},
             {"grad_accum", M_}, {"steps", o_.steps}, {"lr", o_.optim.lr}, {"warmup", o_.optim.warmup},
             {"sync", o_.sync}, {"compress", o_.compress}, {"optimizer", o_.optimizer}};
  if (diloco_)
    s.state["diloco"] = {{"inner_steps", o_.inner_steps}, {"outer_lr", o_.outer_lr}, {"outer_momentum", o_.outer_momentum}};
  if (data_offset_ != 0) s.state["data_offset"] = data_offset_;
  s.tokenizer = tokenizer_bytes_;
  return s;
}

}  // namespace

Result<TrainResult> Train(const TrainOptions& o, Communicator* comm, const std::atomic<bool>* stop,
                          const std::function<void(const std::string&)>& log) {
  Trainer t(o, stop, log);
  return t.Run(comm, nullptr);
}

Result<TrainResult> TrainElastic(const TrainOptions& o, ElasticGroup* group, const std::atomic<bool>* stop,
                                 const std::function<void(const std::string&)>& log) {
  Trainer t(o, stop, log);
  return t.Run(nullptr, group);
}

}  // namespace keel
