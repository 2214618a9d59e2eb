// ops_gradcheck_test.cc: every backend op against plain double-precision references (tests/ops_reference.h):
//  - forward outputs against the reference evaluated on the same (float) inputs;
//  - backward ops against central finite differences of the double reference (h = 1e-5) of the scalar
//    L = sum(out * R) for a fixed random R (the mean/weighted loss for softmax cross-entropy), with dout = R;
//  - the accumulate contract (backward twice = twice the gradient), KV-cached decode against full attention,
//    AdamW and SumSquares against double arithmetic;
//  - the whole GPT model: Forward's loss against the double reference model, Backward's gradient against finite
//    differences (of the double reference for every parameter, and of Forward itself for a sample), the
//    on_group_ready order. (Bit-identical results for 1 and 2 threads: thread_invariance_test.cc.)
//
// Error measure (ops_test_util.h): rel = max_i |got_i - want_i| / max(max_i |want_i|, floor), the worst absolute
// error scaled by the tensor's largest reference magnitude (robust to entries near zero). Every check prints its
// rel so the margins are visible in the test log.
#include <gtest/gtest.h>

#include "formats/half.h"
#include "ops_test_util.h"

namespace keel::optest {
namespace {


// ---------------------------------------------------------------------------------------------------------
// Encoder

TEST_F(OpsTest, Encoder) {
  const int B = 2, T = 5, C = 8, V = 11, maxT = 6, N = B * T;
  auto tokens = RandInt(rng_, N, V);
  tokens[3] = tokens[0];
  tokens[7] = tokens[0];  // a repeated token: the scatter-add must sum its rows
  std::vector<int32_t> positions(N);
  for (int n = 0; n < N; ++n) positions[n] = (3 * n + 1) % maxT;
  auto wte = RandN(rng_, V * C), wpe = RandN(rng_, maxT * C), R = RandN(rng_, N * C);
  DevInt dtok(be(), tokens), dpos(be(), positions);
  Dev dwte(be(), wte), dwpe(be(), wpe), dout(be(), R), out(be(), N * C);

  Vec want(N * C);
  out.Fill(kNaN);
  be()->EncoderForward(out, dtok, nullptr, dwte, dwpe, B, T, C);
  ref::Encoder(want.data(), tokens.data(), nullptr, ToDouble(wte).data(), ToDouble(wpe).data(), B, T, C);
  CheckClose("encoder forward", out.Host(), want, kFwdTol, 1.0);
  out.Fill(kNaN);
  be()->EncoderForward(out, dtok, dpos, dwte, dwpe, B, T, C);
  ref::Encoder(want.data(), tokens.data(), positions.data(), ToDouble(wte).data(), ToDouble(wpe).data(), B, T, C);
  CheckClose("encoder forward (explicit positions)", out.Host(), want, kFwdTol, 1.0);

  auto L = [&](const Vec& te, const Vec& pe) {
    Vec o(N * C);
    ref::Encoder(o.data(), tokens.data(), nullptr, te.data(), pe.data(), B, T, C);
    return Dot(o, R);
  };
  const Vec fd_wte = NumGrad(ToDouble(wte), [&](const Vec& x) { return L(x, ToDouble(wpe)); });
  const Vec fd_wpe = NumGrad(ToDouble(wpe), [&](const Vec& x) { return L(ToDouble(wte), x); });
  Dev gwte(be(), V * C), gwpe(be(), maxT * C);
  be()->EncoderBackward(gwte, gwpe, dout, dtok, B, T, C);
  const auto once_te = gwte.Host(), once_pe = gwpe.Host();
  CheckClose("encoder dwte", once_te, fd_wte, kGradTol, kGradFloor);
  CheckClose("encoder dwpe", once_pe, fd_wpe, kGradTol, kGradFloor);
  be()->EncoderBackward(gwte, gwpe, dout, dtok, B, T, C);
  CheckAccumulated("encoder dwte", once_te, gwte.Host());
  CheckAccumulated("encoder dwpe", once_pe, gwpe.Host());
}

// ---------------------------------------------------------------------------------------------------------
// LayerNorm

TEST_F(OpsTest, LayerNorm) {
  // The last case has variance ~1e-4, where eps = 1e-5 changes rstd by ~5%: a wrong eps shows.
  for (auto [N, C, xscale] : {std::tuple{10, 8, 2.0f}, {3, 7, 2.0f}, {4, 33, 2.0f}, {5, 8, 0.01f}}) {
    SCOPED_TRACE("N=" + std::to_string(N) + " C=" + std::to_string(C));
    std::printf(" LayerNorm N=%d C=%d x-scale %g\n", N, C, xscale);
    auto x = RandN(rng_, N * C, xscale, 0.35f * xscale), w = RandN(rng_, C, 0.3f, 1.0f), b = RandN(rng_, C, 0.3f),
         R = RandN(rng_, N * C);
    Dev dx(be(), x), dw_(be(), w), db_(be(), b), dout(be(), R), out(be(), N * C), mean(be(), N), rstd(be(), N);
    out.Fill(kNaN);
    mean.Fill(kNaN);
    rstd.Fill(kNaN);
    be()->LayerNormForward(out, mean, rstd, dx, dw_, db_, N, C);
    Vec want(N * C), want_mean(N), want_rstd(N);
    ref::LayerNorm(want.data(), want_mean.data(), want_rstd.data(), ToDouble(x).data(), ToDouble(w).data(),
                   ToDouble(b).data(), N, C);
    CheckClose("layernorm forward", out.Host(), want, kFwdTol, 1.0);
    CheckClose("layernorm mean", mean.Host(), want_mean, kFwdTol, 1.0);
    CheckClose("layernorm rstd", rstd.Host(), want_rstd, kFwdTol, 1.0);

    auto L = [&](const Vec& xx, const Vec& ww, const Vec& bb) {
      Vec o(N * C);
      ref::LayerNorm(o.data(), nullptr, nullptr, xx.data(), ww.data(), bb.data(), N, C);
      return Dot(o, R);
    };
    const Vec X = ToDouble(x), W = ToDouble(w), Bv = ToDouble(b);
    const Vec fd_x = NumGrad(X, [&](const Vec& v) { return L(v, W, Bv); });
    const Vec fd_w = NumGrad(W, [&](const Vec& v) { return L(X, v, Bv); });
    const Vec fd_b = NumGrad(Bv, [&](const Vec& v) { return L(X, W, v); });
    Dev gx(be(), N * C), gw(be(), C), gb(be(), C);
    be()->LayerNormBackward(gx, gw, gb, dout, dx, dw_, mean, rstd, N, C);
    const auto ox = gx.Host(), ow = gw.Host(), ob = gb.Host();
    CheckClose("layernorm dinp", ox, fd_x, kGradTol, kGradFloor);
    CheckClose("layernorm dw", ow, fd_w, kGradTol, kGradFloor);
    CheckClose("layernorm db", ob, fd_b, kGradTol, kGradFloor);
    be()->LayerNormBackward(gx, gw, gb, dout, dx, dw_, mean, rstd, N, C);
    CheckAccumulated("layernorm dinp", ox, gx.Host());
    CheckAccumulated("layernorm dw", ow, gw.Host());
    CheckAccumulated("layernorm db", ob, gb.Host());
  }
}

// ---------------------------------------------------------------------------------------------------------
// Matmul

TEST_F(OpsTest, Matmul) {
  struct Case {
    int N, IC, OC;
    bool bias, dinp;
  };
  // N = 1 is the single-row (decode) shape.
  for (const Case& k : {Case{10, 8, 12, true, true}, Case{7, 5, 3, false, true}, Case{37, 19, 23, true, true},
                        Case{6, 4, 9, true, false}, Case{1, 9, 13, true, true}, Case{1, 6, 5, false, true}}) {
    const int N = k.N, IC = k.IC, OC = k.OC;
    const std::string tag = "N=" + std::to_string(N) + " IC=" + std::to_string(IC) + " OC=" + std::to_string(OC) +
                            (k.bias ? " bias" : " no-bias") + (k.dinp ? "" : " dinp=null");
    SCOPED_TRACE(tag);
    std::printf(" Matmul %s\n", tag.c_str());
    auto x = RandN(rng_, N * IC), w = RandN(rng_, OC * IC, 0.5f), b = RandN(rng_, OC, 0.5f), R = RandN(rng_, N * OC);
    Dev dx(be(), x), dw_(be(), w), db_(be(), b), dout(be(), R), out(be(), N * OC);
    out.Fill(kNaN);
    be()->MatmulForward(out, dx, dw_, k.bias ? static_cast<float*>(db_) : nullptr, N, IC, OC);
    const Vec X = ToDouble(x), W = ToDouble(w), Bv = ToDouble(b);
    Vec want(N * OC);
    ref::Matmul(want.data(), X.data(), W.data(), k.bias ? Bv.data() : nullptr, N, IC, OC);
    CheckClose("matmul forward", out.Host(), want, kFwdTol, 1.0);

    auto L = [&](const Vec& xx, const Vec& ww, const Vec& bb) {
      Vec o(N * OC);
      ref::Matmul(o.data(), xx.data(), ww.data(), k.bias ? bb.data() : nullptr, N, IC, OC);
      return Dot(o, R);
    };
    Dev gx(be(), N * IC), gw(be(), OC * IC), gb(be(), OC);
    auto backward = [&] {
      be()->MatmulBackward(k.dinp ? static_cast<float*>(gx) : nullptr, gw, k.bias ? static_cast<float*>(gb) : nullptr,
                           dout, dx, dw_, N, IC, OC);
    };
    backward();
    const auto ox = gx.Host(), ow = gw.Host(), ob = gb.Host();
    if (k.dinp) CheckClose("matmul dinp", ox, NumGrad(X, [&](const Vec& v) { return L(v, W, Bv); }), kGradTol, kGradFloor);
    CheckClose("matmul dw", ow, NumGrad(W, [&](const Vec& v) { return L(X, v, Bv); }), kGradTol, kGradFloor);
    if (k.bias) CheckClose("matmul dbias", ob, NumGrad(Bv, [&](const Vec& v) { return L(X, W, v); }), kGradTol, kGradFloor);
    backward();
    if (k.dinp) CheckAccumulated("matmul dinp", ox, gx.Host());
    CheckAccumulated("matmul dw", ow, gw.Host());
    if (k.bias) CheckAccumulated("matmul dbias", ob, gb.Host());
  }
}

// Shapes large enough that the CPU backend splits every product into several tiles (a dimension >= 128), on each
// branch of its tiling (forward split on N, backward dw split on OC, dinp split on N and on IC), against exact
// double products (finite differences would be too slow here; the small cases above cover the formulas).
TEST_F(OpsTest, MatmulMultiTile) {
  struct Case {
    int N, IC, OC;
  };
  for (const Case& k : {Case{300, 100, 40}, Case{40, 300, 200}, Case{200, 64, 333}, Case{129, 130, 131}}) {
    const int N = k.N, IC = k.IC, OC = k.OC;
    const std::string tag = "N=" + std::to_string(N) + " IC=" + std::to_string(IC) + " OC=" + std::to_string(OC);
    SCOPED_TRACE(tag);
    std::printf(" MatmulMultiTile %s\n", tag.c_str());
    auto x = RandN(rng_, N * IC), w = RandN(rng_, OC * IC, 0.5f), b = RandN(rng_, OC, 0.5f), R = RandN(rng_, N * OC);
    Dev dx(be(), x), dw_(be(), w), db_(be(), b), dout(be(), R), out(be(), N * OC);
    out.Fill(kNaN);
    be()->MatmulForward(out, dx, dw_, db_, N, IC, OC);
    const Vec X = ToDouble(x), W = ToDouble(w), Bv = ToDouble(b), D = ToDouble(R);
    Vec want(static_cast<size_t>(N) * OC);
    ref::Matmul(want.data(), X.data(), W.data(), Bv.data(), N, IC, OC);
    CheckClose("matmul forward", out.Host(), want, kFwdTol, 1.0);
    Vec want_dx(static_cast<size_t>(N) * IC, 0.0), want_dw(static_cast<size_t>(OC) * IC, 0.0), want_db(OC, 0.0);
    for (int n = 0; n < N; ++n)
      for (int o = 0; o < OC; ++o) {
        const double g = D[static_cast<size_t>(n) * OC + o];
        want_db[o] += g;
        for (int i = 0; i < IC; ++i) {
          want_dx[static_cast<size_t>(n) * IC + i] += g * W[static_cast<size_t>(o) * IC + i];
          want_dw[static_cast<size_t>(o) * IC + i] += g * X[static_cast<size_t>(n) * IC + i];
        }
      }
    Dev gx(be(), N * IC), gw(be(), OC * IC), gb(be(), OC);
    be()->MatmulBackward(gx, gw, gb, dout, dx, dw_, N, IC, OC);
    CheckClose("matmul dinp", gx.Host(), want_dx, kFwdTol, 1.0);
    CheckClose("matmul dw", gw.Host(), want_dw, kFwdTol, 1.0);
    CheckClose("matmul dbias", gb.Host(), want_db, kFwdTol, 1.0);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Attention

TEST_F(OpsTest, Attention) {
  struct Case {
    int B, T, C, NH;
  };
  for (const Case& k : {Case{2, 5, 8, 2}, Case{1, 7, 12, 3}, Case{3, 4, 4, 1}, Case{2, 1, 6, 2},
                        Case{1, 37, 8, 2},
                        Case{1, 150, 4, 2}}) {  // T=37: rows longer than the vector blocks; T=150: causal blocks
    const int B = k.B, T = k.T, C = k.C, NH = k.NH;
    const std::string tag = "B=" + std::to_string(B) + " T=" + std::to_string(T) + " C=" + std::to_string(C) +
                            " NH=" + std::to_string(NH);
    SCOPED_TRACE(tag);
    std::printf(" Attention %s\n", tag.c_str());
    const size_t nqkv = static_cast<size_t>(B) * T * 3 * C, nout = static_cast<size_t>(B) * T * C,
                 natt = static_cast<size_t>(B) * NH * T * T;
    auto qkv = RandN(rng_, nqkv), R = RandN(rng_, nout);
    Dev dqkv_in(be(), qkv), dout(be(), R), out(be(), nout), att(be(), natt);
    out.Fill(kNaN);
    att.Fill(kNaN);
    be()->AttentionForward(out, att, dqkv_in, B, T, C, NH);
    const Vec Q = ToDouble(qkv);
    Vec want(nout), want_att(natt);
    ref::Attention(want.data(), want_att.data(), Q.data(), B, T, C, NH);
    CheckClose("attention forward", out.Host(), want, kFwdTol, 1.0);
    CheckClose("attention probabilities", att.Host(), want_att, kFwdTol, 1.0);

    const Vec fd = NumGrad(Q, [&](const Vec& v) {
      Vec o(nout);
      ref::Attention(o.data(), nullptr, v.data(), B, T, C, NH);
      return Dot(o, R);
    });
    Dev g(be(), nqkv), datt(be(), natt);
    datt.Fill(kNaN);  // scratch: its contents on entry must not matter
    be()->AttentionBackward(g, datt, dout, dqkv_in, att, B, T, C, NH);
    const auto once = g.Host();
    CheckClose("attention dqkv", once, fd, kGradTol, kGradFloor);
    be()->AttentionBackward(g, datt, dout, dqkv_in, att, B, T, C, NH);
    CheckAccumulated("attention dqkv", once, g.Host());
  }
}

// Decoding one position at a time against a KV cache reproduces the rows of the full causal forward, for two
// sequences of different lengths advancing together. Cache slots not yet written hold NaN, so reading past
// pos[b] would show.
TEST_F(OpsTest, AttentionDecodeMatchesForward) {
  struct Case {
    int C, NH, maxT;
    std::vector<int> lens;
  };
  // Head sizes 4 and 12 take the generic path; 16, 32, 64 and 128 (2, 4 or 8 vectors of 8 or 16 lanes) the
  // register-held path that scores four keys at a time, with lengths around multiples of 4 and of the lanes.
  for (const Case& k : {Case{8, 2, 6, {5, 3}}, Case{12, 1, 7, {2, 7}}, Case{32, 2, 19, {19, 6}},
                        Case{64, 2, 9, {9, 4}}, Case{128, 2, 18, {17, 1}}, Case{256, 2, 11, {11, 8}}}) {
    const int B = static_cast<int>(k.lens.size()), C = k.C, NH = k.NH, maxT = k.maxT;
    const int T = *std::max_element(k.lens.begin(), k.lens.end());
    SCOPED_TRACE("C=" + std::to_string(C) + " NH=" + std::to_string(NH));
    auto qkv = RandN(rng_, static_cast<size_t>(B) * T * 3 * C);
    Dev dqkv(be(), qkv), full(be(), static_cast<size_t>(B) * T * C), att(be(), static_cast<size_t>(B) * NH * T * T);
    be()->AttentionForward(full, att, dqkv, B, T, C, NH);
    const auto want = full.Host();
    Vec want_ref(static_cast<size_t>(B) * T * C);
    ref::Attention(want_ref.data(), nullptr, ToDouble(qkv).data(), B, T, C, NH);

    std::vector<float> kc(static_cast<size_t>(B) * maxT * C, kNaN), vc(kc.size(), kNaN);
    Dev dk(be(), kc), dv(be(), vc), q(be(), static_cast<size_t>(B) * C), out(be(), static_cast<size_t>(B) * C),
        scratch(be(), static_cast<size_t>(B) * NH * maxT);
    double worst = 0.0, worst_ref = 0.0;
    for (int s = 0; s < T; ++s) {
      // Sequence b is at position min(s, len_b - 1): a finished sequence re-decodes its last position.
      std::vector<int32_t> pos(B);
      std::vector<float> qh(static_cast<size_t>(B) * C);
      for (int b = 0; b < B; ++b) {
        pos[b] = std::min(s, k.lens[b] - 1);
        const float* row = qkv.data() + (static_cast<size_t>(b) * T + pos[b]) * 3 * C;
        std::copy(row, row + C, qh.begin() + static_cast<size_t>(b) * C);
        std::copy(row + C, row + 2 * C, kc.begin() + (static_cast<size_t>(b) * maxT + pos[b]) * C);
        std::copy(row + 2 * C, row + 3 * C, vc.begin() + (static_cast<size_t>(b) * maxT + pos[b]) * C);
      }
      dk.Set(kc);
      dv.Set(vc);
      q.Set(qh);
      DevInt dpos(be(), pos);
      out.Fill(kNaN);
      be()->AttentionDecode(out, q, dk, dv, dpos, scratch, B, maxT, C, NH);
      const auto got = out.Host();
      for (int b = 0; b < B; ++b)
        for (int c = 0; c < C; ++c) {
          const size_t w = (static_cast<size_t>(b) * T + pos[b]) * C + c;
          const float g = got[static_cast<size_t>(b) * C + c];
          ASSERT_TRUE(std::isfinite(g)) << "decode read an unwritten cache slot: b=" << b << " pos=" << pos[b];
          worst = std::max(worst, std::fabs(static_cast<double>(g) - want[w]));
          worst_ref = std::max(worst_ref, std::fabs(static_cast<double>(g) - want_ref[w]));
        }
    }
    std::printf("  [check] %-44s abs %.2e / %.2e vs double (tol %.0e)\n", "decode vs AttentionForward", worst,
                worst_ref, kFwdTol);
    EXPECT_LT(worst, kFwdTol);
    EXPECT_LT(worst_ref, kFwdTol);
  }
}

// The f16 KV cache (DecodeState's --kv-dtype f16): AttentionDecodeHalfKv over caches written by StoreHalf equals
// AttentionDecodeSlots over the same values rounded to f16 and held in fp32, bit for bit (the conversion is exact
// and the operations are the same), for every head-size path (generic, 2, 4 and 8 vectors), shared and identity
// slots, and lengths around multiples of 4 and of the lanes.
TEST_F(OpsTest, AttentionDecodeHalfKvEqualsFp32OnRoundedValues) {
  if (!be()->SupportsOp(Op::kAttentionDecodeHalfKv)) GTEST_SKIP() << be()->Name() << " has no f16 KV cache";
  for (auto [C, NH] : {std::pair{12, 1}, std::pair{24, 2}, std::pair{32, 2}, std::pair{64, 2}, std::pair{128, 2}, std::pair{128, 1},
                       std::pair{256, 2}}) {
    SCOPED_TRACE("C=" + std::to_string(C) + " NH=" + std::to_string(NH));
    const int maxT = 37, N = 3;
    auto k = RandN(rng_, static_cast<size_t>(N) * maxT * C), v = RandN(rng_, k.size());
    for (auto* x : {&k, &v})
      for (float& e : *x) e = F16ToFloat(FloatToF16(e));
    Dev dk(be(), k), dv(be(), v), dk16(be(), k.size() / 2), dv16(be(), v.size() / 2);
    auto* k16 = reinterpret_cast<uint16_t*>(static_cast<float*>(dk16));
    auto* v16 = reinterpret_cast<uint16_t*>(static_cast<float*>(dv16));
    be()->StoreHalf(k16, dk, k.size());
    be()->StoreHalf(v16, dv, v.size());
    Dev q(be(), RandN(rng_, static_cast<size_t>(N) * C)), want(be(), static_cast<size_t>(N) * C),
        got(be(), static_cast<size_t>(N) * C), scratch(be(), static_cast<size_t>(N) * NH * maxT);
    const std::vector<int32_t> slots = {2, 0, 2};  // rows 0 and 2 read slot 2
    for (const std::vector<int32_t>& pos : {std::vector<int32_t>{36, 5, 17}, std::vector<int32_t>{0, 3, 8}}) {
      DevInt dpos(be(), pos);
      for (const int32_t* sl : {slots.data(), static_cast<const int32_t*>(nullptr)}) {
        want.Poison();
        got.Poison();
        if (sl) be()->AttentionDecodeSlots(want, q, dk, dv, dpos, sl, scratch, N, maxT, C, NH);
        else be()->AttentionDecode(want, q, dk, dv, dpos, scratch, N, maxT, C, NH);
        be()->AttentionDecodeHalfKv(got, q, k16, v16, dpos, sl, scratch, N, maxT, C, NH);
        const auto w = want.Host(), g = got.Host();
        for (size_t i = 0; i < w.size(); ++i) {
          ASSERT_TRUE(std::isfinite(g[i]));
          ASSERT_EQ(w[i], g[i]) << "at " << i << (sl ? " (slots)" : " (identity)");
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// GELU, residual

TEST_F(OpsTest, Gelu) {
  // A sweep of [-6, 6] plus the tanh approximation's branch points: |u| < 0.0625 (series), |u| > 9 (saturated).
  std::vector<float> x;
  for (int i = 0; i <= 48; ++i) x.push_back(-6.0f + 0.25f * i + 0.01f * static_cast<float>(i % 3));
  for (float v : {0.0f, 0.03f, -0.03f, 0.07f, -0.07f, 6.5f, -6.5f, 10.0f, -10.0f, 1e-4f, -20.0f})
    x.push_back(v);
  const size_t n = x.size();
  auto R = RandN(rng_, n);
  Dev dx(be(), x), dout(be(), R), out(be(), n);
  out.Fill(kNaN);
  be()->GeluForward(out, dx, n);
  Vec want(n);
  for (size_t i = 0; i < n; ++i) want[i] = ref::Gelu(x[i]);
  CheckClose("gelu forward", out.Host(), want, kFwdTol, 1.0);
  const Vec fd = NumGrad(ToDouble(x), [&](const Vec& v) {
    double s = 0.0;
    for (size_t i = 0; i < n; ++i) s += ref::Gelu(v[i]) * R[i];
    return s;
  });
  Dev g(be(), n);
  be()->GeluBackward(g, dx, dout, n);
  const auto once = g.Host();
  CheckClose("gelu dinp", once, fd, kGradTol, kGradFloor);
  be()->GeluBackward(g, dx, dout, n);
  CheckAccumulated("gelu dinp", once, g.Host());
}

TEST_F(OpsTest, Residual) {
  const size_t n = 37;
  auto a = RandN(rng_, n), b = RandN(rng_, n);
  Dev da(be(), a), db(be(), b), out(be(), n);
  out.Fill(kNaN);
  be()->ResidualForward(out, da, db, n);
  std::vector<float> want(n);
  for (size_t i = 0; i < n; ++i) want[i] = a[i] + b[i];  // one correctly rounded float add
  EXPECT_TRUE(BitEqual(out.Host(), want)) << FirstDiff(out.Host(), want);
  be()->ResidualForward(da, da, db, n);  // in place, as decode uses it
  EXPECT_TRUE(BitEqual(da.Host(), want)) << FirstDiff(da.Host(), want);
  // Residual has no backward op: its gradient is the identity into both inputs, which the model applies by
  // accumulating dres into both branches (covered by the whole-model checks below).
}

// ---------------------------------------------------------------------------------------------------------
// Softmax cross-entropy

TEST_F(OpsTest, SoftmaxCrossEntropy) {
  const int N = 6, V = 11, Vp = 16;
  auto logits = RandN(rng_, static_cast<size_t>(N) * Vp, 3.0f);
  for (int n = 0; n < N; ++n)
    for (int i = V; i < Vp; ++i) logits[n * Vp + i] = 50.0f;  // padding columns: must be ignored
  for (int i = 0; i < V; ++i) logits[5 * Vp + i] *= 30.0f;   // a row spanning ~±100: exp underflows
  auto targets = RandInt(rng_, N, V);
  targets[0] = V - 1;
  targets[5] = static_cast<int32_t>(std::min_element(logits.begin() + 5 * Vp, logits.begin() + 5 * Vp + V) -
                                    (logits.begin() + 5 * Vp));  // probability ~exp(-300): loss via log-softmax
  const float dloss = 0.37f;
  DevInt dt(be(), targets);
  Dev dl(be(), logits), losses(be(), N), probs(be(), static_cast<size_t>(N) * Vp);
  losses.Fill(kNaN);
  probs.Fill(kNaN);
  be()->SoftmaxCrossEntropyForward(losses, probs, dl, dt, N, V, Vp);
  const Vec Lg = ToDouble(logits);
  Vec want_loss(N), want_probs(static_cast<size_t>(N) * Vp);
  ref::SoftmaxXent(want_loss.data(), want_probs.data(), Lg.data(), targets.data(), N, V, Vp);
  const auto got_loss = losses.Host(), got_probs = probs.Host();
  CheckClose("softmax-xent losses", got_loss, want_loss, kFwdTol, 1.0);
  CheckClose("softmax-xent probs", got_probs, want_probs, kFwdTol, 1.0);
  for (int n = 0; n < N; ++n)
    for (int i = V; i < Vp; ++i) EXPECT_EQ(got_probs[n * Vp + i], 0.0f) << "padded prob n=" << n << " i=" << i;

  const Vec fd = NumGrad(Lg, [&](const Vec& v) {
    Vec l(N);
    ref::SoftmaxXent(l.data(), nullptr, v.data(), targets.data(), N, V, Vp);
    double s = 0.0;
    for (double x : l) s += x;
    return dloss * s;
  });
  Dev dlog(be(), static_cast<size_t>(N) * Vp);
  dlog.Fill(kNaN);  // written, not accumulated: prior contents must not matter
  be()->SoftmaxCrossEntropyBackward(dlog, probs, dt, dloss, N, V, Vp);
  const auto got_d = dlog.Host();
  CheckClose("softmax-xent dlogits", got_d, fd, kGradTol, kGradFloor);
  for (int n = 0; n < N; ++n)
    for (int i = V; i < Vp; ++i) EXPECT_EQ(got_d[n * Vp + i], 0.0f) << "padded dlogit n=" << n << " i=" << i;

  // In place, as the model runs them (probs == logits, then dlogits == probs): bit-identical results.
  Dev x(be(), logits), losses2(be(), N);
  be()->SoftmaxCrossEntropyForward(losses2, x, x, dt, N, V, Vp);
  EXPECT_TRUE(BitEqual(losses2.Host(), got_loss)) << FirstDiff(losses2.Host(), got_loss);
  EXPECT_TRUE(BitEqual(x.Host(), got_probs)) << FirstDiff(x.Host(), got_probs);
  be()->SoftmaxCrossEntropyBackward(x, x, dt, dloss, N, V, Vp);
  EXPECT_TRUE(BitEqual(x.Host(), got_d)) << FirstDiff(x.Host(), got_d);

  // Softmax only (Op::kSoftmaxForward: no targets, no losses) gives the same probabilities.
  if (be()->SupportsOp(Op::kSoftmaxForward)) {
    Dev p2(be(), static_cast<size_t>(N) * Vp);
    p2.Fill(kNaN);
    be()->SoftmaxCrossEntropyForward(nullptr, p2, dl, nullptr, N, V, Vp);
    EXPECT_TRUE(BitEqual(p2.Host(), got_probs)) << FirstDiff(p2.Host(), got_probs);
  }
}

// The CPU kernels' vector exp/tanh must equal the scalar reference functions bit for bit (so an element's
// result does not depend on whether it falls in a vector block or a loop tail).
TEST(VecMath, VectorLanesMatchScalarBitForBit) {
  std::vector<float> x;
  for (int i = -4000; i <= 4000; ++i) x.push_back(0.025f * static_cast<float>(i));  // [-100, 100]
  for (float v : {0.0f, -0.0f, 1e-30f, -1e-30f, 0.0624f, 0.0626f, -0.0625f, 4.5f, 9.0f, 9.5f, -88.0f, 88.5f, 89.0f,
                  -87.0f, -87.5f, 1e30f, -1e30f, std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity(), kNaN})
    x.push_back(v);
  while (x.size() % cpu::kLanes) x.push_back(0.5f);
  auto bits = [](float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
  };
  for (size_t i = 0; i < x.size(); i += cpu::kLanes) {
    const cpu::VecF v = cpu::LoadV(&x[i]);
    const cpu::VecF e = cpu::VecExp(v), t = cpu::VecTanh(v);
    for (int l = 0; l < cpu::kLanes; ++l) {
      ASSERT_EQ(bits(e[l]), bits(cpu::VecExp(x[i + l]))) << "exp(" << x[i + l] << ")";
      ASSERT_EQ(bits(t[l]), bits(cpu::VecTanh(x[i + l]))) << "tanh(" << x[i + l] << ")";
    }
  }
}

// The deterministic mode's in-place fixed-point rounding: its vector loop must equal the scalar reference (the
// one-element calls) bit for bit, including -0, ties, tiny and saturated values and non-finite inputs.
TEST(ExactSum, RoundThroughFixedPointVectorMatchesScalar) {
  std::vector<float> x;
  Rng rng(11);
  for (int e = -150; e <= 30; ++e)
    for (int k = 0; k < 20; ++k) x.push_back(std::ldexp(1.0f + 0.5f * rng.Normal(), e) * (k % 2 ? -1.0f : 1.0f));
  for (int k = -300; k < 300; ++k) x.push_back(std::ldexp(static_cast<float>(k) + 0.5f, -40));  // exact ties
  for (float v : {0.0f, -0.0f, 65536.0f, -65536.0f, 70000.0f, -1e30f, 1e-45f, -1e-45f, 0.3e-12f, -0.3e-12f,
                  std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(), kNaN})
    x.push_back(v);
  std::vector<float> all(x), one(x);
  size_t sat_all = 0, sat_one = 0, expect_sat = 0;
  for (float v : x) expect_sat += std::isfinite(v) && std::fabs(static_cast<double>(v)) >= 65536.0;
  const size_t bad_all = RoundThroughFixedPoint(all.data(), all.size(), &sat_all);
  size_t bad_one = 0;
  for (float& v : one) {
    size_t s = 0;
    bad_one += RoundThroughFixedPoint(&v, 1, &s);
    sat_one += s;
  }
  EXPECT_EQ(bad_all, 3u);
  EXPECT_EQ(bad_one, 3u);
  EXPECT_GT(expect_sat, 4u);
  EXPECT_EQ(sat_all, expect_sat);  // the clamp is counted, in the vector loop and the scalar one
  EXPECT_EQ(sat_one, expect_sat);
  EXPECT_TRUE(BitEqual(all, one)) << FirstDiff(all, one);
}

// Saturated gradients summed over the most micro-batches a step may have (kMaxExactMicroBatches) stay inside
// int64: the clamp sits 16 units below 2^56, where 128 x 2^56 would be 2^63 and wrap negative.
TEST(ExactSum, SaturatedSumOfTheMostMicroBatchesDoesNotOverflow) {
  std::vector<int64_t> acc(3, 0);
  const float g[3] = {1e9f, -1e9f, std::numeric_limits<float>::max()};
  size_t saturated = 0, total = 0;
  for (int m = 0; m < kMaxExactMicroBatches; ++m) {
    EXPECT_EQ(AddFixedPoint(acc.data(), g, 3, &saturated), 0u);
    total += saturated;
  }
  EXPECT_EQ(total, 3u * kMaxExactMicroBatches);
  EXPECT_GT(acc[0], 0);
  EXPECT_LT(acc[1], 0);
  EXPECT_EQ(acc[2], acc[0]);
  float out[3];
  FixedPointToFloat(out, acc.data(), 3, 1.0 / kMaxExactMicroBatches);
  EXPECT_NEAR(out[0], 65536.0f, 0.01f);
  EXPECT_NEAR(out[1], -65536.0f, 0.01f);
}

// Rows wider than the kernels' vector blocks (the vectorised max/exp/sum paths and their scalar tails).
TEST_F(OpsTest, SoftmaxCrossEntropyWideRows) {
  const int N = 5, V = 75, Vp = 80;
  auto logits = RandN(rng_, static_cast<size_t>(N) * Vp, 4.0f);
  for (int i = 0; i < V; ++i) logits[4 * Vp + i] *= 40.0f;  // exp underflows for most of the row
  auto targets = RandInt(rng_, N, V);
  DevInt dt(be(), targets);
  Dev dl(be(), logits), losses(be(), N), probs(be(), static_cast<size_t>(N) * Vp);
  be()->SoftmaxCrossEntropyForward(losses, probs, dl, dt, N, V, Vp);
  Vec want_loss(N), want_probs(static_cast<size_t>(N) * Vp);
  ref::SoftmaxXent(want_loss.data(), want_probs.data(), ToDouble(logits).data(), targets.data(), N, V, Vp);
  CheckClose("softmax-xent losses (wide)", losses.Host(), want_loss, kFwdTol, 1.0);
  CheckClose("softmax-xent probs (wide)", probs.Host(), want_probs, kFwdTol, 1.0);
}

// ---------------------------------------------------------------------------------------------------------
// AdamW, SumSquares

ref::AdamWHyper ToRef(const AdamWParams& p) {
  return {p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, p.grad_scale};  // the exact float values, widened
}

TEST_F(OpsTest, AdamWMatchesDoubleReference) {
  const size_t n = 37;
  auto params = RandN(rng_, n, 0.5f);
  std::vector<uint8_t> mask(n);
  for (size_t i = 0; i < n; ++i) mask[i] = i % 3 != 0;
  AdamWParams p = TestAdamW();
  Dev dp(be(), params), dm(be(), n), dv(be(), n);
  Vec P = ToDouble(params), M(n, 0.0), Vv(n, 0.0);
  for (int64_t t = 1; t <= 6; ++t) {
    SCOPED_TRACE("step " + std::to_string(t));
    auto grads = RandN(rng_, n);
    Dev dg(be(), grads);
    p.t = t;
    be()->AdamW(dp, dg, dm, dv, mask.data(), n, p);
    ref::AdamW(P.data(), ToDouble(grads).data(), M.data(), Vv.data(), mask.data(), n, ToRef(p), t);
    if (t == 1 || t == 6) {
      const std::string s = "adamw step " + std::to_string(t);
      CheckClose(s + " params", dp.Host(), P, 1e-6, 1.0);
      CheckClose(s + " m", dm.Host(), M, 1e-5, 1e-30);
      CheckClose(s + " v", dv.Host(), Vv, 1e-5, 1e-30);
    }
  }
}

// With zero gradients and moments the update is pure decay: masked-out entries stay bit-identical, the others
// shrink by (1 - lr * wd); a null mask decays everything.
// The vectorised CPU loops against their scalar tails: an op over n elements must equal n one-element calls
// (each of which runs the scalar reference code) bit for bit.
TEST(CpuVectorPaths, MatchOneElementCalls) {
  auto be = MakeCpuBackend(1);
  Rng rng(7);
  const size_t n = 203;
  auto x = RandN(rng, n, 3.0f), d = RandN(rng, n), m = RandN(rng, n, 0.1f), v = RandN(rng, n, 0.1f);
  for (auto& e : v) e = e * e;
  std::vector<uint8_t> mask(n);
  for (size_t i = 0; i < n; ++i) mask[i] = static_cast<uint8_t>(i % 3 != 0);
  AdamWParams p = TestAdamW();
  p.t = 3;
  std::vector<float> out(n), out1(n), din(d), din1(d);
  be->GeluForward(out.data(), x.data(), n);
  be->GeluBackward(din.data(), x.data(), d.data(), n);
  std::vector<float> pa(x), ma(m), va(v), pb(x), mb(m), vb(v);
  be->AdamW(pa.data(), d.data(), ma.data(), va.data(), mask.data(), n, p);
  for (size_t i = 0; i < n; ++i) {
    be->GeluForward(&out1[i], &x[i], 1);
    be->GeluBackward(&din1[i], &x[i], &d[i], 1);
    be->AdamW(&pb[i], &d[i], &mb[i], &vb[i], &mask[i], 1, p);
  }
  EXPECT_TRUE(BitEqual(out, out1)) << FirstDiff(out, out1);
  EXPECT_TRUE(BitEqual(din, din1)) << FirstDiff(din, din1);
  EXPECT_TRUE(BitEqual(pa, pb)) << FirstDiff(pa, pb);
  EXPECT_TRUE(BitEqual(ma, mb)) << FirstDiff(ma, mb);
  EXPECT_TRUE(BitEqual(va, vb)) << FirstDiff(va, vb);
}

TEST_F(OpsTest, AdamWDecayMask) {
  const size_t n = 10;
  auto params = RandN(rng_, n, 1.0f, 0.5f);
  std::vector<uint8_t> mask = {1, 0, 0, 1, 0, 1, 1, 0, 1, 0};
  const AdamWParams p = TestAdamW();
  for (bool null_mask : {false, true}) {
    SCOPED_TRACE(null_mask ? "null mask" : "mask");
    Dev dp(be(), params), dg(be(), n), dm(be(), n), dv(be(), n);
    be()->AdamW(dp, dg, dm, dv, null_mask ? nullptr : mask.data(), n, p);
    const auto got = dp.Host();
    for (size_t i = 0; i < n; ++i) {
      if (!null_mask && mask[i] == 0) {
        EXPECT_EQ(got[i], params[i]) << "no-decay entry " << i << " changed";
      } else {
        const double want = params[i] * (1.0 - static_cast<double>(p.lr) * p.weight_decay);
        EXPECT_NEAR(got[i], want, 1e-6 * std::fabs(want)) << "decayed entry " << i;
      }
    }
  }
}

TEST_F(OpsTest, SumSquares) {
  EXPECT_EQ(be()->SumSquares(nullptr, 0), 0.0);
  for (size_t n : {size_t{1}, size_t{1000}, size_t{2 * 65536 + 123}}) {
    auto x = RandN(rng_, n, 3.0f);
    Dev dx(be(), x);
    long double want = 0.0L;
    for (float v : x) want += static_cast<long double>(v) * v;
    const double got = be()->SumSquares(dx, n);
    EXPECT_NEAR(got, static_cast<double>(want), 1e-12 * static_cast<double>(want)) << "n=" << n;
  }
}

// ---------------------------------------------------------------------------------------------------------
// The whole model (fixture ModelTest in ops_test_util.h)


TEST_F(ModelTest, ForwardMatchesReference) {
  const float loss = model_->Forward(tokens_.data(), targets_.data(), kB, kT);
  Vec want_losses;
  const double want = RefLoss(ToDouble(params_), &want_losses);
  std::printf("  loss %.7f, reference %.7f\n", loss, want);
  CheckClose("model per-position losses", model_->LastLosses(), want_losses, kFwdTol, 1.0);
  CheckClose("model mean loss", {loss}, Vec{want}, kFwdTol, 1.0);
}

// Every parameter's gradient against central differences (h = 1e-5) of the double reference model.
TEST_F(ModelTest, BackwardMatchesReferenceFiniteDifferences) {
  const auto grads = Gradient();
  Vec P = ToDouble(params_);
  for (const ParamTensor& t : model_->tensors()) {
    Vec fd(t.size);
    for (size_t j = 0; j < t.size; ++j) {
      double& x = P[t.offset + j];
      const double x0 = x;
      x = x0 + kFdStep;
      const double lp = RefLoss(P);
      x = x0 - kFdStep;
      const double lm = RefLoss(P);
      x = x0;
      fd[j] = (lp - lm) / (2.0 * kFdStep);
    }
    std::vector<float> got(grads.begin() + t.offset, grads.begin() + t.offset + t.size);
    CheckClose("grad " + t.name, got, fd, kGradTol, kGradFloor);
  }
}

// A sample of every tensor's gradient (3 entries each) against central differences of Forward() itself, in
// float: h = 1e-2 keeps float rounding of the loss (~1e-7 relative) well under the tolerance, and the O(h^2)
// truncation error is below it too.
TEST_F(ModelTest, BackwardMatchesForwardFiniteDifferences) {
  const auto grads = Gradient();
  const float h = 1e-2f;
  Rng pick(7);
  double worst = 0.0;
  std::string worst_at;
  for (const ParamTensor& t : model_->tensors()) {
    for (int s = 0; s < 3; ++s) {
      const size_t j = s == 0 ? 0 : s == 1 ? t.size - 1 : pick.Below(t.size);
      const size_t i = t.offset + j;
      std::vector<float> p = params_;
      const float xp = params_[i] + h, xm = params_[i] - h;
      p[i] = xp;
      model_->SetParamsFromHost(p);
      const double lp = model_->Forward(tokens_.data(), targets_.data(), kB, kT);
      p[i] = xm;
      model_->SetParamsFromHost(p);
      const double lm = model_->Forward(tokens_.data(), targets_.data(), kB, kT);
      const double fd = (lp - lm) / (static_cast<double>(xp) - xm);  // the step actually taken, in float
      const double err = std::fabs(grads[i] - fd), bound = 2e-2 * std::fabs(fd) + 2e-4;
      worst = std::max(worst, err / bound);
      if (err / bound >= worst) worst_at = t.name + "[" + std::to_string(j) + "]";
      EXPECT_LE(err, bound) << t.name << "[" << j << "]: backward " << grads[i] << ", finite difference " << fd;
    }
  }
  model_->SetParamsFromHost(params_);
  std::printf("  [check] %-44s worst err/bound %.2f at %s (bound 2e-2 |fd| + 2e-4)\n", "float forward FD (sampled)",
              worst, worst_at.c_str());
}

// on_group_ready: every group once, in the order final LN, layers L-1..0, embeddings; and when a group is
// reported, its gradients are final (equal to the gradients after Backward returns).
TEST_F(ModelTest, GroupReadyOrderAndFinality) {
  std::vector<int> order;
  std::vector<std::vector<float>> snapshot;
  const auto grads = Gradient(nullptr, [&](int g) {
    order.push_back(g);
    snapshot.push_back(model_->GradsToHost());
  });
  const int L = cfg_.layers;
  std::vector<int> want = {L + 1};
  for (int l = L - 1; l >= 0; --l) want.push_back(1 + l);
  want.push_back(0);
  EXPECT_EQ(order, want);
  for (size_t k = 0; k < order.size(); ++k)
    for (const ParamTensor& t : model_->tensors()) {
      if (t.group != order[k]) continue;
      EXPECT_EQ(0, std::memcmp(snapshot[k].data() + t.offset, grads.data() + t.offset, t.size * sizeof(float)))
          << t.name << " changed after its group " << order[k] << " was reported ready";
    }
}

// Forward + Backward twice without ZeroGrads accumulates twice the gradient.
TEST_F(ModelTest, BackwardAccumulates) {
  const auto once = Gradient();
  model_->Forward(tokens_.data(), targets_.data(), kB, kT);
  model_->Backward();
  CheckAccumulated("model gradient", once, model_->GradsToHost());
}

}  // namespace
}  // namespace keel::optest
