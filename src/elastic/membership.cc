// membership.cc: joining and leaving, the quorum loop and group forming (see membership.h). The heartbeats and
// the watchdog are in membership_watch.cc.
#include "elastic/membership.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>

#include "dist/gloo_communicator.h"
#include "elastic/fault_inject.h"
#include "elastic/membership_util.h"
#include "dist/rendezvous.h"

namespace keel {
using namespace membership_detail;
namespace {

std::string Hostname() {
  char host[256] = {0};
  if (gethostname(host, sizeof(host) - 1) != 0) return "?";
  return host;
}

// Which process table a pid belongs to: the kernel's boot id and this process's pid namespace. Two machines
// with the same hostname (cloned images) or two containers on one host must not read each other's pids in their
// own /proc, which would declare a live remote peer crashed.
std::string MachineId() {
  std::string boot;
  if (FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "r")) {
    char buf[64] = {0};
    if (std::fgets(buf, sizeof buf, f)) boot = buf;
    std::fclose(f);
  }
  while (!boot.empty() && (boot.back() == '\n' || boot.back() == ' ')) boot.pop_back();
  struct stat ns;
  const std::string pidns = stat("/proc/self/ns/pid", &ns) == 0 ? std::to_string(ns.st_ino) : "?";
  return Hostname() + "/" + (boot.empty() ? "?" : boot) + "/" + pidns;
}

}  // namespace

bool LocalProcessGone(int64_t pid) {
  if (pid <= 0) return false;
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  if (!f) return true;
  std::string line;
  std::getline(f, line);
  size_t close = line.rfind(')');
  if (close == std::string::npos || close + 2 >= line.size()) return false;
  const char state = line[close + 2];
  return state == 'Z' || state == 'X';
}

double ElasticGroup::Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

ElasticGroup::ElasticGroup(std::shared_ptr<Store> store, std::shared_ptr<Store> hb_store, ElasticOptions o,
                           EventLog* events, std::function<void(const std::string&)> log)
    : store_(std::move(store)), hb_store_(std::move(hb_store)), o_(std::move(o)), events_(events),
      log_(std::move(log)), host_(Hostname()), machine_(MachineId()) {}

Result<std::unique_ptr<ElasticGroup>> ElasticGroup::Join(std::shared_ptr<Store> store, std::shared_ptr<Store> hb_store,
                                                         const ElasticOptions& o, const nlohmann::json& descriptor,
                                                         EventLog* events,
                                                         std::function<void(const std::string&)> log) {
  auto s = MakePrefixStore(std::move(store), "elastic");
  auto hs = MakePrefixStore(std::move(hb_store), "elastic");
  if (o.min_workers < 1 || o.max_workers < o.min_workers)
    return InvalidArgument("--min-workers " + std::to_string(o.min_workers) + " / --max-workers " +
                           std::to_string(o.max_workers) + ": expected 1 <= min <= max");
  KEEL_ASSIGN_OR_RETURN(bool first, s->SetIfAbsent("desc", Dump(descriptor)));
  if (!first) {
    KEEL_ASSIGN_OR_RETURN(auto text, s->TryGet("desc"));
    auto theirs = nlohmann::json::parse(text.value_or(""), nullptr, false);
    if (!theirs.is_object()) return Corrupt("malformed job descriptor in " + s->Describe());
    std::string diff = DescriptorDifference(theirs, descriptor);
    if (!diff.empty()) return InvalidArgument("refused by the job in " + s->Describe() + ": " + diff);
  }
  std::unique_ptr<ElasticGroup> g(new ElasticGroup(s, hs, o, events, std::move(log)));
  KEEL_ASSIGN_OR_RETURN(auto latest, s->TryGet("latest"));
  g->joined_running_ = latest.has_value();
  KEEL_ASSIGN_OR_RETURN(int64_t n, s->Increment("uids"));
  g->uid_ = n - 1;
  if (events) events->SetIdentity(g->uid_, o.rank);
  KEEL_RETURN_IF_ERROR(g->WriteStatus(*s));
  g->hb_thread_ = std::thread([p = g.get()] { p->HeartbeatLoop(); });
  return g;
}

ElasticGroup::~ElasticGroup() {
  bool leave = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    leave = state_ != "gone" && state_ != "quarantined";
  }
  if (leave) Leave("gone");
  StopHeartbeats();
}

void ElasticGroup::StopHeartbeats() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (hb_thread_.joinable()) hb_thread_.join();
}

void ElasticGroup::Leave(const std::string& state) {
  StopHeartbeats();
  {
    std::lock_guard<std::mutex> l(mu_);
    state_ = state;
    ready_ = false;
  }
  (void)WriteStatus(*store_);
}

Status ElasticGroup::WriteStatus(Store& s) {
  std::lock_guard<std::mutex> w(write_mu_);  // never taken with mu_ held (callers don't hold mu_)
  nlohmann::json rec;
  int64_t uid;
  {
    std::lock_guard<std::mutex> l(mu_);
    ++seq_;
    uid = uid_.load();
    rec = {{"seq", seq_}, {"t", EventLog::Now()}, {"pid", static_cast<int64_t>(getpid())}, {"host", host_}, {"machine", machine_},
           {"rank", o_.rank}, {"gen", gen_}, {"step", step_}, {"epoch", epoch_}, {"has_state", has_state_},
           {"state", state_}};
    if (!waiting_.empty()) rec["wait"] = waiting_;
    if (ready_) {
      rec["after"] = after_;
      rec["why"] = voluntary_ ? "reform" : "fault";
    }
  }
  return s.Set("m/" + std::to_string(uid), Dump(rec));
}

void ElasticGroup::Publish() {
  {
    std::lock_guard<std::mutex> l(mu_);
    dirty_ = true;
  }
  cv_.notify_all();
}

void ElasticGroup::SetProgress(int64_t step, int64_t epoch, bool has_state) {
  bool changed;
  {
    std::lock_guard<std::mutex> l(mu_);
    changed = has_state != has_state_;
    step_ = step;
    epoch_ = epoch;
    has_state_ = has_state;
  }
  if (changed) Publish();
}

void ElasticGroup::SetWaiting(const std::string& key) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (waiting_ == key) return;
    waiting_ = key;
    waiting_since_ = Now();
  }
  Publish();
}

Result<std::vector<int64_t>> ElasticGroup::GenerationMembers(Store& s, int64_t gen) {
  {
    std::lock_guard<std::mutex> l(peers_mu_);
    auto it = gen_members_cache_.find(gen);
    if (it != gen_members_cache_.end()) return it->second;
  }
  KEEL_ASSIGN_OR_RETURN(auto text, s.TryGet("g/" + std::to_string(gen)));
  if (!text) return NotFound("generation " + std::to_string(gen));
  auto j = nlohmann::json::parse(*text, nullptr, false);
  if (!j.is_object() || !j.contains("members") || !j["members"].is_array())
    return Corrupt("malformed generation record g/" + std::to_string(gen) + " in " + s.Describe());
  std::vector<int64_t> m;
  for (const auto& x : j["members"])
    if (x.is_number_integer()) m.push_back(x.get<int64_t>());
  std::sort(m.begin(), m.end());
  std::lock_guard<std::mutex> l(peers_mu_);
  gen_members_cache_[gen] = m;
  return m;
}

Result<std::unique_ptr<Communicator>> ElasticGroup::Form(int64_t gen, const std::vector<int64_t>& members, int index) {
  const int size = static_cast<int>(members.size());
  if (size == 1) return MakeLocalCommunicator();
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Result<std::unique_ptr<Communicator>> result{Internal("not formed")};
    std::atomic<bool> abort{false};
  };
  auto st = std::make_shared<State>();
  GlooOptions g;
  g.hostname = o_.host;
  g.iface = o_.iface;
  g.timeout_s = o_.t.op_s;
  auto gen_store = MakePrefixStore(store_, "g/" + std::to_string(gen) + "/gloo");
  // Gloo bounds its connect by the operation timeout (long, on purpose); forming must be quick, so it runs
  // on a thread that is abandoned (and finishes on its own) when the deadline passes.
  std::thread([st, gen_store, index, size, g] {
    auto r = ConnectGlooCommunicator(gen_store, index, size, g, &st->abort);
    std::lock_guard<std::mutex> l(st->mu);
    st->result = std::move(r);
    st->done = true;
    st->cv.notify_all();
  }).detach();
  std::unique_lock<std::mutex> l(st->mu);
  if (!st->cv.wait_for(l, std::chrono::duration<double>(o_.t.form_s), [&] { return st->done; })) {
    st->abort = true;
    return Timeout("generation " + std::to_string(gen) + " " + UidList(members) + ": not every member connected within " +
                   Secs(o_.t.form_s));
  }
  return std::move(st->result);
}

Status ElasticGroup::NewIncarnation(const std::string& why) {
  const int64_t old = uid_.load();
  {
    std::lock_guard<std::mutex> l(mu_);
    state_ = "gone";
  }
  (void)WriteStatus(*store_);
  KEEL_ASSIGN_OR_RETURN(int64_t n, store_->Increment("uids"));
  {
    std::lock_guard<std::mutex> l(mu_);
    uid_ = n - 1;
    seq_ = 0;
    gen_ = -1;
    state_ = "ready";
    has_state_ = false;
  }
  was_member_ = false;
  if (events_) {
    events_->SetIdentity(n - 1, o_.rank);
    events_->Emit("rejoin", {{"old_uid", old}, {"reason", why}});
  }
  if (log_) log_(why + "; rejoining as member " + std::to_string(n - 1));
  return WriteStatus(*store_);
}

void ElasticGroup::FreezeOnce(double secs) {
  {
    std::lock_guard<std::mutex> l(mu_);
    freezing_ = true;
    freeze_s_ = secs;
    dirty_ = true;  // the heartbeat thread's next round now, while this member waits in the reduce
  }
  cv_.notify_all();
}

Result<Generation> ElasticGroup::NextGeneration(const std::atomic<bool>* stop, bool voluntary) {
  {
    // An injected freeze: its heartbeat round after waking goes first (bounded, should that thread be gone).
    std::unique_lock<std::mutex> l(mu_);
    freeze_cv_.wait_for(l, std::chrono::seconds(30), [&] { return !freezing_ || stop_; });
  }
  Unwatch();
  {
    std::lock_guard<std::mutex> l(mu_);
    after_ = std::max(after_, gen_);
    ready_ = true;
    voluntary_ = voluntary;
    state_ = "ready";
  }
  Publish();
  const double t_start = Now();
  double ready_since = t_start, last_log = t_start;
  QuorumConfig cfg;
  // Finishing a trained job (the final checkpoint and the done mark) needs one member holding the state, not a
  // quorum: survivors below --min-workers would otherwise wait for ever.
  cfg.min_workers = finishing_.load() ? 1 : o_.min_workers;
  cfg.max_workers = o_.max_workers;
  cfg.stale_s = o_.t.stale_s;
  cfg.straggle_s = o_.t.straggle_s;
  cfg.initial_wait_s = o_.t.initial_wait_s;
  Store& s = *store_;
  std::vector<int64_t> unreachable;  // UnreachableJoiners, recomputed now and then (below)
  int64_t unreachable_after = -2;
  double unreachable_t = 0;
  // A store that does not answer (a Redis restart or fail-over, a network blip) while the group re-forms is
  // waited out for up to kStoreOutageS, polling as usual, instead of failing every re-forming member at once (in
  // steady training the heartbeats already ride such outages out). Every step of the loop may be redone: a
  // proposal whose reply was lost is found on the next pass as the generation record it wrote.
  constexpr double kStoreOutageS = 30;
  double outage_since = -1;
  // The outage ends with a pass whose reads and writes all succeeded (reads alone may work on a Redis replica that
  // refuses writes after a fail-over: that must still time out).
  auto answered = [&] {
    if (outage_since >= 0 && log_) log_("rendezvous store answers again");
    outage_since = -1;
  };
  auto retry = [&](const Status& st) {
    if (st.code() != Code::kUnavailable) return false;
    const double t = Now();
    if (outage_since < 0) {
      outage_since = t;
      if (log_) log_("rendezvous store unavailable while forming a generation (" + st.message() + "); retrying for up to " +
                     std::to_string(static_cast<int>(kStoreOutageS)) + " s");
    }
    if (t - outage_since > kStoreOutageS) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    return true;
  };
#define KEEL_STORE_OR_RETRY(var, expr)                          \
  auto var = (expr);                                            \
  if (!var.ok()) {                                              \
    if (retry(var.status())) continue;                          \
    return var.status();                                        \
  }
  for (;;) {
    if (stop && stop->load()) return Aborted("stopped while waiting for a generation to form");
    const double now = Now();
    KEEL_STORE_OR_RETRY(done_r, s.TryGet("done"));
    const auto& done = *done_r;
    if (done) {
      Generation g;
      g.done = true;
      return g;
    }
    KEEL_STORE_OR_RETRY(stopped_r, s.TryGet("stopped"));
    if (*stopped_r) {
      Generation g;
      g.stopped = true;
      return g;
    }
    int64_t after;
    {
      std::lock_guard<std::mutex> l(mu_);
      after = after_;
    }
    KEEL_STORE_OR_RETRY(latest_r, s.TryGet("latest"));
    const auto& latest_text = *latest_r;
    const int64_t latest = latest_text ? std::atoll(latest_text->c_str()) : -1;
    if (latest > after + 1) {
      // Generations were formed without this member: only the newest one matters.
      after = latest - 1;
      std::lock_guard<std::mutex> l(mu_);
      after_ = after;
    }
    QuorumView v;
    v.my_uid = uid_.load();
    v.after = after;
    v.ready_since = ready_since;
    v.expected_initial = o_.expected_initial;
    auto next = GenerationMembers(s, after + 1);
    if (next.ok()) {
      v.next_exists = true;
      v.next_members = *next;
    } else if (next.status().code() != Code::kNotFound) {
      if (retry(next.status())) continue;
      return next.status();
    }
    if (after >= 0) {
      auto prev = GenerationMembers(s, after);
      if (prev.ok()) v.prev_members = *prev;
    }
    if (!v.next_exists) {
      KEEL_STORE_OR_RETRY(n_r, s.Counter("uids"));
      const int64_t n = *n_r;
      // A peer whose record cannot be read is not absent: taking it for absent proposed generations without a
      // live member over one store timeout. The pass is redone (within the outage allowance) instead.
      Status read_error;
      for (int64_t u = 0; u < n && read_error.code() != Code::kUnavailable; ++u) {
        if (u == v.my_uid) continue;
        {
          std::lock_guard<std::mutex> l(peers_mu_);
          if (std::find(dead_uids_.begin(), dead_uids_.end(), u) != dead_uids_.end()) continue;
        }
        if (Observe(s, u, now, &read_error).is_null()) continue;
        PeerInfo p = InfoOf(u, now);
        if (p.gone) {
          std::lock_guard<std::mutex> l(peers_mu_);
          dead_uids_.push_back(u);
        }
        v.peers.push_back(p);
      }
      if (read_error.code() == Code::kUnavailable) {  // other read errors: the peer counts as absent, as before
        if (retry(read_error)) continue;
        return read_error;
      }
    }
    if (!v.next_exists) {
      // Up to 16 store reads: at most every 250 ms, and at once after a generation failed (v.after moved).
      if (v.after != unreachable_after || now - unreachable_t >= 0.25) {
        unreachable = Unreachable(s, v.after, v.peers);
        unreachable_after = v.after;
        unreachable_t = now;
      }
      v.unreachable = unreachable;
      if (std::find(v.unreachable.begin(), v.unreachable.end(), v.my_uid) != v.unreachable.end()) {
        if (events_) events_->Emit("unreachable", {{"uid", v.my_uid}, {"host", o_.host}, {"iface", o_.iface}});
        return Unavailable("member " + std::to_string(v.my_uid) + ": " + std::to_string(kFormFailuresToExclude) +
                           " generations with this worker failed to form (its peers could not connect to it, or it "
                           "to them) and the job goes on without it: check that --host / --iface (" +
                           (o_.iface.empty() ? "host " + (o_.host.empty() ? std::string("default") : o_.host)
                                             : "iface " + o_.iface) +
                           ") name an address the other machines can reach");
      }
      if (!v.unreachable.empty() && now - last_log >= 5) {
        if (log_) log_("leaving out member(s) " + UidList(v.unreachable) + ": generations with them failed to form");
        last_log = now;
      }
    }
    QuorumDecision d = Decide(now, v, cfg);
    switch (d.kind) {
      case QuorumDecision::kJoin: {
        answered();
        const int index = static_cast<int>(std::find(d.members.begin(), d.members.end(), v.my_uid) - d.members.begin());
        auto comm = Form(d.gen, d.members, index);
        if (!comm.ok()) {
          // The record that lets everyone tell a joiner that keeps groups from forming (UnreachableJoiners).
          (void)s.SetIfAbsent("ff/" + std::to_string(d.gen), "1");
          if (log_) log_("generation " + std::to_string(d.gen) + " could not form: " + comm.status().message());
          if (events_) events_->Emit("form_failed", {{"gen", d.gen}, {"reason", comm.status().message()}});
          {
            std::lock_guard<std::mutex> l(mu_);
            after_ = d.gen;
            voluntary_ = false;
          }
          Publish();
          ready_since = Now();
          continue;
        }
        {
          std::lock_guard<std::mutex> l(mu_);
          gen_ = d.gen;
          after_ = d.gen - 1;
          ready_ = false;
          state_ = "member";
        }
        Publish();
        was_member_ = true;
        Generation g;
        g.gen = d.gen;
        g.members = d.members;
        g.index = index;
        g.comm = std::move(comm).value();
        g.formed_s = Now() - t_start;
        {
          std::lock_guard<std::mutex> l(watch_mu_);
          watched_members_ = d.members;
          watched_comm_ = g.comm.get();
          gen_dead_ = false;
          dead_reason_.clear();
          watched_gen_ = d.gen;
        }
        return g;
      }
      case QuorumDecision::kSkip: {
        {
          std::lock_guard<std::mutex> l(mu_);
          after_ = d.gen;
          voluntary_ = false;
        }
        if (was_member_) {
          // A store outage here is ridden out like any other while forming: the pass is redone (if the new uid
          // was taken, was_member_ is already false and only the status write is left to the heartbeats).
          Status inc = NewIncarnation("evicted: generation " + std::to_string(d.gen) + " " + UidList(d.members) +
                                      " was formed without member " + std::to_string(v.my_uid));
          if (!inc.ok()) {
            if (retry(inc)) continue;
            return inc;
          }
        }
        Publish();
        ready_since = Now();
        answered();
        continue;
      }
      case QuorumDecision::kPropose: {
        nlohmann::json rec = {{"members", d.members}, {"by", v.my_uid}, {"t", EventLog::Now()}};
        KEEL_STORE_OR_RETRY(won, s.SetIfAbsent("g/" + std::to_string(d.gen), Dump(rec)));
        answered();
        if (*won) {
          // "latest" only lets late members skip ahead; the record itself is what counts (the next pass finds it
          // and returns the generation), so a failure to write it is not an error here.
          (void)s.Set("latest", std::to_string(d.gen));
          if (events_) events_->Emit("propose", {{"gen", d.gen}, {"members", d.members}, {"why", d.reason}});
        }
        continue;
      }
      case QuorumDecision::kWait:
        answered();
        if (now - last_log >= 5) {
          if (log_) log_("waiting for a generation: " + d.reason);
          last_log = now;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(15));
        continue;
    }
  }
}

#undef KEEL_STORE_OR_RETRY

std::vector<int64_t> ElasticGroup::Unreachable(Store& s, int64_t after, std::vector<PeerInfo> peers) {
  PeerInfo me;
  me.uid = uid_.load();
  me.ready = true;
  {
    std::lock_guard<std::mutex> l(mu_);
    me.has_state = has_state_;
  }
  peers.push_back(me);
  const double now = Now();
  bool joiner = false;
  for (const auto& p : peers)
    joiner |= !p.has_state && !p.gone && (p.uid == me.uid || Alive(p, now, o_.t.stale_s));
  if (!joiner) return std::vector<int64_t>{};
  // The last few generations, newest first: enough to see kFormFailuresToExclude failures in a row.
  std::vector<FormAttempt> recent;
  for (int64_t g = after; g >= 0 && g > after - 8; --g) {
    auto members = GenerationMembers(s, g);
    if (!members.ok()) continue;  // unknown or unreadable: it counts for nobody (store errors surface elsewhere)
    FormAttempt a;
    a.members = *members;
    {
      std::lock_guard<std::mutex> l(peers_mu_);
      a.failed = std::find(form_failed_.begin(), form_failed_.end(), g) != form_failed_.end();
    }
    if (!a.failed) {
      auto mark = s.TryGet("ff/" + std::to_string(g));
      if (mark.ok() && *mark) {
        a.failed = true;
        std::lock_guard<std::mutex> l(peers_mu_);
        form_failed_.push_back(g);  // final: a failure record is never taken back
      }
    }
    recent.push_back(std::move(a));
  }
  std::vector<PeerInfo> live;
  for (const auto& p : peers)
    if (p.uid == me.uid || Alive(p, now, o_.t.stale_s)) live.push_back(p);
  return UnreachableJoiners(recent, live);
}

bool ElasticGroup::Claim(const std::string& id) {
  auto r = store_->SetIfAbsent("claim/" + id, std::to_string(uid_.load()));
  return r.ok() && *r;
}

Status ElasticGroup::MarkDone(int64_t step) { return store_->Set("done", Dump({{"step", step}})); }

Status ElasticGroup::MarkStopped(int64_t step) { return store_->Set("stopped", Dump({{"step", step}})); }

Result<bool> ElasticGroup::JobDone() {
  KEEL_ASSIGN_OR_RETURN(auto v, store_->TryGet("done"));
  return v.has_value();
}

Result<bool> ElasticGroup::EvictedSince(int64_t gen, int64_t uid) {
  // Every generation after `gen`, in order until one does not exist ("latest" is best effort and may trail
  // the member lists), then the one "latest" names if it lies further on. The main store's connection: the
  // heartbeat thread's must never wait behind this. Member lists are cached (they never change).
  // A member `gen` itself does not list (one never admitted, whose trainer still counts generation 0) was never
  // in it: evicted as far as anything it does for `gen` goes.
  if (gen >= 0) {
    auto own = GenerationMembers(*store_, gen);
    if (own.ok() && !std::binary_search(own->begin(), own->end(), uid)) return true;
    if (!own.ok() && own.status().code() != Code::kNotFound) return own.status();
  }
  int64_t g = gen + 1;
  for (;; ++g) {
    auto members = GenerationMembers(*store_, g);
    if (!members.ok()) {
      if (members.status().code() == Code::kNotFound) break;
      return members.status();
    }
    if (!std::binary_search(members->begin(), members->end(), uid)) return true;
  }
  KEEL_ASSIGN_OR_RETURN(auto latest, store_->TryGet("latest"));
  const int64_t newest = latest ? std::strtoll(latest->c_str(), nullptr, 10) : -1;
  if (newest > g) {
    auto members = GenerationMembers(*store_, newest);
    if (members.ok() && !std::binary_search(members->begin(), members->end(), uid)) return true;
    if (!members.ok() && members.status().code() != Code::kNotFound) return members.status();
  }
  return false;
}

}  // namespace keel
