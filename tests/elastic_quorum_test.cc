// elastic_quorum_test.cc: the pure decisions of elastic training with a fake clock — quorum (who forms the next
// generation, when), micro-batch assignment, the commit vote, the state-sync plan, timeouts, fault specs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>

#include "elastic/events.h"
#include "elastic/fault_inject.h"
#include "elastic/quorum.h"

namespace keel {
namespace {

PeerInfo Peer(int64_t uid, double last_seen, bool ready = false, int64_t after = -2, bool gone = false) {
  PeerInfo p;
  p.uid = uid;
  p.last_seen = last_seen;
  p.ready = ready;
  p.after = after;
  p.gone = gone;
  return p;
}

QuorumConfig Config(int min_workers = 1) {
  QuorumConfig c;
  c.min_workers = min_workers;
  c.stale_s = 1.5;
  c.straggle_s = 60;
  c.initial_wait_s = 30;
  return c;
}

TEST(Quorum, FirstGenerationWaitsForTheLaunchedWorkersThenTheLowestProposes) {
  QuorumView v;
  v.my_uid = 0;
  v.after = -1;
  v.ready_since = 100;
  v.expected_initial = 3;
  v.peers = {Peer(0, 100, true, -1), Peer(1, 100, true, -1)};
  auto d = Decide(100.5, v, Config());
  EXPECT_EQ(d.kind, QuorumDecision::kWait) << d.reason;
  EXPECT_NE(d.reason.find("2 of 3"), std::string::npos) << d.reason;
  v.peers.push_back(Peer(2, 100.4, true, -1));
  d = Decide(100.5, v, Config());
  ASSERT_EQ(d.kind, QuorumDecision::kPropose) << d.reason;
  EXPECT_EQ(d.gen, 0);
  EXPECT_EQ(d.members, (std::vector<int64_t>{0, 1, 2}));
  // The others wait for the leader.
  v.my_uid = 2;
  d = Decide(100.5, v, Config());
  EXPECT_EQ(d.kind, QuorumDecision::kWait);
  EXPECT_NE(d.reason.find("leader (member 0)"), std::string::npos) << d.reason;
}

TEST(Quorum, FirstGenerationStartsWithoutAMissingWorkerAfterTheInitialWait) {
  QuorumView v;
  v.my_uid = 0;
  v.after = -1;
  v.ready_since = 100;
  v.expected_initial = 3;
  v.peers = {Peer(0, 100, true, -1), Peer(1, 100, true, -1)};
  v.peers = {Peer(0, 129.9, true, -1), Peer(1, 129.9, true, -1)};  // heartbeating while they wait
  EXPECT_EQ(Decide(129.9, v, Config()).kind, QuorumDecision::kWait);
  auto d = Decide(130.1, v, Config());
  ASSERT_EQ(d.kind, QuorumDecision::kPropose);
  EXPECT_EQ(d.members, (std::vector<int64_t>{0, 1}));
}

TEST(Quorum, AnExistingProposalIsJoinedOrSkipped) {
  QuorumView v;
  v.my_uid = 4;
  v.after = 2;
  v.next_exists = true;
  v.next_members = {1, 4};
  auto d = Decide(0, v, Config());
  EXPECT_EQ(d.kind, QuorumDecision::kJoin);
  EXPECT_EQ(d.gen, 3);
  v.next_members = {1, 2};
  d = Decide(0, v, Config());
  EXPECT_EQ(d.kind, QuorumDecision::kSkip);
  EXPECT_EQ(d.gen, 3);
}

// Generation 5 = {0,1,2}; member 1 crashed. Its heartbeat is still fresh for a while: the leader waits for it
// (it might just be busy) unless it is known gone, then proposes without it as soon as it goes stale.
TEST(Quorum, SurvivorsReformWithoutAStaleMember) {
  QuorumView v;
  v.my_uid = 0;
  v.after = 5;
  v.ready_since = 10;
  v.prev_members = {0, 1, 2};
  v.peers = {Peer(0, 10, true, 5), Peer(1, 9.9), Peer(2, 10, true, 5)};
  auto d = Decide(10.2, v, Config());
  EXPECT_EQ(d.kind, QuorumDecision::kWait) << d.reason;
  EXPECT_NE(d.reason.find("member(s) [1]"), std::string::npos) << d.reason;
  // 1.5 s after its last heartbeat it is dead.
  d = Decide(11.41, v, Config());
  ASSERT_EQ(d.kind, QuorumDecision::kPropose) << d.reason;
  EXPECT_EQ(d.gen, 6);
  EXPECT_EQ(d.members, (std::vector<int64_t>{0, 2}));
  // A process known to be gone (same host /proc, or its status) is not waited for at all.
  v.peers[1].gone = true;
  d = Decide(10.2, v, Config());
  ASSERT_EQ(d.kind, QuorumDecision::kPropose) << d.reason;
  EXPECT_EQ(d.members, (std::vector<int64_t>{0, 2}));
}

TEST(Quorum, StaleBoundaryWithAFakeClock) {
  PeerInfo p = Peer(3, 50.0);
  EXPECT_TRUE(Alive(p, 51.5, 1.5));
  EXPECT_FALSE(Alive(p, 51.5001, 1.5));
  p.gone = true;
  EXPECT_FALSE(Alive(p, 50.0, 1.5));
}

// A live member of the failed generation that never arrives (stuck outside a collective) is left out after
// straggle_s.
TEST(Quorum, ALiveButAbsentMemberIsLeftOutAfterTheStraggleWindow) {
  QuorumView v;
  v.my_uid = 0;
  v.after = 1;
  v.ready_since = 0;
  v.prev_members = {0, 1};
  auto c = Config();
  for (double t : {1.0, 30.0, 59.0}) {
    v.peers = {Peer(0, t, true, 1), Peer(1, t)};  // 1 keeps heartbeating
    EXPECT_EQ(Decide(t, v, c).kind, QuorumDecision::kWait) << t;
  }
  v.peers = {Peer(0, 60.5, true, 1), Peer(1, 60.5)};
  auto d = Decide(60.5, v, c);
  ASSERT_EQ(d.kind, QuorumDecision::kPropose);
  EXPECT_EQ(d.members, (std::vector<int64_t>{0}));
}

// A joiner ready after a running, healthy generation never proposes over it: it waits to be admitted.
TEST(Quorum, AJoinerNeverProposesOverAHealthyGeneration) {
  QuorumView v;
  v.my_uid = 7;
  v.after = 3;
  v.ready_since = 0;
  v.prev_members = {0, 2};
  for (double t : {0.1, 59.0, 600.0}) {
    v.peers = {Peer(0, t), Peer(2, t), Peer(7, t, true, 3)};
    auto d = Decide(t, v, Config());
    EXPECT_EQ(d.kind, QuorumDecision::kWait) << t;
    EXPECT_NE(d.reason.find("is running"), std::string::npos) << d.reason;
  }
  // Once the members come to the quorum (a step boundary), the joiner is included.
  v.my_uid = 0;
  v.peers = {Peer(0, 601, true, 3), Peer(2, 601, true, 3), Peer(7, 601, true, 3)};
  auto d = Decide(601, v, Config());
  ASSERT_EQ(d.kind, QuorumDecision::kPropose);
  EXPECT_EQ(d.members, (std::vector<int64_t>{0, 2, 7}));
  // If the whole generation died, the joiners carry on by themselves.
  v.my_uid = 7;
  v.peers = {Peer(0, 500), Peer(2, 500), Peer(7, 601, true, 3)};
  d = Decide(601, v, Config());
  ASSERT_EQ(d.kind, QuorumDecision::kPropose);
  EXPECT_EQ(d.members, (std::vector<int64_t>{7}));
}

// A joiner whose address its peers cannot reach made every generation with it fail to form, forever. After three
// failed generations (and none formed with it) it is left out, and the members that ran before re-form alone.
TEST(Quorum, AJoinerThatKeepsGroupsFromFormingIsLeftOut) {
  auto with_state = [](PeerInfo p) {
    p.has_state = true;
    return p;
  };
  std::vector<PeerInfo> peers = {with_state(Peer(0, 100, true, 5)), with_state(Peer(2, 100, true, 5)),
                                 Peer(7, 100, true, 5)};
  // Generation 3 {0, 2} formed; 4, 5 and 6 {0, 2, 7} failed.
  std::vector<FormAttempt> recent = {{{0, 2, 7}, true}, {{0, 2, 7}, true}, {{0, 2, 7}, true}, {{0, 2}, false}};
  EXPECT_EQ(UnreachableJoiners(recent, peers), std::vector<int64_t>{7});
  // Two failures are not enough (a loaded machine can miss the forming bound twice).
  EXPECT_TRUE(UnreachableJoiners({recent[0], recent[1], recent[3]}, peers).empty());
  // A failure with a member that has died since is not counted against the joiner: member 5 was in one of them.
  EXPECT_TRUE(UnreachableJoiners({{{0, 2, 7}, true}, {{0, 2, 5, 7}, true}, {{0, 2, 7}, true}}, peers).empty());
  // A member that holds state is never the suspect; a joiner that once formed a group is not either.
  peers[2].has_state = true;
  EXPECT_TRUE(UnreachableJoiners(recent, peers).empty());
  peers[2].has_state = false;
  EXPECT_TRUE(UnreachableJoiners({{{0, 2, 7}, true}, {{0, 2, 7}, true}, {{0, 2, 7}, false}, {{0, 2, 7}, true}}, peers)
                  .empty());
  // Nobody holds state (the whole job restarted): the fault could be anyone's, so nobody is excluded.
  std::vector<PeerInfo> fresh = {Peer(0, 100, true, 5), Peer(2, 100, true, 5), Peer(7, 100, true, 5)};
  EXPECT_TRUE(UnreachableJoiners(recent, fresh).empty());

  // The leader's proposal leaves it out, without waiting for it as a member of the failed generation 5.
  QuorumView v;
  v.my_uid = 0;
  v.after = 6;
  v.ready_since = 99;
  v.prev_members = {0, 2, 7};
  v.peers = peers;
  v.unreachable = UnreachableJoiners(recent, peers);
  auto d = Decide(100, v, Config());
  ASSERT_EQ(d.kind, QuorumDecision::kPropose) << d.reason;
  EXPECT_EQ(d.members, (std::vector<int64_t>{0, 2}));
  // Without the exclusion it would be proposed again, and fail again.
  v.unreachable.clear();
  d = Decide(100, v, Config());
  ASSERT_EQ(d.kind, QuorumDecision::kPropose) << d.reason;
  EXPECT_EQ(d.members, (std::vector<int64_t>{0, 2, 7}));
}

TEST(Quorum, BelowMinWorkersTheJobWaitsInsteadOfFailing) {
  QuorumView v;
  v.my_uid = 0;
  v.after = 4;
  v.prev_members = {0, 1, 2};
  v.peers = {Peer(0, 0, true, 4), Peer(1, -10), Peer(2, -10)};
  for (double t : {0.0, 100.0, 10000.0}) {
    v.peers[0].last_seen = t;
    auto d = Decide(t, v, Config(2));
    EXPECT_EQ(d.kind, QuorumDecision::kWait);
    EXPECT_NE(d.reason.find("below quorum: 1 of --min-workers 2"), std::string::npos) << d.reason;
  }
  v.peers.push_back(Peer(9, 10000, true, 4));  // a replacement arrives
  auto d = Decide(10000, v, Config(2));
  ASSERT_EQ(d.kind, QuorumDecision::kPropose);
  EXPECT_EQ(d.members, (std::vector<int64_t>{0, 9}));
}

TEST(Quorum, MaxWorkersKeepsPreviousMembersFirst) {
  QuorumView v;
  v.my_uid = 1;
  v.after = 2;
  v.prev_members = {1, 5};
  v.peers = {Peer(1, 0, true, 2), Peer(3, 0, true, 2), Peer(4, 0, true, 2), Peer(5, 0, true, 2)};
  auto c = Config();
  c.max_workers = 3;
  auto d = Decide(0, v, c);
  ASSERT_EQ(d.kind, QuorumDecision::kPropose);
  EXPECT_EQ(d.members, (std::vector<int64_t>{1, 3, 5}));
}

// The lowest ready uid is a joiner that --max-workers leaves out (the previous members come first): the lowest
// member of the generation proposes, and the joiner waits. (The leader used to be the lowest ready uid: it waited
// for a generation listing it while the others waited for its proposal, for ever.)
TEST(Quorum, ALowestJoinerLeftOutByMaxWorkersDoesNotBlockTheProposal) {
  auto c = Config();
  c.max_workers = 2;
  QuorumView v;
  v.after = 2;
  v.prev_members = {3, 4};
  v.peers = {Peer(2, 0, true, 2), Peer(3, 0, true, 2), Peer(4, 0, true, 2)};
  v.my_uid = 3;
  auto d = Decide(0, v, c);
  ASSERT_EQ(d.kind, QuorumDecision::kPropose) << d.reason;
  EXPECT_EQ(d.members, (std::vector<int64_t>{3, 4}));
  v.my_uid = 4;
  d = Decide(0, v, c);
  EXPECT_EQ(d.kind, QuorumDecision::kWait);
  EXPECT_NE(d.reason.find("waiting for the leader (member 3)"), std::string::npos) << d.reason;
  v.my_uid = 2;
  d = Decide(0, v, c);
  EXPECT_EQ(d.kind, QuorumDecision::kWait);
  EXPECT_NE(d.reason.find("member 3"), std::string::npos) << d.reason;
}

// ---- assignment ----

TEST(Assign, CoversEveryMissingMicroBatchOnceAndKeepsHoldings) {
  const int M = 8;
  std::vector<MicroSet> held(3);
  held[0].Set(0), held[0].Set(3);
  held[2].Set(5);
  auto a = AssignMicroBatches(M, held, {1, 1, 1}, {});
  MicroSet all;
  int total = 0;
  for (int k = 0; k < 3; ++k) {
    EXPECT_FALSE(a[static_cast<size_t>(k)].Intersects(held[static_cast<size_t>(k)]));
    for (const auto& h : held) EXPECT_FALSE(a[static_cast<size_t>(k)].Intersects(h));
    EXPECT_FALSE(all.Intersects(a[static_cast<size_t>(k)]));
    all |= a[static_cast<size_t>(k)];
    total += a[static_cast<size_t>(k)].Count();
  }
  for (const auto& h : held) all |= h;
  EXPECT_TRUE(all == MicroSet::All(M));
  EXPECT_EQ(total, 5);
  // Loads end up balanced (targets 3, 3, 2 -> holdings count).
  EXPECT_EQ(a[0].Count() + held[0].Count(), 3);
  EXPECT_EQ(a[1].Count() + held[1].Count(), 3);
  EXPECT_EQ(a[2].Count() + held[2].Count(), 2);
}

TEST(Assign, SlowerMembersGetFewerAndAvoidanceIsHonoured) {
  auto a = AssignMicroBatches(12, std::vector<MicroSet>(3), {1, 1, 0.5}, {});
  EXPECT_EQ(a[0].Count(), 5);
  EXPECT_EQ(a[1].Count(), 5);
  EXPECT_EQ(a[2].Count(), 2);
  std::vector<MicroSet> avoid(2);
  avoid[0].Set(0);
  auto b = AssignMicroBatches(2, std::vector<MicroSet>(2), {1, 1}, avoid);
  EXPECT_TRUE(b[1].Has(0));
  // When everyone avoids it, it still gets computed.
  avoid[1].Set(0);
  auto c = AssignMicroBatches(2, std::vector<MicroSet>(2), {1, 1}, avoid);
  EXPECT_TRUE(c[0].Has(0) || c[1].Has(0));
}

// ---- the vote ----

std::vector<VoteRecord> Votes(int n, int M) {
  std::vector<VoteRecord> v(static_cast<size_t>(n));
  for (int k = 0; k < n; ++k) {
    v[static_cast<size_t>(k)].uid = 10 + k;
    v[static_cast<size_t>(k)].gen = 3;
    v[static_cast<size_t>(k)].step = 42;
    v[static_cast<size_t>(k)].params_hash = 0xABC;
  }
  for (int i = 0; i < M; ++i) {
    v[static_cast<size_t>(i % n)].held.Set(i);
    v[static_cast<size_t>(i % n)].loss[i] = 1.0 + i;
  }
  return v;
}

TEST(Vote, CommitsWhenEverythingAgreesAndTheLossIsExact) {
  VoteConfig c;
  c.M = 4;
  StrikeBook strikes;
  std::vector<std::pair<int, int64_t>> bad;
  auto o = DecideCommit(Votes(3, 4), c, &strikes, &bad);
  EXPECT_TRUE(o.commit) << o.reason;
  EXPECT_DOUBLE_EQ(o.loss, (1 + 2 + 3 + 4) / 4.0);
}

// diloco (partial): a round commits with the pseudo-gradients that are held, without the lost member's
// micro-batches; the loss is the mean over the held ones. Data-parallel steps still need every micro-batch.
TEST(Vote, PartialCommitsWithTheHoldingsThatExist) {
  VoteConfig c;
  c.M = 6;
  StrikeBook strikes;
  std::vector<std::pair<int, int64_t>> bad;
  auto v = Votes(3, 6);
  v.pop_back();  // member 2 (micro-batches 2 and 5) is gone
  EXPECT_FALSE(DecideCommit(v, c, &strikes, &bad).commit);
  c.partial = true;
  auto o = DecideCommit(v, c, &strikes, &bad);
  EXPECT_TRUE(o.commit) << o.reason;
  EXPECT_DOUBLE_EQ(o.loss, (1 + 2 + 4 + 5) / 4.0);
  for (auto& r : v) r.held = MicroSet{};  // nobody holds anything: nothing to apply
  EXPECT_FALSE(DecideCommit(v, c, &strikes, &bad).commit);
}

TEST(Vote, NonFiniteAbortsBlamesTheMemberThenQuarantinesOnRepeat) {
  VoteConfig c;
  c.M = 4;
  StrikeBook strikes;
  std::vector<std::pair<int, int64_t>> bad;
  auto v = Votes(3, 4);
  v[1].held.Clear(1);
  v[1].bad.Set(1);
  auto o = DecideCommit(v, c, &strikes, &bad);
  EXPECT_FALSE(o.commit);
  EXPECT_EQ(o.clear_holdings, std::vector<int>{1});
  ASSERT_EQ(o.avoid.size(), 1u);
  EXPECT_EQ(o.avoid[0], std::make_pair(1, 1));
  EXPECT_TRUE(o.quarantine.empty());
  EXPECT_NE(o.reason.find("member 11: non-finite"), std::string::npos) << o.reason;
  // The redo on member 2 is fine: commit.
  auto w = Votes(3, 4);
  w[2].held.Set(1);
  w[1].held.Clear(1);
  EXPECT_TRUE(DecideCommit(w, c, &strikes, &bad).commit);
  bad.clear();
  // A corruption strike does not add up with a non-finite one.
  auto x = Votes(3, 4);
  x[1].params_hash = 0xBAD;
  EXPECT_TRUE(DecideCommit(x, c, &strikes, &bad).quarantine.empty());
  // Member 11 non-finite again, 10 steps later: quarantined.
  for (auto& r : v) r.step = 52;
  o = DecideCommit(v, c, &strikes, &bad);
  EXPECT_EQ(o.quarantine, std::vector<int>{1});
}

// Quarantine never leaves fewer than --quarantine-floor (default 2) members: a lone member cannot detect silent
// corruption, so a repeatedly faulty second member is kept (its faults are still caught) unless the floor is 1.
TEST(Vote, QuarantineKeepsTwoMembersUnlessTheFloorIsOne) {
  for (int floor : {2, 1}) {
    VoteConfig c;
    c.M = 4;
    c.quarantine_floor = floor;
    StrikeBook strikes;
    std::vector<std::pair<int, int64_t>> bad;
    auto v = Votes(2, 4);
    v[1].held.Clear(1);
    v[1].bad.Set(1);
    EXPECT_TRUE(DecideCommit(v, c, &strikes, &bad).quarantine.empty());
    bad.clear();
    for (auto& r : v) r.step = 60;
    auto o = DecideCommit(v, c, &strikes, &bad);
    EXPECT_FALSE(o.commit);
    EXPECT_EQ(o.clear_holdings, std::vector<int>{1});  // its result is still dropped and recomputed
    if (floor == 2) {
      EXPECT_TRUE(o.quarantine.empty());
      bool kept = false;
      for (const auto& note : o.notes) kept |= note.find("member 11: repeated faults, but kept") != std::string::npos;
      EXPECT_TRUE(kept) << o.reason;
    } else {
      EXPECT_EQ(o.quarantine, std::vector<int>{1});
    }
  }
  // Three members, two of them faulty again in the same vote: only one goes; the higher-indexed one stays.
  VoteConfig c;
  c.M = 6;
  StrikeBook strikes;
  std::vector<std::pair<int, int64_t>> bad;
  for (int64_t step : {42, 70}) {
    auto v = Votes(3, 6);
    for (int k : {0, 2}) {
      v[static_cast<size_t>(k)].held.Clear(k);
      v[static_cast<size_t>(k)].bad.Set(k);
      v[static_cast<size_t>(k)].step = step;
    }
    v[1].step = step;
    bad.clear();
    auto o = DecideCommit(v, c, &strikes, &bad);
    if (step == 42) EXPECT_TRUE(o.quarantine.empty());
    else EXPECT_EQ(o.quarantine, std::vector<int>{0});
  }
}

TEST(Vote, TheSameMicroBatchNonFiniteOnTwoMembersIsTheData) {
  VoteConfig c;
  c.M = 4;
  StrikeBook strikes;
  std::vector<std::pair<int, int64_t>> bad;
  auto v = Votes(3, 4);
  v[1].held.Clear(1), v[1].bad.Set(1);
  EXPECT_FALSE(DecideCommit(v, c, &strikes, &bad).commit);
  auto w = Votes(3, 4);
  w[1].held.Clear(1);
  w[2].bad.Set(1);
  auto o = DecideCommit(w, c, &strikes, &bad);
  EXPECT_TRUE(o.commit);
  EXPECT_TRUE(o.data_fault);
  EXPECT_TRUE(o.skip_update);
  EXPECT_EQ(strikes.Count(11, kStrikeNonFinite, 42, 100), 0);  // the first blame was taken back
}

// The refund takes back exactly the strikes this step's earlier blames cost: one per blamed member, for the
// data's micro-batch only. It used to refund once per recorded entry, this vote's own included, which forgave an
// unrelated strike from an earlier step.
TEST(Vote, TheDataFaultRefundLeavesEarlierStrikesAlone) {
  VoteConfig c;
  c.M = 4;
  c.quarantine_after = 3;
  StrikeBook strikes;
  std::vector<std::pair<int, int64_t>> bad;
  // Two members: 10 holds micro-batches 0 and 2, 11 holds 1 and 3.
  // Step 30: member 11 non-finite on micro-batch 1 (a strike of its own), redone elsewhere and committed.
  auto a = Votes(2, 4);
  for (auto& r : a) r.step = 30;
  a[1].held.Clear(1), a[1].bad.Set(1);
  EXPECT_FALSE(DecideCommit(a, c, &strikes, &bad).commit);
  bad.clear();  // the trainer clears the list when a step commits
  EXPECT_EQ(strikes.Count(11, kStrikeNonFinite, 42, 100), 1);
  // Step 42: member 11 fails micro-batches 1 and 3 (one strike for the vote)...
  auto v = Votes(2, 4);
  v[1].held = MicroSet{}, v[1].bad.Set(1), v[1].bad.Set(3);
  EXPECT_FALSE(DecideCommit(v, c, &strikes, &bad).commit);
  EXPECT_EQ(strikes.Count(11, kStrikeNonFinite, 42, 100), 2);
  // ... then member 10, redoing them, fails micro-batch 1 as well (the data) and a micro-batch of its own.
  auto w = Votes(2, 4);
  w[1].held = MicroSet{};
  w[0].held = MicroSet{};
  w[0].held.Set(2), w[0].held.Set(3);
  w[0].bad.Set(1), w[0].bad.Set(0);
  auto o = DecideCommit(w, c, &strikes, &bad);
  EXPECT_TRUE(o.data_fault);
  EXPECT_EQ(strikes.Count(11, kStrikeNonFinite, 42, 100), 1);  // step 30's strike stands
  EXPECT_EQ(strikes.Count(10, kStrikeNonFinite, 42, 100), 0);
  bad.clear();
  // Step 50, quarantine after 4: member 11 is struck in two votes for micro-batch 1 (a re-form gave it back),
  // then member 10 fails it too: both strikes of this step are taken back, the older one stays.
  c.quarantine_after = 4;
  auto x = Votes(2, 4);
  for (auto& r : x) r.step = 50;
  x[1].held = MicroSet{}, x[1].bad.Set(1);
  EXPECT_FALSE(DecideCommit(x, c, &strikes, &bad).commit);
  EXPECT_FALSE(DecideCommit(x, c, &strikes, &bad).commit);  // same member, same micro-batch, next vote
  EXPECT_EQ(strikes.Count(11, kStrikeNonFinite, 50, 100), 3);
  auto y = Votes(2, 4);
  for (auto& r : y) r.step = 50;
  y[1].held = MicroSet{};
  y[0].bad.Set(1);
  EXPECT_TRUE(DecideCommit(y, c, &strikes, &bad).data_fault);
  EXPECT_EQ(strikes.Count(11, kStrikeNonFinite, 50, 100), 1);
}

TEST(Vote, AMinorityReplicaIsRepairedFromTheMajority) {
  VoteConfig c;
  c.M = 3;
  StrikeBook strikes;
  std::vector<std::pair<int, int64_t>> bad;
  auto v = Votes(3, 3);
  v[2].params_hash = 0xBAD;
  auto o = DecideCommit(v, c, &strikes, &bad);
  EXPECT_FALSE(o.commit);
  EXPECT_EQ(o.repair, std::vector<int>{2});
  EXPECT_EQ(o.source, 0);
  EXPECT_EQ(o.clear_holdings, std::vector<int>{2});
  EXPECT_FALSE(o.rollback);
  // Whole-state hashes on a check step: same treatment.
  auto w = Votes(3, 3);
  for (auto& r : w) r.state_hash = 7;
  w[0].state_hash = 8;
  o = DecideCommit(w, c, &strikes, &bad);
  EXPECT_EQ(o.repair, std::vector<int>{0});
  EXPECT_EQ(o.source, 1);
}

TEST(Vote, TwoReplicasThatDisagreeRollBack) {
  VoteConfig c;
  c.M = 2;
  StrikeBook strikes;
  std::vector<std::pair<int, int64_t>> bad;
  auto v = Votes(2, 2);
  v[1].params_hash = 0xBAD;
  auto o = DecideCommit(v, c, &strikes, &bad);
  EXPECT_FALSE(o.commit);
  EXPECT_TRUE(o.rollback);
  EXPECT_TRUE(o.repair.empty());
}

// A group of two whose parameters differ: the member whose parameters no longer hash to what it recorded at its
// last commit is the corrupted one (a bit flipped in its memory) and is repaired from the other — no rollback.
TEST(Vote, TwoReplicasThatDisagreeAreRepairedWhenOneFailsItsOwnCheck) {
  VoteConfig c;
  c.M = 2;
  StrikeBook strikes;
  std::vector<std::pair<int, int64_t>> bad;
  auto v = Votes(2, 2);
  for (auto& r : v) r.committed_hash = 0xABC;
  v[0].params_hash = 0xBAD;  // member 0 changed since its commit
  auto o = DecideCommit(v, c, &strikes, &bad);
  EXPECT_FALSE(o.commit);
  EXPECT_FALSE(o.rollback);
  EXPECT_EQ(o.repair, std::vector<int>{0});
  EXPECT_EQ(o.source, 1);
  // On a whole-state check step the corrupted member's state hash differs too; it is being repaired anyway.
  auto w = v;
  w[0].state_hash = 8;
  w[1].state_hash = 7;
  o = DecideCommit(w, c, &strikes, &bad);
  EXPECT_FALSE(o.rollback);
  EXPECT_EQ(o.repair, std::vector<int>{0});
  EXPECT_EQ(o.source, 1);
  // Both intact but different (an update computed wrongly on one of them): nobody can tell, roll back.
  auto x = Votes(2, 2);
  x[0].committed_hash = x[0].params_hash = 0xABC;
  x[1].committed_hash = x[1].params_hash = 0xBAD;
  o = DecideCommit(x, c, &strikes, &bad);
  EXPECT_TRUE(o.rollback);
  // A member that cannot vouch for itself (no record: it just received state): roll back.
  auto y = v;
  y[1].committed_hash = 0;
  o = DecideCommit(y, c, &strikes, &bad);
  EXPECT_TRUE(o.rollback);
  // A three-way split where two members changed: the one intact member is the reference.
  auto z = Votes(3, 3);
  for (auto& r : z) r.committed_hash = 0xABC;
  z[1].params_hash = 0xBAD1;
  z[2].params_hash = 0xBAD2;
  o = DecideCommit(z, c, &strikes, &bad);
  EXPECT_FALSE(o.rollback);
  EXPECT_EQ(o.repair, (std::vector<int>{1, 2}));
  EXPECT_EQ(o.source, 0);
}

TEST(Vote, DisagreementOnTheStepResyncsAndGapsAreRecomputed) {
  VoteConfig c;
  c.M = 4;
  StrikeBook strikes;
  std::vector<std::pair<int, int64_t>> bad;
  auto v = Votes(2, 4);
  v[1].step = 43;
  EXPECT_TRUE(DecideCommit(v, c, &strikes, &bad).resync);
  auto w = Votes(2, 4);
  w[0].held.Clear(2);  // nobody holds micro-batch 2
  auto o = DecideCommit(w, c, &strikes, &bad);
  EXPECT_FALSE(o.commit);
  EXPECT_EQ(o.clear_holdings.size(), 2u);
}

TEST(Vote, CrossCheckedGradientsMustMatch) {
  VoteConfig c;
  c.M = 2;
  StrikeBook strikes;
  std::vector<std::pair<int, int64_t>> bad;
  auto v = Votes(3, 2);
  for (int k = 0; k < 3; ++k) {
    v[static_cast<size_t>(k)].n_verify = 1;
    v[static_cast<size_t>(k)].verify_micro[0] = 1;
    v[static_cast<size_t>(k)].verify_hash[0] = 99;
  }
  EXPECT_TRUE(DecideCommit(v, c, &strikes, &bad).commit);
  v[2].verify_hash[0] = 98;
  auto o = DecideCommit(v, c, &strikes, &bad);
  EXPECT_FALSE(o.commit);
  EXPECT_EQ(o.clear_holdings, std::vector<int>{2});
}

// Each micro-batch of the cross-check gets one verifier, never its owner; a disputed one (a tie in the previous
// attempt) gets two, the third opinion, whatever the fraction.
TEST(Vote, PickVerificationsGivesDisputedMicroBatchesAThirdOpinion) {
  std::vector<MicroSet> assigned(3);
  for (int i = 0; i < 6; ++i) assigned[static_cast<size_t>(i % 3)].Set(i);
  auto all = PickVerifications(7, 42, 0, 1.0, assigned);
  ASSERT_EQ(all.size(), 6u);
  for (const auto& t : all) {
    EXPECT_EQ(t.owner, t.micro % 3);
    EXPECT_NE(t.verifier, t.owner);
    EXPECT_GE(t.verifier, 0);
    EXPECT_LT(t.verifier, 3);
  }
  EXPECT_TRUE(PickVerifications(7, 42, 0, 0.0, assigned).empty());

  MicroSet disputed;
  disputed.Set(4);
  auto third = PickVerifications(7, 42, 1, 0.0, assigned, disputed);
  ASSERT_EQ(third.size(), 2u);
  EXPECT_EQ(third[0].micro, 4);
  EXPECT_EQ(third[1].micro, 4);
  EXPECT_EQ(third[0].owner, 1);
  EXPECT_EQ(third[1].owner, 1);
  EXPECT_EQ(std::set<int>({third[0].verifier, third[1].verifier}), std::set<int>({0, 2}));
  // With the fraction too, the disputed one comes first and is not checked twice over.
  auto both = PickVerifications(7, 42, 1, 1.0, assigned, disputed);
  ASSERT_EQ(both.size(), 7u);
  EXPECT_EQ(both[0].micro, 4);
  EXPECT_EQ(both[1].micro, 4);
  for (size_t k = 2; k < both.size(); ++k) EXPECT_NE(both[k].micro, 4);
  // A group of two has only one other member to ask.
  std::vector<MicroSet> two(2);
  two[0].Set(0);
  two[1].Set(1);
  MicroSet d0;
  d0.Set(0);
  auto pair = PickVerifications(7, 42, 1, 0.0, two, d0);
  ASSERT_EQ(pair.size(), 1u);
  EXPECT_EQ(pair[0].verifier, 1);
  // Never more than kMaxVerify tasks: every member's vote has room for its hashes.
  std::vector<MicroSet> big(3);
  for (int i = 0; i < 30; ++i) big[static_cast<size_t>(i % 3)].Set(i);
  MicroSet many;
  for (int i = 0; i < 30; i += 2) many.Set(i);
  EXPECT_EQ(PickVerifications(7, 42, 1, 1.0, big, many).size(), static_cast<size_t>(kMaxVerify));
}

// Two differing hashes are a tie (recompute with a third opinion, nobody struck); three with one odd name the
// faulty member: one strike per vote however many of its micro-batches differ, quarantined at the second.
TEST(Vote, AThirdOpinionNamesTheFaultyMemberAndRepeatedFaultsQuarantineIt) {
  VoteConfig c;
  c.M = 3;
  StrikeBook strikes;
  std::vector<std::pair<int, int64_t>> bad;
  auto v = Votes(3, 3);
  v[0].n_verify = 1;  // micro-batch 0: member 0 owns it, member 1 verified it
  v[0].verify_micro[0] = 0;
  v[0].verify_hash[0] = 5;
  v[1].n_verify = 1;
  v[1].verify_micro[0] = 0;
  v[1].verify_hash[0] = 6;
  auto tie = DecideCommit(v, c, &strikes, &bad);
  EXPECT_FALSE(tie.commit);
  EXPECT_TRUE(tie.unresolved);
  EXPECT_TRUE(tie.disputed.Has(0));
  EXPECT_EQ(tie.clear_holdings, std::vector<int>({0, 1}));
  EXPECT_TRUE(tie.quarantine.empty());
  EXPECT_EQ(strikes.Count(11, kStrikeCorrupt, 42, c.strike_window), 0);
  EXPECT_NE(tie.reason.find("member 10, member 11"), std::string::npos) << tie.reason;

  // The next attempt: micro-batches 0 and 1 each computed by all three; member 11 is wrong on both.
  auto w = Votes(3, 3);
  for (int k = 0; k < 3; ++k) {
    auto& r = w[static_cast<size_t>(k)];
    r.n_verify = 2;
    r.verify_micro[0] = 0;
    r.verify_micro[1] = 1;
    r.verify_hash[0] = k == 1 ? 6 : 5;
    r.verify_hash[1] = k == 1 ? 8 : 7;
  }
  auto named = DecideCommit(w, c, &strikes, &bad);
  EXPECT_FALSE(named.commit);
  EXPECT_FALSE(named.unresolved);
  EXPECT_EQ(named.clear_holdings, std::vector<int>{1});
  EXPECT_TRUE(named.quarantine.empty());
  EXPECT_EQ(strikes.Count(11, kStrikeCorrupt, 42, c.strike_window), 1);
  EXPECT_EQ(strikes.Count(10, kStrikeCorrupt, 42, c.strike_window), 0);
  EXPECT_NE(std::find(named.avoid.begin(), named.avoid.end(), std::make_pair(1, 0)), named.avoid.end());
  auto again = DecideCommit(w, c, &strikes, &bad);
  EXPECT_EQ(again.quarantine, std::vector<int>{1});
}

TEST(Vote, StopAndJoinerFlagsAreOredAcrossMembers) {
  VoteConfig c;
  c.M = 2;
  StrikeBook strikes;
  std::vector<std::pair<int, int64_t>> bad;
  auto v = Votes(2, 2);
  v[1].flags = kFlagStop | kFlagJoiners;
  auto o = DecideCommit(v, c, &strikes, &bad);
  EXPECT_TRUE(o.commit);
  EXPECT_TRUE(o.stop);
  EXPECT_TRUE(o.joiners);
}

// ---- state sync ----

TEST(Sync, TheNewestStateWinsAndStaleOrEmptyMembersReceiveIt) {
  std::vector<SyncRecord> r(4);
  for (int k = 0; k < 4; ++k) {
    r[static_cast<size_t>(k)].uid = k;
    r[static_cast<size_t>(k)].has_state = 1;
    r[static_cast<size_t>(k)].step = 10;
    r[static_cast<size_t>(k)].state_hash = 5;
    r[static_cast<size_t>(k)].held_step = 10;
    r[static_cast<size_t>(k)].held_epoch = 0;
  }
  r[0].held.Set(0);
  r[1].step = 11;  // committed the step the others missed
  r[1].state_hash = 6;
  r[3].has_state = 0;  // a joiner
  auto p = PlanSync(r);
  EXPECT_EQ(p.source, 1);
  EXPECT_EQ(p.step, 11);
  EXPECT_EQ(p.receivers, (std::vector<int>{0, 2, 3}));
  EXPECT_TRUE(p.held[0].Empty());  // its holdings were for step 10
  // Everyone agrees: nobody receives; holdings are kept.
  r[1].step = 10, r[1].state_hash = 5, r[3].has_state = 1;
  p = PlanSync(r);
  EXPECT_TRUE(p.receivers.empty());
  EXPECT_TRUE(p.held[0].Has(0));
  // A later epoch (a rollback) outranks a later step; the majority hash wins among equals.
  r[2].epoch = 1, r[2].step = 3, r[2].state_hash = 1;
  p = PlanSync(r);
  EXPECT_EQ(p.source, 2);
  r[2].epoch = 0, r[2].step = 10, r[2].state_hash = 5;
  r[0].state_hash = 9;
  p = PlanSync(r);
  EXPECT_NE(p.source, 0);
  EXPECT_EQ(p.state_hash, 5u);
  EXPECT_EQ(p.receivers, std::vector<int>{0});
  // Two members that disagree, one of them corrupted since its last commit (a bit flip, then the third member
  // died before the vote could see it): the self-checked one is the source, whatever the order.
  r.resize(2);
  r[0].state_hash = 7, r[0].self_checked = 0;
  r[1].state_hash = 5, r[1].self_checked = 1;
  p = PlanSync(r);
  EXPECT_EQ(p.source, 1);
  EXPECT_EQ(p.receivers, std::vector<int>{0});
  std::swap(r[0], r[1]);
  EXPECT_EQ(PlanSync(r).source, 0);
  // Neither self-checked: the lowest index, as before.
  r[0].self_checked = r[1].self_checked = 0;
  EXPECT_EQ(PlanSync(r).source, 0);
  // Nobody has state: load from disk.
  for (auto& x : r) x.has_state = 0;
  EXPECT_EQ(PlanSync(r).source, -1);
}

// ---- timeouts and fault specs ----

TEST(Timeouts, EverythingDerivesFromTheHangTimeout) {
  auto t = ElasticTimeouts::From(2, 60);
  EXPECT_DOUBLE_EQ(t.heartbeat_s, 0.2);
  EXPECT_DOUBLE_EQ(t.stale_s, 1.5);
  EXPECT_DOUBLE_EQ(t.watch_tick_s, 0.05);
  EXPECT_DOUBLE_EQ(t.form_s, 2);
  EXPECT_DOUBLE_EQ(t.op_s, 60);
  EXPECT_LE(t.stale_s + 2 * t.watch_tick_s, 2.0);  // hang detected within the knob
  auto u = ElasticTimeouts::From(8, 60);
  EXPECT_DOUBLE_EQ(u.watch_tick_s, 0.05);
  EXPECT_DOUBLE_EQ(u.op_s, 240);
}

TEST(FaultSpec, ParsesAndRejects) {
  auto s = ParseFaultSpec("crash:rank=1,step=5; hang:rank=2,step=8,secs=3;random:every=15,seed=7,kinds=nan+bitflip");
  ASSERT_TRUE(s.ok()) << s.status().message();
  ASSERT_EQ(s->size(), 3u);
  EXPECT_EQ((*s)[0].kind, FaultSpec::kCrash);
  EXPECT_EQ((*s)[1].secs, 3);
  EXPECT_EQ((*s)[2].kinds.size(), 2u);
  EXPECT_FALSE(ParseFaultSpec("explode:rank=1,step=2").ok());
  EXPECT_FALSE(ParseFaultSpec("crash:step=2").ok());
  EXPECT_FALSE(ParseFaultSpec("crash:rank=1,step=x").ok());
  EXPECT_FALSE(ParseFaultSpec("random:kinds=crash+slow").ok());
}

// Each kind's defaults apply only to what the item leaves out (an explicit factor=3 on a spike used to become 100,
// secs=5 on deaf 30), stall's default is the documented 30 s, and keys the kind does not read, fractional counts
// and absurd durations are refused.
TEST(FaultSpec, DefaultsPerKindAndStrictKeys) {
  auto d = ParseFaultSpec("spike:rank=0,step=1,factor=3;deaf:rank=0,step=1,secs=5;stall:rank=0,step=1;"
                          "spike:rank=0,step=2;hang:rank=0,step=1;slow:rank=0,step=1");
  ASSERT_TRUE(d.ok()) << d.status().message();
  EXPECT_EQ((*d)[0].factor, 3);
  EXPECT_EQ((*d)[1].secs, 5);
  EXPECT_EQ((*d)[2].secs, 30);
  EXPECT_EQ((*d)[3].factor, 100);
  EXPECT_EQ((*d)[4].secs, 5);
  EXPECT_EQ((*d)[5].factor, 3);
  for (const char* bad : {"hang:rank=0,step=1,secs=1e20", "crash:rank=1.5,step=1", "crash:rank=1,step=2.5",
                          "hang:rank=0,step=1,then=kill", "nan:rank=0,step=1,steps=3", "crash:rank=0,step=1,kinds=nan",
                          "random:every=5,rank=1", "link:rank=0,mbit=10,secs=3", "corrupt:rank=0,step=1,steps=1.5",
                          "link:rank=0,mbit=10,step=5", "truncate-ckpt:step=5,then=kill,secs=3", "device-fail:rank=0,step=1"})
    EXPECT_FALSE(ParseFaultSpec(bad).ok()) << bad;
}

// Two random items each keep their own schedule (the second never fired: the merged schedule was not in time
// order and both used the same claim ids).
TEST(FaultSpec, TwoRandomItemsBothFire) {
  setenv("KEEL_ALLOW_FAULT_INJECTION", "1", 1);
  char t0[64];
  std::snprintf(t0, sizeof(t0), "%.3f", EventLog::Now() - 0.5);
  setenv("KEEL_INJECT_T0", t0, 1);
  auto inj = FaultInjector::Create("random:every=1000,start=0,kinds=nan,ranks=1;"
                                   "random:every=1000,start=0,kinds=bitflip,ranks=1", 0, 1);
  unsetenv("KEEL_INJECT_T0");
  ASSERT_TRUE(inj.ok()) << inj.status().message();
  float g[4] = {1, 2, 3, 4};
  EXPECT_TRUE((*inj)->CorruptGradient(3, g, 4));
  float p[4] = {1, 2, 3, 4};
  EXPECT_TRUE((*inj)->FlipParamBit(3, p, 4));
  // Each item's entries may fire only within half its own period: the fast item's NaN due 100 s ago is stale,
  // even beside a slow item whose window is 500 s (one shared widest window fired stale faults in bursts).
  std::snprintf(t0, sizeof(t0), "%.3f", EventLog::Now() - 100);
  setenv("KEEL_INJECT_T0", t0, 1);
  auto stale = FaultInjector::Create("random:every=2,start=0,kinds=nan,ranks=1;"
                                     "random:every=1000,start=0,kinds=bitflip,ranks=1", 0, 1);
  unsetenv("KEEL_INJECT_T0");
  ASSERT_TRUE(stale.ok()) << stale.status().message();
  int fired = 0;
  for (int step = 0; step < 5; ++step) fired += (*stale)->CorruptGradient(step, g, 4);
  EXPECT_LE(fired, 1);  // at most the one entry that fell due within the last second
  unsetenv("KEEL_ALLOW_FAULT_INJECTION");
}

TEST(FaultSpec, InjectionNeedsTheEnvironmentSwitch) {
  unsetenv("KEEL_ALLOW_FAULT_INJECTION");
  auto a = FaultInjector::Create("crash:rank=0,step=1", 0, 1);
  ASSERT_FALSE(a.ok());
  EXPECT_NE(a.status().message().find("KEEL_ALLOW_FAULT_INJECTION=1"), std::string::npos);
  auto none = FaultInjector::Create("", 0, 1);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->get(), nullptr);
  setenv("KEEL_ALLOW_FAULT_INJECTION", "1", 1);
  auto b = FaultInjector::Create("nan:rank=0,step=1", 0, 1);
  ASSERT_TRUE(b.ok());
  float g[4] = {1, 2, 3, 4};
  EXPECT_FALSE((*b)->CorruptGradient(0, g, 4));
  EXPECT_TRUE((*b)->CorruptGradient(1, g, 4));
  EXPECT_FALSE((*b)->CorruptGradient(1, g, 4));  // once
  unsetenv("KEEL_ALLOW_FAULT_INJECTION");
}

// corrupt: one flipped bit in the first summed gradient of its step, once; with steps=N every gradient of those
// steps (summed or not), each still finite.
TEST(FaultSpec, APersistentCorruptionHitsEveryGradientOfItsSteps) {
  setenv("KEEL_ALLOW_FAULT_INJECTION", "1", 1);
  auto once = FaultInjector::Create("corrupt:rank=0,step=2", 0, 1);
  ASSERT_TRUE(once.ok());
  float g[4] = {1, 2, 3, 4};
  EXPECT_FALSE((*once)->CorruptGradient(2, g, 4, /*first=*/false));
  EXPECT_TRUE((*once)->CorruptGradient(2, g, 4));
  EXPECT_FALSE((*once)->CorruptGradient(2, g, 4));
  auto many = FaultInjector::Create("corrupt:rank=0,step=2,steps=3", 0, 1);
  ASSERT_TRUE(many.ok());
  EXPECT_FALSE((*many)->CorruptGradient(1, g, 4));
  for (int64_t step = 2; step < 5; ++step)
    for (bool first : {true, false, false}) {
      const float before[4] = {g[0], g[1], g[2], g[3]};
      EXPECT_TRUE((*many)->CorruptGradient(step, g, 4, first)) << step;
      int changed = 0;
      for (int i = 0; i < 4; ++i) {
        EXPECT_TRUE(std::isfinite(g[i]));
        changed += g[i] != before[i];
      }
      EXPECT_EQ(changed, 1) << step;
    }
  EXPECT_FALSE((*many)->CorruptGradient(5, g, 4));
  unsetenv("KEEL_ALLOW_FAULT_INJECTION");
}

}  // namespace
}  // namespace keel
