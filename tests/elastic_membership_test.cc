// elastic_membership_test.cc: ElasticGroup (src/elastic/membership.h) against a rendezvous store that stops
// answering for a while, as a Redis server does while it restarts or fails over. The store here is a FileStore
// wrapped so that a given number of calls fail with the error the Redis store gives for a server that does not
// answer (kUnavailable).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
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

// Fails only the reads of one key, `fail_next` times: one peer's record that does not come back.
class OneKeyFlakyStore final : public Store {
 public:
  explicit OneKeyFlakyStore(std::shared_ptr<Store> base) : base_(std::move(base)) {}
  void FailReadsOf(const std::string& key, int n) {
    std::lock_guard<std::mutex> l(mu_);
    key_ = key;
    fail_next_ = n;
  }
  int failed() {
    std::lock_guard<std::mutex> l(mu_);
    return failed_;
  }
  Status Set(const std::string& key, std::string_view value) override { return base_->Set(key, value); }
  Result<bool> SetIfAbsent(const std::string& key, std::string_view value) override {
    return base_->SetIfAbsent(key, value);
  }
  Result<std::optional<std::string>> TryGet(const std::string& key) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      // The group may prefix its keys (a job namespace): match the end.
      const bool match = !key_.empty() && key.size() >= key_.size() &&
                         key.compare(key.size() - key_.size(), key_.size(), key_) == 0 &&
                         (key.size() == key_.size() || key[key.size() - key_.size() - 1] == '/');
      if (match && fail_next_ > 0) {
        --fail_next_;
        ++failed_;
        return Unavailable("rendezvous flaky: GET " + key + ": no reply within 1s");
      }
    }
    return base_->TryGet(key);
  }
  Result<int64_t> Increment(const std::string& key) override { return base_->Increment(key); }
  Result<int64_t> Counter(const std::string& key) override { return base_->Counter(key); }
  Status Clear() override { return base_->Clear(); }
  std::string Describe() const override { return "one-key flaky " + base_->Describe(); }

 private:
  std::shared_ptr<Store> base_;
  std::mutex mu_;
  std::string key_;
  int fail_next_ = 0, failed_ = 0;
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

// A live member of the previous generation whose record cannot be read for a moment (one store timeout) is not
// taken for absent: the re-forming member redoes its pass and then waits for it, as for any live member that has
// not noticed the failure yet. (It used to propose a generation without it at once, evicting a live member that
// then needed a full state transfer.)
TEST(ElasticMembership, AnUnreadablePeerRecordIsNotTakenForAnAbsentPeer) {
  TempDir t;
  auto base = OpenFileStore(t / "rdzv");
  ASSERT_TRUE(base.ok()) << base.status().ToString();
  auto flaky = std::make_shared<OneKeyFlakyStore>(*base);
  ElasticOptions o;
  o.t = ElasticTimeouts::From(2, 10);  // straggle_s 60: a live member of the old generation is waited for
  o.host = "127.0.0.1";
  o.expected_initial = 2;
  auto hb_a = OpenFileStore(t / "rdzv");
  auto hb_b = OpenFileStore(t / "rdzv");
  ASSERT_TRUE(hb_a.ok() && hb_b.ok());
  auto a = ElasticGroup::Join(flaky, *hb_a, o, nlohmann::json{{"job", "test"}}, nullptr, nullptr);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ElasticOptions ob = o;
  ob.rank = 1;
  auto b = ElasticGroup::Join(*base, *hb_b, ob, nlohmann::json{{"job", "test"}}, nullptr, nullptr);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  // Generation 0 of both.
  auto fb = std::async(std::launch::async, [&] { return (*b)->NextGeneration(nullptr, false); });
  auto ga = (*a)->NextGeneration(nullptr, false);
  auto gb = fb.get();
  ASSERT_TRUE(ga.ok() && gb.ok()) << ga.status().ToString() << " / " << gb.status().ToString();
  ASSERT_EQ(ga->members.size(), 2u);
  // A re-forms (its generation failed, say); B is alive and still in generation 0; B's record fails 5 reads.
  flaky->FailReadsOf("m/" + std::to_string((*b)->uid()), 5);
  std::atomic<bool> stop{false};
  auto next = std::async(std::launch::async, [&] { return (*a)->NextGeneration(&stop, false); });
  EXPECT_EQ(next.wait_for(std::chrono::milliseconds(2500)), std::future_status::timeout)
      << "formed a generation without its live peer";
  EXPECT_EQ(flaky->failed(), 5);
  stop = true;
  auto r = next.get();
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kAborted) << r.status().ToString();
}

bool Evicted(ElasticGroup& g, int64_t gen, int64_t uid) {
  auto r = g.EvictedSince(gen, uid);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() && *r;
}

// EvictedSince: the question a leader's checkpoint writer asks before it writes (a leader frozen mid-write may
// wake after the others re-formed without it and rolled back). False while no later generation exists, and for a
// member listed in the later one; true for the member it left out.
TEST(ElasticMembership, EvictedSinceTellsALeftOutMemberFromAListedOne) {
  TempDir t;
  auto store = OpenFileStore(t / "rdzv");
  auto hb_a = OpenFileStore(t / "rdzv");
  auto hb_b = OpenFileStore(t / "rdzv");
  ASSERT_TRUE(store.ok() && hb_a.ok() && hb_b.ok());
  ElasticOptions o;
  o.t = ElasticTimeouts::From(2, 10);
  o.host = "127.0.0.1";
  o.expected_initial = 2;
  auto a = ElasticGroup::Join(*store, *hb_a, o, nlohmann::json{{"job", "test"}}, nullptr, nullptr);
  ElasticOptions ob = o;
  ob.rank = 1;
  auto b = ElasticGroup::Join(*store, *hb_b, ob, nlohmann::json{{"job", "test"}}, nullptr, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  auto fb = std::async(std::launch::async, [&] { return (*b)->NextGeneration(nullptr, false); });
  auto ga = (*a)->NextGeneration(nullptr, false);
  auto gb = fb.get();
  ASSERT_TRUE(ga.ok() && gb.ok()) << ga.status().ToString() << " / " << gb.status().ToString();
  const int64_t gen = ga->gen, uid_a = (*a)->uid(), uid_b = (*b)->uid();
  EXPECT_FALSE(Evicted(**a, gen, uid_a));
  EXPECT_FALSE(Evicted(**b, gen, uid_b));
  // A goes; B re-forms alone.
  (*a)->Leave("gone");
  auto next = (*b)->NextGeneration(nullptr, false);
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  ASSERT_EQ(next->members, std::vector<int64_t>{uid_b});
  EXPECT_TRUE(Evicted(**a, gen, uid_a));
  EXPECT_FALSE(Evicted(**b, gen, uid_b));
}

}  // namespace
}  // namespace keel::testing
