// packed_matmul_test.cc: the decode layer's product from repacked weights (Backend::MatmulForwardPacked, CPU
// packed_matmul.cc), fp32, f16 and bf16, against a double-precision product (bf16 also bit for bit against its
// scalar definition); its promise that a row's result does not depend on the other rows of the step or on the
// thread count; and a DecodeState built on it, whose batched step must give each sequence exactly the logits it
// gets decoded alone.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_ops.h"
#include "core/hash.h"
#include "formats/half.h"
#include "model/gpt.h"

namespace keel {
namespace {

double RelErr(const std::vector<float>& a, const std::vector<double>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(a[i] - b[i]) / (1.0 + std::fabs(b[i])));
  return worst;
}

constexpr WeightDtype kAllDtypes[] = {WeightDtype::kF32, WeightDtype::kF16, WeightDtype::kBF16};

std::vector<float> Pack(Backend* be, const std::vector<float>& w, int IC, int OC, WeightDtype dtype) {
  std::vector<float> packed(be->PackedMatmulFloats(IC, OC, dtype));
  be->PackMatmulWeight(packed.data(), w.data(), IC, OC, dtype);
  return packed;
}

float Bf16ToFloat(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

float RoundTo(WeightDtype d, float x) {
  if (d == WeightDtype::kF16) return F16ToFloat(FloatToF16(x));
  if (d == WeightDtype::kBF16) return Bf16ToFloat(cpu::FloatToBf16Ftz(x));
  return x;
}

TEST(PackedMatmul, MatchesADoubleReference) {
  auto be = MakeCpuBackend(2);
  if (!be->SupportsOp(Op::kMatmulForwardPacked)) GTEST_SKIP() << "this CPU lacks AVX2/FMA/F16C";
  Rng rng(21);
  // OC around the 16-column panel (a padded last panel), N around the micro-kernels' 6 (AVX2) and 6/12 (AVX-512)
  // rows, IC odd and tiny.
  for (int IC : {1, 29, 200}) {
    for (int OC : {1, 15, 16, 17, 133}) {
      std::vector<float> w(static_cast<size_t>(OC) * IC), bias(OC);
      for (auto& x : w) x = rng.Normal();
      for (auto& x : bias) x = rng.Normal();
      for (WeightDtype dtype : kAllDtypes) {
        std::vector<float> packed = Pack(be.get(), w, IC, OC, dtype);
        std::vector<float> wr(w.size());  // what the packed form holds
        for (size_t i = 0; i < w.size(); ++i) wr[i] = RoundTo(dtype, w[i]);
        for (int N : {1, 2, 5, 6, 7, 11, 12, 13, 16, 25, 64}) {
          std::vector<float> inp(static_cast<size_t>(N) * IC);
          for (auto& x : inp) x = rng.Normal();
          // bf16 rounds the inputs too; f32 and f16 take them as they are.
          auto xr = [&](size_t i) { return dtype == WeightDtype::kBF16 ? RoundTo(dtype, inp[i]) : inp[i]; };
          for (bool with_bias : {true, false}) {
            std::vector<double> ref(static_cast<size_t>(N) * OC);
            for (int n = 0; n < N; ++n)
              for (int o = 0; o < OC; ++o) {
                double s = with_bias ? bias[o] : 0.0;
                for (int i = 0; i < IC; ++i) s += double(xr(size_t(n) * IC + i)) * wr[size_t(o) * IC + i];
                ref[size_t(n) * OC + o] = s;
              }
            // A sentinel after the output: padded panel columns must never be stored.
            std::vector<float> out(ref.size() + 1, 0.0f);
            out.back() = 12345.0f;
            be->MatmulForwardPacked(out.data(), inp.data(), packed.data(), with_bias ? bias.data() : nullptr, N, IC,
                                    OC, dtype);
            EXPECT_EQ(out.back(), 12345.0f) << "wrote past the output, OC=" << OC << " N=" << N;
            out.pop_back();
            EXPECT_LT(RelErr(out, ref), 1e-5 * std::sqrt(double(IC)))
                << WeightDtypeName(dtype) << " IC=" << IC << " OC=" << OC << " N=" << N << " bias=" << with_bias;
          }
        }
      }
    }
  }
}

// The 512-bit kernels (used where the CPU has AVX-512) and the 256-bit ones do the same FMAs per output in the
// same order, so they must agree bit for bit, over every row count of both dispatchers and partial panel groups.
TEST(PackedMatmul, Avx512AndAvx2KernelsGiveTheSameBits) {
  if (!cpu::PackedMatmulIsaSupported(cpu::PackedIsa::kAvx512)) GTEST_SKIP() << "this CPU lacks AVX-512F";
  Rng rng(5);
  for (int IC : {1, 29, 200}) {
    for (int OC : {1, 17, 33, 64, 65, 133}) {
      std::vector<float> w(static_cast<size_t>(OC) * IC), bias(OC);
      for (auto& x : w) x = rng.Normal();
      for (auto& x : bias) x = rng.Normal();
      for (WeightDtype dtype : kAllDtypes) {
        if (!cpu::PackedMatmulIsaSupported(cpu::PackedIsa::kAvx512, dtype)) continue;  // bf16: AVX-512 BF16
        std::vector<float> packed(cpu::PackedMatmulFloats(IC, OC, dtype));
        cpu::PackMatmulWeight(packed.data(), w.data(), IC, OC, dtype);
        for (int N = 1; N <= 26; ++N) {
          std::vector<float> inp(static_cast<size_t>(N) * IC);
          for (auto& x : inp) x = rng.Normal();
          for (const float* b : {static_cast<const float*>(bias.data()), static_cast<const float*>(nullptr)}) {
            std::vector<float> o2(static_cast<size_t>(N) * OC + 1, 7.0f), o5(o2.size(), 7.0f);
            cpu::MatmulForwardPackedWith(cpu::PackedIsa::kAvx2, o2.data(), inp.data(), packed.data(), b, N, IC, OC,
                                         dtype);
            cpu::MatmulForwardPackedWith(cpu::PackedIsa::kAvx512, o5.data(), inp.data(), packed.data(), b, N, IC, OC,
                                         dtype);
            EXPECT_EQ(o5.back(), 7.0f) << "wrote past the output, OC=" << OC << " N=" << N;
            ASSERT_EQ(o2, o5) << WeightDtypeName(dtype) << " IC=" << IC << " OC=" << OC << " N=" << N
                              << " bias=" << (b != nullptr);
          }
        }
      }
    }
  }
}

TEST(PackedMatmul, ARowsResultDoesNotDependOnTheOtherRowsOrThreads) {
  auto be1 = MakeCpuBackend(1), be2 = MakeCpuBackend(2);
  if (!be2->SupportsOp(Op::kMatmulForwardPacked)) GTEST_SKIP() << "this CPU lacks AVX2/FMA/F16C";
  Rng rng(8);
  const int IC = 96, OC = 300, N = 17;
  std::vector<float> w(static_cast<size_t>(OC) * IC), bias(OC), inp(static_cast<size_t>(N) * IC);
  for (auto& x : w) x = rng.Normal();
  for (auto& x : bias) x = rng.Normal();
  for (auto& x : inp) x = rng.Normal();
  for (WeightDtype dtype : kAllDtypes) {
    const char* half = WeightDtypeName(dtype);
    std::vector<float> packed = Pack(be2.get(), w, IC, OC, dtype);
    std::vector<float> all(static_cast<size_t>(N) * OC), all1(all.size());
    // The thread count is OpenMP's per-OS-thread setting (backend.h): set it before each call, and check it.
    be2->SetThreads(2);
    ASSERT_EQ(omp_get_max_threads(), 2);
    be2->MatmulForwardPacked(all.data(), inp.data(), packed.data(), bias.data(), N, IC, OC, dtype);
    be1->SetThreads(1);
    ASSERT_EQ(omp_get_max_threads(), 1);
    be1->MatmulForwardPacked(all1.data(), inp.data(), packed.data(), bias.data(), N, IC, OC, dtype);
    EXPECT_EQ(all, all1) << "1 vs 2 threads, " << half;
    be2->SetThreads(2);
    for (int n = 0; n < N; ++n) {  // row n alone, and as the last of a group of n+1 rows
      std::vector<float> alone(OC), group(static_cast<size_t>(n + 1) * OC);
      be2->MatmulForwardPacked(alone.data(), inp.data() + size_t(n) * IC, packed.data(), bias.data(), 1, IC, OC,
                               dtype);
      be2->MatmulForwardPacked(group.data(), inp.data(), packed.data(), bias.data(), n + 1, IC, OC, dtype);
      for (int o = 0; o < OC; ++o) {
        ASSERT_EQ(alone[o], all[size_t(n) * OC + o]) << "row " << n << " col " << o << " " << half;
        ASSERT_EQ(group[size_t(n) * OC + o], all[size_t(n) * OC + o]) << "row " << n << " col " << o;
      }
    }
  }
}

// bf16 against its definition (backend.h, packed_matmul.cc), bit for bit, on every kernel this CPU has: inputs and
// weights rounded to nearest even with denormals flushed to zero, then per pair of k the odd one's product added
// first, then the even one's, each sum rounded to fp32 (the products are exact). Includes denormal, huge and
// zero inputs, odd IC (a padded pair) and every row count of the dispatchers. The AVX-512 half rests on the
// instruction rounding after each of its two products, as Intel's manual defines it (checked on AMD Zen 5): a CPU
// that fused the two would fail here, on every run.
TEST(PackedMatmul, Bf16MatchesItsScalarDefinitionBitForBit) {
  if (!cpu::PackedMatmulSupported()) GTEST_SKIP() << "this CPU lacks AVX2/FMA/F16C";
  // The rounding itself: nearest even, ties to even, denormals to signed zero, overflow to inf, NaN stays NaN.
  EXPECT_EQ(cpu::FloatToBf16Ftz(1.0f), 0x3f80);
  EXPECT_EQ(cpu::FloatToBf16Ftz(Bf16ToFloat(0x3f80) + std::ldexp(1.0f, -8)), 0x3f80);  // tie: down to even
  EXPECT_EQ(cpu::FloatToBf16Ftz(Bf16ToFloat(0x3f81) + std::ldexp(1.0f, -8)), 0x3f82);  // tie: up to even
  EXPECT_EQ(cpu::FloatToBf16Ftz(Bf16ToFloat(0x3f80) + std::ldexp(1.0f, -9)), 0x3f80);
  EXPECT_EQ(cpu::FloatToBf16Ftz(-std::numeric_limits<float>::denorm_min()), 0x8000);
  EXPECT_EQ(cpu::FloatToBf16Ftz(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(cpu::FloatToBf16Ftz(std::numeric_limits<float>::quiet_NaN()))));
  Rng rng(77);
  for (int IC : {1, 2, 31, 64, 65, 200}) {
    for (int OC : {1, 16, 17, 100}) {
      std::vector<float> w(static_cast<size_t>(OC) * IC), bias(OC);
      for (auto& x : w) x = rng.Normal();
      for (auto& x : bias) x = rng.Normal();
      w[0] = 1e-39f;  // a denormal weight: zero
      std::vector<float> packed(cpu::PackedMatmulFloats(IC, OC, WeightDtype::kBF16));
      cpu::PackMatmulWeight(packed.data(), w.data(), IC, OC, WeightDtype::kBF16);
      for (int N : {1, 3, 6, 7, 12, 13, 16, 25}) {
        std::vector<float> inp(static_cast<size_t>(N) * IC);
        for (auto& x : inp) x = rng.Normal() * 3.0f;
        inp[0] = 2e-39f;    // a denormal input: zero
        inp.back() = 1e30f;  // a huge one: no overflow (weights are ~1)
        std::vector<float> ref(static_cast<size_t>(N) * OC);
        for (int n = 0; n < N; ++n)
          for (int o = 0; o < OC; ++o) {
            float acc = 0.0f;
            for (int k = 0; k < IC; k += 2) {
              auto product = [&](int kk) {
                if (kk >= IC) return 0.0f;
                const size_t i = size_t(n) * IC + size_t(kk), j = size_t(o) * IC + size_t(kk);
                return RoundTo(WeightDtype::kBF16, inp[i]) * RoundTo(WeightDtype::kBF16, w[j]);  // exact
              };
              acc = acc + product(k + 1);
              acc = acc + product(k);
            }
            ref[size_t(n) * OC + o] = acc + bias[o];
          }
        for (cpu::PackedIsa isa : {cpu::PackedIsa::kAvx2, cpu::PackedIsa::kAvx512}) {
          if (!cpu::PackedMatmulIsaSupported(isa, WeightDtype::kBF16)) continue;
          std::vector<float> out(ref.size() + 1, 7.0f);
          cpu::MatmulForwardPackedWith(isa, out.data(), inp.data(), packed.data(), bias.data(), N, IC, OC,
                                       WeightDtype::kBF16);
          EXPECT_EQ(out.back(), 7.0f) << "wrote past the output";
          out.pop_back();
          for (size_t i = 0; i < ref.size(); ++i)
            ASSERT_EQ(out[i], ref[i]) << (isa == cpu::PackedIsa::kAvx2 ? "avx2" : "avx512") << " IC=" << IC
                                      << " OC=" << OC << " N=" << N << " at " << i;
        }
      }
    }
  }
}

// Three sequences advanced together (one step of 3 rows, then a step mixing a 4-row prompt chunk and two decode
// rows; every weight type, with either KV cache type) against each sequence decoded alone in its own state: the
// logits must be equal bit for bit, so a server's answer to one client does not depend on who else is being served.
TEST(PackedMatmul, BatchedDecodeEqualsEachSequenceAlone) {
  GptConfig c{.layers = 2, .heads = 2, .dim = 48, .ctx = 16, .vocab = 53};
  auto be = MakeCpuBackend(2);
  if (!be->SupportsOp(Op::kMatmulForwardPacked)) GTEST_SKIP() << "this CPU lacks AVX2/FMA/F16C";
  auto model = GptModel::Create(c, be.get(), 1, c.ctx);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  (*model)->InitWeights(6);
  for (int variant = 0; variant < 6; ++variant) {  // every weight type, with an fp32 and an f16 KV cache
    const WeightDtype dtype = kAllDtypes[variant / 2];
    const bool half_kv = variant % 2 == 1;
    const std::string half = std::string(WeightDtypeName(dtype)) + (half_kv ? " f16-kv" : "");
    auto batched = DecodeState::Create(model->get(), 3, c.ctx, 8, dtype, true, half_kv);
    ASSERT_TRUE(batched.ok()) << batched.status().ToString();
    std::vector<std::unique_ptr<DecodeState>> alone;
    for (int s = 0; s < 3; ++s) {
      auto a = DecodeState::Create(model->get(), 1, c.ctx, 8, dtype, true, half_kv);
      ASSERT_TRUE(a.ok());
      alone.push_back(std::move(*a));
    }
    const int V = c.vocab;
    // Step 1: one row per sequence at position 0.
    int32_t tok[3] = {5, 17, 40}, pos[3] = {0, 0, 0}, slots[3] = {0, 1, 2}, rows[3] = {0, 1, 2};
    std::vector<float> b = (*batched)->StepRows(tok, pos, slots, 3, rows, 3);
    for (int s = 0; s < 3; ++s) {
      int32_t zero = 0;
      std::vector<float> a = alone[s]->StepRows(&tok[s], &pos[s], &zero, 1, &zero, 1);
      for (int v = 0; v < V; ++v) ASSERT_EQ(a[v], b[size_t(s) * V + v]) << "step 1 seq " << s << " " << half;
    }
    // Step 2: sequence 0 feeds a 4-token chunk (positions 1-4), sequences 1 and 2 one token each.
    int32_t tok2[6] = {1, 2, 3, 4, 9, 33}, pos2[6] = {1, 2, 3, 4, 1, 1}, slots2[6] = {0, 0, 0, 0, 1, 2};
    int32_t lrows[3] = {3, 4, 5};
    b = (*batched)->StepRows(tok2, pos2, slots2, 6, lrows, 3);
    int32_t zeros[4] = {0, 0, 0, 0}, last = 3, first = 0;
    std::vector<float> a0 = alone[0]->StepRows(tok2, pos2, zeros, 4, &last, 1);
    for (int v = 0; v < V; ++v) ASSERT_EQ(a0[v], b[v]) << "step 2 seq 0 half=" << half;
    for (int s = 1; s < 3; ++s) {
      std::vector<float> a = alone[s]->StepRows(&tok2[3 + s], &pos2[3 + s], zeros, 1, &first, 1);
      for (int v = 0; v < V; ++v) ASSERT_EQ(a[v], b[size_t(s) * V + v]) << "step 2 seq " << s << " " << half;
    }
  }
}

}  // namespace
}  // namespace keel
