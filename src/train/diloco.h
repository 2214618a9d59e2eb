// diloco.h: infrequent synchronisation (`keel train --sync diloco`, DiLoCo: Douillard et al. 2023) — the
// outer optimizer, the pseudo-gradient and its exchange, and the inner phase driver; plus the plain-SGD
// optimizer option (`--optimizer sgd`, linear, so averaging updates equals updating with the averaged
// gradient: what the H = 1 equivalence test with several workers relies on).
//
// One protocol step of the trainer (docs/step-protocol.md) is one outer round in diloco mode:
//   (2) compute  RunInner: from the outer parameters θ, this member runs H inner optimizer steps on its share
//                of the micro-batches of global steps s .. s+H-1 (inner AdamW state is its own), then keeps the
//                pseudo-gradient Δ = θ − θ_local (in double) and restores θ. Δ is the member's *holding*: it
//                stays valid while θ is unchanged, so a redone attempt (a lost peer, a re-formed group) reuses
//                it instead of recomputing the inner steps.
//   (3) reduce   Exchange: Σ_k w_k Δ_k and Σ_k w_k, w_k = micro-batches member k processed this round (0 for
//                a member without a holding), uncompressed (float allreduce) or with --compress (allgather of
//                bf16/int8 blocks with error feedback, dist/compress.h).
//   (5) apply    ApplyOuter: g = ΣwΔ / Σw; Nesterov momentum m = μ m + g; θ −= lr_outer (g + μ m), in double.
// The outer momentum is agreed state (hashed, checkpointed, sent to joiners); the error-feedback residual is
// local. With one member, H = 1, lr_outer = 1 and μ = 0 the outer step reproduces the inner step bit for bit
// (Δ and θ − Δ are exact in double for parameters within 2^29 of each other's magnitude).
// Thread safety: the training thread calls everything except the exchange closure, which runs on the
// communication thread and owns its buffers (shared), so a given-up collective cannot touch later rounds.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "dist/compress.h"
#include "optim/adamw.h"

namespace keel {

struct TrainOptions;
// The --sync/--inner-steps/--outer-lr/--outer-momentum/--optimizer/--compress options (errors name the flag).
Status ValidateSyncOptions(const TrainOptions& o);

enum class OptimizerKind { kAdamW, kSgd };
Result<OptimizerKind> ParseOptimizer(const std::string& name);  // "adamw" | "sgd"; errors name --optimizer

// One update with gradients already averaged over the batch (host memory for SGD). Returns the pre-clipping
// global gradient norm. SGD: p -= lr(step) * (clip * g + wd * p) for decaying tensors (decoupled decay, as
// AdamW), momentum-free.
double OptimizerStep(OptimizerKind kind, AdamW* adam, float* params, const float* grads,
                     const std::vector<ParamTensor>& layout, int64_t step, const OptimConfig& c);

struct DilocoConfig {
  int inner_steps = 50;
  double outer_lr = 0.7;
  double outer_momentum = 0.9;
  Codec codec = Codec::kNone;
};

class Diloco {
 public:
  Diloco(const DilocoConfig& c, size_t params);

  // Inner steps of the round starting at global step `step` (the last round of a run may be shorter).
  int RoundSteps(int64_t step, int64_t total_steps) const;

  struct InnerFns {
    // Forward + backward of micro-batch `micro` of global step s; the gradient is left in `grads`. Returns
    // the loss.
    std::function<float(int64_t s, int micro)> micro_batch;
    // One inner optimizer update at global step s, gradient (averaged over this member's micro-batches) in
    // `grads`.
    std::function<void(int64_t s)> update;
  };
  struct InnerResult {
    int micro_batches = 0;  // forward/backward passes done
    bool nonfinite = false; // a loss, gradient or the pseudo-gradient was non-finite (no holding)
    size_t saturated = 0;   // gradient values clamped by the exact sum (deterministic)
    double loss[128] = {};  // per micro-batch: mean loss over the round's inner steps
  };
  // The inner phase: params (host, P floats) hold the outer parameters on entry and again on return; grads is
  // the model's host gradient buffer. deterministic: the micro-batch gradients are summed in fixed point
  // (train/exact_sum.h) as data-parallel steps do.
  InnerResult RunInner(float* params, float* grads, bool deterministic, int64_t step, int n_steps,
                       const std::vector<int>& micros, const InnerFns& f);
  // The holding's weight (micro-batches processed); 0 = none.
  double weight() const { return weight_; }
  void DropHolding() { weight_ = 0; }

  // (3) The exchange, as a closure for the communication thread: sums w Δ and w over the group (this member
  // contributes its holding, or zeros with w = 0 when `have_holding` is false).
  std::function<Status(Communicator*)> MakeExchange(bool have_holding);
  // (5) The outer step on params (host). group: whether the exchange ran (else this member's own Δ is used, in
  // double). Returns the L2 norm of the averaged pseudo-gradient. Commits the error-feedback residual. An update
  // that would make a parameter or the momentum non-finite (or exceed float's range) is not applied at all: NaN
  // is returned, and the residual is not committed.
  double ApplyOuter(float* params, bool group);
  // The micro-batches behind the last ApplyOuter's update (Σw over the group; a lost member's are not in it).
  double applied_micro_batches() const { return applied_; }

  float* momentum() { return momentum_.data(); }
  size_t size() const { return P_; }
  // Agreed state: parameters + outer momentum + trainer aux (inner moments are per member: not included).
  uint64_t StateHash(const float* params, const std::string& aux) const;
  void Snapshot() { snap_momentum_ = momentum_; }
  void Restore() {
    if (snap_momentum_.size() == momentum_.size()) momentum_ = snap_momentum_;
  }
  // A new lineage of state (state transfer, rollback, a given-up exchange): error feedback starts over.
  void ResetFeedback() { ef_ = std::make_shared<ErrorFeedback>(); }

 private:
  struct Sum {
    std::vector<float> v;
    double weight = 0;
  };
  DilocoConfig c_;
  size_t P_;
  std::vector<float> momentum_, snap_momentum_;
  std::vector<float> outer_;          // the outer parameters during the inner phase
  std::vector<double> delta_;         // the holding: θ − θ_local
  std::vector<int64_t> acc_;          // fixed-point gradient sum of one inner step
  std::vector<float> accf_;           // fast-mode gradient sum
  double weight_ = 0;
  double applied_ = 0;
  std::shared_ptr<ErrorFeedback> ef_ = std::make_shared<ErrorFeedback>();
  std::shared_ptr<Sum> sum_;          // the last exchange's result
};

}  // namespace keel
