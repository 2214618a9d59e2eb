// pointwise.cu: GELU (tanh form, as GPT-2) forward/backward, the residual add, and the bias broadcast that
// starts a biased matmul. Grid-stride loops; every element is independent, so results do not depend on the launch.
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/cuda_ops.h"

namespace keel::cuda {
namespace {

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr int kThreads = 256;

#define KEEL_GRID_STRIDE(i, n)                                                                       \
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<size_t>(gridDim.x) * blockDim.x)

__global__ void GeluForwardKernel(float* out, const float* inp, size_t n) {
  KEEL_GRID_STRIDE(i, n) {
    const float x = inp[i];
    const float u = kGeluScale * (x + 0.044715f * x * x * x);
    out[i] = 0.5f * x * (1.0f + tanhf(u));
  }
}

__global__ void GeluBackwardKernel(float* dinp, const float* inp, const float* dout, size_t n) {
  KEEL_GRID_STRIDE(i, n) {
    const float x = inp[i];
    const float u = kGeluScale * (x + 0.044715f * x * x * x);
    const float th = tanhf(u);
    const float sech2 = 1.0f - th * th;
    const float grad = 0.5f * (1.0f + th) + 0.5f * x * sech2 * kGeluScale * (1.0f + 3.0f * 0.044715f * x * x);
    dinp[i] += grad * dout[i];
  }
}

__global__ void ResidualKernel(float* out, const float* a, const float* b, size_t n) {
  KEEL_GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}

__global__ void BroadcastRowsKernel(float* out, const float* bias, size_t total, int C) {
  KEEL_GRID_STRIDE(i, total) out[i] = bias[i % C];
}

}  // namespace

cudaError_t GeluForward(float* out, const float* inp, size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  GeluForwardKernel<<<GridFor(n, kThreads), kThreads, 0, stream>>>(out, inp, n);
  return cudaGetLastError();
}

cudaError_t GeluBackward(float* dinp, const float* inp, const float* dout, size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  GeluBackwardKernel<<<GridFor(n, kThreads), kThreads, 0, stream>>>(dinp, inp, dout, n);
  return cudaGetLastError();
}

cudaError_t ResidualForward(float* out, const float* a, const float* b, size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  ResidualKernel<<<GridFor(n, kThreads), kThreads, 0, stream>>>(out, a, b, n);
  return cudaGetLastError();
}

cudaError_t BroadcastRows(float* out, const float* bias, int N, int C, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(N) * C;
  if (total == 0) return cudaSuccess;
  BroadcastRowsKernel<<<GridFor(total, kThreads), kThreads, 0, stream>>>(out, bias, total, C);
  return cudaGetLastError();
}

}  // namespace keel::cuda
