// rendezvous.h: how the workers of one training job find each other, get their ranks, check they run the same
// job, and form a communication group.
//
// Protocol (all keys under the job's store: a file:// directory, or "keel/<JOB>/" on Redis):
//   Node level (one launcher per machine, `keel train --rdzv URL --nnodes MIN[:MAX] --nproc-per-node N`):
//     nodes            INCR counter; the k-th launcher to arrive is node k-1. k > MAX: refused ("job full").
//     node/<k>         {"host", "pid", "nproc_per_node"} of node k (for messages).
//     nodes_closed     written once by node 0 when MIN nodes arrived and then MAX arrived or the last-call
//                      window passed: {"nnodes", "nproc_per_node"}. A later node, or one whose
//                      --nproc-per-node differs, is refused. Global rank = node * nproc_per_node + local rank.
//   Worker level (every worker; ranks come from the launcher's KEEL_RANK or from mpirun/srun/torchrun):
//     workers          INCR counter; a value above the world size means the job id was used before (its keys
//                      are still there) or ranks are duplicated: refused with a message saying so.
//     desc             rank 0's descriptor JSON (keel version, model config, data fingerprint, training options,
//                      the step it resumes from). Every other worker compares its own and is refused with
//                      "refused by job JOB: model config differs: dim: job has 32, this worker has 64".
//     member/<rank>    {"host", "pid", "refused": "..."?}, written before the worker counts itself in
//                      `workers`; when `workers` reaches the world size every worker reads all of them, so a
//                      refusal anywhere fails the whole job at once instead of at a timeout.
//   Group level: gen/<g>/...  Gloo's keys for the group of generation g (see CreateCommunicator).
// Every wait is bounded: peers arriving by rdzv_timeout_s, forming a group and every collective by
// comm_timeout_s. Store errors (unreachable Redis, wrong password) fail at once with one line.
#pragma once
#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dist/communicator.h"
#include "dist/gloo_communicator.h"
#include "dist/store.h"

namespace keel {

// Where a worker sits in its job, as a launcher told it through the environment.
struct WorkerPlacement {
  int rank = 0;
  int world = 1;
  int local_rank = 0;
  int local_world = 1;
  std::string source;  // which variables: "KEEL_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"
  std::string rdzv;    // KEEL_RDZV, when keel's launcher set it
  std::string host;    // KEEL_HOST
  std::string iface;   // KEEL_IFACE
  bool has_master_addr = false;  // MASTER_ADDR/MASTER_PORT are set (torchrun / Lightning conventions)
};
// Reads KEEL_RANK/KEEL_WORLD_SIZE/KEEL_LOCAL_RANK/KEEL_LOCAL_WORLD_SIZE (keel's launcher), else
// RANK/WORLD_SIZE/LOCAL_RANK (torchrun), else OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK (mpirun), else
// SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (srun). nullopt: none set. Malformed values are an error.
Result<std::optional<WorkerPlacement>> PlacementFromEnv();

struct RendezvousOptions {
  double rdzv_timeout_s = 60;  // waiting for the other nodes/workers to arrive
  double comm_timeout_s = 30;  // forming groups and every collective (GlooOptions::timeout_s)
  std::string host;            // address peers use for this worker (--host), or
  std::string iface;           // its network interface (--iface)
  double last_call_s = 5;      // node level: how long node 0 waits for more than MIN nodes (up to MAX)
};

// The node-level step, run by each machine's launcher. Returns this node's index and the job's node count.
struct NodeAssignment {
  int node_rank = 0;
  int nnodes = 1;
};
Result<NodeAssignment> JoinAsNode(Store& job, const std::string& job_id, int min_nodes, int max_nodes,
                                  int nproc_per_node, const RendezvousOptions& o,
                                  const std::atomic<bool>* abort = nullptr);

// Empty when a and b describe the same job; else "model config differs: dim: job has 32, this worker has 64"
// (the first differing section). Sections: keel_version, model, data_fingerprint, training, resume.
std::string DescriptorDifference(const nlohmann::json& job, const nlohmann::json& mine);

// A worker's membership in a job.
class WorkerGroup {
 public:
  // Registers this worker (rank of world) in the job, checks its descriptor against rank 0's, and waits until
  // every worker has registered. Errors: refused (kInvalidArgument, "refused by job JOB: ..."), another
  // worker refused, the job id reused, peers missing after rdzv_timeout_s (kTimeout), store errors.
  static Result<std::unique_ptr<WorkerGroup>> Join(std::shared_ptr<Store> job, std::string job_id, int rank,
                                                   int world, const nlohmann::json& descriptor,
                                                   const RendezvousOptions& o,
                                                   const std::atomic<bool>* abort = nullptr);

  int rank() const { return rank_; }
  int world() const { return world_; }
  const std::string& job_id() const { return job_id_; }
  Store& store() { return *job_; }

  // The communicator of generation `generation` among `members` (global ranks, each listed once, including
  // this worker): its rank is this worker's position in the sorted list. The group's keys live under
  // "gen/<generation>/", so a generation must not be reused for a different member list. A later issue
  // re-forms groups of survivors under new generations; generation 0 with all ranks is the job's first group.
  Result<std::unique_ptr<Communicator>> CreateCommunicator(int generation, std::vector<int> members,
                                                           const std::atomic<bool>* abort = nullptr);

  // Removes the job's keys from the store (rank 0, after every worker finished cleanly; best effort).
  Status ClearJob();

 private:
  WorkerGroup(std::shared_ptr<Store> job, std::string job_id, int rank, int world, RendezvousOptions o)
      : job_(std::move(job)), job_id_(std::move(job_id)), rank_(rank), world_(world), o_(std::move(o)) {}
  std::shared_ptr<Store> job_;
  std::string job_id_;
  int rank_, world_;
  RendezvousOptions o_;
};

}  // namespace keel
