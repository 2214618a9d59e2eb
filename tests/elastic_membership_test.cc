// elastic_membership_test.cc: ElasticGroup (src/elastic/membership.h) against a rendezvous store that stops
// answering for a while, as a Redis server does while it restarts or fails over. The store here is a FileStore
// wrapped so that a given number of calls fail with the error the Redis store gives for a server that does not
// answer (kUnavailable).
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dist/store.h"
#include "elastic/membership.h"
#include "test_util.h"

namespace keel::testing {
namespace {

class FlakyStore final : public Store {
 public:
  explicit FlakyStore(std::shared_ptr<Store> base) : base_(std::move(base)) {}
  std::atomic<int> fail_next{0};  // the next N calls fail
  std::atomic<int> failed{0};

  Status Set(const std::string& key, std::string_view value) override {
    if (Fail()) return Down();
    return base_->Set(key, value);
  }
  Result<bool> SetIfAbsent(const std::string& key, std::string_view value) override {
    if (Fail()) return Down();
    return base_->SetIfAbsent(key, value);
  }
  Result<std::optional<std::string>> TryGet(const std::string& key) override {
    if (Fail()) return Down();
    return base_->TryGet(key);
  }
  Result<int64_t> Increment(const std::string& key) override {
    if (Fail()) return Down();
    return base_->Increment(key);
  }
  Result<int64_t> Counter(const std::string& key) override {
    if (Fail()) return Down();
    return base_->Counter(key);
  }
  Status Clear() override { return base_->Clear(); }
  std::string Describe() const override { return "flaky " + base_->Describe(); }

 private:
  bool Fail() {
    for (int n = fail_next.load(); n > 0;)
      if (fail_next.compare_exchange_weak(n, n - 1)) {
        ++failed;
        return true;
      }
    return false;
  }
  static Status Down() { return Unavailable("rendezvous flaky: GET: no reply within 1s"); }
  std::shared_ptr<Store> base_;
};

// A store outage while the group forms is waited out (before, the first failed call ended the worker, and so every
// member re-forming at that moment: one Redis restart during a re-form ended the job).
TEST(ElasticMembership, AStoreOutageWhileFormingIsWaitedOut) {
  TempDir t;
  auto base = OpenFileStore(t / "rdzv");
  ASSERT_TRUE(base.ok()) << base.status().ToString();
  auto hb = OpenFileStore(t / "rdzv");
  ASSERT_TRUE(hb.ok());
  auto flaky = std::make_shared<FlakyStore>(*base);
  ElasticOptions o;
  o.t = ElasticTimeouts::From(2, 10);
  o.host = "127.0.0.1";
  std::mutex mu;
  std::vector<std::string> logs;
  auto g = ElasticGroup::Join(flaky, *hb, o, nlohmann::json{{"job", "test"}}, nullptr, [&](const std::string& l) {
    std::lock_guard<std::mutex> lock(mu);
    logs.push_back(l);
  });
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  flaky->fail_next = 20;  // ~2 s of failed polls
  auto gen = (*g)->NextGeneration(nullptr, false);
  ASSERT_TRUE(gen.ok()) << gen.status().ToString();
  EXPECT_EQ(gen->members.size(), 1u);
  EXPECT_EQ(flaky->failed.load(), 20);
  std::lock_guard<std::mutex> lock(mu);
  std::string all;
  for (const auto& l : logs) all += l + "\n";
  EXPECT_NE(all.find("rendezvous store unavailable while forming a generation"), std::string::npos) << all;
  EXPECT_NE(all.find("rendezvous store answers again"), std::string::npos) << all;
}

}  // namespace
}  // namespace keel::testing
