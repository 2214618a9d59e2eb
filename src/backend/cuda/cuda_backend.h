// cuda_backend.h: the CUDA Backend (keel issue 6) — every op of backend/backend.h on device pointers.
//
// GEMMs (the linear layers, and attention's Q K^T / P V products) run in cuBLAS; everything else is keel's own
// kernels, one op group per .cu file beside this header (encoder, layernorm, attention, pointwise, loss, adamw),
// written to compute what the CPU reference (backend/cpu/) computes. Reductions across rows (bias and LayerNorm
// gain gradients, the wte/wpe scatter-add) have a fixed order that depends only on the shapes, never on the
// launch or timing, so a run on one GPU repeats bit for bit; results are close to, not bit-identical with, the
// CPU's (different summation orders, FMA contraction, cuBLAS).
//
// Memory: Alloc returns zeroed device memory; Upload/Download copy from/to pageable host memory (Download
// waits; Upload returns once the host buffer has been read). decay_mask in AdamW is a device pointer, like
// every other buffer argument (AttentionDecodeSlots' host_slots excepted, as documented in backend.h).
// Errors: a failed CUDA or cuBLAS call is recorded (the first one wins), printed once to stderr, makes later ops
// no-ops and Download fill its output with NaN (so a loss goes non-finite rather than silently wrong), and is
// returned by Sync(). Nothing exits or throws.
//
// Precision (CudaBackendOptions::matmul): kFp32 (default) is plain fp32 everywhere. kTf32 and kBf16 keep every
// buffer fp32 (fp32 master weights, fp32 activations) and let cuBLAS round GEMM inputs to TF32 / bf16 inside the
// tensor-core GEMM (CUBLAS_COMPUTE_32F_FAST_TF32 / _FAST_16BF, fp32 accumulate). This is the first step of the
// issue's bf16 mixed precision; bf16 activation storage (half the memory traffic) needs bf16 buffers in the
// Backend interface and is not done.
// Attention: cuBLAS strided-batched GEMMs with the T x T probability matrix materialised in `att` (the
// interface's contract: att is saved for backward). A fused flash-attention kernel is not done.
// Thread safety: like every Backend, one thread at a time.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace keel {

enum class CudaMatmulPrecision { kFp32, kTf32, kBf16 };
const char* CudaMatmulPrecisionName(CudaMatmulPrecision p);

struct CudaBackendOptions {
  int device = -1;  // CUDA device ordinal; -1: KEEL_LOCAL_RANK (or LOCAL_RANK) modulo the device count, else 0
  CudaMatmulPrecision matmul = CudaMatmulPrecision::kFp32;
  bool profile = false;  // per-op device time, printed to stderr when the backend is destroyed (op_profile.h)
};

// Options from the environment: KEEL_CUDA_DEVICE (an ordinal), KEEL_CUDA_MATMUL (fp32 | tf32 | bf16) and
// KEEL_CUDA_PROFILE (0 | 1).
// An unparsable value is an InvalidArgument naming the variable.
Result<CudaBackendOptions> CudaBackendOptionsFromEnv();

// kUnavailable "cuda: no device (cudaGetDeviceCount: ...)" when there is no usable GPU (or driver).
Result<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options);
// MakeCudaBackend(CudaBackendOptionsFromEnv()): what MakeBackend("cuda", ...) calls.
Result<std::unique_ptr<Backend>> MakeCudaBackend();

// The per-op device-time tables so far (KEEL_CUDA_PROFILE=1; see backend/cuda/op_profile.h); "" for a backend
// that is not a profiling CUDA backend.
std::string CudaOpProfileReport(Backend* backend);

// Host-side helper of EncoderBackward, exposed for tests: the rows of `tokens` grouped by token id, each
// group in increasing row order (a stable counting sort). uniq[u] is the u-th distinct token (ascending),
// its rows are rows[offsets[u] .. offsets[u+1]).
struct TokenBuckets {
  std::vector<int32_t> uniq, offsets, rows;
};
TokenBuckets BucketTokens(const int32_t* tokens, int n);

}  // namespace keel
