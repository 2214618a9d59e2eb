// adamw.h: the optimizer — AdamW with decoupled weight decay, LR warmup + cosine decay, and global
// gradient-norm clipping. Moments live on the backend next to the parameters.
//
// Weight decay policy (documented choice): matrices AND embeddings (wte, wpe) decay, as in GPT-2/nanoGPT;
// biases and LayerNorm gains never do. ParamTensor::decay carries the decision.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "model/gpt_config.h"

namespace keel {

struct OptimConfig {
  float lr = 1e-3f;          // peak learning rate
  float min_lr_frac = 0.1f;  // cosine decays to lr * min_lr_frac
  int64_t warmup = 20;       // linear warmup steps
  int64_t total_steps = 1000;
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  float weight_decay = 0.1f;
  float grad_clip = 1.0f;    // global L2 norm; <= 0 disables
};

// LR at a 0-based step: linear warmup to lr over `warmup` steps, then cosine to lr*min_lr_frac at total_steps.
float LearningRate(const OptimConfig& c, int64_t step);

class AdamW {
 public:
  static Result<std::unique_ptr<AdamW>> Create(Backend* backend, const std::vector<ParamTensor>& layout);
  ~AdamW();
  // One update at 0-based `step` with gradients already averaged over the global batch. Returns the
  // pre-clipping global gradient norm.
  double Step(float* params, const float* grads, int64_t step, const OptimConfig& c);
  float* m() { return m_; }
  float* v() { return v_; }
  size_t size() const { return n_; }

 private:
  AdamW(Backend* b, size_t n, std::vector<ParamTensor> layout) : backend_(b), n_(n), layout_(std::move(layout)) {}
  Backend* backend_;
  size_t n_;
  std::vector<ParamTensor> layout_;  // one update per tensor, with or without weight decay (no per-element mask)
  float* m_ = nullptr;
  float* v_ = nullptr;
};

}  // namespace keel
