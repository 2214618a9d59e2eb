// trainer.h: the training loop of one worker. With a one-member Communicator it is single-process training;
// with N members it is data-parallel (every member runs this same loop on its share of each step's
// micro-batches).
//
// Determinism: micro-batch i of step s is a pure function of (seed, s, i) (data/dataset.h); in deterministic
// mode each micro-batch's gradient is computed from zeroed buffers and summed in fixed point (exact_sum.h), so
// the update does not depend on which worker computed what, nor on the worker or thread count. Resuming
// restores parameters, moments and the step (the data position), so an interrupted run continues bit-exactly.
// Fault tolerance: every step follows the step protocol of docs/step-protocol.md — (1) quorum, (2) compute this
// member's micro-batches, (3) reduce, (4) commit vote, (5) optimizer step — in Trainer::RunStep. Nothing is
// applied before the vote, so an aborted attempt leaves the state untouched and is simply redone. With a
// static group (Train) a communicator failure ends training; with an elastic group (TrainElastic) the
// survivors re-form without the failed member and redo the step, joiners get the state from a peer, and
// non-finite results and silent corruption are caught by the vote and repaired.
// Errors: bad options, unreadable data or checkpoints, and (static groups) communicator failures come back as a
// Status.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

#include "dist/communicator.h"
#include "model/gpt_config.h"
#include "optim/adamw.h"

namespace keel {

struct TrainOptions {
  std::string data_dir;
  std::string out_dir;
  std::string device = "cpu";
  GptConfig model{.vocab = 0};  // vocab 0 = the tokenizer's; larger pads the embedding (unused rows)
  int batch = 8;              // sequences per micro-batch
  int grad_accum = 1;         // micro-batches per step (global, whatever the worker count)
  int64_t steps = 200;
  OptimConfig optim;
  uint64_t seed = 1337;
  int threads = 0;            // 0 = all cores
  int64_t eval_every = 50;
  int eval_batches = 8;
  int64_t checkpoint_every = 100;
  int keep = 3;
  bool resume = false;
  bool deterministic = true;
  int64_t stop_after = 0;     // stop (with a checkpoint) after this many steps in this invocation; 0 = never
  double peak_gflops = 0;     // for MFU; 0 = measure a GEMM at start
  bool progress = true;       // live progress line on stderr
  // Fault tolerance (docs/step-protocol.md).
  int64_t check_every = 10;   // every K steps: whole training state hashed and compared across members, and an
                              // in-memory snapshot kept for rollbacks (parameters are compared every step); 0: never
  double verify_fraction = 0; // deterministic mode: this fraction of micro-batches (at most 8 per step) is
                              // recomputed by a second member and the gradients compared bit for bit; a mismatch
                              // is recomputed on three members, and the odd one out is struck
  double spike_factor = 0;    // loss > running mean + factor * running deviation: roll back and skip the data
                              // (0: off)
  int quarantine_after = 2;   // faults of one kind on one member (within 100 steps; diloco: rounds) before quarantine
  int quarantine_floor = 2;   // ... unless that would leave fewer members than this (one alone cannot detect
                              //   silent corruption)
  double straggler_evict = 0; // evict a member persistently slower than this multiple of the median (0: never)
  bool even_shares = false;   // split micro-batches evenly whatever the measured speeds (no speed-aware shares)
  std::string inject;         // fault-injection spec (elastic/fault_inject.h; needs KEEL_ALLOW_FAULT_INJECTION=1)
  // Slow links and unequal workers (docs/diloco.md).
  std::string sync = "ddp";   // ddp: every step reduces gradients; diloco: every inner_steps steps, pseudo-gradients
  int inner_steps = 50;       // diloco: inner optimizer steps per outer round (H)
  double outer_lr = 0.7;      // diloco: outer SGD learning rate
  double outer_momentum = 0.9;// diloco: outer Nesterov momentum
  std::string optimizer = "adamw";  // adamw | sgd (ddp's optimizer; diloco's inner optimizer)
  std::string compress = "none";    // none | bf16 | int8: gradient (ddp) / pseudo-gradient (diloco) exchange
  int launch_rank = 0;        // this worker's launch rank / world (fault-injection targets, labels)
  int launch_world = 1;
};

// Validates options that do not need the data (sizes, ranges). Errors name the flag.
Status ValidateTrainOptions(const TrainOptions& o);

class Env;
// Whether --out can take a run: absent (and creatable), empty, or a keel run directory when resume is set.
// kInvalidArgument naming --out otherwise (someone else's directory; a run without --resume).
Status CheckOutDirForNewOrResumedRun(Env* env, const std::string& out_dir, bool resume);

struct TrainResult {
  int64_t final_step = 0;     // steps completed in total
  float last_loss = 0;
  float last_val_loss = -1;
  bool stopped_early = false;
  int64_t attempts_failed = 0; // step attempts aborted and redone by this member
  uint64_t wire_bytes = 0;     // bytes this member sent in collectives (dist/link_emulation.h)
  int64_t steps_this_run = 0;  // steps (diloco: outer rounds) committed by this invocation
};

// Runs training. stop (may be null) is polled at step boundaries: when set, the worker writes a checkpoint and
// returns. log(line) receives human-readable log lines (may be null: stderr).
Result<TrainResult> Train(const TrainOptions& o, Communicator* comm, const std::atomic<bool>* stop = nullptr,
                          const std::function<void(const std::string&)>& log = nullptr);

// Elastic training: the membership (src/elastic/membership.h) forms generations of live members; the loop
// survives crashed, hung and corrupting members. A member that is quarantined returns kAborted.
class ElasticGroup;
Result<TrainResult> TrainElastic(const TrainOptions& o, ElasticGroup* group, const std::atomic<bool>* stop = nullptr,
                                 const std::function<void(const std::string&)>& log = nullptr);

// GEMM GFLOP/s through `device` (a backend whose memory may be a GPU's), or when null through the CPU backend
// with the current thread count; 0 if the measurement failed. A short measurement (~0.1 s).
double MeasureGemmPeakGflops(Backend* device = nullptr);

}  // namespace keel
