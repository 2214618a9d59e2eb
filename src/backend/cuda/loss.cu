// loss.cu: softmax + cross-entropy over the vocabulary (forward: one block per row; backward: elementwise).
// Both may run in place (probs == logits, dlogits == probs) like the CPU kernels: every element is read and then
// written by the same thread, and the target logit is read before the block's first write.
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/cuda_ops.h"

namespace keel::cuda {
namespace {

constexpr int kRowThreads = 512;

__global__ void SoftmaxXentForwardKernel(float* losses, float* probs, const float* logits, const int32_t* targets,
                                         int V, int Vp) {
  __shared__ float shared[32];
  const size_t n = blockIdx.x;
  const float* l = logits + n * Vp;
  float* p = probs + n * Vp;
  const bool want_loss = targets != nullptr && losses != nullptr;
  const float target_logit = want_loss ? l[targets[n]] : 0.0f;
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, l[i]);
  mx = BlockMax(mx, shared);  // synchronises: every read above happens before any write below
  float sum = 0.0f;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float e = expf(l[i] - mx);
    p[i] = e;
    sum += e;
  }
  sum = BlockSum(sum, shared);
  const float inv = 1.0f / sum;
  for (int i = threadIdx.x; i < V; i += blockDim.x) p[i] *= inv;
  for (int i = V + threadIdx.x; i < Vp; i += blockDim.x) p[i] = 0.0f;
  // log-softmax directly from the logits: finite even where the probability underflows.
  if (threadIdx.x == 0 && want_loss) losses[n] = -(target_logit - mx - logf(sum));
}

__global__ void SoftmaxXentBackwardKernel(float* dlogits, const float* probs, const int32_t* targets, float dloss,
                                          int V, int Vp, size_t total) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / Vp;
    const int c = static_cast<int>(i % Vp);
    float d = 0.0f;
    if (c < V) {
      d = __fmul_rn(probs[i], dloss);  // no FMA contraction: (p * dloss) - dloss, rounded as the CPU does
      if (c == targets[n]) d -= dloss;
    }
    dlogits[i] = d;
  }
}

}  // namespace

cudaError_t SoftmaxCrossEntropyForward(float* losses, float* probs, const float* logits, const int32_t* targets,
                                       int N, int V, int Vp, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  SoftmaxXentForwardKernel<<<static_cast<unsigned>(N), kRowThreads, 0, stream>>>(losses, probs, logits, targets, V,
                                                                                 Vp);
  return cudaGetLastError();
}

cudaError_t SoftmaxCrossEntropyBackward(float* dlogits, const float* probs, const int32_t* targets, float dloss,
                                        int N, int V, int Vp, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(N) * Vp;
  if (total == 0) return cudaSuccess;
  SoftmaxXentBackwardKernel<<<GridFor(total, 256), 256, 0, stream>>>(dlogits, probs, targets, dloss, V, Vp, total);
  return cudaGetLastError();
}

}  // namespace keel::cuda
