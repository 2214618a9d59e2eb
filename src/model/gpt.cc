// gpt.cc: GPT-2 forward, backward and KV-cached decoding, written as a sequence of backend ops.
#include "model/gpt.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "core/check.h"
#include "core/hash.h"
#include "formats/half.h"

namespace keel {

namespace {
// Tensor index of each parameter inside a layer (see ParamLayout).
enum LayerParam { kLn1W, kLn1B, kQkvW, kQkvB, kProjW, kProjB, kLn2W, kLn2B, kFcW, kFcB, kFcProjW, kFcProjB };
}  // namespace

GptModel::GptModel(const GptConfig& c, Backend* b, int max_B, int max_T)
    : config_(c), backend_(b), max_B_(max_B), max_T_(max_T), tensors_(ParamLayout(c)), num_params_(NumParams(c)) {}

GptModel::~GptModel() {
  for (float* p : owned_) backend_->Free(p);
  if (tokens_) backend_->FreeInt(tokens_);
  if (targets_) backend_->FreeInt(targets_);
}

Result<std::unique_ptr<GptModel>> GptModel::Create(const GptConfig& config, Backend* backend, int max_B, int max_T) {
  KEEL_RETURN_IF_ERROR(config.Validate());
  if (max_B <= 0 || max_T <= 0) return InvalidArgument("--batch and context must be positive");
  if (max_T > config.ctx)
    return InvalidArgument("sequence length " + std::to_string(max_T) + " exceeds the model context " +
                           std::to_string(config.ctx));
  // Beyond this, Allocate's size_t products would wrap (and no memory holds it anyway).
  if (const double need = ActivationBytes(config, max_B, max_T); need > 0x1p62) {
    char gb[32];
    std::snprintf(gb, sizeof gb, "%.3g GB", need / 1e9);
    return InvalidArgument("a micro-batch of --batch " + std::to_string(max_B) + " sequences x " +
                           std::to_string(max_T) + " tokens is implausibly large (" + gb + " of activations)");
  }
  std::unique_ptr<GptModel> m(new GptModel(config, backend, max_B, max_T));
  KEEL_RETURN_IF_ERROR(m->Allocate());
  return m;
}

// Keep in step with Allocate() (which fails with kInternal when the two disagree).
double GptModel::ActivationBytes(const GptConfig& c, int64_t B, int64_t T) {
  const double BT = static_cast<double>(B) * static_cast<double>(T), C = c.dim, V = c.vocab;
  const double att = static_cast<double>(B) * c.heads * static_cast<double>(T) * static_cast<double>(T);
  const double per_layer = 18 * BT * C + 4 * BT + att;             // LayerActs
  const double rest = 16 * BT * C + 3 * BT + BT * V + att;         // final LN, probs, losses, backward scratch
  return (c.layers * per_layer + rest) * sizeof(float) + 2 * BT * sizeof(int32_t);  // + tokens, targets
}

Status GptModel::Allocate() {
  double act_bytes = 0;  // the activations' share, checked against ActivationBytes
  auto alloc = [&](size_t n, float** out) -> Status {
    auto r = backend_->Alloc(n);
    if (!r.ok()) return r.status();
    *out = r.value();
    owned_.push_back(*out);
    act_bytes += static_cast<double>(n) * sizeof(float);
    return Status::Ok();
  };
  KEEL_RETURN_IF_ERROR(alloc(num_params_, &params_));
  KEEL_RETURN_IF_ERROR(alloc(num_params_, &grads_));
  act_bytes = 0;
  // The backend's out-of-memory error alone does not say that the micro-batch is what is too large.
  const double need = ActivationBytes(config_, max_B_, max_T_);
  auto too_large = [&](const Status& s) {
    char gb[32];
    std::snprintf(gb, sizeof gb, "%.1f GB", need / 1e9);
    return s.Wrap("a micro-batch of --batch " + std::to_string(max_B_) + " sequences x " + std::to_string(max_T_) +
                  " tokens needs " + gb + " of activations");
  };
  const size_t BT = static_cast<size_t>(max_B_) * max_T_, C = config_.dim, NH = config_.heads;
  const size_t att = static_cast<size_t>(max_B_) * NH * max_T_ * max_T_;
  acts_.resize(config_.layers);
  for (auto& a : acts_) {
    for (auto [p, n] : {std::pair{&a.ln1, BT * C}, {&a.ln1_mean, BT}, {&a.ln1_rstd, BT}, {&a.qkv, 3 * BT * C},
                        {&a.atty, BT * C}, {&a.att, att}, {&a.attproj, BT * C}, {&a.res2, BT * C}, {&a.ln2, BT * C},
                        {&a.ln2_mean, BT}, {&a.ln2_rstd, BT}, {&a.fch, 4 * BT * C}, {&a.fch_gelu, 4 * BT * C},
                        {&a.fcproj, BT * C}, {&a.res3, BT * C}})
      if (Status s = alloc(n, p); !s.ok()) return too_large(s);
  }
  for (auto [p, n] : {std::pair{&encoded_, BT * C}, {&lnf_, BT * C}, {&lnf_mean_, BT}, {&lnf_rstd_, BT},
                      {&probs_, BT * config_.vocab}, {&losses_, BT}, {&dres_, BT * C}, {&dln_, BT * C},
                      {&dqkv_, 3 * BT * C}, {&datty_, BT * C}, {&datt_, att}, {&dfch_, 4 * BT * C},
                      {&dfch_gelu_, 4 * BT * C}})
    if (Status s = alloc(n, p); !s.ok()) return too_large(s);
  auto ti = backend_->AllocInt(BT);
  if (!ti.ok()) return too_large(ti.status());
  tokens_ = ti.value();
  auto tt = backend_->AllocInt(BT);
  if (!tt.ok()) return too_large(tt.status());
  targets_ = tt.value();
  act_bytes += 2.0 * static_cast<double>(BT) * sizeof(int32_t);
  // Checked in every build (RelWithDebInfo drops asserts): every model creation in the tests compares them.
  if (act_bytes != need)
    return Internal("GptModel::ActivationBytes (" + std::to_string(need) + ") is out of step with Allocate (" +
                    std::to_string(act_bytes) + ")");
  return Status::Ok();
}

void GptModel::InitWeights(uint64_t seed) {
  // Written in place where the backend's memory is host memory (no second P-sized copy: 0.5 GB at GPT-2 small).
  std::vector<float> staging;
  float* base = params_;
  if (backend_->host_memory()) {
    std::fill(params_, params_ + num_params_, 0.0f);
  } else {
    staging.assign(num_params_, 0.0f);
    base = staging.data();
  }
  const float residual_std = 0.02f / std::sqrt(2.0f * static_cast<float>(config_.layers));
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const ParamTensor& t = tensors_[i];
    float* p = base + t.offset;
    bool is_ln_gain = t.name.find("ln") != std::string::npos && t.name.ends_with(".weight");
    bool is_bias = t.name.ends_with(".bias");
    if (is_ln_gain) {
      for (size_t j = 0; j < t.size; ++j) p[j] = 1.0f;
    } else if (!is_bias) {
      float stdv = (t.name.ends_with("attn.proj.weight") || t.name.ends_with("mlp.proj.weight")) ? residual_std : 0.02f;
      Rng rng(MixKey(seed, i));  // one stream per tensor: the init does not depend on the layout of others
      for (size_t j = 0; j < t.size; ++j) p[j] = stdv * rng.Normal();
    }
  }
  if (!staging.empty()) SetParamsFromHost(staging);
}

void GptModel::SetParamsFromHost(const std::vector<float>& host) { backend_->Upload(params_, host.data(), num_params_); }

std::vector<float> GptModel::ParamsToHost() const {
  std::vector<float> h(num_params_);
  backend_->Download(h.data(), params_, num_params_);
  return h;
}

std::vector<float> GptModel::GradsToHost() const {
  std::vector<float> h(num_params_);
  backend_->Download(h.data(), grads_, num_params_);
  return h;
}

void GptModel::ZeroGrads() { backend_->Zero(grads_, num_params_); }

float GptModel::Forward(const int32_t* tokens, const int32_t* targets, int B, int T) {
  KEEL_CHECK(B > 0 && T > 0 && B <= max_B_ && T <= max_T_, "GptModel::Forward: B x T beyond the buffers' size");
  Backend* be = backend_;
  const int C = config_.dim, NH = config_.heads, V = config_.vocab, N = B * T;
  be->UploadInt(tokens_, tokens, static_cast<size_t>(N));
  if (targets) be->UploadInt(targets_, targets, static_cast<size_t>(N));
  be->EncoderForward(encoded_, tokens_, nullptr, P(0), P(1), B, T, C);
  const float* x = encoded_;
  for (int l = 0; l < config_.layers; ++l) {
    LayerActs& a = acts_[l];
    auto W = [&](int k) { return P(LayerTensor(l, k)); };
    be->LayerNormForward(a.ln1, a.ln1_mean, a.ln1_rstd, x, W(kLn1W), W(kLn1B), N, C);
    be->MatmulForward(a.qkv, a.ln1, W(kQkvW), W(kQkvB), N, C, 3 * C);
    be->AttentionForward(a.atty, a.att, a.qkv, B, T, C, NH);
    be->MatmulForward(a.attproj, a.atty, W(kProjW), W(kProjB), N, C, C);
    be->ResidualForward(a.res2, x, a.attproj, static_cast<size_t>(N) * C);
    be->LayerNormForward(a.ln2, a.ln2_mean, a.ln2_rstd, a.res2, W(kLn2W), W(kLn2B), N, C);
    be->MatmulForward(a.fch, a.ln2, W(kFcW), W(kFcB), N, C, 4 * C);
    be->GeluForward(a.fch_gelu, a.fch, static_cast<size_t>(N) * 4 * C);
    be->MatmulForward(a.fcproj, a.fch_gelu, W(kFcProjW), W(kFcProjB), N, 4 * C, C);
    be->ResidualForward(a.res3, a.res2, a.fcproj, static_cast<size_t>(N) * C);
    x = a.res3;
  }
  const size_t lnf = tensors_.size() - 2;
  be->LayerNormForward(lnf_, lnf_mean_, lnf_rstd_, x, P(lnf), P(lnf + 1), N, C);
  be->MatmulForward(probs_, lnf_, P(0), nullptr, N, C, V);  // logits; tied head
  last_B_ = B;
  last_T_ = T;
  last_has_targets_ = targets != nullptr;
  if (!targets) return 0.0f;
  be->SoftmaxCrossEntropyForward(losses_, probs_, probs_, targets_, N, V, V);
  std::vector<float> losses(static_cast<size_t>(N));
  be->Download(losses.data(), losses_, losses.size());
  double sum = 0.0;
  for (float v : losses) sum += v;
  return static_cast<float>(sum / N);
}

std::vector<float> GptModel::LastLosses() const {
  std::vector<float> h(static_cast<size_t>(last_B_) * last_T_);
  backend_->Download(h.data(), losses_, h.size());
  return h;
}

std::vector<float> GptModel::LastLogits() const {
  KEEL_CHECK(!last_has_targets_, "GptModel::LastLogits after a Forward with targets (the buffer holds probabilities)");
  std::vector<float> h(static_cast<size_t>(last_B_) * last_T_ * config_.vocab);
  backend_->Download(h.data(), probs_, h.size());
  return h;
}

void GptModel::Backward(const std::function<void(int group)>& on_group_ready) {
  KEEL_CHECK(last_has_targets_, "GptModel::Backward needs a Forward with targets first");
  Backend* be = backend_;
  const int B = last_B_, T = last_T_, C = config_.dim, NH = config_.heads, V = config_.vocab, N = B * T;
  const size_t BTC = static_cast<size_t>(N) * C;
  const size_t lnf = tensors_.size() - 2;
  // Mean over the B*T positions of this micro-batch.
  be->SoftmaxCrossEntropyBackward(probs_, probs_, targets_, 1.0f / static_cast<float>(N), N, V, V);
  be->Zero(dln_, BTC);
  be->MatmulBackward(dln_, G(0), nullptr, probs_, lnf_, P(0), N, C, V);
  const float* last_x = config_.layers > 0 ? acts_.back().res3 : encoded_;
  be->Zero(dres_, BTC);
  be->LayerNormBackward(dres_, G(lnf), G(lnf + 1), dln_, last_x, P(lnf), lnf_mean_, lnf_rstd_, N, C);
  if (on_group_ready) on_group_ready(config_.layers + 1);
  for (int l = config_.layers - 1; l >= 0; --l) {
    LayerActs& a = acts_[l];
    const float* x = l == 0 ? encoded_ : acts_[l - 1].res3;
    auto W = [&](int k) { return P(LayerTensor(l, k)); };
    auto D = [&](int k) { return G(LayerTensor(l, k)); };
    be->Zero(dfch_gelu_, 4 * BTC);
    be->MatmulBackward(dfch_gelu_, D(kFcProjW), D(kFcProjB), dres_, a.fch_gelu, W(kFcProjW), N, 4 * C, C);
    be->Zero(dfch_, 4 * BTC);
    be->GeluBackward(dfch_, a.fch, dfch_gelu_, 4 * BTC);
    be->Zero(dln_, BTC);
    be->MatmulBackward(dln_, D(kFcW), D(kFcB), dfch_, a.ln2, W(kFcW), N, C, 4 * C);
    be->LayerNormBackward(dres_, D(kLn2W), D(kLn2B), dln_, a.res2, W(kLn2W), a.ln2_mean, a.ln2_rstd, N, C);
    be->Zero(datty_, BTC);
    be->MatmulBackward(datty_, D(kProjW), D(kProjB), dres_, a.atty, W(kProjW), N, C, C);
    be->Zero(dqkv_, 3 * BTC);
    be->AttentionBackward(dqkv_, datt_, datty_, a.qkv, a.att, B, T, C, NH);
    be->Zero(dln_, BTC);
    be->MatmulBackward(dln_, D(kQkvW), D(kQkvB), dqkv_, a.ln1, W(kQkvW), N, C, 3 * C);
    be->LayerNormBackward(dres_, D(kLn1W), D(kLn1B), dln_, x, W(kLn1W), a.ln1_mean, a.ln1_rstd, N, C);
    if (on_group_ready) on_group_ready(1 + l);
  }
  be->EncoderBackward(G(0), G(1), dres_, tokens_, B, T, C);
  if (on_group_ready) on_group_ready(0);
}

// ---------------------------------------------------------------------------------------------------------
// DecodeState

Result<std::unique_ptr<DecodeState>> DecodeState::Create(GptModel* model, int B, int maxT, int max_rows,
                                                         WeightDtype dtype, bool repack, bool half_kv) {
  const GptConfig& c = model->config();
  if (B <= 0) return InvalidArgument("decode batch must be positive");
  if (maxT <= 0 || maxT > c.ctx)
    return InvalidArgument("decode context " + std::to_string(maxT) + " must be in [1, " + std::to_string(c.ctx) +
                           "]");
  if (max_rows < 0) return InvalidArgument("decode rows must be >= 0");
  const int R = std::max(B, max_rows);
  Backend* be = model->backend();
  // bf16 exists only as repacked panels (the CPU's needs AVX2/FMA/F16C).
  if (dtype == WeightDtype::kBF16 &&
      !(repack && be->SupportsOp(Op::kMatmulForwardPacked) && be->SupportsOp(Op::kMatmulForwardPackedBf16)))
    return InvalidArgument("bf16 weights are not supported by the " + be->Name() + " backend" +
                           (!repack ? " without repacking"
                            : be->host_memory() ? " on this CPU (it needs AVX2, FMA and F16C)" : ""));
  if (half_kv && !be->SupportsOp(Op::kAttentionDecodeHalfKv))
    return InvalidArgument("an f16 KV cache is not supported by the " + be->Name() + " backend");
  // Positions start at multiples of C values: an even C keeps them on whole floats for Copy.
  if (half_kv && c.dim % 2 != 0) return InvalidArgument("an f16 KV cache needs an even model width");
  std::unique_ptr<DecodeState> s(new DecodeState(model, B, maxT, R));
  s->half_kv_ = half_kv;
  const size_t C = c.dim;
  auto alloc = [&](size_t n, float** out) -> Status {
    auto r = be->Alloc(n);
    if (!r.ok()) return r.status();
    *out = r.value();
    s->owned_.push_back(*out);
    return Status::Ok();
  };
  s->k_cache_.resize(c.layers);
  s->v_cache_.resize(c.layers);
  const size_t cache_floats = static_cast<size_t>(B) * maxT * C / (half_kv ? 2 : 1);
  for (int l = 0; l < c.layers; ++l) {
    KEEL_RETURN_IF_ERROR(alloc(cache_floats, &s->k_cache_[l]));
    KEEL_RETURN_IF_ERROR(alloc(cache_floats, &s->v_cache_[l]));
  }
  const size_t Rs = static_cast<size_t>(R);
  for (auto [p, n] : {std::pair{&s->x_, Rs * C}, {&s->ln_, Rs * C}, {&s->mean_, Rs}, {&s->rstd_, Rs},
                      {&s->qkv_, 3 * Rs * C}, {&s->atty_, Rs * C}, {&s->tmp_, Rs * C}, {&s->fch_, 4 * Rs * C},
                      {&s->fch_gelu_, 4 * Rs * C}, {&s->logits_, size_t(B) * c.vocab}, {&s->lnsel_, size_t(B) * C},
                      {&s->scratch_, Rs * c.heads * maxT}})
    KEEL_RETURN_IF_ERROR(alloc(n, p));
  auto t = be->AllocInt(Rs);
  if (!t.ok()) return t.status();
  s->tok_ = t.value();
  auto p = be->AllocInt(Rs);
  if (!p.ok()) return p.status();
  s->pos_ = p.value();
  s->identity_.resize(Rs);
  for (int i = 0; i < R; ++i) s->identity_[static_cast<size_t>(i)] = i;
  s->host_logits_.reserve(size_t(B) * c.vocab);
  std::vector<size_t> mats = {0};  // wte: the tied LM head
  for (int l = 0; l < c.layers; ++l)
    for (int k : {kQkvW, kProjW, kFcW, kFcProjW}) mats.push_back(model->LayerTensor(l, k));
  if (repack && be->SupportsOp(Op::kMatmulForwardPacked)) {
    // Every matrix repacked once for the backend's decode kernel (fp32, f16 or bf16).
    s->packed_.assign(model->tensors().size(), nullptr);
    s->packed_dtype_ = dtype;
    const int Ci = c.dim;
    auto dims = [&](size_t t) -> std::pair<int, int> {  // (IC, OC) as StepRows multiplies tensor t
      if (t == 0) return {Ci, c.vocab};                  // the tied LM head: the first V rows of wte
      for (int l = 0; l < c.layers; ++l) {
        if (t == model->LayerTensor(l, kQkvW)) return {Ci, 3 * Ci};
        if (t == model->LayerTensor(l, kProjW)) return {Ci, Ci};
        if (t == model->LayerTensor(l, kFcW)) return {Ci, 4 * Ci};
      }
      return {4 * Ci, Ci};  // kFcProjW
    };
    for (size_t t : mats) {
      const auto [IC, OC] = dims(t);
      float* dev = nullptr;
      KEEL_RETURN_IF_ERROR(alloc(be->PackedMatmulFloats(IC, OC, dtype), &dev));
      be->PackMatmulWeight(dev, model->P(t), IC, OC, dtype);
      s->packed_[t] = dev;
    }
    return s;
  }
  if (dtype == WeightDtype::kF16) {
    if (!be->SupportsOp(Op::kMatmulForwardHalf))
      return InvalidArgument("f16 weights are not supported by the " + be->Name() + " backend");
    s->half_.assign(model->tensors().size(), nullptr);
    std::vector<float> host;
    std::vector<uint16_t> h16;
    for (size_t t : mats) {
      const size_t n = model->tensors()[t].size, floats = (n + 1) / 2;
      host.resize(n);
      be->Download(host.data(), model->P(t), n);
      h16.assign(floats * 2, 0);
      FloatToF16N(host.data(), h16.data(), n);
      float* dev = nullptr;
      KEEL_RETURN_IF_ERROR(alloc(floats, &dev));
      be->Upload(dev, reinterpret_cast<const float*>(h16.data()), floats);
      s->half_[t] = reinterpret_cast<const uint16_t*>(dev);
    }
  }
  return s;
}

DecodeState::~DecodeState() {
  Backend* be = model_->backend();
  for (float* p : owned_) be->Free(p);
  if (tok_) be->FreeInt(tok_);
  if (pos_) be->FreeInt(pos_);
}

void DecodeState::CopyPositions(int from, int to, int n) {
  KEEL_CHECK(from >= 0 && from < B_ && to >= 0 && to < B_ && n >= 0 && n <= maxT_,
             "DecodeState::CopyPositions: slot or position count out of range");
  if (from == to || n == 0) return;
  Backend* be = model_->backend();
  // In floats: an f16 cache packs two values per float (C is even there).
  const size_t C = static_cast<size_t>(model_->config().dim) / (half_kv_ ? 2 : 1),
               per_slot = static_cast<size_t>(maxT_) * C;
  for (size_t l = 0; l < k_cache_.size(); ++l) {
    be->Copy(k_cache_[l] + static_cast<size_t>(to) * per_slot, k_cache_[l] + static_cast<size_t>(from) * per_slot,
             static_cast<size_t>(n) * C);
    be->Copy(v_cache_[l] + static_cast<size_t>(to) * per_slot, v_cache_[l] + static_cast<size_t>(from) * per_slot,
             static_cast<size_t>(n) * C);
  }
}

const std::vector<float>& DecodeState::Step(const int32_t* tokens, const int32_t* positions, int n) {
  KEEL_CHECK(n > 0 && n <= B_, "DecodeState::Step: row count out of range");
  return StepRows(tokens, positions, identity_.data(), n, identity_.data(), n);
}

const std::vector<float>& DecodeState::StepRows(const int32_t* tokens, const int32_t* positions,
                                                const int32_t* slots, int n, const int32_t* logit_rows,
                                                int n_logits) {
  // The KV cache is written at (slot, position) below: out-of-range rows would write past it.
  KEEL_CHECK(n > 0 && n <= R_ && n_logits >= 0 && n_logits <= B_, "DecodeState::StepRows: row counts out of range");
  for (int i = 0; i < n; ++i)
    KEEL_CHECK(slots[i] >= 0 && slots[i] < B_ && positions[i] >= 0 && positions[i] < maxT_ && tokens[i] >= 0 &&
                   tokens[i] < model_->config().vocab,
               "DecodeState::StepRows: a row's slot, position or token is out of range");
  for (int i = 0; i < n_logits; ++i)
    KEEL_CHECK(logit_rows[i] >= 0 && logit_rows[i] < n, "DecodeState::StepRows: a logit row is out of range");
  GptModel& m = *model_;
  Backend* be = m.backend();
  const GptConfig& c = m.config();
  const int C = c.dim, NH = c.heads, V = c.vocab;
  const size_t Cs = static_cast<size_t>(C);
  // Row b in slot b for every b: the batched AttentionDecode applies as is.
  bool identity = true;
  for (int b = 0; b < n && identity; ++b) identity = slots[b] == b;
  be->UploadInt(tok_, tokens, n);
  be->UploadInt(pos_, positions, n);
  be->EncoderForward(x_, tok_, pos_, m.P(0), m.P(1), n, 1, C);
  // out = inp @ W^T + bias with tensor t's f16 copy when there is one.
  auto linear = [&](float* out, const float* inp, size_t t, const float* bias, int rows, int IC, int OC) {
    if (!packed_.empty() && packed_[t]) be->MatmulForwardPacked(out, inp, packed_[t], bias, rows, IC, OC, packed_dtype_);
    else if (!half_.empty() && half_[t]) be->MatmulForwardHalf(out, inp, half_[t], bias, rows, IC, OC);
    else be->MatmulForward(out, inp, m.P(t), bias, rows, IC, OC);
  };
  for (int l = 0; l < c.layers; ++l) {
    auto W = [&](int k) { return m.P(m.LayerTensor(l, k)); };
    auto T = [&](int k) { return m.LayerTensor(l, k); };
    be->LayerNormForward(ln_, mean_, rstd_, x_, W(kLn1W), W(kLn1B), n, C);
    linear(qkv_, ln_, T(kQkvW), W(kQkvB), n, C, 3 * C);
    // Every row's K and V go into the cache before any row attends, so rows of one slot see each other.
    for (int b = 0; b < n; ++b) {
      size_t slot = (static_cast<size_t>(slots[b]) * maxT_ + positions[b]) * Cs;
      const float* k = qkv_ + static_cast<size_t>(b) * 3 * Cs + Cs;
      if (half_kv_) {
        be->StoreHalf(reinterpret_cast<uint16_t*>(k_cache_[l]) + slot, k, Cs);
        be->StoreHalf(reinterpret_cast<uint16_t*>(v_cache_[l]) + slot, k + Cs, Cs);
      } else {
        be->Copy(k_cache_[l] + slot, k, Cs);
        be->Copy(v_cache_[l] + slot, k + Cs, Cs);
      }
    }
    // q rows are strided by 3C in qkv_; gather them into tmp_ as the [n, C] query block.
    for (int b = 0; b < n; ++b) be->Copy(tmp_ + static_cast<size_t>(b) * Cs, qkv_ + static_cast<size_t>(b) * 3 * Cs, Cs);
    if (half_kv_)
      be->AttentionDecodeHalfKv(atty_, tmp_, reinterpret_cast<const uint16_t*>(k_cache_[l]),
                                reinterpret_cast<const uint16_t*>(v_cache_[l]), pos_, identity ? nullptr : slots,
                                scratch_, n, maxT_, C, NH);
    else if (identity)
      be->AttentionDecode(atty_, tmp_, k_cache_[l], v_cache_[l], pos_, scratch_, n, maxT_, C, NH);
    else
      be->AttentionDecodeSlots(atty_, tmp_, k_cache_[l], v_cache_[l], pos_, slots, scratch_, n, maxT_, C, NH);
    linear(tmp_, atty_, T(kProjW), W(kProjB), n, C, C);
    be->ResidualForward(x_, x_, tmp_, static_cast<size_t>(n) * C);
    be->LayerNormForward(ln_, mean_, rstd_, x_, W(kLn2W), W(kLn2B), n, C);
    linear(fch_, ln_, T(kFcW), W(kFcB), n, C, 4 * C);
    be->GeluForward(fch_gelu_, fch_, static_cast<size_t>(n) * 4 * C);
    linear(tmp_, fch_gelu_, T(kFcProjW), W(kFcProjB), n, 4 * C, C);
    be->ResidualForward(x_, x_, tmp_, static_cast<size_t>(n) * C);
  }
  host_logits_.resize(static_cast<size_t>(n_logits) * V);
  if (n_logits == 0) return host_logits_;
  // The final LayerNorm and the LM head (the largest matmul) run only on the rows whose logits are wanted.
  bool all_rows = n_logits == n;
  for (int i = 0; i < n_logits && all_rows; ++i) all_rows = logit_rows[i] == i;
  const float* head_in = ln_;
  if (all_rows) {
    const size_t lnf = m.tensors().size() - 2;
    be->LayerNormForward(ln_, mean_, rstd_, x_, m.P(lnf), m.P(lnf + 1), n, C);
  } else {
    for (int i = 0; i < n_logits; ++i)
      be->Copy(tmp_ + static_cast<size_t>(i) * Cs, x_ + static_cast<size_t>(logit_rows[i]) * Cs, Cs);
    const size_t lnf = m.tensors().size() - 2;
    be->LayerNormForward(lnsel_, mean_, rstd_, tmp_, m.P(lnf), m.P(lnf + 1), n_logits, C);
    head_in = lnsel_;
  }
  linear(logits_, head_in, 0, nullptr, n_logits, C, V);
  be->Download(host_logits_.data(), logits_, host_logits_.size());
  return host_logits_;
}

}  // namespace keel
