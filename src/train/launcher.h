// launcher.h: starts the worker processes of one machine and supervises them (torchrun's agent, in small).
//
// Each worker is the keel binary re-executed with the same arguments and KEEL_RANK, KEEL_WORLD_SIZE,
// KEEL_LOCAL_RANK, KEEL_LOCAL_WORLD_SIZE, KEEL_NODE_RANK plus the caller's variables (KEEL_RDZV, ...), in its
// own process group (so a terminal's Ctrl-C reaches only the launcher, which forwards it exactly once), and
// with PR_SET_PDEATHSIG=SIGTERM (a launcher that dies stops its workers, at a step boundary).
// Output: every line a worker writes is relayed to the launcher's stderr as "[rank R] line". When that stderr
// is a terminal, rank 0 writes to a pseudo-terminal, and its live progress line is kept as the one line at the
// bottom, redrawn under the other ranks' lines.
// Signals: SIGINT/SIGTERM to the launcher are forwarded to every worker as SIGTERM (the trainer stops at the
// next step boundary with a checkpoint; all ranks agree through the stats allreduce). A second signal, a second or
// more after the first, SIGKILLs the workers (one within the second is the same request delivered twice, as GNU
// timeout or a process-group kill does). Workers get KEEL_SUPERVISED=1 and take repeated SIGTERMs as one stop request, since
// a batch system or `pkill keel` signals them directly as well as the launcher. SIGCHLD is reset to its default
// while the launcher runs (an inherited SIG_IGN would hide the workers' exits).
// Failures (static jobs): a worker that exits non-zero or is killed makes the launcher SIGTERM the others,
// SIGKILL whatever is left after kill_grace_s, and return non-zero with a message naming the worker.
// Failures (elastic jobs, docs/step-protocol.md): the others carry on (they re-form without it); the failed
// worker is restarted with the same rank and KEEL_RESTART=n while fewer than max_restarts restarts were made
// (in total, on this machine), except when it exited with kExitQuarantined. The first restart is immediate; a
// worker that keeps failing within 10 s of its start is restarted after 1, 2, 4, ... (at most 30) seconds, so a
// worker that cannot start does not use up the budget at once. A restart still waiting is cancelled when the job
// finishes or a stop is requested. The launcher succeeds when any worker finished the job (exit 0).
// Nothing here calls exit(); errors come back as values. Not thread-safe: one launch per process at a time
// (it owns the SIGINT/SIGTERM handlers while it runs and restores them after).
#pragma once
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"

namespace keel {

// A worker's exit status meaning "quarantined after repeated faults": never restarted.
inline constexpr int kExitQuarantined = 3;

struct LaunchOptions {
  std::string exe;                     // the program to run (keel's own binary: /proc/self/exe)
  std::vector<std::string> args;       // argv[1..] of every worker
  int nproc = 1;                       // workers on this machine
  int node_rank = 0;                   // global rank = node_rank * nproc + local rank
  int nnodes = 1;
  std::vector<std::pair<std::string, std::string>> env;  // extra environment of every worker
  double kill_grace_s = 5;             // after a failure, how long the others get before SIGKILL
  bool elastic = false;                // restart single workers instead of ending the job (see above)
  int max_restarts = 0;                // elastic: worker restarts allowed on this machine
  // Called (on the launcher's thread) when a worker exits (wait status) / is restarted.
  std::function<void(int rank, int pid, int status)> on_exit;
  std::function<void(int rank, int pid, int restart, const std::string& why)> on_restart;
  bool prefix_output = true;           // "[rank R] " before each relayed line
};

struct LaunchResult {
  int exit_code = 0;          // 0: every worker exited 0
  bool stopped_by_signal = false;  // the launcher received SIGINT/SIGTERM and forwarded it
  std::string message;        // why it failed ("worker rank 1 (pid 123) was killed by signal 9 (SIGKILL)")
};

// Starts the workers and waits for all of them. Errors starting them come back as a Status.
Result<LaunchResult> LaunchWorkers(const LaunchOptions& o);

}  // namespace keel
