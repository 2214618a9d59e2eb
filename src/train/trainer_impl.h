// trainer_impl.h: the Trainer class — one worker's training loop, organised around the step protocol of
// docs/step-protocol.md — shared by the files that implement it: trainer.cc (set-up, the loop, the quorum),
// trainer_step.cc (compute, reduce, vote, apply, metrics and checkpoints after a commit) and trainer_state.cc
// (hashes, snapshots, state transfer between members). Internal to the trainer: the public entry points are
// Train / TrainElastic in train/trainer.h. Not thread-safe: one Trainer per worker, driven by one thread
// (its collectives run on the BucketReducer's communication thread).
#pragma once
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

namespace keel::trainer_support {

// Attempts of one step in a row whose cross-check differed without a majority before the job stops (a
// transient fault resolves on the next attempt, which gets a third opinion).
inline constexpr int kMaxUnresolvedVotes = 4;

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
  // metrics.jsonl (leader only): opened (and trimmed to the steps before `step`) when not open; a write that
  // fails (a full disk) is reported once and the file reopened at the next commit (trainer_run_dir.cc).
  Status OpenMetrics(int64_t step);
  void WriteMetricsLine(const nlohmann::json& m);
  void DropAbandonedCheckpoints(int64_t rollback_step);
  Status CheckSnapshotData(const TrainingSnapshot& snap, const std::string& dir) const;
  // For AsyncCheckpointer::Start: elastic, a checkpoint is not written once this member has been evicted from
  // the generation it was started in (null when not elastic).
  std::function<std::string()> PublishCheck() const;

  // The step protocol.
  Result<bool> RunStep();
  Result<bool> Quorum();
  Status FinishElasticJob();
  struct Plan {
    int attempt = 0;         // the group's attempt number in this generation (agreed by every member)
    int member_attempt = 0;  // this member's attempts at the step so far (for its log)
    MicroSet mine;
    std::vector<VerifyTask> verify;
    std::vector<MicroSet> assigned;
  };
  Plan MakePlan(int attempt, int member_attempt);
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
  // counted: the failed attempt is already in result_.attempts_failed (Abort counts its own).
  Status GroupFailed(const Status& why, bool counted = false);
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
  uint64_t MomentsHash();  // the AdamW moments alone (diloco transfers check them: StateHash leaves them out)
  void TakeSnapshot();
  bool RestoreSnapshot();
  void ClearHoldings();
  void BeginCompute();
  void ReportSaturation();
  // Whether this step's vote compares whole-state hashes (and its state becomes the rollback snapshot): every K =
  // --check-every steps. A diloco round moves the counter H steps at once, so there it is the round after which a
  // multiple of K was passed (only `step_ % K == 0` fired every lcm(H, K) steps). A pure function of the step
  // and the job's options, so every member decides alike.
  bool CheckStep() const {
    const int64_t K = o_.check_every;
    if (K <= 0) return false;
    if (step_ % K == 0) return true;
    const int64_t H = o_.sync == "diloco" ? o_.inner_steps : 1;
    return H > 1 && step_ >= H && step_ / K != (step_ - H) / K;
  }
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
  MicroSet disputed_;                  // cross-checks that differed in the last attempt: a third opinion next
  int unresolved_votes_ = 0;           // attempts of this step in a row whose cross-check had no majority
  std::vector<int> last_counts_;       // the last full-step split (for the "shares" event)
  // This attempt.
  MicroSet bad_;
  int computed_ = 0;
  size_t saturated_ = 0;  // this attempt's gradient values clamped by the exact sum (exact_sum.h)
  double compute_s_ = 0;
  std::vector<std::pair<int, uint64_t>> verify_hashes_;

  struct Snapshot {
    bool valid = false;
    int64_t step = 0, epoch = 0;
    std::vector<float> p, m, v;
    nlohmann::json aux;
  } snap_;
  // diloco: this member's inner AdamW moments as they were when the current round's inner steps began (the inner
  // steps move them in place). A snapshot taken at the round's vote takes these, not the moved ones, so a rollback
  // does not count the round's gradients twice; inner steps run again in the same round start from them too.
  // Valid for (step, epoch) while no state was installed (moments_version_ counts installs).
  struct RoundStart {
    std::vector<float> m, v;
    int64_t step = -1, epoch = -1, version = -1;
  } round_start_;
  int64_t moments_version_ = 0;
  bool RoundStartValid() const {
    return round_start_.step == step_ && round_start_.epoch == epoch_ && round_start_.version == moments_version_;
  }
  // Whether the group holds a rollback snapshot (the same verified step for every member that has one; a member that
  // joined after it was taken has none and receives the restored state): every member must take the same spike
  // decision, so it rests on this, not on snap_.valid.
  bool group_snapshot_ = false;
  // Checkpoints after this step belong to a trajectory a rollback abandoned but could not delete yet (no older
  // valid one existed): the first checkpoint this run commits after the rollback replaces them (-1: none).
  int64_t abandoned_after_ = -1;
  int64_t ckpt_started_step_ = -1;  // the step of the checkpoint write last started
  void DropAbandonedAfterCommit();
  int64_t group_snap_step_ = -1;  // its step (what a rollback returns to), known to members that hold none too
  Status deferred_ckpt_error_;     // a checkpoint write that failed, found by DropAbandonedCheckpoints

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
  double freeze_s_ = 0;  // an injected `freeze` armed for this step's reduce
  EventLog own_events_;
  EventLog* events_ = &own_events_;  // the membership's when elastic (one identity, one file)
  int64_t faults_pending_since_step_ = -1;  // a fault is being recovered from (for the "recovered" event)
  double fault_t_ = 0;

  // Output. The checkpoint copies outlive the writer (declared first, destroyed last).
  std::vector<float> ckpt_p_, ckpt_m_, ckpt_v_;
  std::unique_ptr<AsyncCheckpointer> ckpt_;
  std::unique_ptr<std::ofstream> metrics_;
  bool metrics_write_failed_ = false;  // a metrics line could not be written (reopened at every commit)
  bool run_dir_ready_ = false;
  double peak_ = 1;
  int peak_remeasured_ = 0;  // times the GEMM peak was measured again because MFU came out above 100 %
  double flops_per_token_ = 0;
  int64_t tokens_per_step_ = 0;
  double last_tokens_ = 0;  // tokens behind the last committed update (diloco: what the surviving members did)
  TrainResult result_;
  std::vector<double> phase_ms_;  // the committed attempt: compute, reduce wait, vote, apply
  int64_t steps_this_run_ = 0;
  double tokens_done_ = 0, loop_seconds_ = 0;
  bool tty_ = false;
  Clock::time_point t_start_ = Clock::now();
};

// True when no listed checkpoint carries its COMMITTED marker (nothing was ever committed: nothing to resume).
bool NoneCommitted(const std::vector<CheckpointInfo>& ckpts);

}  // namespace keel::trainer_support
