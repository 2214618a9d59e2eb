// cuda_backend.cc: CudaBackend — device memory, error capture, cuBLAS GEMMs (matmul and attention) and the
// dispatch to keel's kernels (cuda_ops.h). See cuda_backend.h for the contract.
//
// GEMM layout: keel's buffers are row-major, cuBLAS is column-major. A row-major [R, K] matrix is the same bytes
// as a column-major K x R matrix (its transpose), so every row-major product Y = A B is issued as the
// column-major product Y^T = B^T A^T with the operands' roles swapped; the comment at each call spells it out.
#include "backend/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/op_profile.h"
#include "train/exact_sum.h"  // kFixedFractionBits (RoundThroughFixedPoint matches the host rounding)

namespace keel {

const char* CudaMatmulPrecisionName(CudaMatmulPrecision p) {
  switch (p) {
    case CudaMatmulPrecision::kFp32: return "fp32";
    case CudaMatmulPrecision::kTf32: return "tf32";
    case CudaMatmulPrecision::kBf16: return "bf16";
  }
  return "?";
}

TokenBuckets BucketTokens(const int32_t* tokens, int n) {
  TokenBuckets tb;
  std::vector<int32_t> order(static_cast<size_t>(n > 0 ? n : 0));
  for (int i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  // Stable: rows of one token stay in increasing order (the CPU reference's summation order).
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return tokens[a] < tokens[b]; });
  tb.rows = order;
  for (int i = 0; i < n; ++i) {
    const int32_t t = tokens[order[static_cast<size_t>(i)]];
    if (tb.uniq.empty() || tb.uniq.back() != t) {
      tb.uniq.push_back(t);
      tb.offsets.push_back(i);
    }
  }
  tb.offsets.push_back(n > 0 ? n : 0);
  return tb;
}

namespace {

std::string CudaErr(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }
std::string CublasErr(cublasStatus_t s) { return cublasGetStatusString(s); }

std::string Mib(size_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }

// A device buffer that only grows (cudaFree synchronises the device first, so work queued on the old buffer
// finishes before it goes).
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { Release(); }
  void Release() {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    bytes_ = 0;
  }
  // nullptr on failure (the caller records the error).
  void* Get(size_t bytes, cudaError_t* err) {
    *err = cudaSuccess;
    if (bytes <= bytes_ && p_) return p_;
    Release();
    *err = cudaMalloc(&p_, bytes);
    if (*err != cudaSuccess) {
      p_ = nullptr;
      return nullptr;
    }
    bytes_ = bytes;
    return p_;
  }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, const std::string& device_name, CudaMatmulPrecision precision, bool profile,
              cudaStream_t stream, cublasHandle_t cublas)
      : device_(device), device_name_(device_name), precision_(precision), stream_(stream), cublas_(cublas) {
    if (profile) prof_ = std::make_unique<cuda::OpProfiler>(stream_);
    switch (precision) {
      case CudaMatmulPrecision::kFp32: compute_ = CUBLAS_COMPUTE_32F; break;
      case CudaMatmulPrecision::kTf32: compute_ = CUBLAS_COMPUTE_32F_FAST_TF32; break;
      case CudaMatmulPrecision::kBf16: compute_ = CUBLAS_COMPUTE_32F_FAST_16BF; break;
    }
  }
  ~CudaBackend() override {
    Enter();
    cudaStreamSynchronize(stream_);
    if (prof_) {
      std::fprintf(stderr, "keel: KEEL_CUDA_PROFILE (%s, %s GEMMs):\n%s", device_name_.c_str(),
                   CudaMatmulPrecisionName(precision_), prof_->Report().c_str());
      prof_.reset();
    }
    scratch_f_.Release();
    scratch_aux_.Release();
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }

  std::string Name() const override { return "cuda"; }
  bool SupportsOp(Op op) const override {
    return op != Op::kCount && op != Op::kMatmulForwardHalf && op != Op::kMatmulForwardPacked &&
           op != Op::kMatmulForwardPackedBf16 && op != Op::kAttentionDecodeHalfKv;
  }
  void SetThreads(int) override {}
  bool host_memory() const override { return false; }

  // ---- memory -------------------------------------------------------------------------------------------

  Result<float*> Alloc(size_t count) override {
    auto r = AllocBytes(count * sizeof(float));
    if (!r.ok()) return r.status();
    return static_cast<float*>(r.value());
  }
  void Free(float* p) override { FreeBytes(p); }
  Result<int32_t*> AllocInt(size_t count) override {
    auto r = AllocBytes(count * sizeof(int32_t));
    if (!r.ok()) return r.status();
    return static_cast<int32_t*>(r.value());
  }
  void FreeInt(int32_t* p) override { FreeBytes(p); }
  void UploadInt(int32_t* dst, const int32_t* host, size_t count) override {
    CopyIn(dst, host, count * sizeof(int32_t), "upload");
  }
  void Upload(float* dst, const float* host, size_t count) override {
    CopyIn(dst, host, count * sizeof(float), "upload");
  }
  void Download(float* host, const float* src, size_t count) override {
    if (count == 0) return;
    Enter();
    auto prof = Prof("download");
    if (!failed()) {
      Check(cudaMemcpyAsync(host, src, count * sizeof(float), cudaMemcpyDeviceToHost, stream_), "download");
      Check(cudaStreamSynchronize(stream_), "download (synchronize)");
    }
    if (failed()) std::fill(host, host + count, std::numeric_limits<float>::quiet_NaN());
  }
  void Zero(float* p, size_t count) override {
    if (count == 0 || !Enter()) return;
    auto prof = Prof("zero");
    Check(cudaMemsetAsync(p, 0, count * sizeof(float), stream_), "zero");
  }
  void Copy(float* dst, const float* src, size_t count) override {
    if (count == 0 || dst == src || !Enter()) return;
    auto prof = Prof("copy");
    Check(cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyDeviceToDevice, stream_), "copy");
  }
  Status Sync() override {
    if (Enter()) Check(cudaStreamSynchronize(stream_), "synchronize");
    if (prof_) prof_->Flush();  // synchronised already: reading the events back costs nothing more
    return error_;
  }

  // ---- ops ----------------------------------------------------------------------------------------------

  void EncoderForward(float* out, const int32_t* tokens, const int32_t* positions, const float* wte, const float* wpe,
                      int B, int T, int C) override {
    if (!Enter()) return;
    auto prof = Prof("encoder_forward");
    Check(cuda::EncoderForward(out, tokens, positions, wte, wpe, B, T, C, stream_), "encoder_forward");
  }

  void EncoderBackward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int B, int T,
                       int C) override {
    if (!Enter()) return;
    auto prof = Prof("encoder_backward");
    const int N = B * T;
    if (N <= 0) return;
    // Group rows by token on the host (N ints each way): the kernel then adds each token's rows in row order.
    host_tokens_.resize(static_cast<size_t>(N));
    if (!Check(cudaMemcpyAsync(host_tokens_.data(), tokens, static_cast<size_t>(N) * sizeof(int32_t),
                               cudaMemcpyDeviceToHost, stream_),
               "encoder_backward (tokens)") ||
        !Check(cudaStreamSynchronize(stream_), "encoder_backward (tokens)"))
      return;
    TokenBuckets tb = BucketTokens(host_tokens_.data(), N);
    const int U = static_cast<int>(tb.uniq.size());
    packed_.clear();
    packed_.insert(packed_.end(), tb.uniq.begin(), tb.uniq.end());
    packed_.insert(packed_.end(), tb.offsets.begin(), tb.offsets.end());
    packed_.insert(packed_.end(), tb.rows.begin(), tb.rows.end());
    int32_t* d = static_cast<int32_t*>(ScratchAux(packed_.size() * sizeof(int32_t)));
    if (!d) return;
    if (!Check(cudaMemcpyAsync(d, packed_.data(), packed_.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
               "encoder_backward (buckets)"))
      return;
    // packed_ is reused by the next call: make sure this copy has read it (it is pageable, so the copy has
    // already been staged, but a synchronisation here costs nothing next to the token download above).
    if (!Check(cudaStreamSynchronize(stream_), "encoder_backward (buckets)")) return;
    Check(cuda::EncoderBackward(dwte, dwpe, dout, d, d + U, d + 2 * U + 1, U, B, T, C, stream_), "encoder_backward");
  }

  void LayerNormForward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b, int N,
                        int C) override {
    if (!Enter()) return;
    auto prof = Prof("layernorm_forward");
    Check(cuda::LayerNormForward(out, mean, rstd, inp, w, b, N, C, stream_), "layernorm_forward");
  }

  void LayerNormBackward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                         const float* mean, const float* rstd, int N, int C) override {
    if (!Enter()) return;
    auto prof = Prof("layernorm_backward");
    float* s = ScratchFloat(cuda::LayerNormBackwardScratchFloats(N, C));
    if (!s) return;
    Check(cuda::LayerNormBackward(dinp, dw, db, dout, inp, w, mean, rstd, N, C, s, stream_), "layernorm_backward");
  }

  void MatmulForward(float* out, const float* inp, const float* w, const float* bias, int N, int IC,
                     int OC) override {
    if (!Enter() || N <= 0 || OC <= 0) return;
    auto prof = Prof("matmul_forward");
    float beta = 0.0f;
    if (bias) {
      if (!Check(cuda::BroadcastRows(out, bias, N, OC, stream_), "matmul_forward (bias)")) return;
      beta = 1.0f;
    }
    // out [N, OC] = inp [N, IC] @ w[OC, IC]^T  <=>  col-major out^T (OC x N) = w^T-view^T ... : op(A) = w (IC x OC
    // col-major, transposed), op(B) = inp (IC x N col-major).
    Gemm(CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, 1.0f, w, IC, inp, IC, beta, out, OC, "matmul_forward");
  }

  void MatmulBackward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w, int N,
                      int IC, int OC) override {
    if (!Enter() || N <= 0) return;
    auto prof = Prof("matmul_backward");
    // dinp [N, IC] += dout [N, OC] @ w [OC, IC]  <=>  dinp^T (IC x N) += w-view (IC x OC) @ dout-view (OC x N).
    if (dinp) Gemm(CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, 1.0f, w, IC, dout, OC, 1.0f, dinp, IC, "matmul_backward dinp");
    // dw [OC, IC] += dout^T [OC, N] @ inp [N, IC]  <=>  dw^T (IC x OC) += inp-view (IC x N) @ (dout-view)^T (N x OC).
    Gemm(CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, 1.0f, inp, IC, dout, OC, 1.0f, dw, IC, "matmul_backward dw");
    if (dbias) {
      float* s = ScratchFloat(cuda::ColumnSumsScratchFloats(N, OC));
      if (!s) return;
      Check(cuda::AccumulateColumnSums(dbias, dout, N, OC, s, stream_), "matmul_backward dbias");
    }
  }

  // Per sequence b, one strided-batched GEMM over the NH heads (head h's q/k/v start h*hs floats into a row of
  // qkv, rows 3C apart; its T x T block of att starts (b*NH + h)*T*T).
  void AttentionForward(float* out, float* att, const float* qkv, int B, int T, int C, int NH) override {
    if (!Enter() || B <= 0 || T <= 0) return;
    auto prof = Prof("attention_forward");
    const int hs = C / NH, C3 = 3 * C;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
    const long long TT = static_cast<long long>(T) * T;
    for (int b = 0; b < B; ++b) {
      const float* q = qkv + static_cast<size_t>(b) * T * C3;
      const float* k = q + C;
      float* P = att + static_cast<size_t>(b) * NH * TT;
      // S [T(t), T(j)] = scale * Q K^T  <=>  S^T (j x t) = (k-view)^T (T x hs) @ q-view (hs x T).
      GemmBatched(CUBLAS_OP_T, CUBLAS_OP_N, T, T, hs, scale, k, C3, hs, q, C3, hs, 0.0f, P, T, TT, NH,
                  "attention_forward QK^T");
    }
    if (!Check(cuda::CausalSoftmaxForward(att, B * NH, T, stream_), "attention_forward softmax")) return;
    for (int b = 0; b < B; ++b) {
      const float* v = qkv + static_cast<size_t>(b) * T * C3 + 2 * C;
      const float* P = att + static_cast<size_t>(b) * NH * TT;
      float* y = out + static_cast<size_t>(b) * T * C;
      // Y [T, hs] = P V  <=>  Y^T (hs x T) = v-view (hs x T(j)) @ P-view (j x t).
      GemmBatched(CUBLAS_OP_N, CUBLAS_OP_N, hs, T, T, 1.0f, v, C3, hs, P, T, TT, 0.0f, y, C, hs, NH,
                  "attention_forward PV");
    }
  }

  void AttentionBackward(float* dqkv, float* datt, const float* dout, const float* qkv, const float* att, int B, int T,
                         int C, int NH) override {
    if (!Enter() || B <= 0 || T <= 0) return;
    auto prof = Prof("attention_backward");
    const int hs = C / NH, C3 = 3 * C;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
    const long long TT = static_cast<long long>(T) * T;
    for (int b = 0; b < B; ++b) {
      const float* v = qkv + static_cast<size_t>(b) * T * C3 + 2 * C;
      float* dv = dqkv + static_cast<size_t>(b) * T * C3 + 2 * C;
      const float* dO = dout + static_cast<size_t>(b) * T * C;
      const float* P = att + static_cast<size_t>(b) * NH * TT;
      float* dP = datt + static_cast<size_t>(b) * NH * TT;
      // dP [t, j] = dO V^T  <=>  dP^T (j x t) = (v-view)^T (T x hs) @ dO-view (hs x T).
      GemmBatched(CUBLAS_OP_T, CUBLAS_OP_N, T, T, hs, 1.0f, v, C3, hs, dO, C, hs, 0.0f, dP, T, TT, NH,
                  "attention_backward dP");
      // dV [j, d] += P^T dO  <=>  dV^T (hs x j) += dO-view (hs x t) @ (P-view)^T (t x j).
      GemmBatched(CUBLAS_OP_N, CUBLAS_OP_T, hs, T, T, 1.0f, dO, C, hs, P, T, TT, 1.0f, dv, C3, hs, NH,
                  "attention_backward dV");
    }
    if (!Check(cuda::CausalSoftmaxBackward(datt, att, B * NH, T, stream_), "attention_backward softmax")) return;
    for (int b = 0; b < B; ++b) {
      const float* q = qkv + static_cast<size_t>(b) * T * C3;
      const float* k = q + C;
      float* dq = dqkv + static_cast<size_t>(b) * T * C3;
      float* dk = dq + C;
      const float* dS = datt + static_cast<size_t>(b) * NH * TT;
      // dQ [t, d] += scale dS K  <=>  dQ^T (hs x t) += scale k-view (hs x j) @ dS-view (j x t).
      GemmBatched(CUBLAS_OP_N, CUBLAS_OP_N, hs, T, T, scale, k, C3, hs, dS, T, TT, 1.0f, dq, C3, hs, NH,
                  "attention_backward dQ");
      // dK [j, d] += scale dS^T Q  <=>  dK^T (hs x j) += scale q-view (hs x t) @ (dS-view)^T (t x j).
      GemmBatched(CUBLAS_OP_N, CUBLAS_OP_T, hs, T, T, scale, q, C3, hs, dS, T, TT, 1.0f, dk, C3, hs, NH,
                  "attention_backward dK");
    }
  }

  void AttentionDecode(float* out, const float* q, const float* k_cache, const float* v_cache, const int32_t* pos,
                       float* scratch, int B, int maxT, int C, int NH) override {
    if (!Enter()) return;
    auto prof = Prof("attention_decode");
    Check(cuda::AttentionDecode(out, q, k_cache, v_cache, pos, nullptr, scratch, B, maxT, C, NH, stream_),
          "attention_decode");
  }
  // All N rows in one launch: the host slot list goes up with the step (N ints), not one launch per row.
  void AttentionDecodeSlots(float* out, const float* q, const float* k_cache, const float* v_cache, const int32_t* pos,
                            const int32_t* host_slots, float* scratch, int N, int maxT, int C, int NH) override {
    if (!Enter() || N <= 0) return;
    auto prof = Prof("attention_decode_slots");
    slots_.assign(host_slots, host_slots + N);
    int32_t* d = static_cast<int32_t*>(ScratchAux(slots_.size() * sizeof(int32_t)));
    if (!d) return;
    if (!Check(cudaMemcpyAsync(d, slots_.data(), slots_.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
               "attention_decode_slots (slots)"))
      return;
    Check(cuda::AttentionDecode(out, q, k_cache, v_cache, pos, d, scratch, N, maxT, C, NH, stream_),
          "attention_decode_slots");
  }

  void GeluForward(float* out, const float* inp, size_t n) override {
    if (!Enter()) return;
    auto prof = Prof("gelu_forward");
    Check(cuda::GeluForward(out, inp, n, stream_), "gelu_forward");
  }
  void GeluBackward(float* dinp, const float* inp, const float* dout, size_t n) override {
    if (!Enter()) return;
    auto prof = Prof("gelu_backward");
    Check(cuda::GeluBackward(dinp, inp, dout, n, stream_), "gelu_backward");
  }
  void ResidualForward(float* out, const float* a, const float* b, size_t n) override {
    if (!Enter()) return;
    auto prof = Prof("residual_forward");
    Check(cuda::ResidualForward(out, a, b, n, stream_), "residual_forward");
  }
  void SoftmaxCrossEntropyForward(float* losses, float* probs, const float* logits, const int32_t* targets, int N,
                                  int V, int Vp) override {
    if (!Enter()) return;
    auto prof = Prof("softmax_xent_forward");
    Check(cuda::SoftmaxCrossEntropyForward(losses, probs, logits, targets, N, V, Vp, stream_), "softmax_xent_forward");
  }
  void SoftmaxCrossEntropyBackward(float* dlogits, const float* probs, const int32_t* targets, float dloss, int N,
                                   int V, int Vp) override {
    if (!Enter()) return;
    auto prof = Prof("softmax_xent_backward");
    Check(cuda::SoftmaxCrossEntropyBackward(dlogits, probs, targets, dloss, N, V, Vp, stream_),
          "softmax_xent_backward");
  }
  void AdamW(float* params, const float* grads, float* m, float* v, const uint8_t* decay_mask, size_t n,
             const AdamWParams& p) override {
    if (!Enter()) return;
    auto prof = Prof("adamw");
    // Bias corrections exactly as the CPU reference computes them (t counted from 1, as there).
    const double t = p.t < 1 ? 1.0 : static_cast<double>(p.t);
    const float bc1 = 1.0f - static_cast<float>(std::pow(static_cast<double>(p.beta1), t));
    const float bc2 = 1.0f - static_cast<float>(std::pow(static_cast<double>(p.beta2), t));
    Check(cuda::AdamW(params, grads, m, v, decay_mask, n, p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, p.grad_scale,
                      bc1, bc2, stream_),
          "adamw");
  }
  double SumSquares(const float* x, size_t n) override {
    if (!Enter()) return std::numeric_limits<double>::quiet_NaN();
    auto prof = Prof("sum_squares");
    const size_t chunks = cuda::SumSquaresChunks(n);
    if (chunks == 0) return 0.0;
    double* d = static_cast<double*>(ScratchAux(chunks * sizeof(double)));
    if (!d) return std::numeric_limits<double>::quiet_NaN();
    host_partials_.resize(chunks);
    if (!Check(cuda::SumSquaresPartials(d, x, n, stream_), "sum_squares") ||
        !Check(cudaMemcpyAsync(host_partials_.data(), d, chunks * sizeof(double), cudaMemcpyDeviceToHost, stream_),
               "sum_squares (download)") ||
        !Check(cudaStreamSynchronize(stream_), "sum_squares (synchronize)"))
      return std::numeric_limits<double>::quiet_NaN();
    double total = 0.0;
    for (double v : host_partials_) total += v;
    return total;
  }

  Result<size_t> RoundThroughFixedPoint(float* x, size_t n) override {
    if (!Enter()) return error_;
    auto prof = Prof("round_through_fixed_point");
    auto* d = static_cast<unsigned long long*>(ScratchAux(sizeof(unsigned long long)));
    if (!d) return error_;
    unsigned long long bad = 0;
    if (!Check(cuda::RoundThroughFixedPoint(x, n, kFixedFractionBits, d, stream_), "round_through_fixed_point") ||
        !Check(cudaMemcpyAsync(&bad, d, sizeof(bad), cudaMemcpyDeviceToHost, stream_),
               "round_through_fixed_point (download)") ||
        !Check(cudaStreamSynchronize(stream_), "round_through_fixed_point (synchronize)"))
      return error_;
    return static_cast<size_t>(bad);
  }

 public:
  std::string ProfileReport() { return prof_ ? prof_->Report() : std::string(); }

 private:
  bool failed() const { return !error_.ok(); }

  // KEEL_CUDA_PROFILE: the op's device time (a no-op scope when profiling is off).
  cuda::OpProfiler::Scope Prof(const char* name) { return cuda::OpProfiler::Scope(prof_.get(), name, 0); }

  // Makes this backend's device current on the calling thread; false once an error has been recorded (later ops
  // are skipped: the first error is the one worth reporting, and device state after it is undefined).
  bool Enter() {
    int cur = -1;
    if (cudaGetDevice(&cur) != cudaSuccess || cur != device_) {
      cudaGetLastError();
      cudaSetDevice(device_);
    }
    return !failed();
  }

  void Record(Code code, const std::string& msg) {
    if (!error_.ok()) return;
    error_ = Status(code, "cuda: " + msg);
    std::fprintf(stderr, "keel: %s (later CUDA ops are skipped; results are NaN)\n", error_.message().c_str());
  }
  bool Check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return true;
    cudaGetLastError();  // clear a non-sticky error so it is not reported again by an unrelated call
    Record(e == cudaErrorMemoryAllocation ? Code::kUnavailable : Code::kInternal, std::string(what) + ": " + CudaErr(e));
    return false;
  }
  bool Check(cublasStatus_t s, const char* what) {
    if (s == CUBLAS_STATUS_SUCCESS) return true;
    Record(Code::kInternal, std::string(what) + ": cuBLAS " + CublasErr(s));
    return false;
  }

  Result<void*> AllocBytes(size_t bytes) {
    Enter();
    if (bytes == 0) bytes = sizeof(float);
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      cudaGetLastError();
      const std::string where = "allocating " + std::to_string(bytes) + " bytes on device " + std::to_string(device_) +
                                " (" + device_name_ + ", " + Mib(free_b) + " free of " + Mib(total_b) + ")";
      if (e == cudaErrorMemoryAllocation) return Unavailable("cuda: out of memory " + where);
      return Internal("cuda: " + CudaErr(e) + " " + where);
    }
    e = cudaMemsetAsync(p, 0, bytes, stream_);
    if (e != cudaSuccess) {
      cudaGetLastError();
      cudaFree(p);
      return Internal("cuda: zeroing a new allocation: " + CudaErr(e));
    }
    return p;
  }
  void FreeBytes(void* p) {
    if (!p) return;
    Enter();
    cudaFree(p);  // synchronises the device first
    cudaGetLastError();
  }
  void CopyIn(void* dst, const void* host, size_t bytes, const char* what) {
    if (bytes == 0 || !Enter()) return;
    auto prof = Prof(what);
    // From pageable memory the copy is staged before cudaMemcpyAsync returns, so the caller may reuse `host`.
    Check(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, stream_), what);
  }
  float* ScratchFloat(size_t count) {
    cudaError_t e;
    void* p = scratch_f_.Get(std::max<size_t>(count, 1) * sizeof(float), &e);
    if (!p) Check(e == cudaSuccess ? cudaErrorMemoryAllocation : e, "scratch allocation");
    return static_cast<float*>(p);
  }
  void* ScratchAux(size_t bytes) {
    cudaError_t e;
    void* p = scratch_aux_.Get(std::max<size_t>(bytes, 8), &e);
    if (!p) Check(e == cudaSuccess ? cudaErrorMemoryAllocation : e, "scratch allocation");
    return p;
  }

  void Gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const float* A, int lda,
            const float* B, int ldb, float beta, float* C, int ldc, const char* what) {
    if (failed() || m <= 0 || n <= 0) return;
    cuda::OpProfiler::Scope prof(prof_.get(), what, 1);
    if (k <= 0) {  // an empty sum: C = beta * C (only beta 0 or 1 occur)
      if (beta == 0.0f) Check(cudaMemset2DAsync(C, sizeof(float) * ldc, 0, sizeof(float) * m, n, stream_), what);
      return;
    }
    Check(cublasGemmEx(cublas_, ta, tb, m, n, k, &alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, &beta, C, CUDA_R_32F,
                       ldc, compute_, CUBLAS_GEMM_DEFAULT),
          what);
  }
  void GemmBatched(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const float* A,
                   int lda, long long sa, const float* B, int ldb, long long sb, float beta, float* C, int ldc,
                   long long sc, int batch, const char* what) {
    if (failed() || m <= 0 || n <= 0 || batch <= 0) return;
    cuda::OpProfiler::Scope prof(prof_.get(), what, 1);
    Check(cublasGemmStridedBatchedEx(cublas_, ta, tb, m, n, k, &alpha, A, CUDA_R_32F, lda, sa, B, CUDA_R_32F, ldb, sb,
                                     &beta, C, CUDA_R_32F, ldc, sc, batch, compute_, CUBLAS_GEMM_DEFAULT),
          what);
  }

  const int device_;
  const std::string device_name_;
  const CudaMatmulPrecision precision_;
  cudaStream_t stream_;
  cublasHandle_t cublas_;
  cublasComputeType_t compute_ = CUBLAS_COMPUTE_32F;
  Status error_;
  Scratch scratch_f_, scratch_aux_;
  std::vector<int32_t> host_tokens_, packed_, slots_;
  std::vector<double> host_partials_;
  std::unique_ptr<cuda::OpProfiler> prof_;  // KEEL_CUDA_PROFILE=1 only
};

bool ParseInt(const char* s, int* out) {
  if (!s || !*s) return false;
  char* end = nullptr;
  long v = std::strtol(s, &end, 10);
  if (*end != '\0' || v < 0 || v > 1 << 20) return false;
  *out = static_cast<int>(v);
  return true;
}

}  // namespace

Result<CudaBackendOptions> CudaBackendOptionsFromEnv() {
  CudaBackendOptions o;
  if (const char* d = std::getenv("KEEL_CUDA_DEVICE"); d && *d) {
    if (!ParseInt(d, &o.device))
      return InvalidArgument(std::string("KEEL_CUDA_DEVICE='") + d + "': expected a device ordinal (0, 1, ...)");
  }
  if (const char* m = std::getenv("KEEL_CUDA_MATMUL"); m && *m) {
    const std::string s = m;
    if (s == "fp32") o.matmul = CudaMatmulPrecision::kFp32;
    else if (s == "tf32") o.matmul = CudaMatmulPrecision::kTf32;
    else if (s == "bf16") o.matmul = CudaMatmulPrecision::kBf16;
    else return InvalidArgument("KEEL_CUDA_MATMUL='" + s + "': expected fp32, tf32 or bf16");
  }
  if (const char* p = std::getenv("KEEL_CUDA_PROFILE"); p && *p) {
    const std::string s = p;
    if (s == "1") o.profile = true;
    else if (s != "0") return InvalidArgument("KEEL_CUDA_PROFILE='" + s + "': expected 0 or 1");
  }
  return o;
}

Result<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return Unavailable(std::string("cuda: no device (cudaGetDeviceCount: ") + cudaGetErrorString(e) + ")");
  }
  if (count <= 0) return Unavailable("cuda: no device (cudaGetDeviceCount: 0 devices)");
  int device = options.device;
  if (device < 0) {
    device = 0;
    for (const char* var : {"KEEL_LOCAL_RANK", "LOCAL_RANK"}) {
      int r = 0;
      if (ParseInt(std::getenv(var), &r)) {
        device = r % count;
        break;
      }
    }
  }
  if (device >= count)
    return InvalidArgument("cuda: device " + std::to_string(device) + " requested but " + std::to_string(count) +
                           " visible");
  if ((e = cudaSetDevice(device)) != cudaSuccess) {
    cudaGetLastError();
    return Unavailable("cuda: cudaSetDevice(" + std::to_string(device) + "): " + CudaErr(e));
  }
  cudaDeviceProp prop;
  if ((e = cudaGetDeviceProperties(&prop, device)) != cudaSuccess) {
    cudaGetLastError();
    return Unavailable("cuda: cudaGetDeviceProperties(" + std::to_string(device) + "): " + CudaErr(e));
  }
  cudaStream_t stream = nullptr;
  if ((e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)) != cudaSuccess) {
    cudaGetLastError();
    return Unavailable("cuda: creating a stream on device " + std::to_string(device) + ": " + CudaErr(e));
  }
  cublasHandle_t handle = nullptr;
  cublasStatus_t s = cublasCreate(&handle);
  if (s == CUBLAS_STATUS_SUCCESS) s = cublasSetStream(handle, stream);
  if (s != CUBLAS_STATUS_SUCCESS) {
    if (handle) cublasDestroy(handle);
    cudaStreamDestroy(stream);
    return Unavailable("cuda: cuBLAS initialisation on device " + std::to_string(device) + ": " + CublasErr(s));
  }
  return std::unique_ptr<Backend>(
      std::make_unique<CudaBackend>(device, std::string(prop.name), options.matmul, options.profile, stream, handle));
}

std::string CudaOpProfileReport(Backend* backend) {
  auto* be = dynamic_cast<CudaBackend*>(backend);
  return be ? be->ProfileReport() : std::string();
}

Result<std::unique_ptr<Backend>> MakeCudaBackend() {
  auto o = CudaBackendOptionsFromEnv();
  if (!o.ok()) return o.status();
  return MakeCudaBackend(o.value());
}

}  // namespace keel
