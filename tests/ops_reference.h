// ops_reference.h: plain double-precision reference implementations of keel's backend ops and of the GPT-2
// forward pass, written as naive loops straight from the definitions (no blocking, no fused tricks, no shared
// code with src/backend). Tests feed them the same float inputs as the backend (widened to double) and use
// them as the oracle for forward outputs and, through central finite differences, for gradients.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/gpt_config.h"

namespace keel::ref {

using Vec = std::vector<double>;

inline Vec ToDouble(const std::vector<float>& v) { return Vec(v.begin(), v.end()); }

// out[n, c] = wte[tokens[n], c] + wpe[pos(n), c], pos(n) = positions ? positions[n] : n % T.
inline void Encoder(double* out, const int32_t* tokens, const int32_t* positions, const double* wte, const double* wpe,
                    int B, int T, int C) {
  for (int n = 0; n < B * T; ++n) {
    int pos = positions ? positions[n] : n % T;
    for (int c = 0; c < C; ++c) out[n * C + c] = wte[tokens[n] * C + c] + wpe[pos * C + c];
  }
}

// LayerNorm over the last axis: biased variance, eps = 1e-5. mean/rstd may be null.
inline void LayerNorm(double* out, double* mean, double* rstd, const double* x, const double* w, const double* b,
                      int N, int C) {
  for (int n = 0; n < N; ++n) {
    const double* row = x + static_cast<size_t>(n) * C;
    double m = 0.0;
    for (int c = 0; c < C; ++c) m += row[c];
    m /= C;
    double var = 0.0;
    for (int c = 0; c < C; ++c) var += (row[c] - m) * (row[c] - m);
    var /= C;
    double s = 1.0 / std::sqrt(var + 1e-5);
    for (int c = 0; c < C; ++c) out[static_cast<size_t>(n) * C + c] = (row[c] - m) * s * w[c] + b[c];
    if (mean) mean[n] = m;
    if (rstd) rstd[n] = s;
  }
}

// out[n, o] = sum_i inp[n, i] * w[o, i] + bias[o]   (w is [OC, IC]; bias may be null).
inline void Matmul(double* out, const double* inp, const double* w, const double* bias, int N, int IC, int OC) {
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < OC; ++o) {
      double s = bias ? bias[o] : 0.0;
      for (int i = 0; i < IC; ++i) s += inp[static_cast<size_t>(n) * IC + i] * w[static_cast<size_t>(o) * IC + i];
      out[static_cast<size_t>(n) * OC + o] = s;
    }
}

// Causal multi-head self-attention. qkv [B, T, 3C] = q | k | v, each [NH heads x hs]; out [B, T, C];
// att [B, NH, T, T] = softmax probabilities (0 above the diagonal); att may be null.
inline void Attention(double* out, double* att, const double* qkv, int B, int T, int C, int NH) {
  const int hs = C / NH;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  std::vector<double> p(T);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h)
      for (int t = 0; t < T; ++t) {
        const double* q = qkv + (static_cast<size_t>(b) * T + t) * 3 * C + h * hs;
        double mx = -INFINITY;
        for (int j = 0; j <= t; ++j) {
          const double* k = qkv + (static_cast<size_t>(b) * T + j) * 3 * C + C + h * hs;
          double s = 0.0;
          for (int i = 0; i < hs; ++i) s += q[i] * k[i];
          p[j] = s * scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0.0;
        for (int j = 0; j <= t; ++j) {
          p[j] = std::exp(p[j] - mx);
          sum += p[j];
        }
        for (int j = 0; j <= t; ++j) p[j] /= sum;
        double* o = out + (static_cast<size_t>(b) * T + t) * C + h * hs;
        for (int i = 0; i < hs; ++i) {
          double s = 0.0;
          for (int j = 0; j <= t; ++j) s += p[j] * qkv[(static_cast<size_t>(b) * T + j) * 3 * C + 2 * C + h * hs + i];
          o[i] = s;
        }
        if (att) {
          double* arow = att + ((static_cast<size_t>(b) * NH + h) * T + t) * T;
          for (int j = 0; j < T; ++j) arow[j] = j <= t ? p[j] : 0.0;
        }
      }
}

// GELU, tanh form (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
inline double Gelu(double x) {
  const double k = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
}

// Row-wise softmax over the first V of Vp columns; losses[n] = -log softmax(logits[n])[targets[n]].
// probs may be null (then only losses); padded columns of probs are 0.
inline void SoftmaxXent(double* losses, double* probs, const double* logits, const int32_t* targets, int N, int V,
                        int Vp) {
  for (int n = 0; n < N; ++n) {
    const double* l = logits + static_cast<size_t>(n) * Vp;
    double mx = l[0];
    for (int i = 1; i < V; ++i) mx = std::max(mx, l[i]);
    double sum = 0.0;
    for (int i = 0; i < V; ++i) sum += std::exp(l[i] - mx);
    const double lse = mx + std::log(sum);
    if (probs)
      for (int i = 0; i < Vp; ++i) probs[static_cast<size_t>(n) * Vp + i] = i < V ? std::exp(l[i] - lse) : 0.0;
    if (losses) losses[n] = lse - l[targets[n]];
  }
}

// AdamW (decoupled weight decay, bias-corrected moments), one step at 1-based step t, in double.
// mask[i] == 0 means no weight decay for i (mask may be null: decay all).
struct AdamWHyper {
  double lr, beta1, beta2, eps, weight_decay, grad_scale;
};
inline void AdamW(double* params, const double* grads, double* m, double* v, const uint8_t* mask, size_t n,
                  const AdamWHyper& p, int64_t t) {
  const double bc1 = 1.0 - std::pow(p.beta1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(p.beta2, static_cast<double>(t));
  for (size_t i = 0; i < n; ++i) {
    const double g = grads[i] * p.grad_scale;
    m[i] = p.beta1 * m[i] + (1.0 - p.beta1) * g;
    v[i] = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    const double mhat = m[i] / bc1, vhat = v[i] / bc2;
    const double wd = (mask == nullptr || mask[i] != 0) ? p.weight_decay : 0.0;
    params[i] -= p.lr * (mhat / (std::sqrt(vhat) + p.eps) + wd * params[i]);
  }
}

// The GPT-2 training forward in double: mean cross-entropy of next-token targets over B*T positions.
// Parameters are looked up by name in ParamLayout(cfg), so the wiring is checked independently of gpt.cc:
//   x = wte[tok] + wpe[t]
//   per layer: x += attn.proj(attention(attn.qkv(ln1(x)))); x += mlp.proj(gelu(mlp.fc(ln2(x))))
//   logits = lnf(x) @ wte^T (tied head).
// losses (optional) receives the B*T per-position losses.
inline double GptLoss(const GptConfig& cfg, const Vec& params, const int32_t* tokens, const int32_t* targets, int B,
                      int T, Vec* losses = nullptr) {
  std::map<std::string, const double*> P;
  for (const ParamTensor& t : ParamLayout(cfg)) P[t.name] = params.data() + t.offset;
  const int C = cfg.dim, NH = cfg.heads, V = cfg.vocab, N = B * T;
  const size_t NC = static_cast<size_t>(N) * C;
  Vec x(NC), ln(NC), qkv(3 * NC), y(NC), proj(NC), fc(4 * NC), g(4 * NC);
  Encoder(x.data(), tokens, nullptr, P.at("wte"), P.at("wpe"), B, T, C);
  for (int l = 0; l < cfg.layers; ++l) {
    const std::string h = "h." + std::to_string(l) + ".";
    LayerNorm(ln.data(), nullptr, nullptr, x.data(), P.at(h + "ln1.weight"), P.at(h + "ln1.bias"), N, C);
    Matmul(qkv.data(), ln.data(), P.at(h + "attn.qkv.weight"), P.at(h + "attn.qkv.bias"), N, C, 3 * C);
    Attention(y.data(), nullptr, qkv.data(), B, T, C, NH);
    Matmul(proj.data(), y.data(), P.at(h + "attn.proj.weight"), P.at(h + "attn.proj.bias"), N, C, C);
    for (size_t i = 0; i < NC; ++i) x[i] += proj[i];
    LayerNorm(ln.data(), nullptr, nullptr, x.data(), P.at(h + "ln2.weight"), P.at(h + "ln2.bias"), N, C);
    Matmul(fc.data(), ln.data(), P.at(h + "mlp.fc.weight"), P.at(h + "mlp.fc.bias"), N, C, 4 * C);
    for (size_t i = 0; i < 4 * NC; ++i) g[i] = Gelu(fc[i]);
    Matmul(proj.data(), g.data(), P.at(h + "mlp.proj.weight"), P.at(h + "mlp.proj.bias"), N, 4 * C, C);
    for (size_t i = 0; i < NC; ++i) x[i] += proj[i];
  }
  LayerNorm(ln.data(), nullptr, nullptr, x.data(), P.at("lnf.weight"), P.at("lnf.bias"), N, C);
  Vec logits(static_cast<size_t>(N) * V), loss(N);
  Matmul(logits.data(), ln.data(), P.at("wte"), nullptr, N, C, V);
  SoftmaxXent(loss.data(), nullptr, logits.data(), targets, N, V, V);
  double sum = 0.0;
  for (double v : loss) sum += v;
  if (losses) *losses = loss;
  return sum / N;
}

}  // namespace keel::ref
