// membership_watch.cc: the heartbeat thread and the watchdog of an ElasticGroup (see membership.h): each member
// publishes its heartbeat and progress, watches the current generation's peers (a silent or dead peer aborts the
// communicator, so a collective blocked on it fails fast), and notices joiners waiting for the next generation.
#include <algorithm>
#include <chrono>

#include "elastic/fault_inject.h"
#include "elastic/membership.h"
#include "elastic/membership_util.h"

namespace keel {
using namespace membership_detail;

void ElasticGroup::HeartbeatLoop() {
  double next_beat = 0, next_scan = 0;
  for (;;) {
    bool write = false;
    {
      std::unique_lock<std::mutex> l(mu_);
      if (stop_) return;
      const double now = Now();
      if (dirty_ || now >= next_beat) {
        dirty_ = false;
        write = true;
        next_beat = now + o_.t.heartbeat_s;
      }
    }
    if (write) (void)WriteStatus(*hb_store_);
    const double now = Now();
    const double freeze = freeze_s_.exchange(0);
    if (freeze > 0) HangProcessFor(freeze);  // injected: `now` is now stale
    Watch(now);
    if (now >= next_scan || freeze > 0) {
      ScanJoiners(now);
      next_scan = now + o_.t.heartbeat_s;
    }
    if (freeze > 0) {
      std::lock_guard<std::mutex> l(mu_);
      freezing_ = false;
      freeze_cv_.notify_all();
    }
    std::unique_lock<std::mutex> l(mu_);
    const double wake = std::min(next_beat, Now() + o_.t.watch_tick_s);
    const auto deadline = std::chrono::steady_clock::time_point(
        std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(wake)));
    cv_.wait_until(l, deadline, [&] { return stop_ || dirty_; });
  }
}

nlohmann::json ElasticGroup::Observe(Store& s, int64_t uid, double now, Status* read_error) {
  auto v = s.TryGet("m/" + std::to_string(uid));
  if (!v.ok() && read_error) *read_error = v.status();
  if (!v.ok() || !v->has_value()) return nlohmann::json();
  auto rec = nlohmann::json::parse(**v, nullptr, false);
  if (!rec.is_object()) return nlohmann::json();
  const int64_t seq = IntOr(rec, "seq", -1);
  // The change was seen now, after the read, not at the caller's `now`: that was taken before the store reads,
  // and a process stopped in between (SIGSTOP, a long store call) stamped a fresh heartbeat with a time from
  // before its own pause. A member woken from a stop then took its live peer for dead ("silent" for the length
  // of its own stop), formed a generation alone and committed steps the peer committed too: a fork (chaos run
  // G; reproduced by the `freeze` fault, AWorkerWokenFromAStopDoesNotTakeItsLivePeerForDead).
  const double seen = std::max(now, Now());
  std::lock_guard<std::mutex> l(peers_mu_);
  Peer& p = peers_[uid];
  if (p.seq != seq) {
    if (p.seq == -1) {
      // First sight: trust the record's age only when it was written on this machine (the same clock). Another
      // machine's clock may run behind ours: a joiner whose clock ran ahead took every live peer for long silent
      // and formed a generation without them. A remote peer seen for the first time counts as just heard from;
      // if it is dead, it is found silent --hang-timeout later.
      double age = 0;
      if (rec.contains("t") && rec["t"].is_number() && StrOr(rec, "machine", "") == machine_)
        age = std::max(0.0, EventLog::Now() - rec["t"].get<double>());
      p.last_seen = seen - age;
    } else {
      p.last_seen = seen;
    }
    p.seq = seq;
  }
  p.rec = rec;
  return rec;
}

PeerInfo ElasticGroup::InfoOf(int64_t uid, double now) {
  (void)now;
  PeerInfo info;
  info.uid = uid;
  std::lock_guard<std::mutex> l(peers_mu_);
  auto it = peers_.find(uid);
  if (it == peers_.end()) return info;
  const auto& rec = it->second.rec;
  info.last_seen = it->second.last_seen;
  const std::string state = StrOr(rec, "state", "");
  info.gone = state == "gone" || state == "quarantined" ||
              (StrOr(rec, "machine", "") == machine_ && LocalProcessGone(IntOr(rec, "pid", -1)));
  info.ready = rec.contains("after");
  info.after = IntOr(rec, "after", -2);
  info.has_state = rec.contains("has_state") && rec["has_state"].is_boolean() && rec["has_state"].get<bool>();
  return info;
}

void ElasticGroup::Watch(double now) {
  const int64_t g = watched_gen_.load();
  if (g < 0 || gen_dead_.load()) return;
  std::vector<int64_t> members;
  {
    std::lock_guard<std::mutex> l(watch_mu_);
    members = watched_members_;
  }
  std::string why, how;
  int64_t lost = -1;
  for (int64_t u : members) {
    if (u == uid_.load()) continue;
    nlohmann::json rec = Observe(*hb_store_, u, now);
    PeerInfo p = InfoOf(u, now);
    if (rec.is_null()) continue;
    const std::string state = StrOr(rec, "state", "");
    if (state == "gone" || state == "quarantined") {
      why = "member " + std::to_string(u) + " left the job (" + state + ")";
      how = state;
    } else if (p.gone) {
      why = "member " + std::to_string(u) + " (pid " + std::to_string(IntOr(rec, "pid", -1)) + ") exited";
      how = "crash";
    } else if (p.ready && p.after >= g && StrOr(rec, "why", "") != "reform") {
      why = "member " + std::to_string(u) + " left generation " + std::to_string(g);
      how = "left";
    } else if (IntOr(rec, "gen", -1) > g) {
      why = "member " + std::to_string(u) + " is in a newer generation";
      how = "superseded";
    } else if (now - p.last_seen > o_.t.stale_s) {
      why = "member " + std::to_string(u) + " silent for " + Secs(now - p.last_seen) +
            " (hung, stopped or unreachable; --hang-timeout " + Secs(o_.t.hang_s) + ")";
      how = "hang";
    } else {
      continue;
    }
    lost = u;
    break;
  }
  // A collective every member is blocked in, for longer than any transfer of its payload should take.
  if (why.empty()) {
    std::string my_key;
    double my_since = 0;
    {
      std::lock_guard<std::mutex> l(mu_);
      my_key = waiting_;
      my_since = waiting_since_;
    }
    // A ring allreduce sends 2(N-1)/N x the payload per member (a 4-member group 1.5x), a compressed exchange's
    // allgather (N-1) x its block: at 100 MB/s.
    const double n = static_cast<double>(std::max<size_t>(members.size(), 1));
    const double sent = std::max(payload_bytes_.load() * 2.0 * (n - 1.0) / n, gather_block_bytes_.load() * (n - 1.0));
    const double allowance = o_.t.hang_s + sent / 100e6;
    bool all = !my_key.empty() && now - my_since > allowance;
    for (int64_t u : members) {
      if (u == uid_.load()) continue;
      std::string key;
      {
        std::lock_guard<std::mutex> l(peers_mu_);
        auto it = peers_.find(u);
        if (it != peers_.end()) key = StrOr(it->second.rec, "wait", "");
      }
      auto& seen = wait_seen_[u];  // when this observer first saw the member blocked in `key`
      if (seen.first != key) seen = {key, Now()};  // not `now`: that predates the reads (see Observe)
      all = all && key == my_key && now - seen.second > allowance;
    }
    if (all && members.size() > 1) {
      why = "every member has been blocked in " + my_key + " for over " + Secs(allowance) +
            " (a collective that does not return)";
      how = "stuck";
    }
  }
  if (why.empty()) {
    auto latest = hb_store_->TryGet("latest");
    if (latest.ok() && latest->has_value()) {
      const int64_t l = std::atoll((*latest)->c_str());
      if (l > g) {
        why = "a newer generation " + std::to_string(l) + " exists without this member";
        how = "evicted";
      }
    }
  }
  if (why.empty()) return;
  {
    std::lock_guard<std::mutex> l(watch_mu_);
    if (watched_gen_.load() != g || gen_dead_.load()) return;
    dead_since_ = Now();
    gen_dead_ = true;
    dead_reason_ = why;
    if (watched_comm_) watched_comm_->Abort();
  }
  if (how != "left" && how != "superseded") {
    if (log_) log_("watchdog: generation " + std::to_string(g) + ": " + why + "; aborting its collectives");
    if (events_) {
      nlohmann::json f = {{"gen", g}, {"how", how}, {"reason", why}};
      if (lost >= 0) f["lost_uid"] = lost;
      events_->Emit("detect", f);
    }
  }
}

void ElasticGroup::ScanJoiners(double now) {
  const int64_t g = watched_gen_.load();
  if (g < 0) {
    joiners_ = false;
    return;
  }
  std::vector<int64_t> members;
  {
    std::lock_guard<std::mutex> l(watch_mu_);
    members = watched_members_;
  }
  auto n = hb_store_->Counter("uids");
  if (!n.ok()) return;
  bool found = false;
  for (int64_t u = 0; u < *n; ++u) {
    if (u == uid_.load() || std::find(members.begin(), members.end(), u) != members.end()) continue;
    {
      std::lock_guard<std::mutex> l(peers_mu_);
      if (std::find(dead_uids_.begin(), dead_uids_.end(), u) != dead_uids_.end()) continue;
    }
    nlohmann::json rec = Observe(*hb_store_, u, now);
    if (rec.is_null()) continue;
    PeerInfo p = InfoOf(u, now);
    if (p.gone) {
      std::lock_guard<std::mutex> l(peers_mu_);
      dead_uids_.push_back(u);
      continue;
    }
    if (Alive(p, now, o_.t.stale_s) && p.ready && p.after >= g) found = true;
  }
  joiners_ = found && static_cast<int>(members.size()) < o_.max_workers;
}

std::string ElasticGroup::dead_reason() {
  std::lock_guard<std::mutex> l(watch_mu_);
  return dead_reason_;
}

void ElasticGroup::Unwatch() {
  std::lock_guard<std::mutex> l(watch_mu_);
  watched_gen_ = -1;
  watched_members_.clear();
  watched_comm_ = nullptr;
  gen_dead_ = false;
  dead_reason_.clear();
  joiners_ = false;
}

void ElasticGroup::WatchCommunicator(Communicator* c) {
  std::lock_guard<std::mutex> l(watch_mu_);
  if (watched_gen_ >= 0) watched_comm_ = c;
}

}  // namespace keel
