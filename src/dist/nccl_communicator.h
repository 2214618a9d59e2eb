// nccl_communicator.h: a Communicator over NCCL (GPU collectives: NVLink / PCIe inside a machine, InfiniBand or
// sockets between machines), formed through keel's Store like the Gloo one. Built into keel_cuda when
// KEEL_CUDA=ON and NCCL is found (KEEL_HAVE_NCCL); otherwise Connect returns kUnavailable.
//
// Forming: rank 0 calls ncclGetUniqueId and publishes it (hex) under "nccl_unique_id" in the store; the others
// wait for it (WaitGet: bounded by timeout_s, or *abort). The store must be private to this group (a prefix per
// membership generation, as for Gloo): a stale id left by an earlier group would make ranks join the wrong one
// (they then fail at the timeout). Then ncclCommInitRankConfig in non-blocking mode (ncclConfig_t.blocking = 0)
// on this rank's device: NcclOptions::device, else KEEL_LOCAL_RANK (or LOCAL_RANK) modulo the device count.
//
// Buffers: NCCL moves device memory. Every collective accepts device pointers (used in place, no copy) and host
// pointers (what the CPU-side trainer passes today): a host buffer is staged through a device buffer owned by
// the communicator (H2D copy, collective, D2H copy), so the Communicator interface is unchanged. Pointers are
// classified with cudaPointerGetAttributes on each call.
//
// Timeouts and abort: every operation is enqueued on the communicator's stream and then polled
// (ncclCommGetAsyncError + cudaStreamQuery) against a deadline of timeout_s. On timeout, on an NCCL error, or when
// Abort() was called (from any thread: it only sets a flag that the polling loop sees within ~1 ms) the
// communicator calls ncclCommAbort, and this and every later call return kTimeout / kUnavailable / kAborted
// (sticky, as the Communicator contract asks). A hung kernel of a peer therefore costs at most timeout_s.
// Thread safety: one thread issues operations; Abort() is safe from any thread.
#pragma once
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "dist/communicator.h"
#include "dist/store.h"

namespace keel {

struct NcclOptions {
  int device = -1;        // CUDA device ordinal; -1: KEEL_LOCAL_RANK / LOCAL_RANK modulo the device count, else 0
  double timeout_s = 30;  // forming the group, and each collective
};

Result<std::unique_ptr<Communicator>> ConnectNcclCommunicator(std::shared_ptr<Store> store, int rank, int size,
                                                              const NcclOptions& options,
                                                              const std::atomic<bool>* abort = nullptr);

// ---- the host-side parts, exposed for tests (no GPU needed) ---------------------------------------------

// The bootstrap id exchange: rank 0 calls make_id() (which must return id_bytes bytes) and publishes it under key;
// every other rank waits for the key (timeout_s, *abort) and decodes it. Returns the id's bytes on every rank.
Result<std::string> ExchangeBootstrapId(Store& store, const std::string& key, int rank,
                                        const std::function<Result<std::string>()>& make_id, size_t id_bytes,
                                        double timeout_s, const std::atomic<bool>* abort = nullptr);
// ncclGetUniqueId's bytes (NCCL_UNIQUE_ID_BYTES = 128), or kUnavailable (no NCCL, or NCCL failed).
Result<std::string> NcclUniqueIdBytes();
size_t NcclUniqueIdSize();
std::string HexEncode(std::string_view bytes);
Result<std::string> HexDecode(std::string_view hex);

}  // namespace keel
