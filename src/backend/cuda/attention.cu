// attention.cu: the softmax parts of causal attention (forward and backward, one warp per row of the T x T
// matrix; the Q K^T and P V products around them are cuBLAS GEMMs in cuda_backend.cc) and KV-cached decode
// attention (one block per (sequence, head)). No atomics; every reduction has a fixed order.
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/cuda_ops.h"

namespace keel::cuda {
namespace {

constexpr int kRowThreads = 256;  // 8 rows per block
constexpr int kDecodeThreads = 128;

__global__ void CausalSoftmaxForwardKernel(float* att, size_t rows, int T) {
  const size_t r = blockIdx.x * static_cast<size_t>(blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= rows) return;
  const int t = static_cast<int>(r % T);
  float* p = att + r * T;
  float mx = -INFINITY;
  for (int j = lane; j <= t; j += kWarp) mx = fmaxf(mx, p[j]);
  mx = WarpMax(mx);
  float sum = 0.0f;
  for (int j = lane; j <= t; j += kWarp) {
    const float e = expf(p[j] - mx);
    p[j] = e;
    sum += e;
  }
  const float inv = 1.0f / WarpSum(sum);
  for (int j = lane; j <= t; j += kWarp) p[j] *= inv;
  for (int j = t + 1 + lane; j < T; j += kWarp) p[j] = 0.0f;
}

__global__ void CausalSoftmaxBackwardKernel(float* datt, const float* att, size_t rows, int T) {
  const size_t r = blockIdx.x * static_cast<size_t>(blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= rows) return;
  const int t = static_cast<int>(r % T);
  const float* p = att + r * T;
  float* d = datt + r * T;
  float dot = 0.0f;
  for (int j = lane; j <= t; j += kWarp) dot += p[j] * d[j];
  dot = WarpSum(dot);
  for (int j = lane; j <= t; j += kWarp) d[j] = p[j] * (d[j] - dot);
  for (int j = t + 1 + lane; j < T; j += kWarp) d[j] = 0.0f;
}

// One block per (b, h). scratch: [B*NH, maxT] scores. Row b reads cache slot slots ? slots[b] : b.
__global__ void AttentionDecodeKernel(float* out, const float* q, const float* k_cache, const float* v_cache,
                                      const int32_t* pos, const int32_t* slots, float* scratch, int maxT, int C,
                                      int NH) {
  __shared__ float shared[32];
  const int bh = blockIdx.x, b = bh / NH, h = bh % NH;
  const int hs = C / NH;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  const float scale = 1.0f / sqrtf(static_cast<float>(hs));
  const int len = pos[b] + 1;
  const float* qv = q + static_cast<size_t>(b) * C + h * hs;
  const size_t slot = static_cast<size_t>(slots ? slots[b] : b);
  const float* kc = k_cache + slot * maxT * C + h * hs;
  const float* vc = v_cache + slot * maxT * C + h * hs;
  float* s = scratch + static_cast<size_t>(bh) * maxT;
  for (int j = warp; j < len; j += nwarps) {
    const float* kr = kc + static_cast<size_t>(j) * C;
    float d = 0.0f;
    for (int i = lane; i < hs; i += kWarp) d += qv[i] * kr[i];
    d = WarpSum(d);
    if (lane == 0) s[j] = d * scale;
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < len; j += blockDim.x) mx = fmaxf(mx, s[j]);
  mx = BlockMax(mx, shared);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    const float e = expf(s[j] - mx);
    s[j] = e;
    sum += e;
  }
  sum = BlockSum(sum, shared);  // synchronises: every s[j] is written
  const float inv = 1.0f / sum;
  float* o = out + static_cast<size_t>(b) * C + h * hs;
  for (int i = threadIdx.x; i < hs; i += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < len; ++j) acc += (s[j] * inv) * vc[static_cast<size_t>(j) * C + i];
    o[i] = acc;
  }
}

}  // namespace

cudaError_t CausalSoftmaxForward(float* att, int BH, int T, cudaStream_t stream) {
  const size_t rows = static_cast<size_t>(BH) * T;
  if (rows == 0) return cudaSuccess;
  const size_t per_block = kRowThreads / kWarp;
  CausalSoftmaxForwardKernel<<<static_cast<unsigned>((rows + per_block - 1) / per_block), kRowThreads, 0, stream>>>(
      att, rows, T);
  return cudaGetLastError();
}

cudaError_t CausalSoftmaxBackward(float* datt, const float* att, int BH, int T, cudaStream_t stream) {
  const size_t rows = static_cast<size_t>(BH) * T;
  if (rows == 0) return cudaSuccess;
  const size_t per_block = kRowThreads / kWarp;
  CausalSoftmaxBackwardKernel<<<static_cast<unsigned>((rows + per_block - 1) / per_block), kRowThreads, 0, stream>>>(
      datt, att, rows, T);
  return cudaGetLastError();
}

cudaError_t AttentionDecode(float* out, const float* q, const float* k_cache, const float* v_cache,
                            const int32_t* pos, const int32_t* slots, float* scratch, int B, int maxT, int C, int NH,
                            cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  AttentionDecodeKernel<<<static_cast<unsigned>(B * NH), kDecodeThreads, 0, stream>>>(out, q, k_cache, v_cache, pos,
                                                                                     slots, scratch, maxT, C, NH);
  return cudaGetLastError();
}

}  // namespace keel::cuda
