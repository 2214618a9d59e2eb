// cli_launch.h: how `keel train` runs — one process, a launcher of workers, or one worker of a job.
//
//   keel train ...                                  one process (the one-member communicator)
//   keel train --nproc N ...                        N workers on this machine (torchrun --standalone): a
//                                                   file store in $TMPDIR, Gloo over 127.0.0.1
//   keel train --rdzv URL --nnodes MIN[:MAX] --nproc-per-node N ...
//                                                   on each machine: this machine's launcher joins the job at
//                                                   URL (redis://[:PASSWORD@]HOST:PORT/JOB or file:///shared/dir)
//   keel train --nproc N --min-workers K --max-restarts R ...
//                                                   elastic: survives crashed, hung and corrupting workers
//                                                   (docs/step-protocol.md); failed workers are restarted
//   KEEL_RANK / RANK / OMPI_COMM_WORLD_RANK / SLURM_PROCID (+ the matching world size) in the environment:
//                                                   this process is that one worker (keel's launcher, torchrun,
//                                                   mpirun, srun start one per rank). It still needs a store:
//                                                   --rdzv redis://... or --rdzv file:///path on a filesystem
//                                                   every worker sees. MASTER_ADDR/MASTER_PORT alone are not
//                                                   enough (keel hosts no store).
#pragma once
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "train/trainer.h"

namespace keel::cli {

struct DistFlags {
  int nproc = 0;              // --nproc / --nproc-per-node (0: not given)
  int nproc_per_node = 0;
  std::string rdzv;           // --rdzv URL
  std::string nnodes;         // --nnodes MIN[:MAX]
  std::string host, iface;    // --host / --iface
  double rdzv_timeout_s = 60; // --rdzv-timeout
  double comm_timeout_s = 30; // --comm-timeout (static jobs)
  // Elastic training (docs/step-protocol.md): on with --elastic or any of the flags below.
  bool elastic = false;       // --elastic
  int min_workers = 0;        // --min-workers (0: not given -> 1)
  int max_workers = 0;        // --max-workers (0: not given -> no limit)
  int max_restarts = 0;       // --max-restarts (launcher: restarts of failed workers on this machine)
  double hang_timeout_s = 2;  // --hang-timeout: the one timeout of elastic jobs (see ElasticTimeouts)
  bool comm_timeout_given = false;
  bool nproc_given = false;   // --nproc / --nproc-per-node given (0 means "not given" above, but 0 given is wrong)
  bool nproc_per_node_given = false;
  bool Elastic() const { return elastic || min_workers > 0 || max_workers > 0 || max_restarts > 0; }
  void AddTo(CLI::App& app);
};

// Runs training as the flags and the environment say. args: the command line after "keel" ("train", ...),
// which launched workers re-execute. Returns the process exit code.
int RunTrainAnyMode(TrainOptions o, const DistFlags& d, const std::vector<std::string>& args);

}  // namespace keel::cli
