// quorum.h: the pure decisions of elastic training (docs/step-protocol.md) — who forms the next membership
// generation, how a step's micro-batches are spread over the members, whether a step commits, and which
// member's state a new generation adopts. Nothing here reads a clock, a store or a socket: every function is
// a pure function of its arguments (the time is an argument), so tests drive them with a fake clock.
//
// Vocabulary: a *member* is one incarnation of a worker process, named by a job-unique `uid` (a restarted or
// re-admitted worker gets a new one). A *generation* g is a member list agreed through the store; its
// members form one communicator (rank = index in the sorted list). A member that is *ready after g* has left
// generation g (or was never in it) and wants to be in a later one.
#pragma once
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace keel {

// ---- the single user-facing timeout and what derives from it ----

// Everything time-related in elastic mode derives from one knob, `--hang-timeout H` (seconds, default 2).
struct ElasticTimeouts {
  double hang_s = 2;          // H: a member silent for this long (worst case) is declared hung and evicted
  double heartbeat_s = 0.2;   // H/10: how often each member publishes its heartbeat
  double stale_s = 1.5;       // 0.75 H: heartbeat unchanged this long -> member dead (detected <= stale + 2 ticks)
  double watch_tick_s = 0.05; // min(H/40, 50 ms): how often the watchdog reads its group's heartbeats
  double form_s = 2;          // H: forming a group (address exchange + connect) must finish within this
  double op_s = 60;           // 30 H: backstop for one collective when every member is alive (a legitimately
                              //   slow peer is not an error; a hang is caught by heartbeats long before)
  double straggle_s = 60;     // 30 H: how long a new generation waits for a live member of the old one that has
                              //   not noticed the failure yet (it is computing its share)
  double initial_wait_s = 60; // how long the first generation waits for all initially launched workers
                              //   (then it starts with >= --min-workers); = --rdzv-timeout
  static ElasticTimeouts From(double hang_s, double rdzv_timeout_s);
  std::string Describe() const;  // one line, for logs and docs
};

// ---- membership: who forms the next generation ----

struct PeerInfo {
  int64_t uid = -1;
  double last_seen = -std::numeric_limits<double>::infinity();  // observer's clock: heartbeat last changed
  bool gone = false;          // exited (cleanly, quarantined, or reported dead by its launcher)
  bool ready = false;         // announced "ready after `after`"
  int64_t after = -2;         // meaningful when ready
  bool has_state = false;     // holds training state (not a fresh joiner)
};

struct QuorumView {
  int64_t my_uid = -1;
  int64_t after = -1;               // I want a generation > after (-1: none exists yet, as far as I know)
  double ready_since = 0;           // observer's clock: when I started waiting for that generation
  bool next_exists = false;         // generation after+1 has been proposed, with these members:
  std::vector<int64_t> next_members;
  std::vector<int64_t> prev_members;  // members of generation `after` (empty if none / unknown)
  std::vector<PeerInfo> peers;        // every member the observer knows about, itself included
  int expected_initial = 1;           // workers launched at the start (the first generation waits for them)
  std::vector<int64_t> unreachable;   // left out of proposals (UnreachableJoiners): they keep groups from forming
};

struct QuorumConfig {
  int min_workers = 1;
  int max_workers = std::numeric_limits<int>::max();
  double stale_s = 1.5;
  double straggle_s = 60;
  double initial_wait_s = 60;
};

struct QuorumDecision {
  enum Kind {
    kWait,     // nothing to do yet (see reason)
    kJoin,     // generation `gen` exists and lists me: form its group with `members`
    kSkip,     // generation `gen` exists without me: I am ready after it now (evicted, or too late)
    kPropose,  // I am the leader: create generation `gen` with `members` (create-once; then join it)
  } kind = kWait;
  int64_t gen = -1;
  std::vector<int64_t> members;
  std::string reason;
};

bool Alive(const PeerInfo& p, double now, double stale_s);

// The decision of one member at time `now`. See quorum.cc for the rules; summary:
//  1. a proposed next generation is joined if it lists me, else skipped;
//  2. otherwise the leader (lowest uid among live members ready for a generation after mine) proposes one
//     when at least min_workers are ready, every live member of the previous generation has arrived (or
//     straggle_s passed since some of them did — while none did, that generation is healthy and the ready
//     ones wait to be admitted), and — for the very first generation — all expected_initial workers arrived
//     (or initial_wait_s passed). Members: the ready ones, previous members first, at most max_workers.
//     Peers listed in v.unreachable are left out (neither ready nor awaited).
QuorumDecision Decide(double now, const QuorumView& v, const QuorumConfig& c);

// A recent generation and whether forming it failed (a member could not connect to all the others in time).
struct FormAttempt {
  std::vector<int64_t> members;
  bool failed = false;
};
inline constexpr int kFormFailuresToExclude = 3;
// Joiners that keep every group from forming: a joiner whose address its peers cannot reach (a wrong --host or
// --iface, a firewall) would otherwise make the group re-form and fail forever, stalling the job. A uid is
// unreachable when it holds no training state (a joiner, never part of a formed group), was a member of at least
// kFormFailuresToExclude of the `recent` generations that failed to form and of none of them that formed, and
// in each failure counted every other member is still live and some holds state (a failure with a member that
// died since is that member's; the group that ran before can form again without the joiner). When nobody holds
// state (a whole-job restart) nobody is excluded: the fault could be anyone's. `peers`: the live members, the
// caller's own entry included.
std::vector<int64_t> UnreachableJoiners(const std::vector<FormAttempt>& recent, const std::vector<PeerInfo>& peers);

// ---- micro-batch assignment ----

// A set of micro-batch indices of one step (M <= 128).
struct MicroSet {
  uint64_t w[2] = {0, 0};
  bool Has(int i) const { return (w[i >> 6] >> (i & 63)) & 1; }
  void Set(int i) { w[i >> 6] |= uint64_t{1} << (i & 63); }
  void Clear(int i) { w[i >> 6] &= ~(uint64_t{1} << (i & 63)); }
  int Count() const { return __builtin_popcountll(w[0]) + __builtin_popcountll(w[1]); }
  bool Empty() const { return (w[0] | w[1]) == 0; }
  bool Intersects(const MicroSet& o) const { return ((w[0] & o.w[0]) | (w[1] & o.w[1])) != 0; }
  MicroSet& operator|=(const MicroSet& o) { w[0] |= o.w[0]; w[1] |= o.w[1]; return *this; }
  bool operator==(const MicroSet& o) const { return w[0] == o.w[0] && w[1] == o.w[1]; }
  static MicroSet All(int m) { MicroSet s; for (int i = 0; i < m; ++i) s.Set(i); return s; }
  std::string ToString() const;  // "{0,3,5}"
};

// Which micro-batches each member computes in this attempt of a step.
//   held[k]   what member k already holds (computed in an earlier attempt of this step, still valid)
//   shares[k] relative speed (1 = nominal); a member's target is M * share / sum(shares), rounded so the
//             targets add up to M (largest remainders, ties to the lower index)
//   avoid[k]  micro-batches member k must not be given (it produced a non-finite result for them)
// Every micro-batch held by nobody goes to the member with the largest remaining deficit (target minus what
// it holds or was given), ties to the lower index; avoidance is honoured unless every member avoids it.
// Returns, per member, the micro-batches to compute (disjoint from every held set).
std::vector<MicroSet> AssignMicroBatches(int M, const std::vector<MicroSet>& held, const std::vector<double>& shares,
                                         const std::vector<MicroSet>& avoid);

// Deterministic-mode cross-check: micro-batches whose gradient a second member recomputes (a pure function
// of (seed, step, attempt, fraction)), for a group whose compute assignment is `assigned`; the verifier is
// drawn among the other members. `disputed` micro-batches (their cross-check was a tie in the previous attempt:
// two hashes that differ cannot say which one is wrong) come first and get a third opinion: two verifiers, the
// two members after the owner, whatever the fraction (one verifier in a group of two). At most kMaxVerify
// tasks in all; a micro-batch with two verifiers is two tasks with the same owner.
struct VerifyTask {
  int micro = -1;
  int owner = -1;     // member computing it for the sum
  int verifier = -1;  // member recomputing it only to compare
};
std::vector<VerifyTask> PickVerifications(uint64_t seed, int64_t step, int attempt, double fraction,
                                          const std::vector<MicroSet>& assigned,
                                          const MicroSet& disputed = MicroSet{});

// ---- the commit vote ----

inline constexpr int kMaxVerify = 8;

// What each member contributes to the vote of one attempt (gathered from every member; plain old data).
struct VoteRecord {
  int64_t uid = -1;
  int64_t gen = -1;
  int64_t epoch = 0;          // state lineage (bumped by a rollback)
  int64_t step = -1;
  uint64_t params_hash = 0;   // the parameters this attempt's gradients were computed from
  uint64_t committed_hash = 0;  // the hash of this member's parameters right after its last committed update
                                // (0: unknown, e.g. just received state). params_hash != committed_hash means
                                // its memory changed them since: it is the corrupted one, whatever the votes
  uint64_t state_hash = 0;    // parameters + moments + trainer state; 0 when not checked this step
  MicroSet held;              // micro-batches in this member's contribution to the sum
  MicroSet bad;               // micro-batches this member computed with a non-finite loss or gradient
  uint32_t flags = 0;         // kFlag*
  int32_t computed = 0;       // micro-batches computed in this attempt
  double compute_s = 0;       // seconds spent computing them
  int32_t n_verify = 0;
  int32_t verify_micro[kMaxVerify] = {};
  uint64_t verify_hash[kMaxVerify] = {};
  double loss[128] = {};      // loss of each held micro-batch (0 elsewhere)
};
inline constexpr uint32_t kFlagStop = 1;          // a stop (SIGTERM / --stop-after) was requested here
inline constexpr uint32_t kFlagJoiners = 2;       // live members wait to be admitted
inline constexpr uint32_t kFlagReform = 4;        // this member wants a new generation after this step

struct VoteConfig {
  int M = 1;
  int quarantine_after = 2;   // faults of one kind (non-finite results; corrupted state or gradients) on one
                              // member before it is quarantined
  int64_t strike_window = 100;  // ... counted over this many steps (older strikes expire)
  int quarantine_floor = 2;     // ... unless fewer than this many members would be left (a lone member cannot
                                //   detect silent corruption): then it is kept, its faults still caught one by one
  bool partial = false;         // diloco: the step commits with the micro-batches held (at least one), not
                                //   necessarily all of them (a lost member's inner work is not redone)
};

// Per-member fault history the vote outcome depends on (agreed: it travels with the training state).
inline constexpr int kStrikeNonFinite = 0, kStrikeCorrupt = 1;
struct Strike {
  int64_t uid = -1;
  int kind = kStrikeNonFinite;
  int count = 0;
  int64_t last_step = 0;
};
struct StrikeBook {
  std::vector<Strike> v;
  int Count(int64_t uid, int kind, int64_t step, int64_t window) const;  // unexpired strikes at `step`
  int Add(int64_t uid, int kind, int64_t step, int64_t window);           // returns the new count
  void Refund(int64_t uid, int kind);                                      // takes one strike back
};

struct VoteOutcome {
  bool commit = false;
  std::string reason;                 // why not (empty when committed)
  bool resync = false;                // members disagree on generation/step/epoch: re-form and resynchronise
  std::vector<int> clear_holdings;    // members whose contribution must be recomputed
  std::vector<int> repair;            // members whose state differs from the majority: repaired from `source`
  int source = -1;                    // a member with the majority state
  bool rollback = false;              // state mismatch without a majority (and no member's own check names the
                                      //   corrupted one): return to the last verified snapshot
  bool data_fault = false;            // a micro-batch was non-finite twice (on different members when there
                                      //   are several): the data, not a worker -> commit without an update
  bool skip_update = false;           // committed, but the parameters are not updated (data fault)
  std::vector<int> quarantine;        // members to remove for good
  std::vector<std::pair<int, int>> bad;  // (member, micro-batch) non-finite results, for the log
  std::vector<std::pair<int, int>> avoid;  // (member, micro-batch): do not give it back to that member
  MicroSet disputed;                  // cross-checked micro-batches whose hashes differed: the next attempt
                                      //   recomputes each on three members (PickVerifications' `disputed`)
  bool unresolved = false;            // some cross-check differed without a majority to name the faulty member
  std::vector<std::string> notes;     // one line per finding, for the log / events
  double loss = 0;                    // mean loss over the step's micro-batches (when committed)
  bool stop = false, joiners = false, reform = false;
};

// The outcome of one attempt, identical on every member that gathered the same records. `strikes` is
// updated (the caller keeps it as part of the agreed state). `data_bad` carries the (micro-batch, uid) pairs
// that were non-finite in earlier attempts of this step (to tell a bad member from bad data), each attempt's
// closed by a {-1, -1} marker; it is updated (the caller clears it when a step commits).
VoteOutcome DecideCommit(const std::vector<VoteRecord>& votes, const VoteConfig& c, StrikeBook* strikes,
                         std::vector<std::pair<int, int64_t>>* data_bad);

// ---- state synchronisation at the start of a generation ----

struct SyncRecord {
  int64_t uid = -1;
  int64_t epoch = 0;
  int64_t step = -1;
  uint64_t state_hash = 0;
  uint32_t has_state = 0;
  // 1: this member's parameters still hash to what it last committed or installed (no silent corruption since).
  uint32_t self_checked = 0;
  MicroSet held;              // micro-batches held for (held_epoch, held_step)
  int64_t held_epoch = -1;
  int64_t held_step = -1;
  double peak_gflops = 0;     // this member's GEMM peak measurement (0: none), for MFU on whoever leads
  int64_t snap_epoch = -1;    // this member's rollback snapshot: (epoch, step) of the state it holds; -1: none
  int64_t snap_step = -1;
};

struct SyncPlan {
  int source = -1;            // -1: nobody has state (every member loads it from disk)
  int64_t epoch = 0, step = 0;
  uint64_t state_hash = 0;
  std::vector<int> receivers; // members that take the source's state
  std::vector<MicroSet> held; // per member: holdings still valid for this step (empty for receivers)
};
// The source is a member with state at the newest (epoch, step), preferring the most common state hash
// there, then a self-checked member (two members that disagree, one of them corrupted since its last commit:
// the one whose parameters still match its own commit is the one to trust), then the lowest index.
SyncPlan PlanSync(const std::vector<SyncRecord>& recs);

}  // namespace keel
