// fault_inject.h: scheduled faults for testing fault tolerance (`keel train --inject SPEC`, or KEEL_INJECT for
// workers started by other launchers). Off by default, and impossible to enable by accident: a spec is
// refused unless the environment also has KEEL_ALLOW_FAULT_INJECTION=1.
//
// SPEC: items separated by ';', each KIND:key=value,key=value
//   crash:rank=R,step=S               SIGKILL itself after its first micro-batch of step S
//   hang:rank=R,step=S,secs=X         SIGSTOP itself there for X seconds (default 5; a helper SIGCONTs it)
//   slow:rank=R,step=S,factor=F,steps=N,busy=B   compute F times slower (default 3) for N steps (default
//                                     1000000): it waits (F-1) x its compute time after each micro-batch;
//                                     busy=1 spins on the CPU instead of sleeping (a busy host: with more
//                                     workers than cores, a sleep would hand its core to the others)
//   stall:rank=R,step=S,secs=X        at step S, enter the gradient reduce but send nothing for X seconds
//                                     (default 30): a collective that does not return while every process
//                                     keeps heartbeating
//   deaf:rank=R,step=S,secs=X         at step S, its communication thread blocks for X seconds (default 30) in a
//                                     way Communicator::Abort cannot wake (as a stuck collective once did)
//   freeze:rank=R,step=S,secs=X       at step S the whole process stops (SIGSTOP) for X seconds (default 5), the
//                                     stop raised by its heartbeat thread just after that thread read its clock
//                                     and before it reads its peers' heartbeats: the worst moment for its view
//                                     of the others (a plain `hang` stops it at a random point of that thread).
//                                     Elastic jobs only, raised in the step's reduce (2 or more members)
//   nan:rank=R,step=S                 a NaN in the gradient of its first micro-batch of step S
//   corrupt:rank=R,step=S,steps=N     one flipped mantissa bit in that gradient (finite: only a cross-check,
//                                     --verify-fraction, can see it); with steps=N, in every gradient this worker
//                                     computes (summed or cross-checked) in steps S..S+N-1: a persistently
//                                     faulty unit
//   spike:rank=R,step=S,factor=F      its first micro-batch of step S reports F times its loss (default 100)
//   bitflip:rank=R,step=S             flip one bit of one parameter at the start of step S
//   truncate-ckpt:step=S,then=kill|hang|freeze   the checkpoint of step S is left half-written (a .tmp
//                                     directory with a truncated weights file); then the writer SIGKILLs itself
//                                     (default), stalls (so a test can kill every worker while the write "is in
//                                     flight"), or stops the whole process (SIGSTOP) for secs=X seconds (default 5)
//                                     and then finishes the write: a leader frozen in the middle of a write
//   link:rank=R,mbit=B,latency_ms=L   this worker's link is limited to B Mbit/s with L ms latency per
//                                     communication round, for the whole run (dist/link_emulation.h)
//   device-fail:step=S                `keel serve` only: from its engine's step S on, the device reports a failure
//                                     (as a CUDA backend's sticky error does): the server fails every request
//                                     and exits non-zero
//   random:every=T,seed=N,kinds=crash+hang+nan+bitflip,secs=X,start=T0,ranks=W
//                                     a fault every T seconds on average (uniform in [T/2, 3T/2]) from T0 seconds
//                                     (default T) after the job's start (KEEL_INJECT_T0, set by the launcher),
//                                     of a kind and rank (of W, default the world size) drawn from the seed
// A key the kind does not read is refused, as is a fractional rank/step/steps/ranks/seed or secs over a week.
// rank is the worker's launch rank (KEEL_RANK): a restarted worker keeps it. Each fault fires once per job
// (claimed through the rendezvous store when there is one) and is written to events.jsonl ("inject") first.
// Thread safety: the hooks are called from the training thread (TruncateCheckpoint from the writer thread).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/status.h"

namespace keel {

class EventLog;

struct FaultSpec {
  enum Kind {
    kCrash, kHang, kSlow, kNan, kBitflip, kTruncateCkpt, kRandom, kStall, kCorrupt, kSpike, kDeaf, kLink, kFreeze,
    kDeviceFail
  } kind = kCrash;
  int rank = -1;          // -1: any (truncate-ckpt: whoever writes the checkpoint)
  int64_t step = -1;
  double secs = 5;        // hang, freeze, truncate-ckpt then=freeze (default 5); stall, deaf (default 30)
  double factor = 3;      // slow (default 3); spike (default 100)
  bool busy = false;      // slow: spin instead of sleeping
  int64_t steps = 1000000;
  bool steps_set = false; // the spec names steps= (corrupt: persistent)
  bool then_kill = true;  // truncate-ckpt
  bool then_freeze = false;  // truncate-ckpt: freeze for `secs`, then finish the write
  double mbit = 0, latency_ms = 0;  // link
  // random
  double every = 15, start = -1;
  uint64_t seed = 1;
  std::vector<Kind> kinds;
  int ranks = 0;
};

const char* FaultKindName(FaultSpec::Kind k);

// Parses SPEC (no environment check). Errors name the offending item.
Result<std::vector<FaultSpec>> ParseFaultSpec(const std::string& spec);

class FaultInjector {
 public:
  // nullptr when spec is empty. Fails when the spec is malformed or KEEL_ALLOW_FAULT_INJECTION=1 is missing.
  // rank/world: this worker's launch rank and the launched world size.
  static Result<std::unique_ptr<FaultInjector>> Create(const std::string& spec, int rank, int world);

  // claim(id) returns true exactly once per job for each fault id (default: always true, i.e. once per process).
  void SetClaim(std::function<bool(const std::string&)> claim) { claim_ = std::move(claim); }
  void SetEvents(EventLog* events) { events_ = events; }
  void SetUid(int64_t uid) { uid_ = uid; }

  // Hooks. Each returns whether it injected something.
  bool AfterMicroBatch(int64_t step);                          // crash / hang
  // nan / corrupt. `first`: this is the first gradient the worker sums in this step, the only one a one-shot
  // fault hits (a persistent corrupt hits every gradient of its steps).
  bool CorruptGradient(int64_t step, float* grads, size_t n, bool first = true);
  bool FlipParamBit(int64_t step, float* params, size_t n);    // bitflip
  double SlowFactor(int64_t step);                             // slow (1 = normal)
  // slow: waits (SlowFactor - 1) x compute_s, sleeping or (busy=1) spinning.
  void SlowDown(int64_t step, double compute_s);
  bool StallCollective(int64_t step, double* secs);            // stall: for how long
  bool DeafCollective(int64_t step, double* secs);             // deaf: for how long
  bool FreezeHeartbeat(int64_t step, double* secs);            // freeze: for how long
  double LossFactor(int64_t step);                             // spike (1 = normal)
  bool DeviceFails(int64_t step);                              // device-fail (serve's engine step)
  bool LinkLimit(double* mbit, double* latency_ms);            // link: this worker's emulated link
  // truncate-ckpt: true if the checkpoint of `step` must be left half-written; *then_kill says what follows,
  // or (*freeze_s > 0) a freeze of that many seconds after which the write goes on.
  bool TruncateCheckpoint(int64_t step, bool* then_kill, double* freeze_s);

 private:
  struct Timed {
    double t;  // Unix time
    FaultSpec::Kind kind;
    int rank;
    int index;
    int spec = 0;     // which random item scheduled it
    double secs = 5;    // that item's secs (hang)
    double window = 1;  // how late it may still fire: half that item's period, at least 1 s
  };
  FaultInjector(std::vector<FaultSpec> specs, int rank, int world);
  bool Claim(const std::string& id);
  void Record(FaultSpec::Kind kind, int64_t step, const std::string& id, const std::string& detail);
  // The next due random fault of `kind` for this rank (claimed), or false.
  bool DueRandom(FaultSpec::Kind kind, int64_t step, double* secs);

  std::vector<FaultSpec> specs_;
  std::vector<Timed> timed_;
  int rank_, world_;
  int64_t uid_ = -1;
  int first_random_ = -1;
  std::function<bool(const std::string&)> claim_;
  std::vector<std::string> claimed_local_;
  EventLog* events_ = nullptr;
  std::mutex mu_;
};

// Stops this process for `secs` seconds (SIGSTOP; a forked helper sends SIGCONT), or until someone else wakes it
// first (the launcher wakes stopped workers when the job ends), as a real stop would end. Returns after waking.
void HangProcessFor(double secs);

}  // namespace keel
