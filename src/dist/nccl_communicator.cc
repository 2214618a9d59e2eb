// nccl_communicator.cc: NcclCommunicator (see nccl_communicator.h). Compiled into keel_cuda.
#include "dist/nccl_communicator.h"

#include <cuda_runtime_api.h>
#ifdef KEEL_HAVE_NCCL
#include <nccl.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

namespace keel {

std::string HexEncode(std::string_view bytes) {
  static const char kDigits[] = "0123456789abcdef";
  std::string s;
  s.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    s.push_back(kDigits[c >> 4]);
    s.push_back(kDigits[c & 15]);
  }
  return s;
}

Result<std::string> HexDecode(std::string_view hex) {
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  if (hex.size() % 2 != 0) return Corrupt("odd number of hex digits (" + std::to_string(hex.size()) + ")");
  std::string out(hex.size() / 2, '\0');
  for (size_t i = 0; i < out.size(); ++i) {
    const int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return Corrupt("not a hex digit at offset " + std::to_string(hi < 0 ? 2 * i : 2 * i + 1));
    out[i] = static_cast<char>(hi << 4 | lo);
  }
  return out;
}

Result<std::string> ExchangeBootstrapId(Store& store, const std::string& key, int rank,
                                        const std::function<Result<std::string>()>& make_id, size_t id_bytes,
                                        double timeout_s, const std::atomic<bool>* abort) {
  if (rank == 0) {
    auto id = make_id();
    if (!id.ok()) return id.status();
    if (id->size() != id_bytes)
      return Internal("bootstrap id has " + std::to_string(id->size()) + " bytes, expected " + std::to_string(id_bytes));
    KEEL_RETURN_IF_ERROR(store.Set(key, HexEncode(*id)).Wrap("publishing the bootstrap id in " + store.Describe()));
    return id;
  }
  auto hex = WaitGet(store, key, timeout_s, "the bootstrap id from rank 0 ('" + key + "' in " + store.Describe() + ")",
                     abort);
  if (!hex.ok()) return hex.status();
  auto id = HexDecode(*hex);
  if (!id.ok()) return id.status().Wrap(store.Describe() + " '" + key + "'");
  if (id->size() != id_bytes)
    return Corrupt(store.Describe() + " '" + key + "': bootstrap id has " + std::to_string(id->size()) +
                   " bytes, expected " + std::to_string(id_bytes));
  return id;
}

#ifdef KEEL_HAVE_NCCL

size_t NcclUniqueIdSize() { return NCCL_UNIQUE_ID_BYTES; }

Result<std::string> NcclUniqueIdBytes() {
  ncclUniqueId id;
  ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) return Unavailable(std::string("nccl: ncclGetUniqueId: ") + ncclGetErrorString(r));
  return std::string(id.internal, NCCL_UNIQUE_ID_BYTES);
}

namespace {

using Clock = std::chrono::steady_clock;

std::string CudaErr(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }

int PickDevice(int requested, int count) {
  if (requested >= 0) return requested;
  for (const char* var : {"KEEL_LOCAL_RANK", "LOCAL_RANK"}) {
    const char* v = std::getenv(var);
    if (v && *v) {
      char* end = nullptr;
      long r = std::strtol(v, &end, 10);
      if (*end == '\0' && r >= 0) return static_cast<int>(r % count);
    }
  }
  return 0;
}

// True for device (or managed) memory NCCL can use directly; false for host memory (staged).
bool IsDevicePointer(const void* p) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, cudaStream_t stream, int device, int rank, int size, double timeout_s,
                   const std::atomic<bool>* external_abort)
      : comm_(comm), stream_(stream), device_(device), rank_(rank), size_(size), timeout_s_(timeout_s),
        external_abort_(external_abort) {}

  ~NcclCommunicator() override {
    cudaSetDevice(device_);
    if (comm_) {
      bool clean = error_.ok() && !aborted_.load();
      if (clean) {
        // Non-blocking finalize: poll it like an operation; on trouble fall back to abort.
        ncclResult_t r = ncclCommFinalize(comm_);
        clean = (r == ncclSuccess || r == ncclInProgress) && Poll("finalize", false).ok();
      }
      if (comm_) {
        if (clean) ncclCommDestroy(comm_);
        else ncclCommAbort(comm_);
        comm_ = nullptr;
      }
    }
    if (staging_) cudaFree(staging_);
    if (stream_) cudaStreamDestroy(stream_);
    cudaGetLastError();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  Status WaitInit() { return Poll("ncclCommInitRankConfig", false); }

  Status AllreduceSum(int64_t* data, size_t n) override {
    return Reduce("allreduce(int64 sum)", data, n, sizeof(int64_t), ncclInt64, ncclSum);
  }
  Status AllreduceSum(float* data, size_t n) override {
    return Reduce("allreduce(float sum)", data, n, sizeof(float), ncclFloat32, ncclSum);
  }
  Status AllreduceSum(double* data, size_t n) override {
    return Reduce("allreduce(double sum)", data, n, sizeof(double), ncclFloat64, ncclSum);
  }
  Status AllreduceMax(double* data, size_t n) override {
    return Reduce("allreduce(double max)", data, n, sizeof(double), ncclFloat64, ncclMax);
  }
  Status Broadcast(void* data, size_t bytes, int root) override {
    if (root < 0 || root >= size_) return InvalidArgument("nccl: broadcast root " + std::to_string(root) + " out of range");
    return Collective("broadcast", data, data, bytes, bytes, [&](const void* in, void* out) {
      return ncclBroadcast(in, out, bytes, ncclUint8, root, comm_, stream_);
    });
  }
  Status Allgather(const void* in, void* out, size_t bytes) override {
    return Collective("allgather", in, out, bytes, bytes * static_cast<size_t>(size_), [&](const void* i, void* o) {
      return ncclAllGather(i, o, bytes, ncclUint8, comm_, stream_);
    });
  }
  Status Barrier() override {
    float one = 1.0f;
    return Reduce("barrier", &one, 1, sizeof(float), ncclFloat32, ncclSum);
  }
  void Abort() override { abort_requested_.store(true); }

 private:
  Status Reduce(const char* what, void* data, size_t n, size_t elem, ncclDataType_t type, ncclRedOp_t op) {
    return Collective(what, data, data, n * elem, n * elem, [&](const void* in, void* out) {
      return ncclAllReduce(in, out, n, type, op, comm_, stream_);
    });
  }

  // Runs one collective: stages host buffers through the device, enqueues call(din, dout), and polls it to
  // completion against the deadline.
  template <typename F>
  Status Collective(const char* what, const void* in, void* out, size_t in_bytes, size_t out_bytes, F call) {
    if (!error_.ok()) return error_;
    if (AbortRequested()) return Fail(Aborted(std::string("nccl: ") + what + ": aborted"), true);
    if (out_bytes == 0) return Status::Ok();
    cudaSetDevice(device_);
    // Host buffers go through the staging buffer: [input | output], or one region when in place.
    const bool in_place = in == out;
    const bool stage_out = !IsDevicePointer(out);
    const bool stage_in = in_place ? stage_out : (in_bytes > 0 && !IsDevicePointer(in));
    const void* din = in;
    void* dout = out;
    if (stage_in || stage_out) {
      const size_t out_off = in_place ? 0 : (in_bytes + 255) / 256 * 256;
      KEEL_RETURN_IF_ERROR(EnsureStaging(out_off + (in_place ? std::max(in_bytes, out_bytes) : out_bytes)));
      char* base = static_cast<char*>(staging_);
      if (stage_in) din = base;
      if (stage_out) dout = base + out_off;
      if (stage_in && in_bytes > 0) {
        cudaError_t e = cudaMemcpyAsync(base, in, in_bytes, cudaMemcpyHostToDevice, stream_);
        if (e != cudaSuccess) return Fail(Internal(std::string("nccl: ") + what + ": staging copy: " + CudaErr(e)), true);
      }
    }
    ncclResult_t r = call(din, dout);
    if (r != ncclSuccess && r != ncclInProgress) return Fail(NcclError(what, r), true);
    KEEL_RETURN_IF_ERROR(Poll(what, true));
    if (dout != out) {
      cudaError_t e = cudaMemcpyAsync(out, dout, out_bytes, cudaMemcpyDeviceToHost, stream_);
      if (e != cudaSuccess) return Fail(Internal(std::string("nccl: ") + what + ": staging copy: " + CudaErr(e)), true);
      KEEL_RETURN_IF_ERROR(Poll(what, true));
    }
    return Status::Ok();
  }

  Status EnsureStaging(size_t bytes) {
    if (bytes <= staging_bytes_ && staging_) return Status::Ok();
    if (staging_) cudaFree(staging_);
    staging_ = nullptr;
    staging_bytes_ = 0;
    cudaError_t e = cudaMalloc(&staging_, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      staging_ = nullptr;
      return Unavailable("nccl: allocating a " + std::to_string(bytes) + "-byte staging buffer: " + CudaErr(e));
    }
    staging_bytes_ = bytes;
    return Status::Ok();
  }

  bool AbortRequested() const {
    return abort_requested_.load() || (external_abort_ && external_abort_->load());
  }

  Status NcclError(const char* what, ncclResult_t r) {
    std::string msg = std::string("nccl: ") + what + ": " + ncclGetErrorString(r);
    const char* last = comm_ ? ncclGetLastError(comm_) : nullptr;
    if (last && *last) msg += std::string(" (") + last + ")";
    return r == ncclInvalidArgument || r == ncclInvalidUsage ? InvalidArgument(msg) : Unavailable(msg);
  }

  // Polls until the communicator has no operation in progress (and, with stream, the stream is idle), an error,
  // an abort request, or the deadline.
  Status Poll(const char* what, bool stream) {
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(timeout_s_));
    for (int spin = 0;; ++spin) {
      ncclResult_t async = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
      if (r != ncclSuccess) return Fail(NcclError(what, r), true);
      if (async != ncclSuccess && async != ncclInProgress) return Fail(NcclError(what, async), true);
      if (async == ncclSuccess) {
        if (!stream) return Status::Ok();
        cudaError_t q = cudaStreamQuery(stream_);
        if (q == cudaSuccess) return Status::Ok();
        if (q != cudaErrorNotReady) {
          cudaGetLastError();
          return Fail(Internal(std::string("nccl: ") + what + ": " + CudaErr(q)), true);
        }
      }
      if (AbortRequested()) return Fail(Aborted(std::string("nccl: ") + what + ": aborted"), true);
      if (Clock::now() > deadline) {
        char buf[64];
        std::snprintf(buf, sizeof(buf), "%g", timeout_s_);
        return Fail(Timeout(std::string("nccl: ") + what + ": timed out after " + buf +
                            "s (a peer is dead, stalled or never joined)"),
                    true);
      }
      if (spin < 200) std::this_thread::yield();
      else std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }

  // Records the first failure (sticky) and, if asked, aborts the NCCL communicator so nothing stays queued.
  Status Fail(Status s, bool abort_comm) {
    if (error_.ok()) error_ = s;
    if (abort_comm && comm_) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
      aborted_.store(true);
    }
    return error_;
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  const int device_, rank_, size_;
  const double timeout_s_;
  const std::atomic<bool>* external_abort_;
  std::atomic<bool> abort_requested_{false}, aborted_{false};
  Status error_;
  void* staging_ = nullptr;
  size_t staging_bytes_ = 0;
};

}  // namespace

Result<std::unique_ptr<Communicator>> ConnectNcclCommunicator(std::shared_ptr<Store> store, int rank, int size,
                                                              const NcclOptions& options,
                                                              const std::atomic<bool>* abort) {
  if (size < 1 || rank < 0 || rank >= size)
    return InvalidArgument("nccl: rank " + std::to_string(rank) + " of " + std::to_string(size) + " is out of range");
  if (!(options.timeout_s > 0)) return InvalidArgument("nccl: timeout must be positive");
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count <= 0) {
    cudaGetLastError();
    return Unavailable(std::string("nccl: no CUDA device (cudaGetDeviceCount: ") +
                       (e != cudaSuccess ? cudaGetErrorString(e) : "0 devices") + ")");
  }
  const int device = PickDevice(options.device, count);
  if (device >= count)
    return InvalidArgument("nccl: device " + std::to_string(device) + " requested but " + std::to_string(count) +
                           " visible");
  if ((e = cudaSetDevice(device)) != cudaSuccess) {
    cudaGetLastError();
    return Unavailable("nccl: cudaSetDevice(" + std::to_string(device) + "): " + CudaErr(e));
  }
  auto id = ExchangeBootstrapId(*store, "nccl_unique_id", rank, NcclUniqueIdBytes, NCCL_UNIQUE_ID_BYTES,
                                options.timeout_s, abort);
  if (!id.ok()) return id.status().Wrap("nccl: forming the group");
  ncclUniqueId uid;
  std::memcpy(uid.internal, id->data(), NCCL_UNIQUE_ID_BYTES);
  cudaStream_t stream = nullptr;
  if ((e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)) != cudaSuccess) {
    cudaGetLastError();
    return Unavailable("nccl: creating a stream: " + CudaErr(e));
  }
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every call returns at once; completion is polled against our deadline
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, size, uid, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    if (comm) ncclCommAbort(comm);
    cudaStreamDestroy(stream);
    return Unavailable(std::string("nccl: ncclCommInitRankConfig: ") + ncclGetErrorString(r));
  }
  auto c = std::make_unique<NcclCommunicator>(comm, stream, device, rank, size, options.timeout_s, abort);
  KEEL_RETURN_IF_ERROR(c->WaitInit());
  return std::unique_ptr<Communicator>(std::move(c));
}

#else  // !KEEL_HAVE_NCCL

size_t NcclUniqueIdSize() { return 128; }
Result<std::string> NcclUniqueIdBytes() { return Unavailable("nccl: this keel was built without NCCL"); }
Result<std::unique_ptr<Communicator>> ConnectNcclCommunicator(std::shared_ptr<Store>, int, int, const NcclOptions&,
                                                              const std::atomic<bool>*) {
  return Unavailable("nccl: this keel was built without NCCL");
}

#endif

}  // namespace keel
