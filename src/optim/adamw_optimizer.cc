// adamw_optimizer.cc: LR schedule, clipping and the AdamW driver over the flat parameter buffer.
#include <cmath>

#include "optim/adamw.h"

namespace keel {

float LearningRate(const OptimConfig& c, int64_t step) {
  if (c.warmup > 0 && step < c.warmup) return c.lr * static_cast<float>(step + 1) / static_cast<float>(c.warmup);
  int64_t decay_steps = c.total_steps - c.warmup;
  if (decay_steps <= 0) return c.lr;
  double progress = static_cast<double>(step - c.warmup) / static_cast<double>(decay_steps);
  if (progress > 1.0) progress = 1.0;
  double min_lr = c.lr * c.min_lr_frac;
  return static_cast<float>(min_lr + 0.5 * (1.0 + std::cos(M_PI * progress)) * (c.lr - min_lr));
}

Result<std::unique_ptr<AdamW>> AdamW::Create(Backend* backend, const std::vector<ParamTensor>& layout) {
  size_t n = layout.back().offset + layout.back().size;
  std::unique_ptr<AdamW> o(new AdamW(backend, n, layout));
  auto m = backend->Alloc(n);
  if (!m.ok()) return m.status();
  o->m_ = m.value();
  auto v = backend->Alloc(n);
  if (!v.ok()) return v.status();
  o->v_ = v.value();
  return o;
}

AdamW::~AdamW() {
  if (m_) backend_->Free(m_);
  if (v_) backend_->Free(v_);
}

double AdamW::Step(float* params, const float* grads, int64_t step, const OptimConfig& c) {
  double norm = std::sqrt(backend_->SumSquares(grads, n_));
  float scale = 1.0f;
  if (c.grad_clip > 0.0f && norm > c.grad_clip) scale = static_cast<float>(c.grad_clip / norm);
  for (const auto& t : layout_) {
    AdamWParams p{LearningRate(c, step), c.beta1, c.beta2, c.eps, t.decay ? c.weight_decay : 0.0f, step + 1, scale};
    backend_->AdamW(params + t.offset, grads + t.offset, m_ + t.offset, v_ + t.offset, nullptr, t.size, p);
  }
  return norm;
}

}  // namespace keel
