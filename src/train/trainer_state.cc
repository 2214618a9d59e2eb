// trainer_state.cc: the Trainer's training state as a whole (train/trainer_impl.h) — the auxiliary JSON state,
// host copies, parameter and state hashes for the votes, rollback snapshots, the state sync of a new group and
// the checksummed state transfer between members, and the view a checkpoint is written from.
#include "train/trainer_impl.h"

#include <cstring>

namespace keel::trainer_support {

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
  ++moments_version_;
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

uint64_t Trainer::MomentsHash() {
  std::vector<float> m(P_), v(P_);
  backend_->Download(m.data(), adam_->m(), P_);
  backend_->Download(v.data(), adam_->v(), P_);
  return Hash64(v.data(), P_ * sizeof(float), Hash64(m.data(), P_ * sizeof(float), 3));
}

void Trainer::TakeSnapshot() {
  // Nothing restores it for one static worker without spike detection (a rollback needs members that disagree):
  // skip the host copy of parameters and Adam moments (1.5 GB at GPT-2 small, more than the rest of the run).
  if (!elastic_ && size_ <= 1 && o_.spike_factor <= 0) return;
  StateToHost(&snap_.p, &snap_.m, &snap_.v);
  if (diloco_ && RoundStartValid()) {  // the moments before this round's inner steps (see round_start_)
    snap_.m = round_start_.m;
    snap_.v = round_start_.v;
  }
  if (diloco_) diloco_->Snapshot();
  snap_.aux = AuxJson();
  snap_.step = step_;
  snap_.epoch = epoch_;
  snap_.valid = true;
  group_snapshot_ = true;
  group_snap_step_ = step_;
}

// Back to the snapshot (with a new epoch, so the restored state outranks newer ones). False when this member
// has none (it then holds no state and receives it from a member that restored).
bool Trainer::RestoreSnapshot() {
  const int64_t new_epoch = epoch_ + 1;
  ClearHoldings();
  data_bad_.clear();  // the replayed steps start without this step's non-finite records
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
  // Strikes and speed figures describe the members, not the model: a rollback keeps them (a member that keeps
  // faulting around rollbacks must not escape --quarantine-after).
  auto strikes = strikes_;
  auto speed = speed_;
  InstallAux(snap_.aux);
  strikes_ = std::move(strikes);
  speed_ = std::move(speed);
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
  mine.self_checked = has_state_ && committed_hash_ != 0 && ParamsHash() == committed_hash_ ? 1 : 0;
  mine.held = held_;
  mine.held_epoch = held_epoch_;
  mine.held_step = held_step_;
  mine.peak_gflops = peak_;
  if (snap_.valid) {
    mine.snap_epoch = snap_.epoch;
    mine.snap_step = snap_.step;
  }
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
  disputed_ = MicroSet{};  // member indices changed: the next attempt's cross-check starts afresh
  unresolved_votes_ = 0;
  if (receiver || group_held_[static_cast<size_t>(index_)].Empty()) {
    ClearHoldings();
    held_step_ = step_;
    held_epoch_ = epoch_;
  } else {
    held_ = group_held_[static_cast<size_t>(index_)];
  }
  // This step's record of non-finite micro-batches is local (not transferred): every member starts it afresh, or
  // a survivor would call a micro-batch the data's fault where a joiner blames the member that computed it.
  data_bad_.clear();
  need_sync_ = false;
  EnsureRunDir();
  // One rollback point for the whole group: the newest snapshot any member holds of the agreed state's lineage
  // (taken in the same epoch, at or before its step: the one every member present at the last check step took). A
  // member holding another one (older, or of an abandoned lineage) drops it, and a member that has none (it joined
  // after that snapshot was taken) does not take one at its own step, or a spike would send it back to another step
  // than the others (and, being the newest state, its choice would win the sync that follows); on a rollback it
  // receives the state of those that restored. If no member holds one, every member takes one now: the state all
  // hold is verified (hashes agree). That is the one case where a later rollback returns to another step than a
  // one-process run's (every member present at the last check step was lost): docs/step-protocol.md.
  int64_t group_snap_step = -1;
  for (const auto& r : all)
    if (r.snap_step >= 0 && r.snap_epoch == plan.epoch && r.snap_step <= plan.step)
      group_snap_step = std::max(group_snap_step, r.snap_step);
  // (--check-every 0 keeps no snapshot at all: one taken here would never be renewed, and a rollback to it would
  // send the run back to its first step and drop every checkpoint since. A vote that wants a rollback then finds
  // none, and the group goes on from the state the sync below agrees on.)
  if (group_snap_step < 0 && o_.check_every > 0) TakeSnapshot();
  else if (snap_.valid && (snap_.step != group_snap_step || snap_.epoch != plan.epoch)) snap_.valid = false;
  group_snapshot_ = snap_.valid || group_snap_step >= 0;
  if (group_snap_step >= 0) group_snap_step_ = group_snap_step;
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
    uint64_t moments_hash;  // diloco: the inner moments, which StateHash leaves out (they are per member)
  } h{0x4B45454C53594E43ull, 0, 0, P_, 0};
  std::string aux;
  if (me_src) {
    aux = AuxJson().dump();
    h.aux_len = aux.size();
    h.hash = StateHash();
    if (diloco_) h.moments_hash = MomentsHash();
  }
  {
    auto hb = std::make_shared<Header>(h);
    KEEL_RETURN_IF_ERROR(Collective([hb, source](Communicator* c) { return c->Broadcast(hb.get(), sizeof(Header), source); }));
    h = *hb;
  }
  if (h.magic == 0x4B45454C53594E43ull && h.params != P_) {
    const std::string what = "member " + std::to_string(members_[static_cast<size_t>(source)]) +
                             " (the state's source) has " + std::to_string(h.params) + " parameters, this worker " +
                             std::to_string(P_) + ": the model flags (--layers/--heads/--dim/--ctx/--vocab) differ";
    // A restarted worker that joined the running job is the odd one out (the others passed the job's
    // descriptor check together): no re-form can fix it, so it stops. Between original members, re-form.
    if (elastic_ && elastic_->joined_running_job()) return InvalidArgument(what);
    return Corrupt("state transfer: " + what);
  }
  if (h.magic != 0x4B45454C53594E43ull || h.aux_len > (1u << 24))
    return Corrupt("state transfer from member " + std::to_string(members_[static_cast<size_t>(source)]) +
                   ": malformed header");
  {
    auto ab = std::make_shared<std::string>(aux);
    ab->resize(h.aux_len);
    KEEL_RETURN_IF_ERROR(Collective([ab, source](Communicator* c) { return c->Broadcast(ab->data(), ab->size(), source); }));
    aux = *ab;
  }
  if (me_recv) ckpt_->WaitEncoded();
  // Host memory: the source sends from the model's and optimizer's own buffers; everyone else receives each
  // buffer into one scratch buffer, which a receiver copies into its own buffer once that broadcast succeeded.
  // Device memory goes through host copies. Shared with the broadcasts' closures: a broadcast given up on
  // (Collective's timeout) may still be running on the communication thread, and must write only into memory
  // that outlives it — never into the model, which the next generation trains on.
  auto p = std::make_shared<std::vector<float>>(), m = std::make_shared<std::vector<float>>(),
       v = std::make_shared<std::vector<float>>(), scratch = std::make_shared<std::vector<float>>();
  float* bufs[3];
  float* dest[3] = {nullptr, nullptr, nullptr};  // where a host receiver copies each received buffer
  if (host_ && me_src) {
    bufs[0] = model_->params(), bufs[1] = adam_->m(), bufs[2] = adam_->v();
  } else if (host_) {
    scratch->resize(P_);
    bufs[0] = bufs[1] = bufs[2] = scratch->data();
    if (me_recv) dest[0] = model_->params(), dest[1] = adam_->m(), dest[2] = adam_->v();
  } else {
    if (me_src) StateToHost(p.get(), m.get(), v.get());
    p->resize(P_), m->resize(P_), v->resize(P_);
    bufs[0] = p->data(), bufs[1] = m->data(), bufs[2] = v->data();
  }
  // A receiver's own buffers are overwritten from here on: should the transfer fail part-way (the source dies),
  // they hold a mix of old and new state, so the receiver holds no state until a transfer verifies (below), and
  // the next sync sends it again or loads the checkpoint.
  if (me_recv) {
    has_state_ = false;
    ClearHoldings();
    ++moments_version_;  // the moments are overwritten in place (host memory): a round-start copy is stale
  }
  const size_t bytes = P_ * sizeof(float);
  for (int k = 0; k < 3; ++k) {
    float* b = bufs[k];
    KEEL_RETURN_IF_ERROR(Collective([b, bytes, source, p, m, v, scratch](Communicator* c) {
      return c->Broadcast(b, bytes, source);
    }));
    if (dest[k]) std::memcpy(dest[k], b, bytes);
  }
  if (diloco_) {  // the outer momentum (host memory: diloco runs on the CPU backend)
    if (scratch->empty() && !me_src) scratch->resize(P_);  // device receivers: their p/m/v are host copies
    float* b = me_src ? diloco_->momentum() : scratch->data();
    KEEL_RETURN_IF_ERROR(Collective([b, bytes, source, p, m, v, scratch](Communicator* c) {
      return c->Broadcast(b, bytes, source);
    }));
    if (me_recv) {
      std::memcpy(diloco_->momentum(), b, bytes);
      diloco_->ResetFeedback();
    }
  }
  if (me_recv) {
    if (!host_) StateFromHost(p->data(), m->data(), v->data());
    auto a = nlohmann::json::parse(aux, nullptr, false);
    if (!a.is_object()) {
      has_state_ = false;
      return Corrupt("state transfer: malformed trainer state");
    }
    try {  // the peer's JSON: wrong types throw in nlohmann's accessors
      InstallAux(a);
    } catch (const nlohmann::json::exception& e) {
      return Corrupt(std::string("state transfer: malformed trainer state (") + e.what() + ")");
    }
    has_state_ = true;
    const uint64_t got = StateHash();
    if (diloco_ && MomentsHash() != h.moments_hash) {
      has_state_ = false;
      return Corrupt("state transfer from member " + std::to_string(members_[static_cast<size_t>(source)]) +
                     ": checksum mismatch in the inner optimizer moments");
    }
    if (got != h.hash || (expect_hash != 0 && got != expect_hash)) {
      has_state_ = false;
      return Corrupt("state transfer from member " + std::to_string(members_[static_cast<size_t>(source)]) +
                     ": checksum mismatch (received " + HashHex(got) + ", sent " + HashHex(h.hash) + ")");
    }
    committed_hash_ = ParamsHash();
    ClearHoldings();
    held_step_ = step_;
    held_epoch_ = epoch_;
    ef_->Reset();  // error feedback starts over with the received state
    // The snapshot is left alone: a repair stays in the group's lineage (the repaired member's snapshot is the
    // group's), and after a sync SyncState keeps or drops it by comparing it with the group's.
    log_("received the training state (step " + std::to_string(step_) + ") from member " +
         std::to_string(members_[static_cast<size_t>(source)]) + " (" + why + ", " +
         Fmt("%.1f MB", ((diloco_ ? 4.0 : 3.0) * P_ * sizeof(float) + aux.size()) / 1e6) + ", checksum " + HashHex(got) + " verified, " +
         Fmt("%.0f ms", Since(t0) * 1e3) + ")");
  }
  if (me_src) {
    std::vector<int64_t> to;
    for (int k : receivers) to.push_back(members_[static_cast<size_t>(k)]);
    Emit("state_transfer", {{"why", why}, {"step", step_}, {"to", to}, {"bytes", (diloco_ ? 4.0 : 3.0) * P_ * sizeof(float) + aux.size()},
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
  // The running loss statistics, so that spike detection goes on after a resume as it would have without the
  // interruption (it used to start over, blind for 20 steps). Strikes and speeds are not kept: they are keyed by
  // member uids, which a new job hands out afresh.
  s.state["loss_stats"] = {{"loss_mean", loss_mean_}, {"loss_var", loss_var_}, {"loss_n", loss_n_}};
  s.tokenizer = tokenizer_bytes_;
  return s;
}

}  // namespace keel::trainer_support
