// fixed_point.cu: rounding a gradient through keel's fixed-point format on the device (Backend::
// RoundThroughFixedPoint), bit for bit as train/exact_sum.cc does on the host: x = g * 2^bits in double (exact),
// clamped to +-(2^(16 + bits) - 16) (the host's bound: exact_sum.cc), rounded to an integer ties-to-even (as llrint), scaled back and rounded once
// to float. Non-finite elements are left unchanged and counted (one atomic add per block: a count, so the order
// of the adds does not matter).
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/cuda_ops.h"

namespace keel::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void RoundThroughFixedPointKernel(float* g, size_t n, double scale, double inv, double limit,
                                             unsigned long long* nonfinite) {
  __shared__ unsigned long long shared[32];
  unsigned long long bad = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float gi = g[i];
    double x = __dmul_rn(static_cast<double>(gi), scale);
    if (!isfinite(x)) {
      ++bad;
      continue;
    }
    x = x > limit ? limit : (x < -limit ? -limit : x);
    // Through a 64-bit integer as llrint: -0.3 rounds to +0 (rint would give -0.0).
    g[i] = __double2float_rn(__dmul_rn(static_cast<double>(__double2ll_rn(x)), inv));
  }
  bad = BlockSum(bad, shared);
  if (threadIdx.x == 0 && bad > 0) atomicAdd(nonfinite, bad);
}

}  // namespace

cudaError_t RoundThroughFixedPoint(float* g, size_t n, int fraction_bits, unsigned long long* nonfinite,
                                   cudaStream_t stream) {
  cudaError_t e = cudaMemsetAsync(nonfinite, 0, sizeof(unsigned long long), stream);
  if (e != cudaSuccess || n == 0) return e;
  const double scale = ldexp(1.0, fraction_bits), inv = ldexp(1.0, -fraction_bits);
  const double limit = ldexp(1.0, 16 + fraction_bits) - 16.0;  // as exact_sum.cc's kLimit
  RoundThroughFixedPointKernel<<<GridFor(n, kThreads), kThreads, 0, stream>>>(g, n, scale, inv, limit, nonfinite);
  return cudaGetLastError();
}

}  // namespace keel::cuda
