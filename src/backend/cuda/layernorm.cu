// layernorm.cu: LayerNorm forward/backward (eps 1e-5, biased variance) and the deterministic column sums that
// the LayerNorm gain/bias gradients and the matmul bias gradient need.
//
// Rows are independent: one warp per row, two-pass mean/variance like the CPU reference. Column sums (reductions
// over rows) never use atomics: rows are cut into fixed chunks of kRowsPerChunk, one thread sums its channel over
// a chunk in row order into a partial, and a second kernel adds a channel's partials in chunk order. The order
// depends on N only, so results repeat bit for bit.
#include <algorithm>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/cuda_ops.h"

namespace keel::cuda {
namespace {

constexpr int kRowsPerChunk = 32;
constexpr int kColThreads = 128;
constexpr int kRowThreads = 256;  // 8 warps = 8 rows per block

int Chunks(int N) { return (N + kRowsPerChunk - 1) / kRowsPerChunk; }

__global__ void LayerNormForwardKernel(float* out, float* mean, float* rstd, const float* inp, const float* w,
                                       const float* b, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const float* x = inp + static_cast<size_t>(row) * C;
  float s = 0.0f;
  for (int c = lane; c < C; c += kWarp) s += x[c];
  const float m = WarpSum(s) / C;
  float v = 0.0f;
  for (int c = lane; c < C; c += kWarp) {
    const float d = x[c] - m;
    v += d * d;
  }
  v = WarpSum(v) / C;
  const float r = 1.0f / sqrtf(v + 1e-5f);
  float* o = out + static_cast<size_t>(row) * C;
  for (int c = lane; c < C; c += kWarp) o[c] = (x[c] - m) * r * w[c] + b[c];
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = r;
  }
}

__global__ void LayerNormBackwardInputKernel(float* dinp, const float* dout, const float* inp, const float* w,
                                             const float* mean, const float* rstd, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const float* x = inp + static_cast<size_t>(row) * C;
  const float* d = dout + static_cast<size_t>(row) * C;
  const float m = mean[row], s = rstd[row];
  float dm = 0.0f, dnm = 0.0f;
  for (int c = lane; c < C; c += kWarp) {
    const float norm = (x[c] - m) * s;
    const float dnorm = w[c] * d[c];
    dm += dnorm;
    dnm += dnorm * norm;
  }
  dm = WarpSum(dm) / C;
  dnm = WarpSum(dnm) / C;
  float* di = dinp + static_cast<size_t>(row) * C;
  for (int c = lane; c < C; c += kWarp) {
    const float norm = (x[c] - m) * s;
    const float dnorm = w[c] * d[c];
    di[c] += (dnorm - dm - norm * dnm) * s;
  }
}

// grid (ceil(C / kColThreads), min(chunks, 65535)); block row y handles chunks y, y + gridDim.y, ...
// partial_w/partial_b: [chunks, C]. partial_w may be null (plain sums).
__global__ void ColumnPartialsKernel(float* partial_w, float* partial_b, const float* dout, const float* inp,
                                     const float* mean, const float* rstd, int N, int C, int chunks) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  for (int k = blockIdx.y; k < chunks; k += gridDim.y) {
    const int r0 = k * kRowsPerChunk;
    const int r1 = min(r0 + kRowsPerChunk, N);
    float sw = 0.0f, sb = 0.0f;
    for (int r = r0; r < r1; ++r) {
      const size_t i = static_cast<size_t>(r) * C + c;
      const float d = dout[i];
      if (partial_w) sw += (inp[i] - mean[r]) * rstd[r] * d;
      sb += d;
    }
    const size_t o = static_cast<size_t>(k) * C + c;
    if (partial_w) partial_w[o] = sw;
    partial_b[o] = sb;
  }
}

// acc_w/acc_b[c] += sum over chunks (in order) of the partials. acc_w may be null.
__global__ void ColumnReduceKernel(float* acc_w, float* acc_b, const float* partial_w, const float* partial_b,
                                   int chunks, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sw = 0.0f, sb = 0.0f;
  for (int k = 0; k < chunks; ++k) {
    const size_t o = static_cast<size_t>(k) * C + c;
    if (acc_w) sw += partial_w[o];
    sb += partial_b[o];
  }
  if (acc_w) acc_w[c] += sw;
  acc_b[c] += sb;
}

cudaError_t Columns(float* acc_w, float* acc_b, const float* dout, const float* inp, const float* mean,
                    const float* rstd, int N, int C, float* scratch, cudaStream_t stream) {
  if (N <= 0 || C <= 0) return cudaSuccess;
  const int chunks = Chunks(N);
  float* partial_b = scratch;
  float* partial_w = acc_w ? scratch + static_cast<size_t>(chunks) * C : nullptr;
  dim3 grid(static_cast<unsigned>((C + kColThreads - 1) / kColThreads), static_cast<unsigned>(std::min(chunks, 65535)));
  ColumnPartialsKernel<<<grid, kColThreads, 0, stream>>>(partial_w, partial_b, dout, inp, mean, rstd, N, C, chunks);
  ColumnReduceKernel<<<(C + kColThreads - 1) / kColThreads, kColThreads, 0, stream>>>(acc_w, acc_b, partial_w,
                                                                                      partial_b, chunks, C);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LayerNormForward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b,
                             int N, int C, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  const int rows_per_block = kRowThreads / kWarp;
  LayerNormForwardKernel<<<(N + rows_per_block - 1) / rows_per_block, kRowThreads, 0, stream>>>(out, mean, rstd, inp,
                                                                                               w, b, N, C);
  return cudaGetLastError();
}

size_t LayerNormBackwardScratchFloats(int N, int C) { return 2 * static_cast<size_t>(Chunks(N)) * C; }

cudaError_t LayerNormBackward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                              const float* mean, const float* rstd, int N, int C, float* scratch,
                              cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  const int rows_per_block = kRowThreads / kWarp;
  LayerNormBackwardInputKernel<<<(N + rows_per_block - 1) / rows_per_block, kRowThreads, 0, stream>>>(
      dinp, dout, inp, w, mean, rstd, N, C);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  return Columns(dw, db, dout, inp, mean, rstd, N, C, scratch, stream);
}

size_t ColumnSumsScratchFloats(int N, int C) { return static_cast<size_t>(Chunks(N)) * C; }

cudaError_t AccumulateColumnSums(float* acc, const float* x, int N, int C, float* scratch, cudaStream_t stream) {
  return Columns(nullptr, acc, x, nullptr, nullptr, nullptr, N, C, scratch, stream);
}

}  // namespace keel::cuda
