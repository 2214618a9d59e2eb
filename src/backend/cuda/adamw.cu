// adamw.cu: the fused AdamW update (one pass over params, grads, m, v) and the sum of squares for gradient-norm
// clipping (double partials over fixed chunks, summed in chunk order by the caller: deterministic for a given n).
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/cuda_ops.h"

namespace keel::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void AdamWKernel(float* params, const float* grads, float* m, float* v, const uint8_t* decay_mask,
                            size_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                            float grad_scale, float bc1, float bc2) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float g = grads[i] * grad_scale;
    const float mi = beta1 * m[i] + (1.0f - beta1) * g;
    const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const float mhat = mi / bc1, vhat = vi / bc2;
    const float wd = (decay_mask == nullptr || decay_mask[i]) ? weight_decay : 0.0f;
    params[i] -= lr * (mhat / (sqrtf(vhat) + eps) + wd * params[i]);
  }
}

// One block per chunk of kSumSquaresChunk elements.
__global__ void SumSquaresKernel(double* partial, const float* x, size_t n) {
  __shared__ double shared[32];
  const size_t lo = blockIdx.x * kSumSquaresChunk;
  const size_t hi = lo + kSumSquaresChunk < n ? lo + kSumSquaresChunk : n;
  double s = 0.0;
  for (size_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const double d = x[i];
    s += d * d;
  }
  s = BlockSum(s, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

}  // namespace

cudaError_t AdamW(float* params, const float* grads, float* m, float* v, const uint8_t* decay_mask, size_t n,
                  float lr, float beta1, float beta2, float eps, float weight_decay, float grad_scale, float bc1,
                  float bc2, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  AdamWKernel<<<GridFor(n, kThreads), kThreads, 0, stream>>>(params, grads, m, v, decay_mask, n, lr, beta1, beta2,
                                                             eps, weight_decay, grad_scale, bc1, bc2);
  return cudaGetLastError();
}

cudaError_t SumSquaresPartials(double* partial, const float* x, size_t n, cudaStream_t stream) {
  const size_t chunks = SumSquaresChunks(n);
  if (chunks == 0) return cudaSuccess;
  SumSquaresKernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(partial, x, n);
  return cudaGetLastError();
}

}  // namespace keel::cuda
