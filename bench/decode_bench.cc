// decode_bench.cc: time per batched decode step of keel's DecodeState (no HTTP, no sampling), fp32 vs f16 vs bf16
// weights, the model's own [OC, IC] matrices (rows) vs the backend's repacked layout (packed), for 1..16 rows,
// next to the step's weight bytes and the memory bandwidth that implies. The profile behind serve_bench.sh's
// figures. Usage: decode_bench [LAYERS HEADS DIM VOCAB] (default GPT-2 small: 12 12 768 50257); env DECODE_KV=f16
// decodes with an f16 KV cache; DECODE_ROWS=n, DECODE_DTYPE=f32|f16|bf16 and DECODE_LAYOUT=rows|packed restrict
// the table to one row count / weight type / layout (for profiling). DECODE_MATMUL=1 prints instead the packed matrix products alone (one
// step's worth: every layer's four matrices and the LM head), 256-bit against 512-bit kernels, in GFLOP/s.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_ops.h"
#include "model/gpt.h"

namespace {

// One decode step's matrix products from packed weights, timed per ISA: best of `passes` passes.
void MatmulTable(const keel::GptConfig& c) {
  using namespace keel::cpu;
  using keel::WeightDtype;
  using keel::WeightDtypeName;
  const int C = c.dim;
  const std::vector<std::pair<int, int>> shapes = {{C, 3 * C}, {C, C}, {C, 4 * C}, {4 * C, C}};  // [IC, OC]
  std::printf("| weights | kernel | rows | ms per step's products | GFLOP/s |\n|---|---|---|---|---|\n");
  const char* only_dtype = std::getenv("DECODE_DTYPE");
  for (WeightDtype dtype : {WeightDtype::kF32, WeightDtype::kF16, WeightDtype::kBF16}) {
    if (only_dtype && std::string(only_dtype) != WeightDtypeName(dtype)) continue;
    std::vector<std::vector<float>> packed;
    std::vector<std::pair<int, int>> all;
    for (int l = 0; l < c.layers; ++l) all.insert(all.end(), shapes.begin(), shapes.end());
    all.push_back({C, c.vocab});
    for (auto [IC, OC] : all) {  // distinct buffers, so each pass streams the weights from memory as decoding does
      std::vector<float> w(static_cast<size_t>(IC) * OC, 0.01f);
      packed.emplace_back(PackedMatmulFloats(IC, OC, dtype));
      PackMatmulWeight(packed.back().data(), w.data(), IC, OC, dtype);
    }
    std::vector<int> row_counts = {1, 8, 16, 24, 64};
    if (const char* r = std::getenv("DECODE_ROWS")) row_counts = {std::max(1, std::atoi(r))};
    for (int rows : row_counts) {
      std::vector<float> inp(static_cast<size_t>(rows) * 4 * C, 0.5f), out(static_cast<size_t>(rows) * c.vocab);
      double flops = 0;
      for (auto [IC, OC] : all) flops += 2.0 * rows * IC * OC;
      for (PackedIsa isa : {PackedIsa::kAvx2, PackedIsa::kAvx512}) {
        if (!PackedMatmulIsaSupported(isa, dtype)) continue;
        double best = 1e9;
        for (int pass = 0; pass < 8; ++pass) {
          const auto t0 = std::chrono::steady_clock::now();
          for (size_t i = 0; i < all.size(); ++i)
            MatmulForwardPackedWith(isa, out.data(), inp.data(), packed[i].data(), nullptr, rows, all[i].first,
                                    all[i].second, dtype);
          best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        std::printf("| %s | %s | %d | %.1f | %.0f |\n", WeightDtypeName(dtype), isa == PackedIsa::kAvx2 ? "avx2" : "avx512",
                    rows, best * 1e3, flops / best / 1e9);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  using namespace keel;
  GptConfig c{.layers = 12, .heads = 12, .dim = 768, .ctx = 256, .vocab = 50257};
  if (argc >= 5) {
    c.layers = std::atoi(argv[1]);
    c.heads = std::atoi(argv[2]);
    c.dim = std::atoi(argv[3]);
    c.vocab = std::atoi(argv[4]);
  }
  auto be = MakeCpuBackend(static_cast<int>(std::thread::hardware_concurrency()));  // all cores
  auto model = GptModel::Create(c, be.get(), 1, 1);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
    return 1;
  }
  if (std::getenv("DECODE_MATMUL")) {
    MatmulTable(c);
    return 0;
  }
  (*model)->InitWeights(1);
  const double C = c.dim;
  const double matrix_params = c.layers * 12.0 * C * C + double(c.vocab) * C;  // streamed once per step
  // DECODE_FILL=n: positions filled before the 32 timed steps (default 64; at most the context less 32).
  const int fill = std::getenv("DECODE_FILL") ? std::clamp(std::atoi(std::getenv("DECODE_FILL")), 0, c.ctx - 32)
                                             : 64;
  std::printf("model %dL/%dH/%dC vocab %d: %.1fM matrix weights; %d positions of context per row\n", c.layers,
              c.heads, c.dim, c.vocab, matrix_params / 1e6, fill);
  std::printf("| weights | layout | rows | ms/step | tok/s | weight GB/s |\n|---|---|---|---|---|---|\n");
  const char* only_rows = std::getenv("DECODE_ROWS");
  const char* only_dtype = std::getenv("DECODE_DTYPE");
  const char* only_layout = std::getenv("DECODE_LAYOUT");
  for (WeightDtype dtype : {WeightDtype::kF32, WeightDtype::kF16, WeightDtype::kBF16}) {
    if (only_dtype && std::string(only_dtype) != WeightDtypeName(dtype)) continue;
    for (int rows : {1, 2, 4, 8, 16})
    for (bool repack : {false, true}) {  // the model's [OC, IC] matrices vs the backend's repacked panels
      if (only_rows && std::atoi(only_rows) != rows) continue;
      if (only_layout && std::string(only_layout) != (repack ? "packed" : "rows")) continue;
      // bf16 exists only packed, and needs a CPU with AVX2.
      if (dtype == WeightDtype::kBF16 && (!repack || !be->SupportsOp(Op::kMatmulForwardPackedBf16))) continue;
      const char* kv = std::getenv("DECODE_KV");  // f16: an f16 KV cache
      auto st = DecodeState::Create(model->get(), rows, c.ctx, rows, dtype, repack, kv && std::string(kv) == "f16");
      if (!st.ok()) {
        std::fprintf(stderr, "%s\n", st.status().ToString().c_str());
        return 1;
      }
      std::vector<int32_t> tok(rows, 7), pos(rows);
      // Fill `fill` positions, then time 32 more steps.
      double t = 0;
      for (int p = 0; p < fill + 32; ++p) {
        for (auto& x : pos) x = p;
        const auto t0 = std::chrono::steady_clock::now();
        (*st)->Step(tok.data(), pos.data(), rows);
        if (p >= fill) t += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
      const double ms = t / 32 * 1e3;
      std::printf("| %s | %s | %d | %.1f | %.1f | %.1f |\n", WeightDtypeName(dtype), repack ? "packed" : "rows", rows,
                  ms, rows / (ms / 1e3),
                  matrix_params * (dtype == WeightDtype::kF32 ? 4 : 2) / (ms / 1e3) / 1e9);
    }
  }
  return 0;
}
