// cpu_backend.cc: the CPU Backend (host memory, the reference kernels in cpu_ops.h) and the backend factory.
#include <omp.h>

#include <cstdlib>
#include <sys/mman.h>

#include <cstring>

#include "backend/backend.h"
#include "backend/cpu/cpu_ops.h"
#include "formats/half.h"

extern "C" void openblas_set_num_threads(int);

namespace keel {

const char* OpName(Op op) {
  static const char* kNames[] = {"encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
                                 "matmul_forward", "matmul_backward", "attention_forward", "attention_backward",
                                 "attention_decode", "gelu_forward", "gelu_backward", "residual_forward",
                                 "softmax_xent_forward", "softmax_xent_backward", "softmax_forward", "adamw",
                                 "matmul_forward_half", "round_through_fixed_point", "matmul_forward_packed",
                                 "matmul_forward_packed_bf16", "attention_decode_half_kv"};
  static_assert(sizeof(kNames) / sizeof(kNames[0]) == static_cast<size_t>(Op::kCount));
  return kNames[static_cast<int>(op)];
}

const char* WeightDtypeName(WeightDtype d) {
  switch (d) {
    case WeightDtype::kF32: return "f32";
    case WeightDtype::kF16: return "f16";
    case WeightDtype::kBF16: return "bf16";
  }
  return "?";
}

namespace {

// Large buffers (weights, optimizer state, activations) are 2 MB aligned and asked for transparent huge pages:
// a decode step streams every weight once, and with 4 KB pages that is a TLB miss every 4 KB.
void* AlignedZeroed(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  const bool huge = bytes >= kHuge;
  const size_t align = huge ? kHuge : 64;
  size_t rounded = (bytes + align - 1) / align * align;
  void* p = std::aligned_alloc(align, rounded ? rounded : align);
  if (p && huge) madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure leaves 4 KB pages
  if (p) std::memset(p, 0, rounded);
  return p;
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) { SetThreads(threads); }
  std::string Name() const override { return "cpu"; }
  // Host memory: callers round gradients with train/exact_sum.h in place (no RoundThroughFixedPoint here).
  bool SupportsOp(Op op) const override {
    // AVX2 + FMA + F16C; bf16 runs on the same (AVX-512 BF16's dot product where the CPU has it, else the same
    // arithmetic emulated in 256-bit FMAs).
    if (op == Op::kMatmulForwardPacked || op == Op::kMatmulForwardPackedBf16) return cpu::PackedMatmulSupported();
    return op != Op::kCount && op != Op::kRoundThroughFixedPoint;
  }
  bool host_memory() const override { return true; }
  void SetThreads(int n) override {
    if (n < 1) n = 1;
    // OpenBLAS itself stays single-threaded: its threading changes sgemm's rounding with the thread count. keel
    // parallelises GEMMs itself over shape-determined tiles (matmul.cc), which keeps every result independent of
    // --threads; every BLAS call is made inside an OpenMP parallel region, where the OpenMP build of OpenBLAS
    // (the one keel links) runs single-threaded. Order matters: in that build openblas_set_num_threads(k) also
    // calls omp_set_num_threads(k), so calling it after omp_set_num_threads(n) left keel on one thread whatever
    // --threads said.
    openblas_set_num_threads(1);
    omp_set_num_threads(n);
    // A team of exactly n: with dynamic teams (OMP_DYNAMIC=true) a region could run on one thread, where the
    // OpenMP build of OpenBLAS would thread internally again (and round differently).
    omp_set_dynamic(0);
  }

  Result<float*> Alloc(size_t count) override {
    void* p = AlignedZeroed(count * sizeof(float));
    if (!p) return Unavailable("cpu: out of memory allocating " + std::to_string(count * 4) + " bytes");
    return static_cast<float*>(p);
  }
  void Free(float* p) override { std::free(p); }
  Result<int32_t*> AllocInt(size_t count) override {
    void* p = AlignedZeroed(count * sizeof(int32_t));
    if (!p) return Unavailable("cpu: out of memory allocating " + std::to_string(count * 4) + " bytes");
    return static_cast<int32_t*>(p);
  }
  void FreeInt(int32_t* p) override { std::free(p); }
  void UploadInt(int32_t* dst, const int32_t* host, size_t count) override {
    if (dst != host) std::memcpy(dst, host, count * sizeof(int32_t));
  }
  void Upload(float* dst, const float* host, size_t count) override {
    if (dst != host) std::memcpy(dst, host, count * sizeof(float));
  }
  void Download(float* host, const float* src, size_t count) override {
    if (host != src) std::memcpy(host, src, count * sizeof(float));
  }
  void Zero(float* p, size_t count) override {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < count; ++i) p[i] = 0.0f;
  }
  void Copy(float* dst, const float* src, size_t count) override { std::memcpy(dst, src, count * sizeof(float)); }
  Status Sync() override { return Status::Ok(); }

  void EncoderForward(float* out, const int32_t* tokens, const int32_t* positions, const float* wte, const float* wpe, int B, int T,
                      int C) override {
    cpu::EncoderForward(out, tokens, positions, wte, wpe, B, T, C);
  }
  void EncoderBackward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int B, int T,
                       int C) override {
    cpu::EncoderBackward(dwte, dwpe, dout, tokens, B, T, C);
  }
  void LayerNormForward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b,
                        int N, int C) override {
    cpu::LayerNormForward(out, mean, rstd, inp, w, b, N, C);
  }
  void LayerNormBackward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                         const float* mean, const float* rstd, int N, int C) override {
    cpu::LayerNormBackward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
  }
  void MatmulForward(float* out, const float* inp, const float* w, const float* bias, int N, int IC,
                     int OC) override {
    cpu::MatmulForward(out, inp, w, bias, N, IC, OC);
  }
  void MatmulForwardHalf(float* out, const float* inp, const uint16_t* w16, const float* bias, int N, int IC,
                         int OC) override {
    cpu::MatmulForwardHalf(out, inp, w16, bias, N, IC, OC);
  }
  size_t PackedMatmulFloats(int IC, int OC, WeightDtype dtype) const override {
    return cpu::PackedMatmulFloats(IC, OC, dtype);
  }
  void PackMatmulWeight(float* packed, const float* w, int IC, int OC, WeightDtype dtype) override {
    cpu::PackMatmulWeight(packed, w, IC, OC, dtype);
  }
  void MatmulForwardPacked(float* out, const float* inp, const float* packed, const float* bias, int N, int IC,
                           int OC, WeightDtype dtype) override {
    cpu::MatmulForwardPacked(out, inp, packed, bias, N, IC, OC, dtype);
  }
  void MatmulBackward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w,
                      int N, int IC, int OC) override {
    cpu::MatmulBackward(dinp, dw, dbias, dout, inp, w, N, IC, OC);
  }
  void AttentionForward(float* out, float* att, const float* qkv, int B, int T, int C, int NH) override {
    cpu::AttentionForward(out, att, qkv, B, T, C, NH);
  }
  void AttentionBackward(float* dqkv, float* datt, const float* dout, const float* qkv, const float* att, int B,
                         int T, int C, int NH) override {
    cpu::AttentionBackward(dqkv, datt, dout, qkv, att, B, T, C, NH);
  }
  void AttentionDecode(float* out, const float* q, const float* k_cache, const float* v_cache, const int32_t* pos,
                       float* scratch, int B, int maxT, int C, int NH) override {
    cpu::AttentionDecode(out, q, k_cache, v_cache, pos, scratch, B, maxT, C, NH);
  }
  void StoreHalf(uint16_t* dst, const float* src, size_t n) override { FloatToF16N(src, dst, n); }
  void AttentionDecodeHalfKv(float* out, const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                             const int32_t* pos, const int32_t* host_slots, float* scratch, int N, int maxT, int C,
                             int NH) override {
    cpu::AttentionDecodeHalfKv(out, q, k_cache, v_cache, pos, scratch, N, maxT, C, NH, host_slots);
  }
  void AttentionDecodeSlots(float* out, const float* q, const float* k_cache, const float* v_cache,
                            const int32_t* pos, const int32_t* host_slots, float* scratch, int N, int maxT, int C,
                            int NH) override {
    cpu::AttentionDecode(out, q, k_cache, v_cache, pos, scratch, N, maxT, C, NH, host_slots);
  }
  void GeluForward(float* out, const float* inp, size_t n) override { cpu::GeluForward(out, inp, n); }
  void GeluBackward(float* dinp, const float* inp, const float* dout, size_t n) override {
    cpu::GeluBackward(dinp, inp, dout, n);
  }
  void ResidualForward(float* out, const float* a, const float* b, size_t n) override {
    cpu::ResidualForward(out, a, b, n);
  }
  void SoftmaxCrossEntropyForward(float* losses, float* probs, const float* logits, const int32_t* targets, int N,
                                  int V, int Vp) override {
    cpu::SoftmaxCrossEntropyForward(losses, probs, logits, targets, N, V, Vp);
  }
  void SoftmaxCrossEntropyBackward(float* dlogits, const float* probs, const int32_t* targets, float dloss, int N,
                                   int V, int Vp) override {
    cpu::SoftmaxCrossEntropyBackward(dlogits, probs, targets, dloss, N, V, Vp);
  }
  void AdamW(float* params, const float* grads, float* m, float* v, const uint8_t* decay_mask, size_t n,
             const AdamWParams& p) override {
    cpu::AdamW(params, grads, m, v, decay_mask, n, p);
  }
  double SumSquares(const float* x, size_t n) override { return cpu::SumSquares(x, n); }
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend(int threads) { return std::make_unique<CpuBackend>(threads); }

Result<std::unique_ptr<Backend>> LoadCudaBackend();  // backend/cuda_plugin.cc

Result<std::unique_ptr<Backend>> MakeBackend(const std::string& name, int threads) {
  if (threads < 0 || threads > kMaxThreads)
    return InvalidArgument("--threads must be in [0, " + std::to_string(kMaxThreads) + "]");
  if (name == "cpu") return MakeCpuBackend(threads);
  if (name == "cuda") return LoadCudaBackend();
  return InvalidArgument("--device: unknown device '" + name + "' (expected cpu or cuda)");
}

}  // namespace keel
