// membership.h: elastic membership over the rendezvous store — heartbeats, the hang/crash watchdog, and the
// agreement on each generation's member list (docs/step-protocol.md, "Membership").
//
// Keys (under "elastic/" in the job's store):
//   uids          INCR counter: each member incarnation gets a job-unique uid (a restart or a re-admission
//                 after an eviction gets a new one)
//   desc          the job descriptor (set once by the first member; every later one must match it)
//   m/<uid>       the member's status, rewritten by its heartbeat thread every --hang-timeout/10 and at once
//                 when it changes: {"seq","t","pid","host","machine","rank","gen","after"?,"why"?,"wait"?,
//                 "step","epoch","has_state","state"}; "after": G means "ready for a generation after G"
//   g/<G>         generation G's member list {"members":[uids],"by","t"}, created once (SetIfAbsent) by the
//                 leader, i.e. the lowest live uid ready for it (quorum.h Decide)
//   latest        the newest G (a hint for joiners)
//   g/<G>/gloo/*  Gloo's keys for that generation's communicator
//   claim/<id>    create-once claims (fault injection fires each fault once per job)
//   done          {"step"}: the job finished; late joiners exit
// The heartbeat thread uses its own store connection, so a training thread blocked in the store or in a
// collective never delays heartbeats. Its watchdog reads the heartbeats of the current generation every
// watch tick and aborts the generation's communicator (Communicator::Abort) when a member is silent for
// stale_s (hung, stopped, vanished), its process is gone (same host), it left the generation, or a newer
// generation exists (this member was evicted) — so the in-flight collective fails at once instead of at its
// timeout.
// Thread safety: the public methods are called from the training thread; the watchdog runs on its own.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "dist/communicator.h"
#include "dist/store.h"
#include "elastic/events.h"
#include "elastic/quorum.h"

namespace keel {

struct ElasticOptions {
  ElasticTimeouts t;
  int min_workers = 1;
  int max_workers = 1 << 20;
  int expected_initial = 1;  // workers launched together (the first generation waits for them)
  int rank = 0;              // launch rank (labels, fault injection)
  std::string host, iface;   // the address peers use for this member's Gloo sockets
};

// One formed generation: this member's communicator within it.
struct Generation {
  int64_t gen = -1;
  std::vector<int64_t> members;  // uids, ascending; comm rank = index
  int index = -1;
  std::unique_ptr<Communicator> comm;
  bool done = false;             // the job has finished: nothing was formed
  bool stopped = false;          // a member stopped the job (a stop request): nothing was formed
  double formed_s = 0;           // seconds from leaving the previous generation to having this one
};

class ElasticGroup {
 public:
  // Registers a new member: a uid, the descriptor check ("refused by job ...: ..."), heartbeats started.
  static Result<std::unique_ptr<ElasticGroup>> Join(std::shared_ptr<Store> store, std::shared_ptr<Store> hb_store,
                                                   const ElasticOptions& o, const nlohmann::json& descriptor,
                                                   EventLog* events,
                                                   std::function<void(const std::string&)> log);
  ~ElasticGroup();  // publishes "gone" and stops the heartbeat thread

  int64_t uid() const { return uid_.load(); }
  int rank() const { return o_.rank; }
  const ElasticOptions& options() const { return o_; }
  EventLog* events() const { return events_; }
  // True when a generation already existed as this member joined: it joins a running job (no state of its
  // own: it gets the state from a peer).
  bool joined_running_job() const { return joined_running_; }

  // What the heartbeats report about this member's training state.
  void SetProgress(int64_t step, int64_t epoch, bool has_state);
  // This member is blocked in a collective (`key` names it, e.g. "g3/s41/a0/reduce"; empty: not waiting).
  // When every member of the generation reports the same key for longer than the allowance (H plus a ring
  // allreduce's 2(N-1)/N x the payload, or a compressed allgather's (N-1) x block, at 100 MB/s), nothing is computing and nothing is arriving: the collective is stuck, and the
  // watchdog aborts it (a collective that never returns, with every member still heartbeating).
  void SetWaiting(const std::string& key);
  // gather_block_bytes: what each member contributes to an allgather when the exchange is compressed (an
  // allgather sends (N-1) x the block per member, more than an allreduce of the float payload for large N); 0
  // when the exchange is an allreduce. The allowance takes the larger of the two transfers.
  void SetPayloadBytes(double bytes, double gather_block_bytes = 0) {
    payload_bytes_ = bytes;
    gather_block_bytes_ = gather_block_bytes;
  }

  // Leaves the current generation and blocks until a generation with this member in it is formed, the job is
  // done (Generation::done), or *stop is set (kAborted). Polls the store every 15 ms; logs why it waits every
  // few seconds. voluntary: every member leaves together after a committed step (to admit joiners or drop a
  // quarantined member), so the watchdogs of members still finishing that step's last collective must not
  // abort it; keep the old communicator alive (unused) until this returns, so its sockets stay open meanwhile.
  Result<Generation> NextGeneration(const std::atomic<bool>* stop, bool voluntary = false);
  // Forget the current generation's communicator (before destroying it).
  void Unwatch();
  // Fault injection (`freeze`): the heartbeat thread stops the whole process for `secs` at its next round, just
  // after it has read its clock (see fault_inject.h). NextGeneration waits until that thread has finished its
  // first round after waking: the adversarial order — the heartbeat thread's view of the peers is updated
  // first, then at once the next generation is decided — is forced, where a plain stop leaves it to chance.
  void FreezeOnce(double secs);
  // The communicator the watchdog aborts from now on, in place of the generation's own: a wrapper around it
  // (the trainer's byte meter and link emulation), so that an abort also cuts the wrapper's own waits short.
  // The wrapper must forward Abort() to the generation's communicator; the caller keeps it alive until Unwatch().
  void WatchCommunicator(Communicator* c);

  // The watchdog gave up on the current generation (and aborted its communicator); the reason.
  bool generation_dead() const { return gen_dead_.load(); }
  double dead_for() const { return gen_dead_.load() ? Now() - dead_since_.load() : 0; }  // seconds
  std::string dead_reason();
  // Live members wait to be admitted (the next step boundary should re-form).
  bool joiners_waiting() const { return joiners_.load(); }
  // Members of the current generation that the watchdog found dead, with how (for events).
  int64_t current_gen() const { return watched_gen_.load(); }

  // Create-once claim of `id` in the job (true for exactly one caller).
  bool Claim(const std::string& id);
  // The job finished at `step` (leader): late joiners exit.
  // A member stopped the job early (SIGTERM, --stop-after) and left: members still waiting for a generation stop
  // too, rather than wait below --min-workers for ever for one that will not come back (its launcher takes its
  // exit 0 for the end of the job). One key per job, like "done".
  Status MarkStopped(int64_t step);
  Status MarkDone(int64_t step);
  // Whether MarkDone() was called (by any member); store errors are returned.
  Result<bool> JobDone();
  // Whether a generation after `gen` exists that does not list `uid` (this member as it was in `gen`), or `gen`
  // itself does not list it: it has been evicted (stopped, silent) or was never admitted, and what it still does
  // for `gen` — a checkpoint write a freeze interrupted — may belong to a lineage the others abandoned. Store
  // errors are returned. Safe from any thread.
  Result<bool> EvictedSince(int64_t gen, int64_t uid);
  // From now on this member's generations need only itself (--min-workers 1): the job is trained and what is
  // left, the final checkpoint and the done mark, needs one member holding the state.
  void SetFinishing(bool on = true) { finishing_ = on; }
  // This member leaves for good (quarantined / exiting): its status says so at once.
  void Leave(const std::string& state);

 private:
  ElasticGroup(std::shared_ptr<Store> store, std::shared_ptr<Store> hb_store, ElasticOptions o, EventLog* events,
               std::function<void(const std::string&)> log);
  struct Peer {
    int64_t seq = -1;
    double last_seen = -1e300;  // steady clock, this process
    nlohmann::json rec;
  };
  std::atomic<bool> finishing_{false};
  void HeartbeatLoop();
  Status WriteStatus(Store& s);
  // Reads m/<uid> and updates the tracker; returns the peer's record (null json if absent).
  // A read error is also stored in *read_error when given (the record then counts as absent).
  nlohmann::json Observe(Store& s, int64_t uid, double now, Status* read_error = nullptr);
  PeerInfo InfoOf(int64_t uid, double now);
  Result<std::vector<int64_t>> GenerationMembers(Store& s, int64_t gen);
  Result<std::unique_ptr<Communicator>> Form(int64_t gen, const std::vector<int64_t>& members, int index);
  // quorum.h's UnreachableJoiners over the generations up to `after` (read from the store), `peers` with my own
  // entry added. Empty, without reading anything, when every live peer holds state (the usual case).
  std::vector<int64_t> Unreachable(Store& s, int64_t after, std::vector<PeerInfo> peers);
  void Publish();  // wake the heartbeat thread to write the status now
  void Watch(double now);         // the watchdog's check of the current generation
  void ScanJoiners(double now);   // live members ready to be admitted?
  Status NewIncarnation(const std::string& why);  // evicted: rejoin under a new uid
  void StopHeartbeats();
  static double Now();

  std::shared_ptr<Store> store_, hb_store_;
  ElasticOptions o_;
  EventLog* events_;
  std::function<void(const std::string&)> log_;
  std::atomic<int64_t> uid_{-1};
  bool joined_running_ = false;
  bool was_member_ = false;  // this incarnation has been in a generation (so leaving it out is an eviction)
  std::string host_;
  std::string machine_;  // hostname/boot id/pid namespace: whose /proc a member's pid is in (MachineId)

  // Serialises WriteStatus (building the record and storing it), so that a heartbeat's record built before a
  // change cannot land after the change's own write (a stale "ready" over NewIncarnation's "gone").
  std::mutex write_mu_;
  // Status (guarded by mu_).
  std::mutex mu_;
  std::condition_variable cv_;
  bool dirty_ = true, stop_ = false;
  int64_t seq_ = 0;
  int64_t gen_ = -1, after_ = -1, step_ = 0, epoch_ = 0;
  bool ready_ = false, has_state_ = false, voluntary_ = false;
  std::string waiting_;
  double waiting_since_ = 0;  // steady clock
  std::atomic<double> payload_bytes_{0};
  std::atomic<double> gather_block_bytes_{0};
  std::atomic<double> freeze_s_{0};
  bool freezing_ = false;  // guarded by mu_: a `freeze` is pending or its round after waking is not over
  std::condition_variable freeze_cv_;
  std::map<int64_t, std::pair<std::string, double>> wait_seen_;  // watchdog: uid -> (key, first seen)
  std::string state_ = "joining";

  // Peers (guarded by peers_mu_).
  std::mutex peers_mu_;
  std::map<int64_t, Peer> peers_;
  std::map<int64_t, std::vector<int64_t>> gen_members_cache_;
  std::vector<int64_t> form_failed_;  // generations known to have failed to form (store keys ff/<gen>)
  std::vector<int64_t> dead_uids_;  // gone for good (uids are never reused): not read again

  // Watch (guarded by watch_mu_).
  std::mutex watch_mu_;
  std::atomic<int64_t> watched_gen_{-1};
  std::vector<int64_t> watched_members_;
  Communicator* watched_comm_ = nullptr;
  std::atomic<bool> gen_dead_{false};
  std::atomic<double> dead_since_{0};
  std::string dead_reason_;
  std::atomic<bool> joiners_{false};

  std::thread hb_thread_;
};

// Whether process `pid` on this machine is gone (no /proc entry, or a zombie).
bool LocalProcessGone(int64_t pid);

}  // namespace keel
