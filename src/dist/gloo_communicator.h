// gloo_communicator.h: a Communicator over Gloo's TCP transport (a full mesh of sockets between the members of
// one group, formed through a Store).
//
// Timeouts: one knob, GlooOptions::timeout_s (`keel train --comm-timeout`), bounds forming the mesh (each key
// wait and each connect) and every collective (Gloo's per-operation timeout: no data from a peer for that long
// fails the operation with kTimeout). A peer that closes its sockets (crash, SIGKILL) fails the operation at
// once with kUnavailable on the members connected to it; the others notice at the timeout.
// Errors: Gloo reports failures with exceptions; they are caught here and come back as a Status. Errors are
// sticky: after one, every call returns it; build a new communicator (a new store prefix) for the next group.
// Abort(): shuts down this member's sockets of the group, so an in-flight operation on the issuing thread fails
// within milliseconds with kAborted (and the peers see the connection close), and later calls fail at once.
// The sockets are found by their addresses when the mesh is formed (Gloo 0.5 does not expose them); see the
// .cc for the limits of that.
#pragma once
#include <atomic>
#include <memory>
#include <string>

#include "dist/communicator.h"
#include "dist/store.h"

namespace keel {

struct GlooOptions {
  // The address peers use to reach this member: a hostname or IP to bind (hostname), or a network interface
  // whose address to use (iface). Both empty: this machine's hostname.
  std::string hostname;
  std::string iface;
  double timeout_s = 30;
};

// Forms the group: this member is `rank` of `size`. `store` should be a view private to this group (a prefix
// such as "gen/<n>"), since Gloo's keys ("0", "rank_0", ...) are reused by every group. When a member does not
// show up it returns within about 2 * timeout_s (waiting for its address, then connecting), or sooner if
// *abort becomes true.
Result<std::unique_ptr<Communicator>> ConnectGlooCommunicator(std::shared_ptr<Store> store, int rank, int size,
                                                              const GlooOptions& options,
                                                              const std::atomic<bool>* abort = nullptr);

}  // namespace keel
