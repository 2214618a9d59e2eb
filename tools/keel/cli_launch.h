// cli_launch.h: how `keel train` runs — one process, a launcher of workers, or one worker of a job.
//
//   keel train ...                                  one process (the one-member communicator)
//   keel train --nproc N ...                        N workers on this machine (torchrun --standalone): a
//                                                   file store in $TMPDIR, Gloo over 127.0.0.1
//   keel train --rdzv URL --nnodes MIN[:MAX] --nproc-per-node N ...
//                                                   on each machine: this machine's launcher joins the job at
//                                                   URL (redis://[:PASSWORD@]HOST:PORT/JOB or file:///shared/dir)
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
  double comm_timeout_s = 30; // --comm-timeout
  void AddTo(CLI::App& app);
};

// Runs training as the flags and the environment say. args: the command line after "keel" ("train", ...),
// which launched workers re-execute. Returns the process exit code.
int RunTrainAnyMode(TrainOptions o, const DistFlags& d, const std::vector<std::string>& args);

}  // namespace keel::cli
