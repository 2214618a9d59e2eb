// diloco.cc: the DiLoCo outer loop pieces and the SGD optimizer option (see diloco.h).
#include "train/diloco.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/hash.h"
#include "train/exact_sum.h"
#include "train/trainer.h"

namespace keel {

Result<OptimizerKind> ParseOptimizer(const std::string& name) {
  if (name == "adamw") return OptimizerKind::kAdamW;
  if (name == "sgd") return OptimizerKind::kSgd;
  return InvalidArgument("--optimizer must be adamw or sgd (got '" + name + "')");
}

Status ValidateSyncOptions(const TrainOptions& o) {
  if (o.sync != "ddp" && o.sync != "diloco") return InvalidArgument("--sync must be ddp or diloco (got '" + o.sync + "')");
  if (o.inner_steps < 1) return InvalidArgument("--inner-steps must be >= 1 (got " + std::to_string(o.inner_steps) + ")");
  if (!(o.outer_lr > 0) || !std::isfinite(o.outer_lr)) return InvalidArgument("--outer-lr must be a positive number");
  if (!(o.outer_momentum >= 0 && o.outer_momentum < 1)) return InvalidArgument("--outer-momentum must be in [0, 1)");
  KEEL_ASSIGN_OR_RETURN(OptimizerKind opt, ParseOptimizer(o.optimizer));
  KEEL_ASSIGN_OR_RETURN(Codec codec, ParseCodec(o.compress));
  (void)codec;
  if (opt == OptimizerKind::kSgd && o.device != "cpu") return InvalidArgument("--optimizer sgd needs --device cpu");
  if (o.sync == "diloco") {
    if (o.device != "cpu") return InvalidArgument("--sync diloco needs --device cpu");
    if (o.verify_fraction > 0)
      return InvalidArgument("--verify-fraction cross-checks data-parallel gradients: it does not apply to --sync diloco");
    if (o.spike_factor > 0) return InvalidArgument("--spike-factor is not supported with --sync diloco");
  }
  return Status::Ok();
}

double OptimizerStep(OptimizerKind kind, AdamW* adam, float* params, const float* grads,
                     const std::vector<ParamTensor>& layout, int64_t step, const OptimConfig& c) {
  if (kind == OptimizerKind::kAdamW) return adam->Step(params, grads, step, c);
  size_t n = layout.empty() ? 0 : layout.back().offset + layout.back().size;
  double ss = 0;
  for (size_t i = 0; i < n; ++i) ss += static_cast<double>(grads[i]) * grads[i];
  const double norm = std::sqrt(ss);
  float scale = 1.0f;
  if (c.grad_clip > 0.0f && norm > c.grad_clip) scale = static_cast<float>(c.grad_clip / norm);
  const float lr = LearningRate(c, step);
  for (const auto& t : layout) {
    const float wd = t.decay ? c.weight_decay : 0.0f;
    float* p = params + t.offset;
    const float* g = grads + t.offset;
    for (size_t i = 0; i < t.size; ++i) p[i] -= lr * (scale * g[i] + wd * p[i]);
  }
  return norm;
}

Diloco::Diloco(const DilocoConfig& c, size_t params) : c_(c), P_(params) {
  momentum_.assign(P_, 0.0f);
  delta_.assign(P_, 0.0);
}

int Diloco::RoundSteps(int64_t step, int64_t total_steps) const {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(c_.inner_steps, total_steps - step)));
}

Diloco::InnerResult Diloco::RunInner(float* params, float* grads, bool deterministic, int64_t step, int n_steps,
                                     const std::vector<int>& micros, const InnerFns& f) {
  InnerResult r;
  weight_ = 0;
  if (micros.empty()) return r;
  outer_.assign(params, params + P_);
  if (deterministic) acc_.assign(P_, 0);
  else accf_.assign(P_, 0.0f);
  for (int j = 0; j < n_steps && !r.nonfinite; ++j) {
    const int64_t s = step + j;
    if (deterministic) std::fill(acc_.begin(), acc_.end(), 0);
    else std::fill(accf_.begin(), accf_.end(), 0.0f);
    for (int micro : micros) {
      const float loss = f.micro_batch(s, micro);
      ++r.micro_batches;
      if (!std::isfinite(loss)) r.nonfinite = true;
      if (micro >= 0 && micro < 128) r.loss[micro] += loss / n_steps;
      if (deterministic) {
        size_t sat = 0;
        r.nonfinite |= AddFixedPoint(acc_.data(), grads, P_, &sat) > 0;
        r.saturated += sat;
      } else {
        for (size_t i = 0; i < P_; ++i) accf_[i] += grads[i];
      }
    }
    // The inner step's gradient: the mean over this member's micro-batches (rounded once, as a data-parallel
    // step rounds the mean over all of them).
    const double inv = 1.0 / static_cast<double>(micros.size());
    if (deterministic) {
      FixedPointToFloat(grads, acc_.data(), P_, inv);
    } else {
      for (size_t i = 0; i < P_; ++i) grads[i] = static_cast<float>(accf_[i] * inv);
    }
    if (!r.nonfinite) f.update(s);
  }
  bool finite = !r.nonfinite;
  for (size_t i = 0; i < P_; ++i) {
    delta_[i] = static_cast<double>(outer_[i]) - static_cast<double>(params[i]);
    finite &= std::isfinite(delta_[i]);
  }
  std::memcpy(params, outer_.data(), P_ * sizeof(float));
  r.nonfinite = !finite;
  weight_ = finite ? static_cast<double>(r.micro_batches) : 0.0;
  return r;
}

std::function<Status(Communicator*)> Diloco::MakeExchange(bool have_holding) {
  const double w = have_holding ? weight_ : 0.0;
  auto out = std::make_shared<Sum>();
  sum_ = out;
  // Built here (training thread): the closure owns everything it touches.
  auto payload = std::make_shared<std::vector<float>>(P_ + 1, 0.0f);
  if (w > 0) {
    if (c_.codec == Codec::kNone)
      for (size_t i = 0; i < P_; ++i) (*payload)[i] = static_cast<float>(w * delta_[i]);
    else
      for (size_t i = 0; i < P_; ++i) (*payload)[i] = static_cast<float>(delta_[i]);
  }
  (*payload)[P_] = static_cast<float>(w);
  auto ef = ef_;
  const Codec codec = c_.codec;
  const size_t P = P_;
  return [payload, out, ef, codec, P, w](Communicator* comm) -> Status {
    out->v.assign(P, 0.0f);
    if (codec == Codec::kNone) {
      // Micro-batch counts are small integers: exact in float.
      KEEL_RETURN_IF_ERROR(comm->AllreduceSum(payload->data(), P + 1));
      std::memcpy(out->v.data(), payload->data(), P * sizeof(float));
      out->weight = (*payload)[P];
      return Status::Ok();
    }
    // Error feedback on Δ itself; each block is decoded with its sender's weight.
    return CompressedSum(comm, codec, payload->data(), 0, P, w > 0 ? ef.get() : nullptr, out->v.data(), w,
                         &out->weight, /*weight_by_header=*/true);
  };
}

double Diloco::ApplyOuter(float* params, bool group) {
  const double mu = c_.outer_momentum, lr = c_.outer_lr;
  const bool use_sum = group && sum_ && sum_->v.size() == P_;
  const double total = use_sum ? sum_->weight : (weight_ > 0 ? 1.0 : 0.0);
  applied_ = use_sum ? sum_->weight : weight_;
  double ss = 0;
  if (total > 0) {
    const double inv = use_sum ? 1.0 / total : 1.0;
    // First check that the whole update is finite (every member computes the same g, so every member decides
    // alike): an overflow in the sum, or bf16 rounding a huge value to inf, must not put inf or NaN into the
    // outer parameters or momentum, from where every later round would be non-finite.
    for (size_t i = 0; i < P_; ++i) {
      const double g = use_sum ? sum_->v[i] * inv : delta_[i];
      const double m = mu * momentum_[i] + g;
      const double p = static_cast<double>(params[i]) - lr * (mu != 0 ? g + mu * m : g);
      if (!(std::fabs(m) <= FLT_MAX && std::fabs(p) <= FLT_MAX)) {
        weight_ = 0;  // nothing applied; the error-feedback residual stays the one before this exchange
        sum_.reset();
        return std::numeric_limits<double>::quiet_NaN();
      }
    }
    for (size_t i = 0; i < P_; ++i) {
      const double g = use_sum ? sum_->v[i] * inv : delta_[i];
      ss += g * g;
      const double m = mu * momentum_[i] + g;
      momentum_[i] = static_cast<float>(m);
      const double upd = mu != 0 ? g + mu * m : g;  // Nesterov
      params[i] = static_cast<float>(static_cast<double>(params[i]) - lr * upd);
    }
  }
  if (group && weight_ > 0) ef_->Commit();
  weight_ = 0;
  sum_.reset();
  return std::sqrt(ss);
}

uint64_t Diloco::StateHash(const float* params, const std::string& aux) const {
  uint64_t h = Hash64(params, P_ * sizeof(float), 7);
  h = Hash64(momentum_.data(), P_ * sizeof(float), h);
  return Hash64(aux.data(), aux.size(), h);
}

}  // namespace keel
