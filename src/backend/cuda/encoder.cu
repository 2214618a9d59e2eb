// encoder.cu: token + position embedding lookup and its backward, without atomics.
// The wte scatter-add is done per (distinct token, channel): the host groups rows by token (BucketTokens, in
// cuda_backend.cc) and one thread adds a token's rows for one channel in increasing row order — the order the
// CPU reference uses, so the sums are the CPU's bit for bit. The wpe gradient is a plain per-(t, c) loop over b.
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/cuda_ops.h"

namespace keel::cuda {
namespace {

__global__ void EncoderForwardKernel(float* out, const int32_t* tokens, const int32_t* positions, const float* wte,
                                     const float* wpe, int T, int C, size_t total) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / C, c = i % C;
    const size_t tok = static_cast<size_t>(tokens[n]);
    const size_t pos = static_cast<size_t>(positions ? positions[n] : static_cast<int>(n % T));
    out[i] = wte[tok * C + c] + wpe[pos * C + c];
  }
}

// grid (n_uniq, ceil(C / blockDim)): block u, channel c.
__global__ void WteBackwardKernel(float* dwte, const float* dout, const int32_t* uniq, const int32_t* offsets,
                                  const int32_t* rows, int C) {
  const int u = blockIdx.x;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float* dst = dwte + static_cast<size_t>(uniq[u]) * C + c;
  float acc = *dst;
  for (int i = offsets[u]; i < offsets[u + 1]; ++i) acc += dout[static_cast<size_t>(rows[i]) * C + c];
  *dst = acc;
}

__global__ void WpeBackwardKernel(float* dwpe, const float* dout, int B, int T, int C) {
  const size_t total = static_cast<size_t>(T) * C;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float acc = dwpe[i];
    for (int b = 0; b < B; ++b) acc += dout[static_cast<size_t>(b) * total + i];
    dwpe[i] = acc;
  }
}

}  // namespace

cudaError_t EncoderForward(float* out, const int32_t* tokens, const int32_t* positions, const float* wte,
                           const float* wpe, int B, int T, int C, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(B) * T * C;
  if (total == 0) return cudaSuccess;
  EncoderForwardKernel<<<GridFor(total, 256), 256, 0, stream>>>(out, tokens, positions, wte, wpe, T, C, total);
  return cudaGetLastError();
}

cudaError_t EncoderBackward(float* dwte, float* dwpe, const float* dout, const int32_t* uniq, const int32_t* offsets,
                            const int32_t* rows, int n_uniq, int B, int T, int C, cudaStream_t stream) {
  if (C <= 0 || B <= 0 || T <= 0) return cudaSuccess;
  constexpr int kThreads = 128;
  if (n_uniq > 0) {
    dim3 grid(static_cast<unsigned>(n_uniq), static_cast<unsigned>((C + kThreads - 1) / kThreads));
    WteBackwardKernel<<<grid, kThreads, 0, stream>>>(dwte, dout, uniq, offsets, rows, C);
  }
  const size_t tc = static_cast<size_t>(T) * C;
  WpeBackwardKernel<<<GridFor(tc, 256), 256, 0, stream>>>(dwpe, dout, B, T, C);
  return cudaGetLastError();
}

}  // namespace keel::cuda
