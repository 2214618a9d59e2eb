// trainer_step.cc: steps (2)-(5) of the step protocol (docs/step-protocol.md) for the Trainer of
// train/trainer_impl.h — compute (forward/backward per micro-batch, gradients into the reducer; diloco's inner
// rounds), reduce, the commit vote and what a vote that fails does, apply (the optimizer or the outer step), and
// after a commit: validation, metrics, checkpoints.
#include "train/trainer_impl.h"

#include <utility>

namespace keel::trainer_support {

// ---- (2) compute -------------------------------------------------------------------------------------------

Trainer::Plan Trainer::MakePlan(int attempt, int member_attempt) {
  Plan p;
  p.attempt = attempt;
  p.member_attempt = member_attempt;
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
  if (fastest > 0 && !o_.even_shares)
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
  // Record when straggler shares change how a full step is split (the leader, on fresh attempts; elastic or not,
  // since in diloco and in compressed ddp the split changes the result).
  if (leader() && attempt == 0) {
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
    p.verify = PickVerifications(o_.seed, step_, attempt, o_.verify_fraction, p.assigned, disputed_);
  return p;
}

void Trainer::Compute(const Plan& plan) {
  if (diloco_) return ComputeRound(plan);
  const auto t0 = Clock::now();
  const int64_t step = step_;
  const int64_t data_step = step_ + data_offset_;
  BeginCompute();
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
  // Injected freeze: armed here, raised once this member waits in the step's reduce (FinishReduce), so that on
  // waking its training thread meets the failure at once, not after finishing its micro-batches.
  if (inject_ && elastic_ && !inject_->FreezeHeartbeat(step, &freeze_s_)) freeze_s_ = 0;
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
        if (inject_ && !corrupt_tried) {
          corrupt_tried = true;
          inject_->CorruptGradient(step, g, count, first_sum);
        }
        if (o_.deterministic) {
          size_t sat = 0;
          nonfinite += AddFixedPoint(acc_.data() + off, g, count, &sat);
          saturated_ += sat;
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
        if (inject_) inject_->CorruptGradient(step, g, P_, t.sum && first_sum);
        if (t.hash) verify_hashes_.push_back({t.micro, Hash64(g, P_ * sizeof(float))});
        if (t.sum) {
          size_t sat = 0;
          if (in_place_) nonfinite += RoundThroughFixedPoint(g, P_, &sat);
          else if (o_.deterministic) nonfinite += AddFixedPoint(acc_.data(), g, P_, &sat);
          else nonfinite += CountNonFinite(g, P_);
          saturated_ += sat;
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
  ReportSaturation();
  compute_s_ = Since(t0);
}

// Deterministic mode clamps gradient values to +-2^16 before its exact sum (exact_sum.h); a run that reaches
// that is diverging, and the clamp changes its gradient, so each worker says so (not counted on a device that
// rounds in place).
void Trainer::ReportSaturation() {
  if (saturated_ == 0) return;
  log_("warning: step " + std::to_string(step_ + 1) + ": " + std::to_string(saturated_) +
       " gradient value(s) of this worker's micro-batches beyond +-65536 were clamped by the deterministic "
       "exact sum (a run with such gradients is likely diverging; --fast does not clamp)");
}

// diloco's compute phase: the inner steps of the round on this member's share of each step's micro-batches
// (nothing when it already holds a pseudo-gradient for this round), then the pseudo-gradient exchange is
// queued on the communication thread.
void Trainer::ComputeRound(const Plan& plan) {
  const auto t0 = Clock::now();
  BeginCompute();
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
    if (RoundStartValid()) {  // this round's inner steps run again (the holding was dropped): same start
      backend_->Upload(adam_->m(), round_start_.m.data(), P_);
      backend_->Upload(adam_->v(), round_start_.v.data(), P_);
    } else {
      round_start_.m.resize(P_);
      round_start_.v.resize(P_);
      backend_->Download(round_start_.m.data(), adam_->m(), P_);
      backend_->Download(round_start_.v.data(), adam_->v(), P_);
      round_start_.step = step_;
      round_start_.epoch = epoch_;
      round_start_.version = moments_version_;
    }
    const auto r = diloco_->RunInner(Params(), grads_host_, o_.deterministic, step_,
                                     diloco_->RoundSteps(step_, o_.steps), micros, f);
    computed_ = r.micro_batches;
    saturated_ = r.saturated;
    ReportSaturation();
    for (int i : micros) {
      if (r.nonfinite) {
        bad_.Set(i);
      } else {
        held_.Set(i);
        held_loss_[i] = r.loss[i];
      }
    }
  }
  if (micros.empty() && !held_.Empty() && plan.member_attempt > 0)
    log_("round at step " + std::to_string(step_ + 1) + ": attempt " + std::to_string(plan.member_attempt + 1) +
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

// The per-attempt compute records start empty; holdings from another step or epoch are dropped.
void Trainer::BeginCompute() {
  bad_ = MicroSet{};
  computed_ = 0;
  saturated_ = 0;
  verify_hashes_.clear();
  if (held_step_ != step_ || held_epoch_ != epoch_) {
    ClearHoldings();
    held_step_ = step_;
    held_epoch_ = epoch_;
  }
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
  if (freeze_s_ > 0) elastic_->FreezeOnce(std::exchange(freeze_s_, 0.0));
  return reducer_->Wait(GiveUp());
}

// ---- (4) vote ----------------------------------------------------------------------------------------------

Result<VoteOutcome> Trainer::VoteOnStep(std::vector<VoteRecord>* records) {
  VoteRecord r;
  r.uid = uid_;
  r.gen = gen_no_;
  r.epoch = epoch_;
  r.step = step_;
  // Both hashes are compared between members only (elastic/quorum.cc): one member alone skips hashing P floats
  // every step and 3 P every --check-every steps (on a device: copying them to the host first, 1.7 s every 10
  // steps at GPT-2 small on an H100).
  r.params_hash = size_ > 1 ? ParamsHash() : 0;
  r.committed_hash = committed_hash_;
  r.state_hash = size_ > 1 && CheckStep() ? StateHash() : 0;
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
  // Below --min-workers the job waits for workers, and a quarantined one is never restarted: never go there.
  c.quarantine_floor = std::max(o_.quarantine_floor, elastic_ ? elastic_->options().min_workers : 1);
  c.partial = diloco_ != nullptr;
  // Strikes expire after 100 exchanges: 100 steps in ddp, 100 outer rounds in diloco (a round moves the step
  // counter H at once: counted in steps, a member faulty every round would never collect two strikes for H > 100).
  if (diloco_) c.strike_window = c.strike_window * std::max<int64_t>(1, o_.inner_steps);
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
    return GroupFailed(Aborted(v.reason), /*counted=*/true);
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
  disputed_ = v.disputed;
  // A cross-check tie that keeps coming back (a group of two has no third opinion; or three different answers)
  // cannot name the faulty member: stop, rather than redo the step forever.
  unresolved_votes_ = v.unresolved && v.quarantine.empty() ? unresolved_votes_ + 1 : 0;
  if (unresolved_votes_ >= kMaxUnresolvedVotes)
    return Aborted("step " + std::to_string(step_ + 1) + ": cross-checked gradients (micro-batches " +
                   v.disputed.ToString() + ") differed between members in " + std::to_string(unresolved_votes_) +
                   " attempts in a row and no majority names the faulty member (" +
                   (size_ == 2 ? "a group of two has no third opinion" : "no two of the results agree") +
                   "); stopping instead of redoing the step forever");
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
    // A repair or a rollback decided by the same vote still applies: the re-formed group's state sync picks the
    // majority hash, and with the quarantined member gone a corrupt member could tie with a sound one (a tie is
    // broken by index), so a member to repair gives up its state, and a rollback is taken before re-forming.
    if (std::find(v.repair.begin(), v.repair.end(), index_) != v.repair.end()) has_state_ = false;
    if (v.rollback) {
      const bool restored = RestoreSnapshot();
      DropAbandonedCheckpoints(group_snap_step_);
      log_("step " + std::to_string(step_ + 1) + ": rolled back to the verified snapshot of step " +
           std::to_string(restored ? step_ : snap_.step) + " before re-forming");
    }
    need_group_ = true;
    voluntary_ = false;
    return Status::Ok();
  }
  // Silent corruption: the minority takes the majority's state (the same group, no re-form).
  if (!v.repair.empty()) {
    Status s = TransferState(v.source, v.repair, 0, "repair");
    if (!s.ok()) return GroupFailed(s, /*counted=*/true);
  }
  if (v.rollback) {
    const bool restored = RestoreSnapshot();
    DropAbandonedCheckpoints(group_snap_step_);
    log_("step " + std::to_string(step_ + 1) + ": rolled back to the verified snapshot of step " +
         std::to_string(restored ? step_ : snap_.step) + (restored ? "" : " (this member has none: it will receive it)"));
    need_sync_ = true;
    Status s = SyncState();
    if (!s.ok()) return GroupFailed(s, /*counted=*/true);
  }
  return Status::Ok();
}

// ---- (5) apply -----------------------------------------------------------------------------------------------

double Trainer::Apply(const VoteOutcome& v, const std::vector<VoteRecord>& records) {
  double gnorm = 0;
  // Loss spike: instead of this update, return to the snapshot and skip the data window that led here.
  const double dev = std::sqrt(std::max(0.0, loss_var_));
  const bool spike = o_.spike_factor > 0 && loss_n_ >= 20 && group_snapshot_ && !v.skip_update &&
                     v.loss > loss_mean_ + o_.spike_factor * std::max(dev, 1e-3);
  if (spike) {
    const int64_t spike_step = step_;
    const int64_t skip = step_ + 1 - snap_.step;  // meaningful where this member holds the snapshot
    const std::string what = "step " + std::to_string(spike_step + 1) + ": loss spike (" + Fmt("%.4f", v.loss) +
                             " vs running mean " + Fmt("%.4f", loss_mean_) + "): ";
    // Every member takes the same decision (agreed state and group_snapshot_); one without a snapshot receives the
    // state of those that restored (the new epoch outranks it) in the sync that follows.
    // The replayed steps read the data after this step's window: from where the data stands now (an earlier
    // skip since the snapshot included), not from the snapshot's position. The snapshot takes the new position
    // too, so that another rollback to it (a second spike, a corruption) does not undo the skip.
    const int64_t data_now = data_offset_;
    const bool restored = RestoreSnapshot();  // step_, epoch_ (bumped), data_offset_, statistics
    if (restored) {
      data_offset_ = data_now + skip;
      snap_.aux["data_offset"] = data_offset_;
    }
    DropAbandonedCheckpoints(group_snap_step_);
    need_sync_ = true;
    log_(what + (restored ? "rolled back to step " + std::to_string(step_) + " and skipping " + std::to_string(skip) +
                                " step(s) of data"
                          : std::string("the group rolls back to its snapshot, which this member does not hold: it "
                                        "will receive the restored state")));
    if (leader())
      Emit("spike", {{"step", spike_step}, {"loss", v.loss}, {"rollback_to", restored ? step_ : int64_t{-1}},
                     {"skip", restored ? skip : int64_t{0}}});
    return -1;
  }
  // The tokens this update stands for (diloco: set by the outer step below; none when it is skipped).
  last_tokens_ = diloco_ ? 0.0 : static_cast<double>(tokens_per_step_);
  if (v.skip_update) {
    if (leader())
      log_("warning: step " + std::to_string(step_ + 1) + ": the data gives a non-finite loss or gradient; update skipped");
    if (leader()) Emit("data_fault", {{"step", step_}});
  } else {
    if (CheckStep()) TakeSnapshot();  // the state the vote just verified (before this update)
    ckpt_->WaitEncoded();             // a checkpoint being encoded from these buffers
    const int64_t* sum = size_ > 1 ? red_->data() : acc_.data();
    bool float_sum = false, summed_not_finite = false;
    if (diloco_) {
      gnorm = diloco_->ApplyOuter(Params(), size_ > 1);
      // The tokens behind this round: a member lost during the inner phase took its micro-batches with it.
      last_tokens_ = static_cast<double>(B_) * T_ * diloco_->applied_micro_batches();
      if (std::isnan(gnorm)) {  // the same decision on every member (the same averaged pseudo-gradient)
        gnorm = 0;
        last_tokens_ = 0;  // nothing was applied
        if (leader()) {
          log_("warning: round at step " + std::to_string(step_ + 1) +
               ": the outer update is not finite (an overflow in the pseudo-gradients); update skipped");
          Emit("data_fault", {{"step", step_}, {"outer", true}});
        }
      }
    } else if (codec_ != Codec::kNone && size_ > 1) {
      const float inv = 1.0f / static_cast<float>(M_);
      for (size_t j = 0; j < P_; ++j) grads_host_[j] = (*cred_)[j] * inv;
      float_sum = true;
    } else if (o_.deterministic && !in_place_) {
      FixedPointToFloat(grads_host_, sum, P_, 1.0 / M_);
    } else if (!o_.deterministic) {
      const float inv = 1.0f / static_cast<float>(M_);
      const float* src = size_ > 1 ? redf_->data() : grads_host_;
      if (!host_ && size_ <= 1) backend_->Download(staging_.data(), model_->grads(), P_);
      for (size_t j = 0; j < P_; ++j) grads_host_[j] = src[j] * inv;
      float_sum = true;
    }
    // A float sum (--fast) or a decoded compressed one can overflow to inf although every member's own gradient was
    // finite (the vote checks only those): the same decision on every member, as diloco's outer step makes it,
    // instead of an optimizer step that would write NaN into every member's weights. (The fixed-point sum clamps.)
    if (!diloco_ && float_sum && CountNonFinite(grads_host_, P_) > 0) {
      gnorm = 0;
      last_tokens_ = 0;
      summed_not_finite = true;
      if (leader()) {
        log_("warning: step " + std::to_string(step_ + 1) +
             ": the summed gradient is not finite (an overflow in the float or compressed sum); update skipped");
        Emit("data_fault", {{"step", step_}, {"summed", true}});
      }
    } else if (!diloco_ && codec_ != Codec::kNone && size_ > 1) {
      ef_->Commit();  // (not for a skipped update: the next exchange encodes again from the old residual)
    }
    if (!diloco_ && !summed_not_finite) {
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
  bool anyone_computed = false;
  for (const auto& r : records) {
    if (r.computed <= 0) continue;
    anyone_computed = true;
    const double x = r.compute_s / r.computed;
    auto it = speed_.find(r.uid);
    if (it == speed_.end()) speed_[r.uid] = x;
    else it->second = 0.8 * it->second + 0.2 * x;
  }
  // A member whose share rounded to no micro-batch is never measured again: its figure would stay the slow one
  // for good, long after it recovered. It drifts towards the fastest member's instead, so after a few steps it
  // gets work again and is measured afresh (agreed state: the records are the same on every member).
  if (anyone_computed) {
    double fastest = 0;
    for (const auto& r : records)
      if (r.computed > 0) {
        const double x = speed_[r.uid];
        fastest = fastest > 0 ? std::min(fastest, x) : x;
      }
    for (const auto& r : records) {
      auto it = speed_.find(r.uid);
      if (r.computed <= 0 && it != speed_.end()) it->second = 0.8 * it->second + 0.2 * fastest;
    }
  }
  for (auto it = speed_.begin(); it != speed_.end();)
    it = std::find(members_.begin(), members_.end(), it->first) == members_.end() ? speed_.erase(it) : std::next(it);
  last_advance_ = diloco_ ? diloco_->RoundSteps(step_, o_.steps) : 1;
  step_ += last_advance_;
  ClearHoldings();
  held_step_ = step_;
  group_held_.assign(static_cast<size_t>(size_), MicroSet{});
  avoid_.assign(static_cast<size_t>(size_), MicroSet{});
  disputed_ = MicroSet{};
  unresolved_votes_ = 0;
  data_bad_.clear();
  return gnorm;
}

Result<bool> Trainer::AfterCommit(const VoteOutcome& v, double gnorm, double dt, int attempts) {
  if (gnorm < 0) return true;  // rolled back (loss spike): nothing was committed
  const int64_t step = step_ - 1;  // the step just committed
  if (elastic_) elastic_->SetProgress(step_, epoch_, has_state_);
  tokens_done_ += last_tokens_;
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
    KEEL_RETURN_IF_ERROR(deferred_ckpt_error_);  // or one found failed at a rollback
    DropAbandonedAfterCommit();
    if (!host_) StateToHost(&ckpt_p_, &ckpt_m_, &ckpt_v_);  // host memory: encoded from the live buffers
    std::function<void(const std::vector<CheckpointFile>&)> before_write;
    bool then_kill = true;
    double freeze_s = 0;
    if (inject_ && inject_->TruncateCheckpoint(step_, &then_kill, &freeze_s)) {
      before_write = [dir = o_.out_dir, step = step_, then_kill, freeze_s](const std::vector<CheckpointFile>& files) {
        // then=kill|hang: the worst crash point (renamed, no marker); then=freeze: frozen amid the file writes.
        WriteTruncatedCheckpoint(dir, step, files, /*published=*/freeze_s <= 0);
        if (freeze_s > 0) return HangProcessFor(freeze_s);  // then the write goes on (a frozen leader waking)
        if (then_kill) ::raise(SIGKILL);
        for (;;) std::this_thread::sleep_for(std::chrono::seconds(3600));
      };
    }
    KEEL_RETURN_IF_ERROR(ckpt_->Start(CheckpointView(step_), step_, std::move(before_write), PublishCheck()));
    ckpt_started_step_ = step_;
    // The training thread's share of an asynchronous checkpoint (waiting for the previous write; device
    // backends: copying the state to the host): the stall it adds to this step.
    ckpt_stall_ms = Since(t_ckpt) * 1e3;
  }
  if (leader()) {
    EnsureRunDir();
    KEEL_RETURN_IF_ERROR(OpenMetrics(step));
    const double tok_s = last_tokens_ / dt;
    // peak_ is one worker's (its --threads); the group's tokens/s come from size_ such workers.
    double mfu = peak_ > 0 ? flops_per_token_ * tok_s / (peak_ * size_ * 1e9) : 0.0;
    // Above 100 %: the start-up measurement ran while the machine was busy (another job, a build). Measure again,
    // a few times at most (each costs a few GEMMs), rather than report an impossible figure.
    if (mfu > 1.0 && o_.peak_gflops <= 0 && peak_remeasured_ < 3) {
      ++peak_remeasured_;
      const double again = MeasureGemmPeakGflops(host_ ? nullptr : backend_.get());
      if (again > peak_) {
        log_("GEMM peak measured again: " + Fmt("%.0f", again) + " GFLOP/s (was " + Fmt("%.0f", peak_) +
             ", measured while the machine was busy)");
        peak_ = again;
        mfu = flops_per_token_ * tok_s / (peak_ * size_ * 1e9);
      }
    }
    const double avg_tok_s = tokens_done_ / loop_seconds_;
    const double eta = static_cast<double>(o_.steps - step_) * static_cast<double>(tokens_per_step_) / avg_tok_s;
    nlohmann::json m = {{"step", step}, {"loss", v.loss}, {"lr", LearningRate(o_.optim, step)}, {"grad_norm", gnorm},
                        {"tokens_per_s", tok_s}, {"mfu", mfu}, {"step_ms", dt * 1e3}, {"workers", size_},
                        {"elapsed_s", Since(t_start_)}};
    if (elastic_) m["gen"] = gen_no_, m["attempts"] = attempts;
    m["wire_bytes"] = wire_step;         // sent by this member (the leader) since the last commit
    m["wire_bytes_total"] = wire_now;
    if (diloco_) m["inner_steps"] = last_advance_;
    m["tokens"] = last_tokens_;  // trained on by this update (diloco: a lost member's micro-batches are not)
    if (phase_ms_.size() == 4)
      m["phase_ms"] = {{"compute", phase_ms_[0]}, {"reduce_wait", phase_ms_[1]}, {"vote", phase_ms_[2]},
                       {"apply", phase_ms_[3]}};
    if (val_loss >= 0) m["val_loss"] = val_loss;
    if (ckpt_stall_ms >= 0) m["checkpoint_stall_ms"] = ckpt_stall_ms;
    WriteMetricsLine(m);
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
    // The leader finishes the job (final checkpoint, done mark) with peers leaving as they see the mark: not a
    // fault. The others keep watching the group: the leader dying before the mark is one (FinishElasticJob).
    if (elastic_ && leader()) elastic_->Unwatch();
    return false;
  }
  // Admit joiners / drop a quarantined member: every member leaves this generation at this boundary.
  // (Not after a failure in this boundary's own collectives, the validation pass: that re-form is a fault,
  // which the peers' watchdogs must see as one.)
  if (elastic_ && (v.joiners || v.reform) && !need_group_) {
    need_group_ = true;
    voluntary_ = true;
  }
  // Straggler eviction: a member persistently slower than --straggler-evict x the median leaves, unless the
  // group would then fall below --min-workers: a slow group goes on, a group below quorum would wait for ever.
  // (Not the quarantine floor: a lone worker cannot cross-check, but it can be fast.)
  const int evict_floor = elastic_ ? elastic_->options().min_workers : 1;
  if (elastic_ && o_.straggler_evict > 1 && size_ > 1 && size_ - 1 >= evict_floor) {
    std::vector<double> xs;
    for (int64_t u : members_)
      if (speed_.count(u)) xs.push_back(speed_[u]);
    if (xs.size() == members_.size()) {
      std::vector<double> sorted = xs;
      std::sort(sorted.begin(), sorted.end());
      // The lower median: with two members the upper one is the slower member itself, which could never be
      // more than a multiple of itself.
      const double median = sorted[(sorted.size() - 1) / 2];
      // At most one member leaves per step (the slowest of those flagged; every member computes the same from
      // the agreed speeds), so that two stragglers at once cannot take the group below the floor together.
      int evict = -1;
      for (size_t k = 0; k < members_.size(); ++k) {
        int& streak = slow_streak_[members_[k]];
        streak = xs[k] > o_.straggler_evict * median ? streak + 1 : 0;
        if (streak >= 5 && (evict < 0 || xs[k] > xs[static_cast<size_t>(evict)])) evict = static_cast<int>(k);
      }
      for (size_t k = 0; k < members_.size(); ++k) {
        if (static_cast<int>(k) == evict) {
          if (static_cast<int>(k) == index_) {
            log_("this worker is " + Fmt("%.1fx", xs[k] / median) + " slower than the median for 5 steps; leaving "
                 "(--straggler-evict)");
            Emit("straggler", {{"step", step}, {"factor", xs[k] / median}, {"action", "evicted"}});
            elastic_->Leave("quarantined");
            // Not restarted by its launcher (a slow machine stays slow): the same exit status as a quarantine.
            return Aborted("quarantined as a straggler: " + Fmt("%.1fx", xs[k] / median) +
                           " slower than the median for 5 steps (--straggler-evict)");
          }
          // The others take the same decision from the same agreed speeds: they re-form without it at this
          // boundary, a planned re-form (its leaving is not a fault to detect in the next step's collectives).
          if (!need_group_) {
            need_group_ = true;
            voluntary_ = true;
          }
        }
      }
    }
  }
  return true;
}

}  // namespace keel::trainer_support
