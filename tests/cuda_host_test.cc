// cuda_host_test.cc: the host-side parts of the CUDA backend and the NCCL communicator, testable without a GPU:
//  - MakeBackend("cuda") and `keel train/sample --device cuda` without a GPU: a clean one-line error, no crash;
//  - KEEL_CUDA_MATMUL / KEEL_CUDA_DEVICE parsing; the token bucketing behind the deterministic wte scatter-add;
//  - the NCCL bootstrap: hex coding, the unique-id exchange through a FileStore between threads (agreement,
//    timeout, abort, corrupt values), ncclGetUniqueId, and ConnectNcclCommunicator's error without a GPU.
// With a GPU present the no-device checks skip and a one-member NCCL group runs every collective on host and
// device buffers (the device script scripts/gpu_check.sh runs this test there).
// In a build without CUDA (KEEL_CUDA=OFF, e.g. the sanitizer build) only the error-message checks run.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "core/hash.h"
#include "dist/store.h"
#include "test_util.h"
#ifdef KEEL_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "dist/nccl_communicator.h"
#endif

namespace keel {
namespace {

using testing::RunKeel;
using testing::TempDir;
using testing::WriteText;

// Restores an environment variable when it goes out of scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    if (value) setenv(name, value, 1);
    else unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_) setenv(name_.c_str(), old_.c_str(), 1);
    else unsetenv(name_.c_str());
  }

 private:
  std::string name_, old_;
  bool had_ = false;
};

bool HaveCudaDevice(std::string* why = nullptr) {
  auto r = MakeBackend("cuda", 1);
  if (!r.ok() && why) *why = r.status().ToString();
  return r.ok();
}

TEST(CudaHost, MakeBackendWithoutDeviceIsOneLineUnavailable) {
  auto r = MakeBackend("cuda", 1);
  if (r.ok()) GTEST_SKIP() << "a CUDA device is present (" << (*r)->Name() << "): the no-device path is not reachable";
  const Status& s = r.status();
  std::printf("  MakeBackend(\"cuda\"): %s\n", s.ToString().c_str());
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.ToString();
  EXPECT_EQ(s.message().find('\n'), std::string::npos) << s.message();
#ifdef KEEL_HAVE_CUDA
  EXPECT_EQ(s.message().rfind("cuda: no device (cudaGetDeviceCount: ", 0), 0u) << s.message();
#else
  EXPECT_NE(s.message().find("without CUDA"), std::string::npos) << s.message();
#endif
}

TEST(CudaHost, CliDeviceCudaWithoutDeviceFailsCleanly) {
  std::string why;
  if (HaveCudaDevice(&why)) GTEST_SKIP() << "a CUDA device is present: the no-device path is not reachable";
  TempDir t;
  std::string text;
  for (int i = 0; i < 200; ++i) text += "line " + std::to_string(i) + " of a small corpus\n";
  WriteText(t / "c.txt", text);
  ASSERT_EQ(RunKeel("prepare --input " + t / "c.txt" + " --out " + t / "data" + " --tokenizer byte").exit_code, 0);
  auto r = RunKeel("train --data " + t / "data" + " --out " + t / "run" +
                   " --device cuda --layers 1 --heads 2 --dim 16 --ctx 16 --batch 2 --steps 2 --no-progress");
  std::printf("  keel train --device cuda: exit %d, output: %s", r.exit_code, r.output.c_str());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_LT(r.exit_code, 128) << "crashed: " << r.output;
  std::string out = r.output;
  while (!out.empty() && out.back() == '\n') out.pop_back();
  EXPECT_EQ(out.find('\n'), std::string::npos) << "expected one line, got: " << r.output;
  EXPECT_NE(out.find("cuda"), std::string::npos) << out;
  EXPECT_NE(out.find(why), std::string::npos) << "the backend's message should reach the user: " << out;
  EXPECT_EQ(out.find("terminate called"), std::string::npos) << out;
}

#ifdef KEEL_HAVE_CUDA

// keel links no CUDA library: the backend is a plugin loaded by `--device cuda` (cuBLAS and cuBLASLt cost every
// command ~0.4 s and ~200 MB when keel linked them). A plugin that is not where it is looked for is a one-line
// error naming the path.
TEST(CudaHost, TheCudaLibrariesAreLoadedOnlyForDeviceCuda) {
  auto v = testing::RunCommand("LD_DEBUG=libs " + testing::KeelBinary() + " --version");
  ASSERT_EQ(v.exit_code, 0) << v.output;
  EXPECT_NE(v.output.find("libopenblas"), std::string::npos) << "LD_DEBUG=libs should list the libraries: " << v.output;
  EXPECT_EQ(v.output.find("libcublas"), std::string::npos) << v.output;
  EXPECT_EQ(v.output.find("libcudart"), std::string::npos) << v.output;
  TempDir t;
  std::string text;
  for (int i = 0; i < 200; ++i) text += "line " + std::to_string(i) + " of a small corpus\n";
  WriteText(t / "c.txt", text);
  ASSERT_EQ(RunKeel("prepare --input " + t / "c.txt" + " --out " + t / "data" + " --tokenizer byte").exit_code, 0);
  auto r = testing::RunCommand("KEEL_CUDA_PLUGIN=" + t / "nowhere.so " + testing::KeelBinary() + " train --data " +
                               t / "data" + " --out " + t / "run" + " --device cuda --layers 1 --heads 2 --dim 16 " +
                               "--ctx 16 --batch 2 --steps 2 --no-progress");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  std::string out = r.output;
  while (!out.empty() && out.back() == '\n') out.pop_back();
  EXPECT_EQ(out.find('\n'), std::string::npos) << r.output;
  EXPECT_NE(out.find("CUDA backend plugin"), std::string::npos) << out;
  EXPECT_NE(out.find(t / "nowhere.so"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(t / "run")) << "nothing is written when the device is missing";
}

TEST(CudaHost, OptionsFromEnvironment) {
  {
    ScopedEnv m("KEEL_CUDA_MATMUL", nullptr), d("KEEL_CUDA_DEVICE", nullptr);
    auto o = CudaBackendOptionsFromEnv();
    ASSERT_TRUE(o.ok()) << o.status().ToString();
    EXPECT_EQ(o->matmul, CudaMatmulPrecision::kFp32);
    EXPECT_EQ(o->device, -1);
  }
  for (auto [value, want] : {std::pair{"fp32", CudaMatmulPrecision::kFp32}, {"tf32", CudaMatmulPrecision::kTf32},
                             {"bf16", CudaMatmulPrecision::kBf16}}) {
    ScopedEnv m("KEEL_CUDA_MATMUL", value), d("KEEL_CUDA_DEVICE", "1");
    auto o = CudaBackendOptionsFromEnv();
    ASSERT_TRUE(o.ok()) << o.status().ToString();
    EXPECT_EQ(o->matmul, want) << value;
    EXPECT_STREQ(CudaMatmulPrecisionName(o->matmul), value);
    EXPECT_EQ(o->device, 1);
  }
  {
    ScopedEnv m("KEEL_CUDA_MATMUL", "fp16");
    auto o = CudaBackendOptionsFromEnv();
    ASSERT_FALSE(o.ok());
    EXPECT_EQ(o.status().code(), Code::kInvalidArgument);
    EXPECT_NE(o.status().message().find("KEEL_CUDA_MATMUL='fp16'"), std::string::npos) << o.status().ToString();
  }
  {
    ScopedEnv d("KEEL_CUDA_DEVICE", "gpu0");
    auto o = CudaBackendOptionsFromEnv();
    ASSERT_FALSE(o.ok());
    EXPECT_NE(o.status().message().find("KEEL_CUDA_DEVICE"), std::string::npos) << o.status().ToString();
    // MakeBackend passes the error on instead of picking a device.
    auto r = MakeBackend("cuda", 1);
    ASSERT_FALSE(r.ok());
  }
  for (auto [value, want] : {std::pair{"0", false}, {"1", true}}) {
    ScopedEnv p("KEEL_CUDA_PROFILE", value);
    auto o = CudaBackendOptionsFromEnv();
    ASSERT_TRUE(o.ok()) << o.status().ToString();
    EXPECT_EQ(o->profile, want) << value;
  }
  {
    ScopedEnv p("KEEL_CUDA_PROFILE", "yes");
    auto o = CudaBackendOptionsFromEnv();
    ASSERT_FALSE(o.ok());
    EXPECT_NE(o.status().message().find("KEEL_CUDA_PROFILE='yes'"), std::string::npos) << o.status().ToString();
  }
}

// KEEL_CUDA_PROFILE: every op and GEMM that ran shows up with its call count (needs a GPU).
TEST(CudaGpu, OpProfileCountsOpsAndGemms) {
  std::string why;
  if (!HaveCudaDevice(&why)) GTEST_SKIP() << "no CUDA device: " << why;
  CudaBackendOptions o;
  o.profile = true;
  auto r = MakeCudaBackend(o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  Backend* be = r->get();
  const int N = 64, IC = 96, OC = 128;
  auto in = be->Alloc(static_cast<size_t>(N) * IC), w = be->Alloc(static_cast<size_t>(OC) * IC),
       out = be->Alloc(static_cast<size_t>(N) * OC);
  ASSERT_TRUE(in.ok() && w.ok() && out.ok());
  for (int i = 0; i < 3; ++i) be->MatmulForward(*out, *in, *w, nullptr, N, IC, OC);
  be->GeluForward(*out, *out, static_cast<size_t>(N) * OC);
  ASSERT_TRUE(be->Sync().ok());
  const std::string report = CudaOpProfileReport(be);
  EXPECT_NE(report.find("CUDA ops"), std::string::npos) << report;
  EXPECT_NE(report.find("matmul_forward"), std::string::npos) << report;
  EXPECT_NE(report.find("gelu_forward"), std::string::npos) << report;
  EXPECT_NE(report.find("of which cuBLAS GEMMs"), std::string::npos) << report;
  // "matmul_forward" appears in both tables, each with 3 calls.
  size_t first = report.find("matmul_forward"), second = report.find("matmul_forward", first + 1);
  ASSERT_NE(second, std::string::npos) << report;
  EXPECT_EQ(std::stoll(report.substr(first + 34, 10)), 3) << report;
  EXPECT_EQ(std::stoll(report.substr(second + 34, 10)), 3) << report;
  for (auto* p : {&in, &w, &out}) be->Free(p->value());
  EXPECT_EQ(CudaOpProfileReport(MakeCpuBackend(1).get()), "");
}

TEST(CudaHost, BucketTokensGroupsRowsByTokenInRowOrder) {
  const std::vector<int32_t> tokens = {5, 3, 5, 0, 3, 5};
  TokenBuckets tb = BucketTokens(tokens.data(), static_cast<int>(tokens.size()));
  EXPECT_EQ(tb.uniq, (std::vector<int32_t>{0, 3, 5}));
  EXPECT_EQ(tb.offsets, (std::vector<int32_t>{0, 1, 3, 6}));
  EXPECT_EQ(tb.rows, (std::vector<int32_t>{3, 1, 4, 0, 2, 5}));
  TokenBuckets empty = BucketTokens(nullptr, 0);
  EXPECT_TRUE(empty.uniq.empty());
  EXPECT_EQ(empty.offsets, (std::vector<int32_t>{0}));

  Rng rng(42);
  std::vector<int32_t> big(8192);
  for (auto& t : big) t = static_cast<int32_t>(rng.Below(300));
  tb = BucketTokens(big.data(), static_cast<int>(big.size()));
  ASSERT_EQ(tb.offsets.size(), tb.uniq.size() + 1);
  ASSERT_EQ(tb.rows.size(), big.size());
  std::vector<int> seen(big.size(), 0);
  for (size_t u = 0; u < tb.uniq.size(); ++u) {
    if (u > 0) {
      EXPECT_LT(tb.uniq[u - 1], tb.uniq[u]);
    }
    ASSERT_LT(tb.offsets[u], tb.offsets[u + 1]);
    for (int i = tb.offsets[u]; i < tb.offsets[u + 1]; ++i) {
      const int32_t row = tb.rows[static_cast<size_t>(i)];
      EXPECT_EQ(big[static_cast<size_t>(row)], tb.uniq[u]);
      if (i > tb.offsets[u]) {
        EXPECT_LT(tb.rows[static_cast<size_t>(i - 1)], row) << "rows of a token in order";
      }
      ++seen[static_cast<size_t>(row)];
    }
  }
  for (int s : seen) ASSERT_EQ(s, 1);
}

TEST(NcclHost, HexRoundTripAndErrors) {
  std::string bytes;
  for (int i = 0; i < 256; ++i) bytes.push_back(static_cast<char>(i));
  const std::string hex = HexEncode(bytes);
  EXPECT_EQ(hex.size(), 512u);
  EXPECT_EQ(hex.substr(0, 6), "000102");
  auto back = HexDecode(hex);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, bytes);
  EXPECT_EQ(HexDecode("ABcd").value(), std::string("\xab\xcd", 2));
  EXPECT_EQ(HexDecode("abc").status().code(), Code::kCorrupt);
  EXPECT_EQ(HexDecode("zz").status().code(), Code::kCorrupt);
}

std::string RandomId(uint64_t seed, size_t n) {
  Rng rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng.Next() & 0xff);
  return s;
}

TEST(NcclHost, BootstrapIdExchangeThroughFileStore) {
  TempDir t;
  auto store = OpenFileStore(t / "store");
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  const size_t kBytes = NcclUniqueIdSize();
  EXPECT_EQ(kBytes, 128u);
  const std::string id = RandomId(7, kBytes);
  constexpr int kRanks = 4;
  std::vector<Result<std::string>> got(kRanks, Result<std::string>(Internal("not run")));
  std::vector<std::thread> threads;
  // Non-zero ranks start first: they must wait for rank 0's id, not fail.
  for (int r = kRanks - 1; r >= 0; --r) {
    threads.emplace_back([&, r] {
      if (r == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      got[static_cast<size_t>(r)] =
          ExchangeBootstrapId(**store, "gen/0/nccl_unique_id", r, [&]() -> Result<std::string> { return id; }, kBytes,
                              10.0);
    });
  }
  for (auto& th : threads) th.join();
  for (int r = 0; r < kRanks; ++r) {
    ASSERT_TRUE(got[static_cast<size_t>(r)].ok()) << "rank " << r << ": " << got[static_cast<size_t>(r)].status().ToString();
    EXPECT_EQ(*got[static_cast<size_t>(r)], id) << "rank " << r;
  }
}

TEST(NcclHost, BootstrapIdExchangeFailures) {
  TempDir t;
  auto store = OpenFileStore(t / "store");
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  auto never = []() -> Result<std::string> { return Internal("rank 0 must not be asked here"); };
  // Rank 0 never shows up: a bounded wait.
  const auto t0 = std::chrono::steady_clock::now();
  auto r = ExchangeBootstrapId(**store, "missing", 1, never, 128, 0.3);
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kTimeout) << r.status().ToString();
  EXPECT_NE(r.status().message().find("bootstrap id from rank 0"), std::string::npos) << r.status().ToString();
  EXPECT_LT(waited, 5.0);
  // Abort ends the wait.
  std::atomic<bool> abort{false};
  std::thread aborter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    abort.store(true);
  });
  r = ExchangeBootstrapId(**store, "missing", 2, never, 128, 30.0, &abort);
  aborter.join();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kAborted) << r.status().ToString();
  // Garbage and wrong sizes in the store are Corrupt, not a silently wrong id.
  ASSERT_TRUE((*store)->Set("garbage", "not hex!").ok());
  r = ExchangeBootstrapId(**store, "garbage", 1, never, 128, 1.0);
  EXPECT_EQ(r.status().code(), Code::kCorrupt) << r.status().ToString();
  ASSERT_TRUE((*store)->Set("short", HexEncode("abc")).ok());
  r = ExchangeBootstrapId(**store, "short", 1, never, 128, 1.0);
  EXPECT_EQ(r.status().code(), Code::kCorrupt) << r.status().ToString();
  // Rank 0's generator failing (e.g. NCCL unavailable) is its error, and nothing is published.
  r = ExchangeBootstrapId(**store, "k", 0, []() -> Result<std::string> { return Unavailable("no nccl"); }, 128, 1.0);
  EXPECT_EQ(r.status().code(), Code::kUnavailable);
  auto v = (*store)->TryGet("k");
  ASSERT_TRUE(v.ok());
  EXPECT_FALSE(v->has_value());
  r = ExchangeBootstrapId(**store, "k", 0, []() -> Result<std::string> { return std::string(5, 'x'); }, 128, 1.0);
  EXPECT_EQ(r.status().code(), Code::kInternal);
}

TEST(NcclHost, UniqueIdWithoutGpu) {
  auto id = NcclUniqueIdBytes();
  if (!id.ok()) GTEST_SKIP() << "ncclGetUniqueId failed here: " << id.status().ToString();
  EXPECT_EQ(id->size(), NcclUniqueIdSize());
  auto id2 = NcclUniqueIdBytes();
  ASSERT_TRUE(id2.ok());
  EXPECT_NE(*id, *id2) << "two unique ids should differ";
}

TEST(NcclHost, ConnectWithoutGpuIsCleanError) {
  if (HaveCudaDevice()) GTEST_SKIP() << "a CUDA device is present: the no-device path is not reachable";
  TempDir t;
  auto store = OpenFileStore(t / "store");
  ASSERT_TRUE(store.ok());
  NcclOptions o;
  o.timeout_s = 2;
  auto c = ConnectNcclCommunicator(*store, 0, 1, o);
  ASSERT_FALSE(c.ok());
  std::printf("  ConnectNcclCommunicator: %s\n", c.status().ToString().c_str());
  EXPECT_EQ(c.status().code(), Code::kUnavailable) << c.status().ToString();
  EXPECT_EQ(c.status().message().find('\n'), std::string::npos);
  EXPECT_EQ(ConnectNcclCommunicator(*store, 1, 1, o).status().code(), Code::kInvalidArgument);
}

// GPU only: a one-member NCCL group runs every collective on host buffers (staged) and on device buffers.
TEST(NcclGpu, SingleMemberGroupCollectives) {
  std::string why;
  if (!HaveCudaDevice(&why)) GTEST_SKIP() << "no CUDA device: " << why;
  TempDir t;
  auto store = OpenFileStore(t / "store");
  ASSERT_TRUE(store.ok());
  NcclOptions o;
  o.timeout_s = 20;
  auto cr = ConnectNcclCommunicator(*store, 0, 1, o);
  ASSERT_TRUE(cr.ok()) << cr.status().ToString();
  auto& c = *cr;
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->size(), 1);
  std::vector<int64_t> i64 = {1, -2, 1LL << 40};
  ASSERT_TRUE(c->AllreduceSum(i64.data(), i64.size()).ok());
  EXPECT_EQ(i64, (std::vector<int64_t>{1, -2, 1LL << 40}));
  std::vector<float> f = {1.5f, -2.25f};
  ASSERT_TRUE(c->AllreduceSum(f.data(), f.size()).ok());
  EXPECT_EQ(f, (std::vector<float>{1.5f, -2.25f}));
  std::vector<double> d = {3.0, -1e300};
  ASSERT_TRUE(c->AllreduceSum(d.data(), d.size()).ok());
  ASSERT_TRUE(c->AllreduceMax(d.data(), d.size()).ok());
  EXPECT_EQ(d, (std::vector<double>{3.0, -1e300}));
  std::string msg = "hello";
  ASSERT_TRUE(c->Broadcast(msg.data(), msg.size(), 0).ok());
  EXPECT_EQ(msg, "hello");
  std::string gathered(5, '\0');
  ASSERT_TRUE(c->Allgather(msg.data(), gathered.data(), msg.size()).ok());
  EXPECT_EQ(gathered, "hello");
  ASSERT_TRUE(c->Barrier().ok());
  // Device buffers are used in place.
  auto be = MakeBackend("cuda", 1);
  ASSERT_TRUE(be.ok()) << be.status().ToString();
  const size_t n = 1 << 20;
  std::vector<float> host(n);
  for (size_t i = 0; i < n; ++i) host[i] = static_cast<float>(i % 1000) * 0.5f;
  auto dev = (*be)->Alloc(n);
  ASSERT_TRUE(dev.ok());
  (*be)->Upload(*dev, host.data(), n);
  ASSERT_TRUE((*be)->Sync().ok());
  ASSERT_TRUE(c->AllreduceSum(*dev, n).ok());
  std::vector<float> back(n);
  (*be)->Download(back.data(), *dev, n);
  EXPECT_EQ(back, host);
  (*be)->Free(*dev);
  // Abort: later calls fail at once with kAborted.
  c->Abort();
  Status s = c->Barrier();
  EXPECT_EQ(s.code(), Code::kAborted) << s.ToString();
  EXPECT_EQ(c->AllreduceSum(f.data(), f.size()).code(), Code::kAborted);
}

#else  // !KEEL_HAVE_CUDA

TEST(CudaHost, BuiltWithoutCuda) { GTEST_SKIP() << "built without CUDA (KEEL_CUDA=OFF): host-side CUDA/NCCL tests skipped"; }

#endif

}  // namespace
}  // namespace keel
