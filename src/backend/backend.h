// backend.h: the interface through which all of keel's math runs (after ggml's backends and llm.c's kernels).
//
// A Backend owns device memory (Alloc/Free/Upload/Download) and implements the model's ops on pointers it
// allocated. The CPU backend is the readable reference and the oracle for every other backend; a CUDA backend
// implements the same ops on device pointers. SupportsOp() is the capability query: callers (and the
// conformance test) ask before using an op.
//
// Conventions (all ops):
//  - fp32 tensors, row-major, contiguous unless a stride is given. N = number of rows (B*T), C = channels.
//  - Linear weights are stored [out, in] (PyTorch nn.Linear layout): out = inp @ W^T + b.
//  - Backward ops ACCUMULATE (+=) into parameter gradients and into input gradients, like llm.c, so the
//    caller zeroes gradient buffers once per micro-batch. Forward ops overwrite their outputs.
//  - Determinism: every op's result is a function of its inputs only. In particular reductions across rows
//    (bias and LayerNorm-gain gradients, embedding scatter-add) are partitioned by channel, never by row, so
//    results do not depend on the thread count. This is what lets N workers reproduce one worker bit-for-bit.
// Thread safety: a Backend instance is used by one thread at a time.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cassert>
#include <memory>
#include <string>

#include "core/check.h"
#include "core/status.h"

namespace keel {

enum class Op {
  kEncoderForward, kEncoderBackward,
  kLayerNormForward, kLayerNormBackward,
  kMatmulForward, kMatmulBackward,
  kAttentionForward, kAttentionBackward, kAttentionDecode,
  kGeluForward, kGeluBackward,
  kResidualForward,
  kSoftmaxCrossEntropyForward, kSoftmaxCrossEntropyBackward, kSoftmaxForward,
  kAdamW,
  kMatmulForwardHalf,
  kRoundThroughFixedPoint,  // device-memory backends only (host memory: train/exact_sum.h directly)
  kMatmulForwardPacked,     // PackedMatmulFloats / PackMatmulWeight / MatmulForwardPacked (f32, f16)
  kMatmulForwardPackedBf16, // the same with WeightDtype::kBF16
  kAttentionDecodeHalfKv,   // StoreHalf / AttentionDecodeHalfKv: decode attention over an IEEE f16 KV cache
  kCount
};
const char* OpName(Op op);

// How a decoding copy of the weight matrices stores its values (DecodeState, MatmulForwardPacked). kBF16 also
// rounds the product's inputs to bfloat16 (the products are then exact in fp32 and summed in fp32), as GPUs'
// tensor cores and llama.cpp's CPU bf16 path do.
enum class WeightDtype { kF32, kF16, kBF16 };
const char* WeightDtypeName(WeightDtype d);  // "f32", "f16", "bf16"

struct AdamWParams {
  float lr, beta1, beta2, eps, weight_decay;
  int64_t t;           // 1-based step count for bias correction
  float grad_scale;    // gradients are multiplied by this first (clipping / averaging)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string Name() const = 0;
  virtual bool SupportsOp(Op op) const = 0;
  // CPU threads for this backend's host work (n < 1 means 1). For the CPU backend this is OpenMP's setting of
  // the *calling OS thread* (libgomp keeps it per thread, not per backend object): the last SetThreads on a thread
  // holds for every CPU backend used from that thread, and a backend used from another thread must be given its
  // count again there (serve's engine thread does). Results do not depend on the count (see matmul.cc).
  virtual void SetThreads(int n) = 0;
  // True when device pointers are host pointers (the CPU backend): callers may then read and write buffers
  // in place instead of staging copies.
  virtual bool host_memory() const = 0;

  // Memory. Alloc returns zeroed memory or an error (out of memory).
  virtual Result<float*> Alloc(size_t count) = 0;
  virtual void Free(float* p) = 0;
  virtual Result<int32_t*> AllocInt(size_t count) = 0;
  virtual void FreeInt(int32_t* p) = 0;
  virtual void UploadInt(int32_t* dst, const int32_t* host, size_t count) = 0;
  virtual void Upload(float* dst, const float* host, size_t count) = 0;
  virtual void Download(float* host, const float* src, size_t count) = 0;
  virtual void Zero(float* p, size_t count) = 0;
  virtual void Copy(float* dst, const float* src, size_t count) = 0;
  // Finishes queued work (no-op on CPU). Returns device errors.
  virtual Status Sync() = 0;

  // out[N,C] = wte[tokens[n]] + wpe[pos(n)], pos(n) = positions ? positions[n] : n % T. tokens/positions are
  // device int32 buffers of N = B*T entries.
  virtual void EncoderForward(float* out, const int32_t* tokens, const int32_t* positions, const float* wte, const float* wpe, int B, int T,
                              int C) = 0;
  virtual void EncoderBackward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int B, int T,
                               int C) = 0;
  // out = (inp - mean) * rstd * w + b; mean and rstd [N] are saved for backward.
  virtual void LayerNormForward(float* out, float* mean, float* rstd, const float* inp, const float* w,
                                const float* b, int N, int C) = 0;
  virtual void LayerNormBackward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                                 const float* w, const float* mean, const float* rstd, int N, int C) = 0;
  // out[N,OC] = inp[N,IC] @ w[OC,IC]^T + bias[OC] (bias may be null).
  virtual void MatmulForward(float* out, const float* inp, const float* w, const float* bias, int N, int IC,
                             int OC) = 0;
  // MatmulForward with the weights stored as IEEE f16 (w16 [OC,IC], packed two per float in a buffer from Alloc
  // and uploaded as floats): decoding reads half the weight bytes. Called only where
  // SupportsOp(kMatmulForwardHalf).
  virtual void MatmulForwardHalf(float* /*out*/, const float* /*inp*/, const uint16_t* /*w16*/, const float* /*bias*/,
                                 int /*N*/, int /*IC*/, int /*OC*/) {
    KEEL_CHECK(false, "MatmulForwardHalf on a backend that does not support it");
  }
  // Weights repacked once for many forward products (decoding), in a layout of the backend's choosing.
  // PackedMatmulFloats: the size, in floats, of the packed form of an [OC, IC] weight stored as `dtype` (f16 and
  // bf16 rounded to nearest even). PackMatmulWeight writes it into `packed` (a buffer from Alloc of that size) from
  // w. MatmulForwardPacked then equals MatmulForward(out, inp, w, bias, N, IC, OC) on w's rounding to dtype (and,
  // for kBF16, on inp's rounding to bfloat16) up to the order of summation; each output's sum must not depend on
  // N, on the other rows or on the thread count, so that a batched decode step gives every row what a step of that
  // row alone gives. Called only where SupportsOp(kMatmulForwardPacked), and for kBF16 where
  // SupportsOp(kMatmulForwardPackedBf16).
  virtual size_t PackedMatmulFloats(int /*IC*/, int /*OC*/, WeightDtype /*dtype*/) const { return 0; }
  virtual void PackMatmulWeight(float* /*packed*/, const float* /*w*/, int /*IC*/, int /*OC*/, WeightDtype /*dtype*/) {
    KEEL_CHECK(false, "PackMatmulWeight on a backend that does not support it");
  }
  virtual void MatmulForwardPacked(float* /*out*/, const float* /*inp*/, const float* /*packed*/,
                                   const float* /*bias*/, int /*N*/, int /*IC*/, int /*OC*/, WeightDtype /*dtype*/) {
    KEEL_CHECK(false, "MatmulForwardPacked on a backend that does not support it");
  }
  // dinp += dout @ w; dw += dout^T @ inp; dbias += sum_rows(dout). dbias may be null; dinp may be null.
  virtual void MatmulBackward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp,
                              const float* w, int N, int IC, int OC) = 0;
  // Causal multi-head attention. qkv [B,T,3C] (q|k|v, heads contiguous within each); out [B,T,C];
  // att [B,NH,T,T] holds the softmax probabilities for backward.
  virtual void AttentionForward(float* out, float* att, const float* qkv, int B, int T, int C, int NH) = 0;
  // dqkv += ...; datt is scratch of the same size as att.
  virtual void AttentionBackward(float* dqkv, float* datt, const float* dout, const float* qkv, const float* att,
                                 int B, int T, int C, int NH) = 0;
  // One new position per sequence against a KV cache. q [B,C] for positions pos[b]; k_cache/v_cache
  // [B, maxT, C] already hold positions 0..pos[b] (inclusive); out [B,C]. scratch >= B*NH*maxT floats.
  virtual void AttentionDecode(float* out, const float* q, const float* k_cache, const float* v_cache,
                               const int32_t* pos, float* scratch, int B, int maxT, int C, int NH) = 0;
  // AttentionDecodeSlots over a KV cache held as IEEE f16 (half the bytes each decode row reads: llama.cpp's
  // default cache type). Must equal AttentionDecodeSlots on the caches' values converted to fp32 (the conversion
  // is exact). host_slots may be null (row i attends slot i). StoreHalf writes n values rounded to f16 (nearest
  // even) at dst. Called only where SupportsOp(kAttentionDecodeHalfKv).
  virtual void StoreHalf(uint16_t* /*dst*/, const float* /*src*/, size_t /*n*/) {
    KEEL_CHECK(false, "StoreHalf on a backend that does not support it");
  }
  virtual void AttentionDecodeHalfKv(float* /*out*/, const float* /*q*/, const uint16_t* /*k_cache*/,
                                     const uint16_t* /*v_cache*/, const int32_t* /*pos*/,
                                     const int32_t* /*host_slots*/, float* /*scratch*/, int /*N*/, int /*maxT*/,
                                     int /*C*/, int /*NH*/) {
    KEEL_CHECK(false, "AttentionDecodeHalfKv on a backend that does not support it");
  }
  // AttentionDecode for N rows where row i attends KV-cache slot host_slots[i] (a host array) instead of slot i.
  // Several rows may share a slot (a chunk of one prompt): row i sees that slot's positions 0..pos[i].
  // scratch >= N*NH*maxT floats. The default runs one AttentionDecode per row; backends may do better.
  virtual void AttentionDecodeSlots(float* out, const float* q, const float* k_cache, const float* v_cache,
                                    const int32_t* pos, const int32_t* host_slots, float* scratch, int N, int maxT,
                                    int C, int NH) {
    const size_t slot_stride = static_cast<size_t>(maxT) * C;
    for (int i = 0; i < N; ++i)
      AttentionDecode(out + static_cast<size_t>(i) * C, q + static_cast<size_t>(i) * C,
                      k_cache + host_slots[i] * slot_stride, v_cache + host_slots[i] * slot_stride, pos + i, scratch,
                      1, maxT, C, NH);
  }
  virtual void GeluForward(float* out, const float* inp, size_t n) = 0;
  virtual void GeluBackward(float* dinp, const float* inp, const float* dout, size_t n) = 0;
  virtual void ResidualForward(float* out, const float* a, const float* b, size_t n) = 0;
  // losses[n] = -log softmax(logits[n])[targets[n]] over the first V of Vp columns (Vp is the padded row
  // stride); probs[N,Vp] receives the softmax.
  virtual void SoftmaxCrossEntropyForward(float* losses, float* probs, const float* logits, const int32_t* targets,
                                          int N, int V, int Vp) = 0;
  // dlogits = (probs - onehot(target)) * dloss (written, not accumulated; padded columns set to 0).
  virtual void SoftmaxCrossEntropyBackward(float* dlogits, const float* probs, const int32_t* targets, float dloss,
                                           int N, int V, int Vp) = 0;
  // In-place AdamW over n parameters. decay_mask[i] != 0 applies weight decay (may be null: decay all).
  virtual void AdamW(float* params, const float* grads, float* m, float* v, const uint8_t* decay_mask, size_t n,
                     const AdamWParams& p) = 0;
  // Sum of squares of x in double (for gradient-norm clipping); deterministic for a given n.
  virtual double SumSquares(const float* x, size_t n) = 0;
  // Rounds every finite x[i] in place through keel's fixed-point gradient format, bit for bit as
  // RoundThroughFixedPoint (train/exact_sum.h) does on the host, and returns how many elements are not finite
  // (left unchanged). Lets a one-worker deterministic step keep its gradient on the device instead of copying
  // it to the host and back. Only where SupportsOp(Op::kRoundThroughFixedPoint); errors as Sync().
  virtual Result<size_t> RoundThroughFixedPoint(float* x, size_t n) {
    (void)x;
    (void)n;
    return Unavailable(Name() + " backend: round_through_fixed_point is not supported");
  }
};

// The CPU reference backend (OpenBLAS GEMM + OpenMP elementwise ops).
std::unique_ptr<Backend> MakeCpuBackend(int threads);
// The most CPU threads a backend accepts (--threads): libgomp crashes or hangs creating tens of thousands.
inline constexpr int kMaxThreads = 1024;
// "cpu" or "cuda"; returns an error if the name is unknown, the device is unavailable, or threads is outside
// [0, kMaxThreads] (0: one thread, until the caller's SetThreads).
Result<std::unique_ptr<Backend>> MakeBackend(const std::string& name, int threads);

}  // namespace keel
