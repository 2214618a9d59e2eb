// cpu_ops.h: the CPU reference kernels behind CpuBackend, one group per file (encoder, layernorm, matmul,
// attention, pointwise, loss, optimizer). Semantics are those documented in backend/backend.h.
// Parallelism is OpenMP with static schedules; no reduction is ever split across rows, so results are
// independent of the thread count.
#pragma once
#include <cstddef>
#include <cstdint>

#include "backend/backend.h"

namespace keel::cpu {

void EncoderForward(float* out, const int32_t* tokens, const int32_t* positions, const float* wte, const float* wpe, int B, int T, int C);
void EncoderBackward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int B, int T, int C);
void LayerNormForward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b, int N,
                      int C);
void LayerNormBackward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                       const float* mean, const float* rstd, int N, int C);
void MatmulForward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC);
void MatmulBackward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w, int N,
                    int IC, int OC);
// MatmulForward with IEEE f16 weights (matmul_half.cc).
void MatmulForwardHalf(float* out, const float* inp, const uint16_t* w, const float* bias, int N, int IC, int OC);
// MatmulForward from weights repacked into column panels, fp32, f16 or bf16 (packed_matmul.cc). Needs
// AVX2/FMA/F16C.
bool PackedMatmulSupported();
size_t PackedMatmulFloats(int IC, int OC, WeightDtype dtype);
void PackMatmulWeight(float* packed, const float* w, int IC, int OC, WeightDtype dtype);
void MatmulForwardPacked(float* out, const float* inp, const float* packed, const float* bias, int N, int IC, int OC,
                         WeightDtype dtype);
// bfloat16 as the packed bf16 product rounds its inputs: to nearest even, zeros and denormals to a signed zero
// (as AVX-512 BF16's VCVTNE2PS2BF16 does), NaN kept quiet. Not formats/half.h's FloatToBF16, which keeps
// denormals (the files keel writes hold them as they are).
uint16_t FloatToBf16Ftz(float f);
// The packed product's two kernels: 256-bit (AVX2/FMA/F16C) and 512-bit (AVX-512F; for bf16 AVX-512 BF16).
// Both give the same bits (for bf16, except where a partial sum falls below fp32's normal range: the BF16 dot
// product flushes it to zero).
// PackedMatmulIsa() is what MatmulForwardPacked uses: AVX-512 where the CPU has it, unless the environment sets
// KEEL_MAX_CPU_ISA=avx2 (read once; =avx512 keeps AVX-512F but not AVX-512 BF16). MatmulForwardPackedWith runs the one named (tests and benchmarks compare
// them); the caller checks PackedMatmulIsaSupported first.
enum class PackedIsa { kAvx2, kAvx512 };
PackedIsa PackedMatmulIsa();
bool PackedMatmulIsaSupported(PackedIsa isa, WeightDtype dtype = WeightDtype::kF32);
void MatmulForwardPackedWith(PackedIsa isa, float* out, const float* inp, const float* packed, const float* bias,
                             int N, int IC, int OC, WeightDtype dtype);
void AttentionForward(float* out, float* att, const float* qkv, int B, int T, int C, int NH);
void AttentionBackward(float* dqkv, float* datt, const float* dout, const float* qkv, const float* att, int B, int T,
                       int C, int NH);
// slots (host, may be null = identity): row b reads KV-cache slot slots[b].
void AttentionDecode(float* out, const float* q, const float* k_cache, const float* v_cache, const int32_t* pos,
                     float* scratch, int B, int maxT, int C, int NH, const int32_t* slots = nullptr);
// The same over IEEE f16 caches (converted exactly to fp32 as they are read; the same operations in the same
// order, so it equals AttentionDecode on the converted values bit for bit).
void AttentionDecodeHalfKv(float* out, const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                           const int32_t* pos, float* scratch, int B, int maxT, int C, int NH,
                           const int32_t* slots = nullptr);
void GeluForward(float* out, const float* inp, size_t n);
void GeluBackward(float* dinp, const float* inp, const float* dout, size_t n);
void ResidualForward(float* out, const float* a, const float* b, size_t n);
void SoftmaxCrossEntropyForward(float* losses, float* probs, const float* logits, const int32_t* targets, int N,
                                int V, int Vp);
void SoftmaxCrossEntropyBackward(float* dlogits, const float* probs, const int32_t* targets, float dloss, int N,
                                 int V, int Vp);
void AdamW(float* params, const float* grads, float* m, float* v, const uint8_t* decay_mask, size_t n,
           const AdamWParams& p);
double SumSquares(const float* x, size_t n);

// Column-sum helper shared by bias and LayerNorm-gain gradients: acc[c] += sum_n x[n*C + c], partitioned by
// channel so the sum order over n is fixed.
void AccumulateColumnSums(float* acc, const float* x, int N, int C);

}  // namespace keel::cpu
