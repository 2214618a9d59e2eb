// link_emulation.h: a Communicator wrapper that every collective of the training loop passes through. It
//  - counts the bytes this member sends on the wire per collective, from the traffic pattern of the algorithm
//    the Gloo communicator runs (gloo_communicator.cc uses Gloo's default algorithms):
//      allreduce (ring: reduce-scatter + allgather)  2 (N-1)/N x payload, in 2 (N-1) rounds
//      allgather (ring)                             (N-1) x block,       in N-1 rounds
//      broadcast                                    payload x (children of this member in a binomial tree
//                                                   rooted at `root`), in ceil(log2 N) rounds
//      barrier                                      8 bytes per round,   ceil(log2 N) rounds
//    (payload bytes only: TCP/IP headers and Gloo's own small control messages are not counted);
//  - emulates a slow link for this member (fault injection `link:rank=R,mbit=B,latency_ms=L`): after each
//    collective the member sleeps for  sent_bytes x 8 / (B x 10^6)  +  rounds x L / 1000  seconds, as if its
//    sends had gone through a link of B Mbit/s with L ms one-way latency. The peers wait for it in the next
//    collective (or the next round of a ring) exactly as they would for a real slow link. It is an emulation:
//    the sleep comes after the collective instead of being spread over its rounds, so a single collective
//    finishes early on the peers and the delay shows up in the next one; per step the total is the same.
// Sleeps are cut short by Abort() (the watchdog must still be able to end a generation).
// Thread safety: as Communicator (one issuing thread; Abort from any). WireStats counters are atomic.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>

#include "dist/communicator.h"

namespace keel {

struct LinkLimit {
  double mbit = 0;        // bandwidth of this member's link in Mbit/s (0: unlimited)
  double latency_ms = 0;  // one-way latency added per communication round
  bool active() const { return mbit > 0 || latency_ms > 0; }
};

struct WireStats {
  std::atomic<uint64_t> bytes_sent{0};   // payload bytes this member sent, over every communicator it used
  std::atomic<uint64_t> collectives{0};
  std::atomic<uint64_t> emulated_us{0};  // time spent in link-emulation sleeps
};

// Per-collective traffic of one member (the models above). n = group size.
uint64_t AllreduceSentBytes(int n, uint64_t payload);
uint64_t AllgatherSentBytes(int n, uint64_t block);
uint64_t BroadcastSentBytes(int n, int rank, int root, uint64_t payload);
int CeilLog2(int n);

// The delay the link emulation adds for one collective.
double LinkDelaySeconds(const LinkLimit& link, uint64_t sent_bytes, int rounds);

// Wraps `inner` (shared: the wrapper keeps it alive). stats must not be null.
std::shared_ptr<Communicator> MakeMeteredCommunicator(std::shared_ptr<Communicator> inner,
                                                      std::shared_ptr<WireStats> stats, LinkLimit link = {});

}  // namespace keel
