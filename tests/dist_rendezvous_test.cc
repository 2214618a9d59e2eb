// dist_rendezvous_test.cc: rendezvous stores (file and a real redis-server), URL parsing, bounded waits, the
// worker-level join protocol (refusals, duplicate ranks, reused job ids, timeouts) and descriptor differences.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "dist/rendezvous.h"
#include "dist/store.h"
#include "dist_test_util.h"

namespace keel::testing {
namespace {

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST(StoreUrl, ParsesFileAndRedis) {
  auto f = ParseStoreUrl("file:///tmp/x/job1/");
  ASSERT_TRUE(f.ok()) << f.status().message();
  EXPECT_EQ(f->kind, StoreUrl::kFile);
  EXPECT_EQ(f->path, "/tmp/x/job1");
  EXPECT_EQ(f->job, "job1");

  auto r = ParseStoreUrl("redis://:s3cret@10.0.0.5:7000/run-42");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->kind, StoreUrl::kRedis);
  EXPECT_EQ(r->host, "10.0.0.5");
  EXPECT_EQ(r->port, 7000);
  EXPECT_EQ(r->password, "s3cret");
  EXPECT_EQ(r->job, "run-42");
  EXPECT_EQ(r->Redacted().find("s3cret"), std::string::npos);

  auto d = ParseStoreUrl("redis://host/j");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->port, 6379);
  EXPECT_TRUE(d->password.empty());

  // A password may hold '/'; IPv6 in brackets.
  auto slashed = ParseStoreUrl("redis://:ab/cd@[::1]:7000/j");
  ASSERT_TRUE(slashed.ok()) << slashed.status().message();
  EXPECT_EQ(slashed->password, "ab/cd");
  EXPECT_EQ(slashed->host, "::1");
  EXPECT_EQ(slashed->Redacted(), "redis://:***@[::1]:7000/j");

  for (const char* bad : {"redis://host:1", "redis://host:99999/j", "redis://:pw@/j", "redis://h:1/bad job",
                          "http://x/y", "file://", "tcp://h:1", "redis://host:/j", "redis://[::1]junk/j",
                          "redis://::1/j", "redis://h:+80/j", "redis://:s3cret@host", "redis://:s3/cret@h:1/bad job"}) {
    auto b = ParseStoreUrl(bad);
    EXPECT_FALSE(b.ok()) << bad;
    if (!b.ok()) {
      EXPECT_EQ(b.status().code(), Code::kInvalidArgument) << bad;
      EXPECT_EQ(b.status().message().find('\n'), std::string::npos);
      EXPECT_EQ(b.status().message().find("s3"), std::string::npos) << "the password shows: " << b.status().message();
    }
  }
}

void ExerciseStore(Store& s) {
  ASSERT_TRUE(s.Set("a/b", "one").ok());
  auto v = s.TryGet("a/b");
  ASSERT_TRUE(v.ok());
  ASSERT_TRUE(v->has_value());
  EXPECT_EQ(**v, "one");
  ASSERT_TRUE(s.Set("a/b", std::string("t\0o", 3)).ok());
  EXPECT_EQ(*Must(s.TryGet("a/b")), std::string("t\0o", 3));
  EXPECT_FALSE(Must(s.TryGet("missing")).has_value());
  EXPECT_TRUE(Must(s.SetIfAbsent("x", "1")));
  EXPECT_FALSE(Must(s.SetIfAbsent("x", "2")));
  EXPECT_EQ(*Must(s.TryGet("x")), "1");
  EXPECT_EQ(Must(s.Counter("n")), 0);
  EXPECT_EQ(Must(s.Increment("n")), 1);
  EXPECT_EQ(Must(s.Increment("n")), 2);
  EXPECT_EQ(Must(s.Counter("n")), 2);
  auto p = MakePrefixStore(std::shared_ptr<Store>(&s, [](Store*) {}), "gen/3");
  ASSERT_TRUE(p->Set("k", "v").ok());
  EXPECT_EQ(*Must(s.TryGet("gen/3/k")), "v");
  EXPECT_EQ(Must(p->Increment("c")), 1);
  EXPECT_EQ(Must(s.Counter("gen/3/c")), 1);

  // WaitGet: returns a value written later, and times out (bounded) on one never written.
  std::thread writer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    (void)s.Set("late", "here");
  });
  auto w = WaitGet(s, "late", 5, "late key");
  writer.join();
  ASSERT_TRUE(w.ok()) << w.status().message();
  EXPECT_EQ(*w, "here");
  auto t0 = std::chrono::steady_clock::now();
  auto never = WaitGet(s, "never", 0.3, "a key nobody writes");
  EXPECT_EQ(never.status().code(), Code::kTimeout);
  EXPECT_NE(never.status().message().find("a key nobody writes"), std::string::npos);
  EXPECT_LT(Since(t0), 2.0);
  std::atomic<bool> abort{true};
  EXPECT_EQ(WaitGet(s, "never", 10, "x", &abort).status().code(), Code::kAborted);

  ASSERT_TRUE(s.Clear().ok());
  EXPECT_FALSE(Must(s.TryGet("x")).has_value());
  EXPECT_EQ(Must(s.Counter("n")), 0);
}

TEST(FileStore, Operations) {
  TempDir t;
  auto s = OpenFileStore(t / "job");
  ASSERT_TRUE(s.ok()) << s.status().message();
  ExerciseStore(**s);
}

TEST(FileStore, ClearLeavesForeignFiles) {
  TempDir t;
  auto s = OpenFileStore(t.path());
  ASSERT_TRUE(s.ok());
  WriteText(t / "precious.txt", "keep me");
  ASSERT_TRUE((*s)->Set("k", "v").ok());
  ASSERT_TRUE((*s)->Clear().ok());
  EXPECT_EQ(ReadFileText(t / "precious.txt"), "keep me");
}

TEST(FileStore, ConcurrentIncrementsAreUnique) {
  TempDir t;
  auto s = OpenFileStore(t / "job");
  ASSERT_TRUE(s.ok());
  std::vector<int64_t> got(8);
  std::vector<std::thread> th;
  for (int i = 0; i < 8; ++i) th.emplace_back([&, i] { got[i] = Must((*s)->Increment("c")); });
  for (auto& x : th) x.join();
  std::sort(got.begin(), got.end());
  for (int i = 0; i < 8; ++i) EXPECT_EQ(got[i], i + 1);
}

TEST(RedisStore, OperationsAndJobIsolation) {
  if (!HaveRedis()) KEEL_SKIP_UNLESS_REQUIRED("redis-server not installed");
  RedisServer redis;
  ASSERT_TRUE(redis.ok());
  auto s = OpenStore(Must(ParseStoreUrl(redis.Url("jobA"))));
  ASSERT_TRUE(s.ok()) << s.status().message();
  auto other = OpenStore(Must(ParseStoreUrl(redis.Url("jobB"))));
  ASSERT_TRUE(other.ok());
  ASSERT_TRUE((*other)->Set("x", "B's").ok());
  ExerciseStore(**s);
  EXPECT_EQ(*Must((*other)->TryGet("x")), "B's");  // jobA's Clear left jobB alone
}

TEST(RedisStore, PasswordRequiredWrongAndRight) {
  if (!HaveRedis()) KEEL_SKIP_UNLESS_REQUIRED("redis-server not installed");
  RedisServer redis("hunter2");
  ASSERT_TRUE(redis.ok());
  auto ok = OpenStore(Must(ParseStoreUrl(redis.Url("j"))));
  ASSERT_TRUE(ok.ok()) << ok.status().message();
  EXPECT_TRUE((*ok)->Set("k", "v").ok());

  auto t0 = std::chrono::steady_clock::now();
  auto wrong = OpenStore(Must(ParseStoreUrl("redis://:nope@127.0.0.1:" + std::to_string(redis.port()) + "/j")));
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.status().message().find("authentication failed"), std::string::npos) << wrong.status().message();
  EXPECT_EQ(wrong.status().message().find("nope"), std::string::npos) << "the password leaked into the message";
  auto none = OpenStore(Must(ParseStoreUrl("redis://127.0.0.1:" + std::to_string(redis.port()) + "/j")));
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("requires a password"), std::string::npos) << none.status().message();
  EXPECT_LT(Since(t0), 5.0);
}

// A connection the server dropped while idle (its idle timeout, a restart, a NAT cut-off) is reopened by the
// next command instead of failing it, WaitGet's polls included.
TEST(RedisStore, AConnectionDroppedWhileIdleIsReopened) {
  if (!HaveRedis()) KEEL_SKIP_UNLESS_REQUIRED("redis-server not installed");
  RedisServer redis;
  ASSERT_TRUE(redis.ok());
  auto s = OpenStore(Must(ParseStoreUrl(redis.Url("j"))));
  ASSERT_TRUE(s.ok()) << s.status().message();
  ASSERT_TRUE((*s)->Set("k", "v").ok());
  auto kill = RunCommand(redis.Cli() + " client kill type normal");
  ASSERT_EQ(kill.exit_code, 0) << kill.output;
  auto v = (*s)->TryGet("k");
  ASSERT_TRUE(v.ok()) << v.status().message();
  EXPECT_EQ(**v, "v");
  ASSERT_EQ(RunCommand(redis.Cli() + " client kill type normal").exit_code, 0);
  EXPECT_TRUE((*s)->Set("k2", "w").ok());
  ASSERT_EQ(RunCommand(redis.Cli() + " client kill type normal").exit_code, 0);
  auto w = WaitGet(**s, "k2", 5, "k2");
  ASSERT_TRUE(w.ok()) << w.status().message();
  EXPECT_EQ(*w, "w");
}

TEST(RedisStore, UnreachableFailsFast) {
  const int port = FreePort();  // nothing listens there
  auto t0 = std::chrono::steady_clock::now();
  auto s = OpenStore(Must(ParseStoreUrl("redis://127.0.0.1:" + std::to_string(port) + "/job")), 2);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), Code::kUnavailable);
  EXPECT_NE(s.status().message().find("cannot reach rendezvous redis://127.0.0.1:" + std::to_string(port)),
            std::string::npos)
      << s.status().message();
  EXPECT_LT(Since(t0), 3.0);
}

TEST(Descriptor, NamesTheFirstDifference) {
  nlohmann::json job = {{"keel_version", "0.1.0"}, {"model", {{"dim", 32}, {"heads", 2}}}, {"data_fingerprint", "ab"}};
  EXPECT_EQ(DescriptorDifference(job, job), "");
  auto mine = job;
  mine["model"]["dim"] = 64;
  EXPECT_EQ(DescriptorDifference(job, mine), "model config differs: dim: job has 32, this worker has 64");
  mine = job;
  mine["data_fingerprint"] = "cd";
  EXPECT_EQ(DescriptorDifference(job, mine), "data fingerprint differs: job has ab, this worker has cd");
  mine = job;
  mine["keel_version"] = "0.2.0";
  EXPECT_EQ(DescriptorDifference(job, mine), "keel version differs: job has 0.1.0, this worker has 0.2.0");
}

// The worker-level protocol with threads as workers over one file store.
TEST(WorkerGroup, JoinRefusalDuplicateAndTimeout) {
  TempDir t;
  RendezvousOptions o;
  o.rdzv_timeout_s = 5;
  nlohmann::json desc = {{"model", {{"dim", 32}}}};
  {  // Three workers, one with another model: it is refused, and the others fail at once naming it.
    auto store = Must(OpenFileStore(t / "job1"));
    std::vector<Status> st(3);
    std::vector<std::thread> th;
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < 3; ++r)
      th.emplace_back([&, r] {
        nlohmann::json d = desc;
        if (r == 2) d["model"]["dim"] = 64;
        auto g = WorkerGroup::Join(store, "job1", r, 3, d, o);
        st[r] = g.ok() ? Status::Ok() : g.status();
      });
    for (auto& x : th) x.join();
    EXPECT_LT(Since(t0), 3.0);
    EXPECT_EQ(st[2].message(), "refused by job job1: model config differs: dim: job has 32, this worker has 64");
    for (int r = 0; r < 2; ++r) {
      EXPECT_FALSE(st[r].ok());
      EXPECT_NE(st[r].message().find("rank 2"), std::string::npos) << st[r].message();
      EXPECT_NE(st[r].message().find("model config differs"), std::string::npos) << st[r].message();
    }
  }
  {  // A job id used before: its keys are still there.
    auto store = Must(OpenFileStore(t / "job1"));
    auto g = WorkerGroup::Join(store, "job1", 0, 3, desc, o);
    ASSERT_FALSE(g.ok());
    EXPECT_NE(g.status().message().find("used before"), std::string::npos) << g.status().message();
  }
  {  // A missing worker: bounded by the rendezvous timeout, naming the missing rank.
    auto store = Must(OpenFileStore(t / "job2"));
    RendezvousOptions quick = o;
    quick.rdzv_timeout_s = 0.5;
    auto t0 = std::chrono::steady_clock::now();
    auto g = WorkerGroup::Join(store, "job2", 0, 2, desc, quick);
    ASSERT_FALSE(g.ok());
    EXPECT_EQ(g.status().code(), Code::kTimeout);
    EXPECT_NE(g.status().message().find("missing ranks: 1"), std::string::npos) << g.status().message();
    EXPECT_LT(Since(t0), 3.0);
  }
}

TEST(NodeJoin, AssignsNodesAndRefusesExtraOrMismatched) {
  TempDir t;
  auto store = Must(OpenFileStore(t / "job"));
  RendezvousOptions o;
  o.rdzv_timeout_s = 5;
  std::vector<Result<NodeAssignment>> got(2, Result<NodeAssignment>(Internal("unset")));
  std::vector<std::thread> th;
  for (int i = 0; i < 2; ++i) th.emplace_back([&, i] { got[i] = JoinAsNode(*store, "job", 2, 2, 3, o); });
  for (auto& x : th) x.join();
  ASSERT_TRUE(got[0].ok()) << got[0].status().message();
  ASSERT_TRUE(got[1].ok()) << got[1].status().message();
  EXPECT_EQ(got[0]->nnodes, 2);
  EXPECT_EQ(got[1]->nnodes, 2);
  EXPECT_EQ(got[0]->node_rank + got[1]->node_rank, 1);
  auto late = JoinAsNode(*store, "job", 2, 2, 3, o);
  ASSERT_FALSE(late.ok());
  EXPECT_NE(late.status().message().find("refused by job job"), std::string::npos) << late.status().message();

  auto store2 = Must(OpenFileStore(t / "job2"));
  std::vector<Result<NodeAssignment>> mixed(2, Result<NodeAssignment>(Internal("unset")));
  std::thread a([&] { mixed[0] = JoinAsNode(*store2, "job2", 2, 2, 2, o); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::thread b([&] { mixed[1] = JoinAsNode(*store2, "job2", 2, 2, 4, o); });
  a.join();
  b.join();
  EXPECT_TRUE(mixed[0].ok());
  ASSERT_FALSE(mixed[1].ok());
  EXPECT_NE(mixed[1].status().message().find("--nproc-per-node differs"), std::string::npos)
      << mixed[1].status().message();
}

}  // namespace
}  // namespace keel::testing
