// cuda_common.cuh: device helpers shared by keel's .cu files (warp/block reductions, launch sizes).
// Every reduction here has a fixed order for a given blockDim, so a kernel's result depends only on its inputs
// and launch shape, never on scheduling.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace keel::cuda {

constexpr int kWarp = 32;

// Blocks for a grid-stride loop over n items: enough to fill an H100 (132 SMs) several times, capped.
inline unsigned GridFor(size_t n, int threads, size_t cap = 132 * 16) {
  size_t blocks = (n + static_cast<size_t>(threads) - 1) / static_cast<size_t>(threads);
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

template <typename T>
__device__ __forceinline__ T WarpSum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum / max (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `shared` holds 32 elements; the function synchronises before returning, so it may be called again at once.
template <typename T>
__device__ T BlockSum(T v, T* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = WarpSum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T total = lane < nwarps ? shared[lane] : T(0);
  total = WarpSum(total);
  __syncthreads();
  return total;
}

__device__ inline float BlockMax(float v, float* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = WarpMax(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float m = lane < nwarps ? shared[lane] : -INFINITY;
  m = WarpMax(m);
  __syncthreads();
  return m;
}

}  // namespace keel::cuda
