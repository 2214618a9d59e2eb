// gpt.h: the GPT-2 model on a Backend — parameters, gradients, the training forward/backward pass (every op
// hand-written in the backend), and KV-cached decoding for sampling and serving.
//
// Contract: Forward() then Backward() accumulate d(mean loss)/d(params) into grads() (call ZeroGrads() first).
// Buffers live on the backend's device; params()/grads() are device pointers (host pointers on CPU).
// Thread safety: one thread at a time per GptModel.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "model/gpt_config.h"

namespace keel {

class GptModel {
 public:
  // Allocates parameters and gradients (zeroed) and activations for micro-batches up to B x T.
  static Result<std::unique_ptr<GptModel>> Create(const GptConfig& config, Backend* backend, int max_B, int max_T);
  // Bytes Create() allocates for the activations of a B x T micro-batch (kept for backward, plus backward's
  // scratch), without parameters and gradients. A lower bound on a training step's memory (parameters, gradients,
  // optimizer state and the backend's workspaces come on top), so a check against it never refuses a step that
  // fits. A double: it must not overflow for absurd B.
  static double ActivationBytes(const GptConfig& config, int64_t B, int64_t T);
  ~GptModel();

  const GptConfig& config() const { return config_; }
  const std::vector<ParamTensor>& tensors() const { return tensors_; }
  size_t num_params() const { return num_params_; }
  Backend* backend() const { return backend_; }
  float* params() { return params_; }
  float* grads() { return grads_; }
  const float* params() const { return params_; }

  // GPT-2 initialisation from seed: N(0, 0.02) for matrices and embeddings, N(0, 0.02/sqrt(2L)) for the two
  // residual projections, zero biases, unit LayerNorm gains. A pure function of (config, seed).
  void InitWeights(uint64_t seed);
  void SetParamsFromHost(const std::vector<float>& host);
  std::vector<float> ParamsToHost() const;
  std::vector<float> GradsToHost() const;
  void ZeroGrads();

  // tokens/targets: host arrays of B*T ids (targets may be null: logits only). Returns the mean loss
  // (0 if no targets). B <= max_B, T <= max_T and T <= ctx.
  float Forward(const int32_t* tokens, const int32_t* targets, int B, int T);
  // Per-position losses of the last Forward (host copy), e.g. to locate a NaN.
  std::vector<float> LastLosses() const;
  // Logits of the last Forward without targets, host copy [B*T, V].
  std::vector<float> LastLogits() const;
  // Backpropagates the last Forward. on_group_ready(g) is called as soon as every gradient of readiness
  // group g (see ParamTensor::group) is final, so a reducer can start sending it while backward continues.
  void Backward(const std::function<void(int group)>& on_group_ready = nullptr);

 private:
  GptModel(const GptConfig& c, Backend* b, int max_B, int max_T);
  Status Allocate();
  float* P(size_t tensor_index) { return params_ + tensors_[tensor_index].offset; }
  float* G(size_t tensor_index) { return grads_ + tensors_[tensor_index].offset; }
  size_t LayerTensor(int l, int k) const { return 2 + static_cast<size_t>(l) * 12 + static_cast<size_t>(k); }

  GptConfig config_;
  Backend* backend_;
  int max_B_, max_T_;
  std::vector<ParamTensor> tensors_;
  size_t num_params_ = 0;
  float* params_ = nullptr;
  float* grads_ = nullptr;

  // Activations (training), sized for max_B x max_T.
  struct LayerActs {
    float *ln1, *ln1_mean, *ln1_rstd, *qkv, *atty, *att, *attproj, *res2, *ln2, *ln2_mean, *ln2_rstd, *fch,
        *fch_gelu, *fcproj, *res3;
  };
  std::vector<LayerActs> acts_;
  float *encoded_ = nullptr, *lnf_ = nullptr, *lnf_mean_ = nullptr, *lnf_rstd_ = nullptr, *probs_ = nullptr,
        *losses_ = nullptr;
  // Backward scratch, reused by every layer.
  float *dres_ = nullptr, *dln_ = nullptr, *dqkv_ = nullptr, *datty_ = nullptr, *datt_ = nullptr,
        *dfch_ = nullptr, *dfch_gelu_ = nullptr;
  int32_t *tokens_ = nullptr, *targets_ = nullptr;
  std::vector<float*> owned_;
  std::vector<const uint16_t*> half_;  // per model tensor: its f16 copy (null: use the fp32 parameters)
  int last_B_ = 0, last_T_ = 0;
  bool last_has_targets_ = false;

  friend class DecodeState;
};

// KV-cached incremental decoding for up to B sequences ("slots") of up to maxT positions: each Step() advances every
// active sequence by one position at the cost of one position (not the whole context).
//
// StepRows() is the general form a continuous-batching server uses: any set of slots, and several rows per slot
// (a chunk of a prompt fed in one step). Step() is StepRows() with row b in slot b and logits for every row.
// Buffers are allocated once in Create(); steps do not allocate (after the first call at a given size).
// Thread safety: one thread at a time (and not concurrently with other users of the same GptModel).
class DecodeState {
 public:
  // max_rows: the most rows one StepRows() may feed (0: B). dtype kF16: the matrices (and the tied LM head) are
  // kept as IEEE f16 copies and multiplied from those (half the bytes per decoded token; logits then differ from
  // the fp32 model's by the f16 rounding of the weights). Fails where the backend lacks kMatmulForwardHalf.
  // kBF16: bfloat16 copies, and the matrices' input rows rounded to bf16 too (half the bytes, and on CPUs with
  // AVX-512 BF16 twice the arithmetic rate of fp32; logits differ from the fp32 model's by both roundings, more
  // than with f16). Needs repacking and kMatmulForwardPackedBf16.
  // Where the backend has kMatmulForwardPacked (the CPU with AVX2/FMA/F16C) every matrix is repacked once into
  // its decode layout, fp32, f16 or bf16: with fp32 weights that copy costs as much memory again as the matrices
  // (a second 500 MB for GPT-2 small), bought for a 1.2-1.6x faster 16-row step. A row's logits then do not
  // depend on which other rows share its step. Either copy is taken here: parameters changed after Create() are
  // not seen by the matrices (create a new DecodeState after loading new weights).
  // repack = false keeps the model's own matrices (no copy; the slower few-row kernels).
  // half_kv: the KV cache holds keys and values rounded to IEEE f16 (half the bytes every row's attention reads,
  // and half the cache's memory; llama.cpp's default cache type). Fails where the backend lacks
  // kAttentionDecodeHalfKv, or for an odd model width.
  static Result<std::unique_ptr<DecodeState>> Create(GptModel* model, int B, int maxT, int max_rows = 0,
                                                     WeightDtype dtype = WeightDtype::kF32, bool repack = true,
                                                     bool half_kv = false);
  ~DecodeState();
  // Feeds tokens[b] at position positions[b] for b < n (positions < maxT, and each sequence's positions
  // fed in order); returns logits [n, V] on the host.
  const std::vector<float>& Step(const int32_t* tokens, const int32_t* positions, int n);
  // Feeds row i = (tokens[i], positions[i]) into KV-cache slot slots[i] for i < n <= max_rows. Rows of one slot
  // must have distinct positions, and every position below a row's position must be filled by earlier steps or
  // by another row of this step (each row attends to its slot's positions 0..positions[i]). Returns the logits
  // of the rows listed in logit_rows (n_logits <= max_batch() of them, in that order) as [n_logits, V].
  const std::vector<float>& StepRows(const int32_t* tokens, const int32_t* positions, const int32_t* slots, int n,
                                     const int32_t* logit_rows, int n_logits);
  // Copies the KV cache of positions [0, n) from slot `from` to slot `to` (a prompt-prefix cache: a sequence
  // whose first n tokens equal another's reuses that one's keys and values instead of recomputing them). A
  // position's keys and values depend only on the tokens at and before it, and with the repacked matrices a row's
  // result does not depend on the other rows of its step, so the copy equals a recomputation bit for bit there.
  // 0 <= n <= max_positions(); from == to is a no-op.
  void CopyPositions(int from, int to, int n);
  int max_batch() const { return B_; }
  int max_positions() const { return maxT_; }
  int max_rows() const { return R_; }

 private:
  DecodeState(GptModel* m, int B, int maxT, int R) : model_(m), B_(B), maxT_(maxT), R_(R) {}
  GptModel* model_;
  int B_, maxT_, R_;
  std::vector<float*> k_cache_, v_cache_;  // per layer [B, maxT, C] (IEEE f16 values with half_kv_)
  bool half_kv_ = false;
  float *x_ = nullptr, *ln_ = nullptr, *mean_ = nullptr, *rstd_ = nullptr, *qkv_ = nullptr, *atty_ = nullptr,
        *tmp_ = nullptr, *fch_ = nullptr, *fch_gelu_ = nullptr, *logits_ = nullptr, *scratch_ = nullptr,
        *lnsel_ = nullptr;
  int32_t *tok_ = nullptr, *pos_ = nullptr;
  std::vector<float*> owned_;
  std::vector<const uint16_t*> half_;  // per model tensor: its f16 copy (null: use the fp32 parameters)
  std::vector<const float*> packed_;   // per model tensor: its packed copy (backends with kMatmulForwardPacked)
  WeightDtype packed_dtype_ = WeightDtype::kF32;  // what packed_ holds
  std::vector<float> host_logits_;
  std::vector<int32_t> identity_;  // 0..max(B, R)-1, for Step()
};

}  // namespace keel
