// gpt_reference_test.cc: keel's GPT-2 forward and backward (CPU backend) against an independent PyTorch
// reference, tests/fixtures/gpt2_reference.safetensors, written by tests/fixtures/gen_gpt2_reference.py from
// bench/torch_gpt.py (regenerate with `/usr/bin/python3 tests/fixtures/gen_gpt2_reference.py`). The reference is
// computed in float64 from the float32 weights stored in the fixture, so the differences measured here are keel's
// float32 arithmetic (and any bug).
//
// Error measure, per tensor: rel = max_i |keel_i - ref_i| / max(max_i |ref_i|, 1e-30), i.e. the worst absolute
// error scaled by the tensor's largest reference magnitude (robust to entries that are near zero). Each tensor
// must have rel < 1e-4.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <omp.h>

#include "backend/backend.h"
#include "formats/safetensors.h"
#include "model/gpt.h"
#include "model/gpt_config.h"

namespace keel {
namespace {

constexpr double kTolerance = 1e-4;
const char* const kFixture = KEEL_SOURCE_DIR "/tests/fixtures/gpt2_reference.safetensors";

double RelError(const std::vector<float>& got, const std::vector<float>& ref) {
  double max_err = 0.0, max_ref = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    max_err = std::max(max_err, std::fabs(static_cast<double>(got[i]) - static_cast<double>(ref[i])));
    max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref[i])));
  }
  if (std::isnan(max_err) || std::any_of(got.begin(), got.end(), [](float v) { return !std::isfinite(v); }))
    return INFINITY;
  return max_err / std::max(max_ref, 1e-30);
}

class GptReferenceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto f = SafetensorsFile::Open(kFixture);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    file_ = std::make_unique<SafetensorsFile>(std::move(f).value());
    auto meta = file_->metadata();
    ASSERT_TRUE(meta.count("config")) << "fixture metadata has no 'config'";
    auto cfg = GptConfig::FromJson(nlohmann::json::parse(meta["config"]));
    ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
    config_ = cfg.value();

    const TensorView* tok = file_->Find("tokens");
    const TensorView* tgt = file_->Find("targets");
    ASSERT_NE(tok, nullptr);
    ASSERT_NE(tgt, nullptr);
    ASSERT_EQ(tok->dtype, "I32");
    ASSERT_EQ(tok->shape.size(), 2u);
    ASSERT_EQ(tgt->shape, tok->shape);
    B_ = static_cast<int>(tok->shape[0]);
    T_ = static_cast<int>(tok->shape[1]);
    tokens_.resize(static_cast<size_t>(B_) * T_);
    targets_.resize(tokens_.size());
    ASSERT_EQ(tok->nbytes, tokens_.size() * sizeof(int32_t));
    ASSERT_EQ(tgt->nbytes, targets_.size() * sizeof(int32_t));
    std::memcpy(tokens_.data(), tok->data, tok->nbytes);  // views may be unaligned
    std::memcpy(targets_.data(), tgt->data, tgt->nbytes);

    // Weights, assembled by keel name in ParamLayout order.
    params_.assign(NumParams(config_), 0.0f);
    for (const ParamTensor& t : ParamLayout(config_)) {
      const TensorView* v = file_->Find(t.name);
      ASSERT_NE(v, nullptr) << "fixture lacks parameter " << t.name;
      ASSERT_EQ(v->shape, t.shape) << t.name;
      auto w = file_->ReadF32(t.name);
      ASSERT_TRUE(w.ok()) << w.status().ToString();
      ASSERT_EQ(w.value().size(), t.size) << t.name;
      std::copy(w.value().begin(), w.value().end(), params_.begin() + static_cast<ptrdiff_t>(t.offset));
    }
  }

  std::vector<float> Ref(const std::string& name, size_t expect_size) {
    auto r = file_->ReadF32(name);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    if (!r.ok()) return std::vector<float>(expect_size, NAN);
    EXPECT_EQ(r.value().size(), expect_size) << name;
    r.value().resize(expect_size, NAN);
    return r.value();
  }

  std::unique_ptr<GptModel> MakeModel(Backend* backend, int B = 0, int T = 0) {
    auto m = GptModel::Create(config_, backend, B > 0 ? B : B_, T > 0 ? T : T_);
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    if (!m.ok()) return nullptr;
    m.value()->SetParamsFromHost(params_);
    return std::move(m).value();
  }

  std::unique_ptr<SafetensorsFile> file_;
  GptConfig config_;
  int B_ = 0, T_ = 0;
  std::vector<int32_t> tokens_, targets_;
  std::vector<float> params_;
};

TEST_F(GptReferenceTest, ForwardAndBackwardMatchPyTorch) {
  auto backend = MakeCpuBackend(1);
  auto model = MakeModel(backend.get());
  ASSERT_NE(model, nullptr);
  const size_t BT = static_cast<size_t>(B_) * T_;

  // Logits (forward without targets).
  model->Forward(tokens_.data(), nullptr, B_, T_);
  double logits_rel = RelError(model->LastLogits(), Ref("logits", BT * config_.vocab));
  EXPECT_LT(logits_rel, kTolerance) << "logits";

  // Loss.
  float loss = model->Forward(tokens_.data(), targets_.data(), B_, T_);
  std::vector<float> ref_loss = Ref("loss", 1);
  double loss_rel = RelError({loss}, ref_loss);
  EXPECT_LT(loss_rel, kTolerance) << "loss " << loss << " vs reference " << ref_loss[0];

  // Every parameter gradient.
  model->ZeroGrads();
  model->Backward();
  std::vector<float> grads = model->GradsToHost();
  double worst_grad = 0.0;
  std::string worst_name;
  for (const ParamTensor& t : model->tensors()) {
    std::vector<float> got(grads.begin() + static_cast<ptrdiff_t>(t.offset),
                           grads.begin() + static_cast<ptrdiff_t>(t.offset + t.size));
    double rel = RelError(got, Ref("grad." + t.name, t.size));
    EXPECT_LT(rel, kTolerance) << "grad." << t.name;
    if (rel >= worst_grad) worst_grad = rel, worst_name = t.name;
    std::printf("  grad.%-22s rel %.3g\n", t.name.c_str(), rel);
  }
  std::printf("worst relative errors: logits %.3g, loss %.3g, grads %.3g (grad.%s)\n", logits_rel, loss_rel,
              worst_grad, worst_name.c_str());
}

// The backend promises results independent of the thread count; the same pass on 2 threads must be bitwise
// identical to 1 thread. The count is OpenMP's per-OS-thread setting (backend.h), so it is set again before each
// pass and checked (it used to be set only when the backends were made, so both passes ran on 2 threads). The
// fixture's 16 rows take the skinny path; a second batch of 8 x 40 rows takes the tiled sgemm paths.
TEST_F(GptReferenceTest, ThreadCountDoesNotChangeResults) {
  // The fixture's batch, then 8 rows of 40 (or the context) from the same tokens.
  const int B2 = 8, T2 = std::min(40, config_.ctx);
  std::vector<int32_t> tok2(static_cast<size_t>(B2) * T2), tgt2(tok2.size());
  for (size_t i = 0; i < tok2.size(); ++i) {
    tok2[i] = tokens_[i % tokens_.size()];
    tgt2[i] = targets_[(i * 7 + 3) % targets_.size()];
  }
  struct Batch {
    const int32_t *tok, *tgt;
    int B, T;
  };
  for (const Batch& b : {Batch{tokens_.data(), targets_.data(), B_, T_}, Batch{tok2.data(), tgt2.data(), B2, T2}}) {
    auto be1 = MakeCpuBackend(1);
    auto be2 = MakeCpuBackend(2);
    auto m1 = MakeModel(be1.get(), b.B, b.T);
    auto m2 = MakeModel(be2.get(), b.B, b.T);
    ASSERT_NE(m1, nullptr);
    ASSERT_NE(m2, nullptr);
    float loss[2] = {0, 0};
    for (int k : {1, 2}) {
      (k == 1 ? be1 : be2)->SetThreads(k);
      ASSERT_EQ(omp_get_max_threads(), k);
      GptModel* m = (k == 1 ? m1 : m2).get();
      loss[k - 1] = m->Forward(b.tok, b.tgt, b.B, b.T);
      m->ZeroGrads();
      m->Backward();
    }
    EXPECT_EQ(loss[0], loss[1]) << b.B << "x" << b.T;
    std::vector<float> g1 = m1->GradsToHost(), g2 = m2->GradsToHost();
    ASSERT_EQ(g1.size(), g2.size());
    EXPECT_EQ(std::memcmp(g1.data(), g2.data(), g1.size() * sizeof(float)), 0) << b.B << "x" << b.T;
  }
}

}  // namespace
}  // namespace keel
