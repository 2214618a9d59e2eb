// trainer_run_dir.cc: the Trainer and its run directory (train/trainer_impl.h) — the end of an elastic job (the
// final checkpoint, the done mark, a leader replaced or evicted meanwhile), the reload from disk when no live
// member holds the state, the data check of a loaded checkpoint, the evicted writer's check before a checkpoint
// is published, and the cleanup of checkpoints a rollback abandoned.
#include "train/trainer_impl.h"

#include <cstring>
#include <thread>

namespace keel::trainer_support {

// The last step is committed (elastic). The leader commits the final checkpoint and marks the job done; every
// other member waits for that mark before it exits. A launcher takes a worker's exit 0 for the end of the job and
// restarts nobody after it, so a member that left at once would leave a leader dying in the final write with no
// one to finish: instead the others see the leader go (the watchdog), re-form, and the new leader finishes.
Status Trainer::FinishElasticJob() {
  for (;;) {
    if (leader()) {
      if (o_.checkpoint_every > 0 && ckpt_started_step_ != step_ && has_state_) {
        // A new leader after the old one died: the final checkpoint may be missing or half-written.
        EnsureRunDir();
        KEEL_RETURN_IF_ERROR(ckpt_->Wait());
        if (!host_) StateToHost(&ckpt_p_, &ckpt_m_, &ckpt_v_);
        KEEL_RETURN_IF_ERROR(ckpt_->Start(CheckpointView(step_), step_, nullptr, PublishCheck()));
        ckpt_started_step_ = step_;
        log_("writing the final checkpoint (step " + std::to_string(step_) + ") in place of the previous leader");
      }
      KEEL_RETURN_IF_ERROR(ckpt_->Wait());
      KEEL_RETURN_IF_ERROR(deferred_ckpt_error_);
      DropAbandonedAfterCommit();
      // A leader evicted meanwhile (frozen in the final write: the write was skipped, see PublishCheck) must not
      // mark the job done: the group that went on without it finishes the job, or this member re-forms with it.
      auto evicted = elastic_->EvictedSince(gen_no_, elastic_->uid());
      if (!ckpt_->last_write_skipped() && !(evicted.ok() && *evicted)) {
        elastic_->Unwatch();
        return elastic_->MarkDone(step_);
      }
      ckpt_started_step_ = -1;
      log_("this member was evicted from generation " + std::to_string(gen_no_) +
           " before the job was marked done: re-forming to finish it");
    } else {
      bool group_ended = false;
      while (!group_ended) {
        if (stop_ && stop_->load()) {
          result_.stopped_early = true;
          return Status::Ok();
        }
        // The leader marks the job done before it leaves, so a dead group is checked after the mark. A store
        // error counts as not done yet (the watchdog decides whether the group is alive).
        const bool dead = elastic_->generation_dead();
        auto done = elastic_->JobDone();
        if (done.ok() && *done) {
          elastic_->Unwatch();
          finished_ = true;
          return Status::Ok();
        }
        group_ended = dead;
        if (!dead) std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      log_("the group ended before the job was marked done (" + elastic_->dead_reason() +
           "): re-forming to finish it");
    }
    need_group_ = true;
    voluntary_ = false;
    elastic_->SetFinishing();
    KEEL_ASSIGN_OR_RETURN(bool have_group, Quorum());
    if (!have_group) return Status::Ok();  // the job is done (another member finished it), or stopped
    // The state sync ranks epochs before steps: should it have brought back an unfinished state, train on
    // (with the quorum --min-workers asks for again).
    if (step_ < o_.steps) {
      elastic_->SetFinishing(false);
      return Status::Ok();
    }
  }
}

// Every member of the group joined a running job and nobody holds state (the whole job was lost and
// restarted): the state comes from the newest valid checkpoint, or fresh weights if there is none at all (an
// error if there are checkpoints but none of them loads).
Status Trainer::LoadStateFromDisk() {
  // This member's own checkpoint writer may still be committing and pruning (checkpoint.h: no reader while a
  // writer may delete).
  KEEL_RETURN_IF_ERROR(ckpt_->Wait());
  auto ckpts = ListCheckpoints(o_.out_dir);
  if (ckpts.ok() && !ckpts->empty() && !NoneCommitted(*ckpts)) {
    std::vector<std::string> warnings;
    std::string dir;
    auto snap = LoadSnapshot(o_.out_dir, true, &warnings, &dir);
    if (snap.ok()) {
      for (const auto& w : warnings) log_("warning: " + w);
      if (snap->tokenizer != tokenizer_bytes_ || snap->config.vocab != o_.model.vocab || snap->params.size() != P_)
        return InvalidArgument(dir + ": does not match this job's model or data");
      KEEL_RETURN_IF_ERROR(CheckSnapshotData(*snap, dir));
      resume_snap_ = std::move(*snap);
      start_step_ = resume_snap_.state["step"].get<int64_t>();
      resume_data_offset_ = 0;
      if (resume_snap_.state.contains("data_offset") && resume_snap_.state["data_offset"].is_number_integer())
        resume_data_offset_ = resume_snap_.state["data_offset"].get<int64_t>();
      resuming_ = true;
      log_("no live member holds the training state: loading " + dir + " (step " + std::to_string(start_step_) + ")");
      return LoadInitialState();
    }
    // Checkpoints exist but none loads: starting from fresh weights would silently throw the run's progress away.
    return Status(snap.status().code(), "no live member holds the training state, and no checkpoint in " +
                                            o_.out_dir + " loads: " + snap.status().message());
  }
  log_("no live member holds the training state and there is no checkpoint: starting from fresh weights");
  resuming_ = false;
  return LoadInitialState();
}

// A checkpoint's data position means something only in its own data: the fingerprint it was written with must
// be --data's (run.json says the same for the run, but a checkpoint copied or left from another run would not).
// Byte-tokenizer data sets share their tokenizer bytes, so the tokenizer check alone cannot tell them apart.
Status Trainer::CheckSnapshotData(const TrainingSnapshot& snap, const std::string& dir) const {
  const nlohmann::json& fp = snap.state.value("data_fingerprint", nlohmann::json());
  if (fp.is_string() && fp.get<std::string>() != data_->fingerprint())
    return InvalidArgument(dir + ": trained on different data (fingerprint " + fp.get<std::string>() + ", --data " +
                           o_.data_dir + " has " + data_->fingerprint() + ")");
  return Status::Ok();
}

// A leader frozen in the middle of a checkpoint write (SIGSTOP, a stalled VM) is evicted; the others may roll
// back and delete the checkpoints of the abandoned steps before it wakes, and its write would then land one of
// them after the cleanup, for --resume to take. So the writer asks the store, just before the write, whether
// this member is still in the group (ElasticGroup::EvictedSince). A store error lets the write go ahead: a
// checkpoint is worth more than the rare stale one this guards against. (A freeze between this check and the
// rename is not covered.)
std::function<std::string()> Trainer::PublishCheck() const {
  if (!elastic_) return nullptr;
  ElasticGroup* group = elastic_;
  const int64_t gen = gen_no_, uid = elastic_->uid();
  return [group, gen, uid]() -> std::string {
    auto evicted = group->EvictedSince(gen, uid);
    if (evicted.ok() && *evicted)
      return "this member (uid " + std::to_string(uid) + ") was evicted from generation " + std::to_string(gen) +
             " meanwhile (a newer generation exists without it)";
    return "";
  };
}

void Trainer::EnsureRunDir() {
  if (run_dir_ready_) return;
  if (leader() && !env_->Exists(run_json_path_)) {
    (void)env_->CreateDirs(o_.out_dir);
    nlohmann::json run = {{"keel_version", KEEL_VERSION}, {"model", o_.model.ToJson()},
                          {"data", o_.data_dir}, {"data_fingerprint", data_->fingerprint()}, {"seed", o_.seed}};
    // data is a user path, not necessarily UTF-8: replace rather than throw.
    (void)WriteFileAtomic(run_json_path_, run.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
  }
  if (env_->IsDir(o_.out_dir)) run_dir_ready_ = true;
}

// After a rollback to the group's snapshot (rollback_step), checkpoints of later steps hold the abandoned trajectory;
// --resume would take the newest of them and redo the spike without the skip. The leader deletes them (whether or
// not it holds the snapshot itself), after the write in flight, which may be one of them. When no checkpoint at or
// below rollback_step exists (--keep 1, say), a leader holding the restored state writes one first; one that does
// not keeps them (a stale checkpoint is better than none). A failed
// write found here ends training at the next checkpoint boundary, as it would have without the rollback; a failed
// deletion is a warning (the run goes on and rewrites those steps).
void Trainer::DropAbandonedCheckpoints(int64_t rollback_step) {
  if (!leader() || rollback_step < 0 || !env_->IsDir(o_.out_dir)) return;
  if (Status w = ckpt_->Wait(); !w.ok()) {
    if (deferred_ckpt_error_.ok()) deferred_ckpt_error_ = w;
    return;
  }
  auto list = ListCheckpoints(o_.out_dir);
  if (!list.ok()) return;
  // Only a valid checkpoint counts as one to fall back to: with the newer ones deleted, a corrupt older one
  // would leave --resume nothing.
  bool newer = false, older = false;
  for (const auto& c : *list) {
    if (c.step > rollback_step) newer = true;
    else if (!older && VerifyCheckpoint(c.dir).ok()) older = true;
  }
  if (!newer) return;
  if (!older && snap_.valid && has_state_ && step_ == rollback_step) {
    // None to fall back to (--keep 1, or the rollback goes back past the first checkpoint): first write one of
    // the restored state, synchronously (rare: a spike right after the only checkpoint).
    EnsureRunDir();
    if (!host_) StateToHost(&ckpt_p_, &ckpt_m_, &ckpt_v_);
    Status w = ckpt_->Start(CheckpointView(step_), step_);
    ckpt_started_step_ = step_;
    if (w.ok()) w = ckpt_->Wait();
    if (!w.ok()) {
      if (deferred_ckpt_error_.ok()) deferred_ckpt_error_ = w;
      return;
    }
    older = true;
  }
  if (!older) {
    log_("warning: the checkpoints after step " + std::to_string(rollback_step) + " hold the trajectory the rollback "
         "abandoned, but no older valid one exists: they are kept until this run commits its next checkpoint");
    abandoned_after_ = abandoned_after_ < 0 ? rollback_step : std::min(abandoned_after_, rollback_step);
    ckpt_started_step_ = -1;  // a write from before the rollback (waited for above) does not count
    return;
  }
  Status s = DeleteCheckpointsAfter(o_.out_dir, rollback_step);
  if (!s.ok())
    log_("warning: checkpoints after the rollback to step " + std::to_string(rollback_step) + " are left: " + s.message());
}

// The checkpoint last started has committed (its Wait() succeeded): after this leader's own rollback left the
// abandoned trajectory's checkpoints in place (no older valid one existed), those after it go now. Only after
// such a rollback: a checkpoint newer than the run is not proof of an abandoned trajectory in general (one a
// transient read error skipped at load is good), and deleting is not undone.
void Trainer::DropAbandonedAfterCommit() {
  if (ckpt_->last_write_skipped()) ckpt_started_step_ = -1;  // nothing committed (an evicted writer)
  if (abandoned_after_ < 0 || ckpt_started_step_ <= abandoned_after_) return;
  // Not a member that only believes it leads (evicted meanwhile, woken from a freeze). A store error: keep them.
  if (elastic_) {
    auto evicted = elastic_->EvictedSince(gen_no_, elastic_->uid());
    if (!evicted.ok() || *evicted) return;
  }
  Status s = DeleteCheckpointsAfter(o_.out_dir, ckpt_started_step_);
  if (!s.ok()) {
    log_("warning: checkpoints of the abandoned trajectory after step " + std::to_string(ckpt_started_step_) +
         " are left: " + s.message());
    return;
  }
  abandoned_after_ = -1;
}

Status Trainer::OpenMetrics(int64_t step) {
  if (metrics_) return Status::Ok();
  const std::string path = JoinPath(o_.out_dir, "metrics.jsonl");
  TruncateMetrics(path, step);  // (also drops a line torn by an earlier failed write)
  metrics_ = std::make_unique<std::ofstream>(path, std::ios::app);
  if (!*metrics_) {
    metrics_.reset();
    // At the start, a run directory that cannot take its metrics is an error; after a write failed (a full
    // disk), training goes on and the file is tried again at the next commit.
    if (!metrics_write_failed_) return IoError(path + ": cannot open for appending");
  }
  return Status::Ok();
}

void Trainer::WriteMetricsLine(const nlohmann::json& m) {
  if (!metrics_) return;
  const std::string path = JoinPath(o_.out_dir, "metrics.jsonl");
  *metrics_ << m.dump() << "\n";
  metrics_->flush();
  if (!*metrics_) {  // a failed write leaves the stream failed for good: reopen at the next commit
    if (!metrics_write_failed_)
      log_("warning: " + path + ": writing the metrics failed (" + std::strerror(errno) +
           "); training goes on, and the file is tried again at every commit");
    metrics_write_failed_ = true;
    metrics_.reset();
  } else if (metrics_write_failed_) {
    log_(path + ": writing the metrics works again (the lines of the steps in between are missing)");
    metrics_write_failed_ = false;
  }
}

}  // namespace keel::trainer_support
