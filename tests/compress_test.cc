// compress_test.cc: the exchange codecs (dist/compress.h) — bf16 and int8 round-trip error bounds, error
// feedback tracking the sum of its inputs within one quantum over many rounds, the compressed sum over a real
// Gloo group (rank-order decode, token weights) — and the byte meter and link emulation
// (dist/link_emulation.h): per-algorithm byte counts, and a limited link slowing a collective by about the
// computed delay. Also the diloco outer step (train/diloco.h) on its own.
#include <gtest/gtest.h>

#include <chrono>
#include <ctime>
#include <cmath>
#include <functional>
#include <random>
#include <thread>

#include "dist/compress.h"
#include "dist/gloo_communicator.h"
#include "dist/link_emulation.h"
#include "dist/store.h"
#include "elastic/fault_inject.h"
#include "dist_test_util.h"
#include "train/diloco.h"

namespace keel::testing {
namespace {

std::vector<float> RandomValues(size_t n, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> x(n);
  for (auto& v : x) v = d(rng);
  return x;
}

std::vector<float> RoundTrip(Codec c, const std::vector<float>& x) {
  std::vector<uint8_t> enc(EncodedBytes(c, x.size()));
  Encode(c, x.data(), x.size(), enc.data());
  std::vector<float> y(x.size());
  Decode(c, enc.data(), x.size(), y.data());
  return y;
}

TEST(Codec, SizesAndNames) {
  EXPECT_EQ(EncodedBytes(Codec::kNone, 1000), 4000u);
  EXPECT_EQ(EncodedBytes(Codec::kBf16, 1000), 2000u);
  EXPECT_EQ(EncodedBytes(Codec::kInt8, 1000), 1000u + 4 * 4);  // 4 chunks of <= 256
  EXPECT_EQ(EncodedBytes(Codec::kInt8, 256), 256u + 4);
  EXPECT_TRUE(ParseCodec("int8").ok());
  auto bad = ParseCodec("fp4");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("--compress"), std::string::npos);
}

TEST(Codec, Bf16RelativeErrorIsAtMostHalfAnUlp) {
  const auto x = RandomValues(10007, 1, 3.0f);
  const auto y = RoundTrip(Codec::kBf16, x);
  for (size_t i = 0; i < x.size(); ++i) ASSERT_LE(std::fabs(y[i] - x[i]), std::ldexp(std::fabs(x[i]), -8)) << i;
  EXPECT_EQ(RoundTrip(Codec::kNone, x), x);
}

TEST(Codec, Int8ErrorIsAtMostHalfAStepOfItsChunk) {
  auto x = RandomValues(1000, 2, 1.0f);
  for (size_t i = 512; i < 768; ++i) x[i] *= 1000;  // a chunk with a much larger scale must not hurt the others
  for (size_t i = 768; i < 1000; ++i) x[i] = 0;     // an all-zero chunk decodes to zeros
  const auto y = RoundTrip(Codec::kInt8, x);
  for (size_t c0 = 0; c0 < x.size(); c0 += kInt8Chunk) {
    float amax = 0;
    for (size_t i = c0; i < std::min(x.size(), c0 + kInt8Chunk); ++i) amax = std::max(amax, std::fabs(x[i]));
    const float step = amax / 127;
    for (size_t i = c0; i < std::min(x.size(), c0 + kInt8Chunk); ++i)
      ASSERT_LE(std::fabs(y[i] - x[i]), 0.5f * step * 1.0001f + 1e-30f) << i;
  }
  for (size_t i = 768; i < 1000; ++i) EXPECT_EQ(y[i], 0.0f);
  {  // A chunk of tiny values (a subnormal scale, 1/scale = inf): zeros stay zeros, nothing exceeds the chunk's max.
    std::vector<float> tiny(kInt8Chunk, 0.0f);
    tiny[1] = 1e-38f;
    tiny[2] = -5e-39f;
    const auto t = RoundTrip(Codec::kInt8, tiny);
    for (size_t i = 0; i < tiny.size(); ++i) {
      ASSERT_TRUE(std::isfinite(t[i])) << i;
      ASSERT_LE(std::fabs(t[i]), 1e-38f) << i;
      if (tiny[i] == 0.0f) {
        ASSERT_EQ(t[i], 0.0f) << i;
      }
    }
  }
  // A non-finite value shows up after decoding (the receiver must not see a finite lie).
  x[3] = NAN;
  EXPECT_TRUE(std::isnan(RoundTrip(Codec::kInt8, x)[5]));
}

// Error feedback: after R rounds, sum(decoded) = sum(inputs) - residual, so the running sums differ by at most
// one quantisation error of the last round (not R of them); without feedback the errors add up.
TEST(Codec, ErrorFeedbackTracksTheSumOfInputsWithinOneQuantum) {
  for (Codec c : {Codec::kInt8, Codec::kBf16}) {
    const size_t n = 512;
    ErrorFeedback ef;
    ef.Resize(n);
    std::vector<double> in_sum(n, 0), out_sum(n, 0), plain_sum(n, 0);
    std::vector<uint8_t> enc(EncodedBytes(c, n));
    std::vector<float> dec(n);
    double max_quantum = 0;
    // A small constant bias per element (as a gradient often has) plus noise: without feedback, rounding the
    // bias the same way every round accumulates.
    for (int round = 0; round < 400; ++round) {
      auto x = RandomValues(n, 100 + round, 0.01f);
      for (size_t i = 0; i < n; ++i) x[i] += 0.3f + 0.001f * static_cast<float>(i % 7);
      float amax = 0;
      for (float v : x) amax = std::max(amax, std::fabs(v));
      max_quantum = std::max(max_quantum, c == Codec::kInt8 ? amax / 127.0 : amax / 128.0);
      ef.Encode(c, x.data(), 0, n, enc.data());
      ef.Commit();
      Decode(c, enc.data(), n, dec.data());
      const auto plain = RoundTrip(c, x);
      for (size_t i = 0; i < n; ++i) {
        in_sum[i] += x[i];
        out_sum[i] += dec[i];
        plain_sum[i] += plain[i];
      }
    }
    double worst_ef = 0, worst_plain = 0;
    for (size_t i = 0; i < n; ++i) {
      worst_ef = std::max(worst_ef, std::fabs(out_sum[i] - in_sum[i]));
      worst_plain = std::max(worst_plain, std::fabs(plain_sum[i] - in_sum[i]));
    }
    EXPECT_LE(worst_ef, max_quantum) << CodecName(c);
    EXPECT_GT(worst_plain, 5 * worst_ef) << CodecName(c) << ": without feedback the error should accumulate";
  }
}

TEST(Codec, AnUncommittedEncodeLeavesTheResidualAlone) {
  ErrorFeedback ef;
  ef.Resize(4);
  const float x[4] = {0.3f, -0.7f, 1.1f, 0.001f};
  std::vector<uint8_t> a(EncodedBytes(Codec::kInt8, 4)), b(a.size());
  ef.Encode(Codec::kInt8, x, 0, 4, a.data());  // an attempt that is then aborted
  ef.Encode(Codec::kInt8, x, 0, 4, b.data());  // the redo encodes the same
  EXPECT_EQ(a, b);
  ef.Commit();
  ef.Encode(Codec::kInt8, x, 0, 4, b.data());
  EXPECT_NE(a, b);  // now the residual is carried
}

TEST(LinkEmulation, ByteModels) {
  EXPECT_EQ(AllreduceSentBytes(1, 1000), 0u);
  EXPECT_EQ(AllreduceSentBytes(2, 1000), 1000u);
  EXPECT_EQ(AllreduceSentBytes(4, 1000), 1500u);
  EXPECT_EQ(AllgatherSentBytes(4, 100), 300u);
  // Binomial tree over 4 from root 0: 0 -> 1, 2; 1 -> 3; 2, 3 -> none.
  EXPECT_EQ(BroadcastSentBytes(4, 0, 0, 10), 20u);
  EXPECT_EQ(BroadcastSentBytes(4, 1, 0, 10), 10u);
  EXPECT_EQ(BroadcastSentBytes(4, 3, 0, 10), 0u);
  EXPECT_EQ(BroadcastSentBytes(4, 2, 2, 10), 20u);  // the root, relative ranks
  LinkLimit l{100, 20};
  EXPECT_NEAR(LinkDelaySeconds(l, 12'500'000, 3), 1.0 + 0.06, 1e-9);  // 100 Mbit = 12.5 MB/s
}

TEST(LinkEmulation, InjectionSpec) {
  auto f = ParseFaultSpec("link:rank=3,mbit=100,latency_ms=20");
  ASSERT_TRUE(f.ok()) << f.status().message();
  ASSERT_EQ(f->size(), 1u);
  EXPECT_EQ((*f)[0].kind, FaultSpec::kLink);
  EXPECT_EQ((*f)[0].rank, 3);
  EXPECT_EQ((*f)[0].mbit, 100);
  EXPECT_EQ((*f)[0].latency_ms, 20);
  EXPECT_FALSE(ParseFaultSpec("link:rank=3").ok());          // neither a bandwidth nor a latency
  EXPECT_FALSE(ParseFaultSpec("link:mbit=10").ok());         // no rank
  EXPECT_FALSE(ParseFaultSpec("crash:rank=1,step=2,mbit=5").ok());  // link keys only for link
  // Values beyond what the casts to integers hold are refused, not undefined behaviour.
  EXPECT_FALSE(ParseFaultSpec("crash:rank=1,step=1e19").ok());
  EXPECT_FALSE(ParseFaultSpec("slow:rank=0,step=0,steps=1e300").ok());
  EXPECT_FALSE(ParseFaultSpec("crash:rank=1e12,step=1").ok());
  EXPECT_TRUE(ParseFaultSpec("slow:rank=0,step=1e15,steps=1e15").ok());
}

// slow:...,busy=1 spins for the extra time (a busy host), plain slow sleeps: the CPU time spent tells them apart.
TEST(SlowFault, BusySpinsAndPlainSleeps) {
  auto f = ParseFaultSpec("slow:rank=0,step=0,factor=3,busy=1");
  ASSERT_TRUE(f.ok()) << f.status().message();
  EXPECT_TRUE((*f)[0].busy);
  EXPECT_FALSE(ParseFaultSpec("slow:rank=0,step=0,busy=2").ok());
  EXPECT_FALSE(ParseFaultSpec("crash:rank=0,step=0,busy=1").ok());  // busy only for slow
  setenv("KEEL_ALLOW_FAULT_INJECTION", "1", 1);
  auto cpu_and_wall = [](const std::string& spec) {
    auto inj = FaultInjector::Create(spec, 0, 1);
    EXPECT_TRUE(inj.ok());
    const std::clock_t c0 = std::clock();
    const auto t0 = std::chrono::steady_clock::now();
    (*inj)->SlowDown(0, 0.1);  // factor 3: 0.2 s more
    return std::make_pair(double(std::clock() - c0) / CLOCKS_PER_SEC,
                          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  };
  const auto [busy_cpu, busy_wall] = cpu_and_wall("slow:rank=0,step=0,factor=3,busy=1");
  const auto [sleep_cpu, sleep_wall] = cpu_and_wall("slow:rank=0,step=0,factor=3");
  EXPECT_GE(busy_wall, 0.2);
  EXPECT_GE(sleep_wall, 0.2);
  // Spinning burns CPU for the 0.2 s, sleeping does not. On a loaded machine the spinner gets only its share of
  // the cores (0.086 s seen with an ASan build and ctest -j2 on 2 cores), so the line between is 0.05 s.
  EXPECT_GT(busy_cpu, 0.05);
  EXPECT_LT(sleep_cpu, 0.05);
  const auto [other_cpu, other_wall] = cpu_and_wall("slow:rank=1,step=0,factor=3,busy=1");  // another rank's
  EXPECT_LT(other_wall, 0.05);
  (void)other_cpu;
}

GlooOptions Loopback() {
  GlooOptions g;
  g.hostname = "127.0.0.1";
  g.timeout_s = 30;
  return g;
}

void RunGroup(int size, const std::function<void(int, std::shared_ptr<Communicator>)>& body) {
  TempDir t;
  auto store = Must(OpenFileStore(t / "job"));
  std::vector<std::thread> th;
  for (int r = 0; r < size; ++r)
    th.emplace_back([&, r] {
      auto c = ConnectGlooCommunicator(MakePrefixStore(store, "gen/0"), r, size, Loopback());
      ASSERT_TRUE(c.ok()) << c.status().message();
      body(r, std::shared_ptr<Communicator>(std::move(*c)));
    });
  for (auto& x : th) x.join();
}

TEST(CompressedSum, EveryMemberGetsTheSameWeightedSum) {
  const size_t n = 1000;
  std::vector<std::vector<float>> results(3);
  std::vector<double> weights(3);
  RunGroup(3, [&](int r, std::shared_ptr<Communicator> c) {
    auto stats = std::make_shared<WireStats>();
    auto m = MakeMeteredCommunicator(c, stats);
    const auto x = RandomValues(n, 7 + r, 1.0f);
    std::vector<float> sum(n);
    double wsum = 0;
    ASSERT_TRUE(CompressedSum(m.get(), Codec::kInt8, x.data(), 0, n, nullptr, sum.data(), r + 1.0, &wsum, true).ok());
    results[static_cast<size_t>(r)] = sum;
    weights[static_cast<size_t>(r)] = wsum;
    EXPECT_EQ(stats->bytes_sent.load(), 2 * (8 + EncodedBytes(Codec::kInt8, n)));  // ring allgather, N = 3
  });
  EXPECT_EQ(results[0], results[1]);
  EXPECT_EQ(results[0], results[2]);
  EXPECT_EQ(weights[0], 6.0);
  // Against the exact weighted sum: within the weighted int8 errors.
  for (size_t i = 0; i < n; ++i) {
    double exact = 0;
    for (int r = 0; r < 3; ++r) exact += (r + 1.0) * RandomValues(n, 7 + r, 1.0f)[i];
    ASSERT_NEAR(results[0][i], exact, 6 * 4.5 / 127) << i;
    if (i > 20) break;  // (RandomValues regenerates the whole vector: keep it short)
  }
}

// A member behind a 100 Mbit/s, 20 ms link: a ring allreduce of 2 MiB between 2 members sends 2 MiB from each
// (reduce-scatter + allgather), so it takes 16.8 Mbit / 100 Mbit/s + 2 rounds x 20 ms = 0.21 s longer.
TEST(LinkEmulation, ALimitedLinkSlowsACollectiveByTheComputedDelay) {
  const size_t n = 512 * 1024;  // floats: 2 MiB
  double plain_s = 0, slow_s = 0;
  const double expect = LinkDelaySeconds(LinkLimit{100, 20}, AllreduceSentBytes(2, n * 4), 2);
  RunGroup(2, [&](int r, std::shared_ptr<Communicator> c) {
    auto stats = std::make_shared<WireStats>();
    auto plain = MakeMeteredCommunicator(c, stats);
    auto slow = MakeMeteredCommunicator(c, stats, r == 1 ? LinkLimit{100, 20} : LinkLimit{});
    std::vector<float> x(n, 1.0f);
    ASSERT_TRUE(plain->AllreduceSum(x.data(), n).ok());  // warm-up
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(plain->AllreduceSum(x.data(), n).ok());
    ASSERT_TRUE(plain->Barrier().ok());
    if (r == 0) plain_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 3;
    t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(slow->AllreduceSum(x.data(), n).ok());
    ASSERT_TRUE(plain->Barrier().ok());  // member 0 waits for the slow one
    if (r == 0) slow_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 3;
    if (r == 1) {
      EXPECT_GE(stats->emulated_us.load(), static_cast<uint64_t>(3 * expect * 1e6 * 0.99));
    }
  });
  std::printf("allreduce of 2 MiB: %.3f s plain, %.3f s behind the emulated link (expected +%.3f s)\n", plain_s,
              slow_s, expect);
  EXPECT_NEAR(slow_s - plain_s, expect, 0.5 * expect + 0.03);
}

// The outer step alone: Nesterov momentum over a known pseudo-gradient; with lr 1 and no momentum one member's
// outer step lands exactly on its local parameters.
TEST(DilocoOuter, OneMemberWithLrOneAndNoMomentumLandsOnTheLocalParameters) {
  const size_t P = 1000;
  DilocoConfig c;
  c.inner_steps = 3;
  c.outer_lr = 1.0;
  c.outer_momentum = 0.0;
  Diloco d(c, P);
  auto p = RandomValues(P, 3, 1.0f);
  const auto outer = p;
  std::vector<float> grads(P), local;
  Diloco::InnerFns f;
  f.micro_batch = [&](int64_t s, int) {
    for (size_t i = 0; i < P; ++i) grads[i] = std::sin(static_cast<float>(i + s)) * 1e-3f;
    return 1.0f;
  };
  f.update = [&](int64_t) {
    for (size_t i = 0; i < P; ++i) p[i] -= 0.1f * grads[i];
  };
  auto r = d.RunInner(p.data(), grads.data(), true, 0, 3, {0, 1}, f);
  EXPECT_EQ(r.micro_batches, 6);
  EXPECT_EQ(p, outer);  // restored
  // What the local parameters were: the same updates on a copy (the fixed-point mean of two equal
  // micro-batch gradients rounds to within 1e-12 of the gradient).
  local = outer;
  for (int s = 0; s < 3; ++s)
    for (size_t i = 0; i < P; ++i) local[i] -= 0.1f * (std::sin(static_cast<float>(i + s)) * 1e-3f);
  d.ApplyOuter(p.data(), false);
  double worst = 0;
  for (size_t i = 0; i < P; ++i) worst = std::max(worst, std::fabs(static_cast<double>(p[i]) - local[i]));
  EXPECT_LT(worst, 1e-6);
  EXPECT_EQ(d.RoundSteps(0, 100), 3);
  EXPECT_EQ(d.RoundSteps(98, 100), 2);
}

// Nesterov: with a constant pseudo-gradient g per round, momentum m1 = g, m2 = (1 + mu) g and the updates are
// lr (g + mu m).
TEST(DilocoOuter, NesterovMomentum) {
  const size_t P = 8;
  DilocoConfig c;
  c.inner_steps = 1;
  c.outer_lr = 0.5;
  c.outer_momentum = 0.5;
  Diloco d(c, P);
  std::vector<float> p(P, 1.0f), grads(P);
  Diloco::InnerFns f;
  f.micro_batch = [&](int64_t, int) {
    std::fill(grads.begin(), grads.end(), 0.0f);
    return 1.0f;
  };
  f.update = [&](int64_t) {
    for (auto& x : p) x -= 0.25f;  // Δ = 0.25
  };
  d.RunInner(p.data(), grads.data(), false, 0, 1, {0}, f);
  d.ApplyOuter(p.data(), false);
  EXPECT_FLOAT_EQ(p[0], 1.0f - 0.5f * (0.25f + 0.5f * 0.25f));
  EXPECT_FLOAT_EQ(d.momentum()[0], 0.25f);
  const float p1 = p[0];
  d.RunInner(p.data(), grads.data(), false, 1, 1, {0}, f);
  d.ApplyOuter(p.data(), false);
  EXPECT_FLOAT_EQ(d.momentum()[0], 0.25f * 1.5f);
  EXPECT_FLOAT_EQ(p[0], p1 - 0.5f * (0.25f + 0.5f * 0.375f));
}

// An outer update that would overflow float is not applied: parameters and momentum stay as they were, and NaN
// is returned (the trainer then skips the round, on every member alike).
TEST(DilocoOuter, AnOverflowingUpdateIsNotApplied) {
  const size_t P = 4;
  DilocoConfig c;
  c.inner_steps = 1;
  c.outer_lr = 0.7;
  c.outer_momentum = 0.9;
  Diloco d(c, P);
  std::vector<float> p(P, 1.0f), grads(P);
  Diloco::InnerFns f;
  f.micro_batch = [&](int64_t, int) { return 1.0f; };
  f.update = [&](int64_t) { p[2] = -3e38f; };  // Δ = 1 + 3e38; lr (Δ + μ m) overflows float
  d.RunInner(p.data(), grads.data(), false, 0, 1, {0}, f);
  ASSERT_EQ(p, std::vector<float>(P, 1.0f));
  EXPECT_TRUE(std::isnan(d.ApplyOuter(p.data(), false)));
  EXPECT_EQ(p, std::vector<float>(P, 1.0f));
  for (size_t i = 0; i < P; ++i) EXPECT_EQ(d.momentum()[i], 0.0f);
}

}  // namespace
}  // namespace keel::testing
