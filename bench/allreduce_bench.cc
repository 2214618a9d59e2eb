// allreduce_bench.cc: achieved Gloo allreduce bandwidth between two workers on loopback, next to a plain TCP
// copy of the same bytes in the same run (the peer the issue asks for). Usage: allreduce_bench [PARAMS]
// (default 10.7M = config (b) of the foundation issue). Reports the deterministic payload (int64 per
// parameter) and the --fast payload (float per parameter).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <thread>
#include <vector>

#include "dist/gloo_communicator.h"
#include "dist/store.h"

namespace {

double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Sends `bytes` from one thread to another over a loopback TCP connection; returns GB/s.
double TcpCopyGBps(size_t bytes) {
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(ls, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(ls, reinterpret_cast<sockaddr*>(&a), &len);
  listen(ls, 1);
  std::vector<char> src(1 << 20, 1), dst(1 << 20);
  double t0 = 0, t1 = 0;
  std::thread rx([&] {
    int c = accept(ls, nullptr, nullptr);
    size_t got = 0;
    while (got < bytes) {
      ssize_t n = recv(c, dst.data(), dst.size(), 0);
      if (n <= 0) break;
      got += static_cast<size_t>(n);
    }
    t1 = Now();
    close(c);
  });
  int s = socket(AF_INET, SOCK_STREAM, 0);
  connect(s, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  t0 = Now();
  size_t sent = 0;
  while (sent < bytes) {
    ssize_t n = send(s, src.data(), std::min(src.size(), bytes - sent), 0);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
  rx.join();
  close(s);
  close(ls);
  return bytes / (t1 - t0) / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const size_t params = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 10'700'000;
  std::string dir = std::filesystem::temp_directory_path() / ("keel-allreduce-bench-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  auto store = keel::OpenFileStore(dir);
  if (!store.ok()) {
    std::fprintf(stderr, "%s\n", store.status().message().c_str());
    return 1;
  }
  const int reps = 5;
  double secs_i64[2] = {0, 0}, secs_f32[2] = {0, 0};
  std::vector<std::thread> workers;
  for (int r = 0; r < 2; ++r) {
    workers.emplace_back([&, r] {
      keel::GlooOptions o;
      o.hostname = "127.0.0.1";
      auto comm = keel::ConnectGlooCommunicator(keel::MakePrefixStore(store.value(), "bench"), r, 2, o);
      if (!comm.ok()) {
        std::fprintf(stderr, "rank %d: %s\n", r, comm.status().message().c_str());
        std::exit(1);
      }
      std::vector<int64_t> gi(params, r + 1);
      std::vector<float> gf(params, 1.0f);
      (void)(*comm)->AllreduceSum(gi.data(), params);  // warm up connections and buffers
      (void)(*comm)->Barrier();
      double t = Now();
      for (int k = 0; k < reps; ++k) (void)(*comm)->AllreduceSum(gi.data(), params);
      secs_i64[r] = (Now() - t) / reps;
      (void)(*comm)->Barrier();
      t = Now();
      for (int k = 0; k < reps; ++k) (void)(*comm)->AllreduceSum(gf.data(), params);
      secs_f32[r] = (Now() - t) / reps;
    });
  }
  for (auto& w : workers) w.join();
  std::filesystem::remove_all(dir);
  const double tcp = TcpCopyGBps(params * 8);
  const double b64 = params * 8.0, b32 = params * 4.0;
  std::printf("params %zu, 2 workers on loopback, mean of %d allreduces\n", params, reps);
  std::printf("| payload | bytes/step | allreduce time | allreduce GB/s (payload/time) | plain TCP copy GB/s | ratio |\n");
  std::printf("|---|---|---|---|---|---|\n");
  std::printf("| int64 (deterministic) | %.1f MB | %.1f ms | %.2f | %.2f | %.2f |\n", b64 / 1e6, secs_i64[0] * 1e3,
              b64 / secs_i64[0] / 1e9, tcp, b64 / secs_i64[0] / 1e9 / tcp);
  std::printf("| float (--fast) | %.1f MB | %.1f ms | %.2f | %.2f | %.2f |\n", b32 / 1e6, secs_f32[0] * 1e3,
              b32 / secs_f32[0] / 1e9, tcp, b32 / secs_f32[0] / 1e9 / tcp);
  return 0;
}
