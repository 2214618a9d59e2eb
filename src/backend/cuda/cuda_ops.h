// cuda_ops.h: host-side launchers of keel's CUDA kernels (one group per .cu file), called by CudaBackend
// (cuda_backend.cc). Every launcher enqueues on `stream`, returns cudaGetLastError() (launch errors only;
// execution errors surface at the next synchronisation), and computes what the CPU kernel of the same name in
// backend/cpu/ computes (see backend/backend.h for the semantics). Buffers are device pointers unless named
// host_*. `scratch` arguments are device float buffers of at least the size the matching *ScratchFloats()
// returns. Row/column counts are ints as in the Backend interface; offsets are computed in size_t.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace keel::cuda {

// encoder.cu
cudaError_t EncoderForward(float* out, const int32_t* tokens, const int32_t* positions, const float* wte,
                           const float* wpe, int B, int T, int C, cudaStream_t stream);
// dwte[uniq[u]] += sum over rows[offsets[u]..offsets[u+1]) of dout[row], in row order (n_uniq groups);
// dwpe[t] += sum over b of dout[b*T + t], in b order.
cudaError_t EncoderBackward(float* dwte, float* dwpe, const float* dout, const int32_t* uniq, const int32_t* offsets,
                            const int32_t* rows, int n_uniq, int B, int T, int C, cudaStream_t stream);

// layernorm.cu
cudaError_t LayerNormForward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b,
                             int N, int C, cudaStream_t stream);
size_t LayerNormBackwardScratchFloats(int N, int C);
cudaError_t LayerNormBackward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                              const float* mean, const float* rstd, int N, int C, float* scratch,
                              cudaStream_t stream);
// acc[c] += sum_n x[n*C + c] (bias gradients), in a fixed order that depends on N only.
size_t ColumnSumsScratchFloats(int N, int C);
cudaError_t AccumulateColumnSums(float* acc, const float* x, int N, int C, float* scratch, cudaStream_t stream);

// pointwise.cu
cudaError_t GeluForward(float* out, const float* inp, size_t n, cudaStream_t stream);
cudaError_t GeluBackward(float* dinp, const float* inp, const float* dout, size_t n, cudaStream_t stream);
cudaError_t ResidualForward(float* out, const float* a, const float* b, size_t n, cudaStream_t stream);
// out[n, c] = bias[c] for every row (the matmul's bias, before a beta = 1 GEMM).
cudaError_t BroadcastRows(float* out, const float* bias, int N, int C, cudaStream_t stream);

// attention.cu (the GEMMs around these are cuBLAS calls in cuda_backend.cc)
// att [BH, T, T] holds scaled scores Q K^T / sqrt(hs) (every entry); replaces each row t with the softmax over
// its causal entries j <= t and zeroes j > t.
cudaError_t CausalSoftmaxForward(float* att, int BH, int T, cudaStream_t stream);
// datt [BH, T, T] holds dP; replaces it with dS = P * (dP - sum_j P dP) on causal entries, 0 elsewhere.
cudaError_t CausalSoftmaxBackward(float* datt, const float* att, int BH, int T, cudaStream_t stream);
// slots (device, may be null = identity): row b reads KV-cache slot slots[b] (AttentionDecodeSlots).
cudaError_t AttentionDecode(float* out, const float* q, const float* k_cache, const float* v_cache,
                            const int32_t* pos, const int32_t* slots, float* scratch, int B, int maxT, int C, int NH,
                            cudaStream_t stream);

// loss.cu (both may run in place: probs == logits, dlogits == probs)
cudaError_t SoftmaxCrossEntropyForward(float* losses, float* probs, const float* logits, const int32_t* targets,
                                       int N, int V, int Vp, cudaStream_t stream);
cudaError_t SoftmaxCrossEntropyBackward(float* dlogits, const float* probs, const int32_t* targets, float dloss,
                                        int N, int V, int Vp, cudaStream_t stream);

// adamw.cu. bc1/bc2: the bias corrections 1 - beta^t, computed on the host as the CPU does.
cudaError_t AdamW(float* params, const float* grads, float* m, float* v, const uint8_t* decay_mask, size_t n,
                  float lr, float beta1, float beta2, float eps, float weight_decay, float grad_scale, float bc1,
                  float bc2, cudaStream_t stream);
// Per-chunk sums of squares in double: partial[i] = sum over x[i*kSumSquaresChunk ...] (fixed tree order);
// the caller adds the partials in order. SumSquaresChunks(n) partials.
constexpr size_t kSumSquaresChunk = size_t{1} << 16;
inline size_t SumSquaresChunks(size_t n) { return (n + kSumSquaresChunk - 1) / kSumSquaresChunk; }
cudaError_t SumSquaresPartials(double* partial, const float* x, size_t n, cudaStream_t stream);

// fixed_point.cu: Backend::RoundThroughFixedPoint with 2^-fraction_bits resolution; *nonfinite (device) receives
// the number of non-finite elements (zeroed first, on `stream`).
cudaError_t RoundThroughFixedPoint(float* g, size_t n, int fraction_bits, unsigned long long* nonfinite,
                                   cudaStream_t stream);

}  // namespace keel::cuda
