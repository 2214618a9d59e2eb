// quorum.cc: pure decisions of elastic training (see quorum.h and docs/step-protocol.md).
#include "elastic/quorum.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>

#include "core/hash.h"

namespace keel {

ElasticTimeouts ElasticTimeouts::From(double hang_s, double rdzv_timeout_s) {
  ElasticTimeouts t;
  t.hang_s = hang_s;
  t.heartbeat_s = hang_s / 10;
  t.stale_s = 0.75 * hang_s;
  t.watch_tick_s = std::min(0.05, hang_s / 40);
  t.form_s = hang_s;
  t.op_s = 30 * hang_s;
  t.straggle_s = 30 * hang_s;
  t.initial_wait_s = rdzv_timeout_s;
  return t;
}

std::string ElasticTimeouts::Describe() const {
  char buf[320];
  std::snprintf(buf, sizeof(buf),
                "--hang-timeout %gs: heartbeat every %gs, silent member evicted after %gs (detected <= %gs), "
                "group forming bound %gs, collective backstop %gs, wait for a busy member %gs",
                hang_s, heartbeat_s, stale_s, stale_s + 2 * std::max(watch_tick_s, heartbeat_s), form_s, op_s,
                straggle_s);
  return buf;
}

bool Alive(const PeerInfo& p, double now, double stale_s) { return !p.gone && now - p.last_seen <= stale_s; }

namespace {

bool Contains(const std::vector<int64_t>& v, int64_t x) { return std::find(v.begin(), v.end(), x) != v.end(); }

std::string UidList(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';  // (not (i ? "," : "") + ...: GCC 12 warns falsely (-Wrestrict) on that form)
    s += std::to_string(v[i]);
  }
  return "[" + s + "]";
}

}  // namespace

QuorumDecision Decide(double now, const QuorumView& v, const QuorumConfig& c) {
  QuorumDecision d;
  // 1. A proposal for the next generation exists: it is final (created once).
  if (v.next_exists) {
    d.gen = v.after + 1;
    d.members = v.next_members;
    if (Contains(v.next_members, v.my_uid)) {
      d.kind = QuorumDecision::kJoin;
      d.reason = "generation " + std::to_string(d.gen) + " lists me";
    } else {
      d.kind = QuorumDecision::kSkip;
      d.reason = "generation " + std::to_string(d.gen) + " " + UidList(v.next_members) + " does not list me";
    }
    return d;
  }
  // 2. Who is alive, and who is ready for a generation after v.after (ready for an older one counts too:
  //    such a member will find the proposal and join it).
  std::vector<int64_t> ready;
  std::vector<int64_t> alive_prev_not_ready;
  bool me_seen = false;
  for (const auto& p : v.peers) {
    const bool me = p.uid == v.my_uid;
    me_seen |= me;
    if (!me && Contains(v.unreachable, p.uid)) continue;
    const bool alive = me || Alive(p, now, c.stale_s);
    if (!alive) continue;
    const bool is_ready = me || (p.ready && p.after <= v.after);
    if (is_ready) ready.push_back(p.uid);
    else if (Contains(v.prev_members, p.uid)) alive_prev_not_ready.push_back(p.uid);
  }
  if (!me_seen) ready.push_back(v.my_uid);
  std::sort(ready.begin(), ready.end());
  // Members: the previous generation's first (they hold the newest state), then the others by uid, at most
  // --max-workers. The leader is the lowest uid among them (not among all ready: a lowest ready member left out
  // by --max-workers would wait for a generation that lists it, while the others waited for its proposal).
  std::vector<int64_t> members;
  for (int64_t u : ready)
    if (Contains(v.prev_members, u)) members.push_back(u);
  for (int64_t u : ready)
    if (!Contains(v.prev_members, u)) members.push_back(u);
  if (static_cast<int>(members.size()) > c.max_workers) members.resize(static_cast<size_t>(c.max_workers));
  std::sort(members.begin(), members.end());
  const int64_t leader = members.front();
  if (leader != v.my_uid) {
    d.reason = "waiting for the leader (member " + std::to_string(leader) + ") to propose generation " +
               std::to_string(v.after + 1);
    return d;
  }
  const int n = static_cast<int>(ready.size());
  const double waited = now - v.ready_since;
  if (n < c.min_workers) {
    d.reason = "below quorum: " + std::to_string(n) + " of --min-workers " + std::to_string(c.min_workers) +
               " ready; waiting for more workers";
    return d;
  }
  if (!alive_prev_not_ready.empty()) {
    int prev_ready = 0;
    for (int64_t u : ready) prev_ready += Contains(v.prev_members, u);
    // No member of the previous generation is here: it is running fine, and whoever is ready is waiting to
    // be admitted at one of its step boundaries. Never propose over a healthy generation.
    if (prev_ready == 0) {
      d.reason = "generation " + std::to_string(v.after) + " is running; waiting to be admitted at its next step";
      return d;
    }
    // It failed (some of its members are here): give the others time to notice (they finish the micro-batches
    // they are computing first), but not forever (a live member that never arrives is left out).
    if (waited < c.straggle_s) {
      d.reason = "waiting for live member(s) " + UidList(alive_prev_not_ready) + " of generation " +
                 std::to_string(v.after) + " to arrive";
      return d;
    }
  }
  if (v.after < 0 && n < v.expected_initial && waited < c.initial_wait_s) {
    d.reason = "first generation: " + std::to_string(n) + " of " + std::to_string(v.expected_initial) +
               " launched workers ready";
    return d;
  }
  d.kind = QuorumDecision::kPropose;
  d.gen = v.after + 1;
  d.members = members;
  d.reason = std::to_string(n) + " member(s) ready";
  return d;
}

std::vector<int64_t> UnreachableJoiners(const std::vector<FormAttempt>& recent, const std::vector<PeerInfo>& peers) {
  std::vector<int64_t> out;
  for (const auto& p : peers) {
    if (p.has_state || p.gone) continue;
    int failed = 0;
    bool formed = false, with_state = false;
    for (const auto& a : recent) {
      if (!Contains(a.members, p.uid)) continue;
      if (!a.failed) {
        formed = true;
        break;
      }
      bool others_live = true, some_state = false;
      for (int64_t u : a.members) {
        if (u == p.uid) continue;
        auto q = std::find_if(peers.begin(), peers.end(), [&](const PeerInfo& x) { return x.uid == u; });
        if (q == peers.end() || q->gone) others_live = false;
        else some_state |= q->has_state;
      }
      if (!others_live) continue;  // a member that died since may have caused it
      ++failed;
      with_state |= some_state;
    }
    if (!formed && with_state && failed >= kFormFailuresToExclude) out.push_back(p.uid);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// ---- micro-batch assignment ----

std::string MicroSet::ToString() const {
  std::string s;
  for (int i = 0; i < 128; ++i)
    if (Has(i)) {
      if (!s.empty()) s += ',';
      s += std::to_string(i);
    }
  return "{" + s + "}";
}

std::vector<MicroSet> AssignMicroBatches(int M, const std::vector<MicroSet>& held, const std::vector<double>& shares,
                                         const std::vector<MicroSet>& avoid) {
  const int n = static_cast<int>(held.size());
  std::vector<MicroSet> out(static_cast<size_t>(n));
  if (n == 0) return out;
  // Targets proportional to the shares, summing to M (largest remainder, ties to the lower index).
  double total = 0;
  std::vector<double> s(static_cast<size_t>(n), 1.0);
  for (int k = 0; k < n; ++k) {
    double x = k < static_cast<int>(shares.size()) ? shares[static_cast<size_t>(k)] : 1.0;
    s[static_cast<size_t>(k)] = (std::isfinite(x) && x > 0) ? x : 1.0;
    total += s[static_cast<size_t>(k)];
  }
  std::vector<int> target(static_cast<size_t>(n));
  std::vector<std::pair<double, int>> rem;
  int assigned = 0;
  for (int k = 0; k < n; ++k) {
    double exact = M * s[static_cast<size_t>(k)] / total;
    target[static_cast<size_t>(k)] = static_cast<int>(std::floor(exact));
    assigned += target[static_cast<size_t>(k)];
    rem.push_back({exact - std::floor(exact), k});
  }
  std::stable_sort(rem.begin(), rem.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t j = 0; assigned < M; j = (j + 1) % rem.size(), ++assigned) ++target[static_cast<size_t>(rem[j].second)];

  MicroSet taken;
  std::vector<int> load(static_cast<size_t>(n));
  for (int k = 0; k < n; ++k) {
    taken |= held[static_cast<size_t>(k)];
    load[static_cast<size_t>(k)] = held[static_cast<size_t>(k)].Count();
  }
  for (int i = 0; i < M; ++i) {
    if (taken.Has(i)) continue;
    int best = -1;
    for (int pass = 0; pass < 2 && best < 0; ++pass) {
      for (int k = 0; k < n; ++k) {
        if (pass == 0 && k < static_cast<int>(avoid.size()) && avoid[static_cast<size_t>(k)].Has(i)) continue;
        const int deficit = target[static_cast<size_t>(k)] - load[static_cast<size_t>(k)];
        if (best < 0 || deficit > target[static_cast<size_t>(best)] - load[static_cast<size_t>(best)]) best = k;
      }
    }
    out[static_cast<size_t>(best)].Set(i);
    ++load[static_cast<size_t>(best)];
  }
  return out;
}

std::vector<VerifyTask> PickVerifications(uint64_t seed, int64_t step, int attempt, double fraction,
                                          const std::vector<MicroSet>& assigned, const MicroSet& disputed) {
  std::vector<VerifyTask> out;
  const int n = static_cast<int>(assigned.size());
  if (n < 2) return out;
  auto owner_of = [&](int i) {
    int owner = -1;
    for (int k = 0; k < n; ++k)
      if (assigned[static_cast<size_t>(k)].Has(i)) owner = k;
    return owner;
  };
  // Third opinions first: a tie that is not broken would be redone forever.
  for (int i = 0; i < 128; ++i) {
    const int owner = disputed.Has(i) ? owner_of(i) : -1;
    if (owner < 0) continue;
    const int verifiers = std::min(2, n - 1);
    if (static_cast<int>(out.size()) + verifiers > kMaxVerify) break;
    for (int j = 1; j <= verifiers; ++j) out.push_back({i, owner, (owner + j) % n});
  }
  if (!(fraction > 0)) return out;
  for (int i = 0; i < 128 && static_cast<int>(out.size()) < kMaxVerify; ++i) {
    if (disputed.Has(i)) continue;
    const int owner = owner_of(i);
    if (owner < 0) continue;
    const uint64_t h = MixKey(MixKey(seed ^ 0x5EC0DEull, static_cast<uint64_t>(step)),
                              static_cast<uint64_t>(i) * 131 + static_cast<uint64_t>(attempt));
    const double u = static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);
    if (u >= fraction) continue;
    out.push_back({i, owner, (owner + 1 + static_cast<int>(h % static_cast<uint64_t>(n - 1))) % n});
  }
  return out;
}

// ---- the commit vote ----

int StrikeBook::Count(int64_t uid, int kind, int64_t step, int64_t window) const {
  for (const auto& s : v)
    if (s.uid == uid && s.kind == kind) return step - s.last_step <= window ? s.count : 0;
  return 0;
}

int StrikeBook::Add(int64_t uid, int kind, int64_t step, int64_t window) {
  for (auto& s : v)
    if (s.uid == uid && s.kind == kind) {
      if (step - s.last_step > window) s.count = 0;
      ++s.count;
      s.last_step = step;
      return s.count;
    }
  v.push_back({uid, kind, 1, step});
  return 1;
}

void StrikeBook::Refund(int64_t uid, int kind) {
  for (auto& s : v)
    if (s.uid == uid && s.kind == kind && s.count > 0) --s.count;
}

namespace {

// The value held by a strict majority of `vals`, with the index of its first holder; -1 when none.
int MajorityIndex(const std::vector<uint64_t>& vals) {
  std::map<uint64_t, int> count;
  for (uint64_t x : vals) ++count[x];
  for (size_t k = 0; k < vals.size(); ++k)
    if (2 * count[vals[k]] > static_cast<int>(vals.size())) return static_cast<int>(k);
  return -1;
}

std::string Uid(const VoteRecord& r) { return "member " + std::to_string(r.uid); }

// Parameters differ and no majority agrees (a group of two, or a three-way split). Each member also reports the
// hash it recorded right after its last committed update: a member whose parameters no longer match that record
// was corrupted since (a flipped bit in memory), so the members whose parameters are intact are the reference —
// if they all agree. Returns one of them, or -1 (then only a rollback is safe). An update computed wrongly (the
// corruption happened inside the optimizer step) passes its own check; then the intact members disagree and
// this returns -1.
int SelfCheckedSource(const std::vector<VoteRecord>& votes) {
  int source = -1, changed = 0;
  for (size_t k = 0; k < votes.size(); ++k) {
    const VoteRecord& r = votes[k];
    if (r.committed_hash == 0) return -1;  // someone cannot vouch for itself
    if (r.params_hash != r.committed_hash) {
      ++changed;
      continue;
    }
    if (source >= 0 && votes[static_cast<size_t>(source)].params_hash != r.params_hash) return -1;
    if (source < 0) source = static_cast<int>(k);
  }
  return changed > 0 ? source : -1;
}

}  // namespace

VoteOutcome DecideCommit(const std::vector<VoteRecord>& votes, const VoteConfig& c, StrikeBook* strikes,
                         std::vector<std::pair<int, int64_t>>* data_bad) {
  VoteOutcome o;
  const int n = static_cast<int>(votes.size());
  if (n == 0) {
    o.reason = "no votes";
    o.resync = true;
    return o;
  }
  for (const auto& r : votes) {
    o.stop |= (r.flags & kFlagStop) != 0;
    o.joiners |= (r.flags & kFlagJoiners) != 0;
    o.reform |= (r.flags & kFlagReform) != 0;
  }
  const int64_t step = votes[0].step;
  // 1. Everyone voted on the same generation, lineage and step.
  for (const auto& r : votes)
    if (r.gen != votes[0].gen || r.epoch != votes[0].epoch || r.step != step) {
      o.reason = "members disagree on the step: " + Uid(votes[0]) + " is at step " + std::to_string(step) + ", " +
                 Uid(r) + " at step " + std::to_string(r.step);
      o.resync = true;
      return o;
    }
  std::vector<bool> clear(static_cast<size_t>(n), false);
  std::vector<bool> quarantine(static_cast<size_t>(n), false);
  // 2. Non-finite results. A micro-batch that failed before in this step (on another member when there is
  //    one) is the data's fault: the step commits without an update and nobody is blamed.
  bool any_bad = false;
  // Entries of this step's earlier votes, each vote's closed by a {-1, -1} marker: in each such vote every member
  // with an entry was struck once.
  const size_t blamed_before = data_bad->size();
  std::vector<int> data_micro;                    // micro-batches found to be the data's fault in this vote
  for (int k = 0; k < n; ++k) {
    const VoteRecord& r = votes[static_cast<size_t>(k)];
    if (r.bad.Empty()) continue;
    any_bad = true;
    clear[static_cast<size_t>(k)] = true;
    for (int i = 0; i < c.M && i < 128; ++i) {
      if (!r.bad.Has(i)) continue;
      o.bad.push_back({k, i});
      bool seen_before = false;
      for (const auto& [mb, uid] : *data_bad)
        if (mb == i && (uid != r.uid || n == 1)) seen_before = true;
      if (seen_before) {
        o.data_fault = true;
        data_micro.push_back(i);
        o.notes.push_back("micro-batch " + std::to_string(i) + " of step " + std::to_string(step) +
                          " is non-finite again (" + Uid(r) + "): the data causes it");
      } else {
        o.notes.push_back(Uid(r) + ": non-finite loss or gradient in micro-batch " + std::to_string(i) + " of step " +
                          std::to_string(step));
        o.avoid.push_back({k, i});
      }
      data_bad->push_back({i, r.uid});
    }
  }
  if (o.data_fault) {
    // Take back the strikes of this step's earlier blames for the data's micro-batches: one per member and
    // earlier vote (a vote strikes a member once, however many of its micro-batches failed). This vote's own
    // entries were never struck, and refunding them (or one per entry) used to forgive an unrelated strike.
    std::vector<int64_t> refunded;  // in the current earlier vote
    for (size_t e = 0; e < blamed_before; ++e) {
      const auto& [mb, uid] = (*data_bad)[e];
      if (mb < 0) {
        refunded.clear();  // the next earlier vote
        continue;
      }
      if (std::find(data_micro.begin(), data_micro.end(), mb) == data_micro.end()) continue;
      if (std::find(refunded.begin(), refunded.end(), uid) != refunded.end()) continue;
      refunded.push_back(uid);
      strikes->Refund(uid, kStrikeNonFinite);
    }
    o.commit = true;
    o.skip_update = true;
    o.reason = "";
    o.avoid.clear();
    return o;
  }
  if (any_bad) {
    for (int k = 0; k < n; ++k) {
      const VoteRecord& r = votes[static_cast<size_t>(k)];
      if (r.bad.Empty()) continue;
      if (strikes->Add(r.uid, kStrikeNonFinite, step, c.strike_window) >= c.quarantine_after) {
        quarantine[static_cast<size_t>(k)] = true;
      }
    }
    data_bad->push_back({-1, -1});  // end of this vote's entries (see the refund above)
  }
  // 3. Silent corruption: the parameters (every step) and the whole state (every K steps) must agree.
  auto check_hashes = [&](bool params) {
    std::vector<uint64_t> h;
    for (const auto& r : votes) h.push_back(params ? r.params_hash : r.state_hash);
    if (!params)
      for (uint64_t x : h)
        if (x == 0) return;  // not a full-check step
    // Members already being repaired (their parameters were wrong) receive the whole state anyway: the state
    // check looks at the others only.
    std::vector<int> judged;
    for (int k = 0; k < n; ++k)
      if (std::find(o.repair.begin(), o.repair.end(), k) == o.repair.end()) judged.push_back(k);
    if (judged.empty()) return;
    bool all_same = std::all_of(judged.begin(), judged.end(),
                                [&](int k) { return h[static_cast<size_t>(k)] == h[static_cast<size_t>(judged[0])]; });
    if (all_same) return;
    std::vector<uint64_t> hj;
    for (int k : judged) hj.push_back(h[static_cast<size_t>(k)]);
    int maj = MajorityIndex(hj);
    if (maj >= 0) maj = judged[static_cast<size_t>(maj)];
    const bool self_checked = maj < 0 && params;
    if (self_checked) maj = SelfCheckedSource(votes);
    if (maj < 0) {
      o.rollback = true;
      o.notes.push_back(std::string(params ? "parameters" : "training state") +
                        " differ between members and no majority agrees: rolling back to the last verified snapshot");
      return;
    }
    o.source = maj;
    for (int k : judged) {
      if (h[static_cast<size_t>(k)] == h[static_cast<size_t>(maj)]) continue;
      o.repair.push_back(k);
      clear[static_cast<size_t>(k)] = true;
      const VoteRecord& r = votes[static_cast<size_t>(k)];
      const std::string why =
          self_checked ? " changed since this member's last commit (" + HashHex(r.committed_hash) + ")"
                       : " differs from the majority's " + HashHex(h[static_cast<size_t>(maj)]);
      o.notes.push_back(Uid(r) + ": " + (params ? "parameters" : "training state") + " hash " +
                        HashHex(h[static_cast<size_t>(k)]) + why + " (silent data corruption): repairing it from " +
                        Uid(votes[static_cast<size_t>(maj)]));
      if (strikes->Add(r.uid, kStrikeCorrupt, step, c.strike_window) >= c.quarantine_after) {
        quarantine[static_cast<size_t>(k)] = true;
      }
    }
  };
  check_hashes(true);
  if (!o.rollback) check_hashes(false);
  if (o.rollback) {
    o.repair.clear();
    o.source = -1;
    for (int k = 0; k < n; ++k) clear[static_cast<size_t>(k)] = true;
  }
  // 4. Cross-checked micro-batches: the owner's and the verifier's gradient hashes must be equal.
  {
    std::map<int, std::vector<std::pair<int, uint64_t>>> seen;  // micro -> (member, hash)
    for (int k = 0; k < n; ++k) {
      const VoteRecord& r = votes[static_cast<size_t>(k)];
      for (int j = 0; j < r.n_verify && j < kMaxVerify; ++j) seen[r.verify_micro[j]].push_back({k, r.verify_hash[j]});
    }
    std::vector<bool> struck(static_cast<size_t>(n), false);  // one strike per member and vote
    for (const auto& [mb, list] : seen) {
      if (list.size() < 2) continue;
      std::vector<uint64_t> h;
      for (const auto& e : list) h.push_back(e.second);
      if (std::all_of(h.begin(), h.end(), [&](uint64_t x) { return x == h[0]; })) continue;
      const int maj = list.size() >= 3 ? MajorityIndex(h) : -1;
      for (size_t e = 0; e < list.size(); ++e) {
        const int k = list[e].first;
        if (maj >= 0 && h[e] == h[static_cast<size_t>(maj)]) continue;
        clear[static_cast<size_t>(k)] = true;
        if (maj >= 0) {
          const VoteRecord& r = votes[static_cast<size_t>(k)];
          o.notes.push_back(Uid(r) + ": gradient of micro-batch " + std::to_string(mb) +
                            " differs from two other members' (silent data corruption)");
          o.avoid.push_back({k, mb});
          if (struck[static_cast<size_t>(k)]) continue;
          struck[static_cast<size_t>(k)] = true;
          if (strikes->Add(r.uid, kStrikeCorrupt, step, c.strike_window) >= c.quarantine_after) {
            quarantine[static_cast<size_t>(k)] = true;
          }
        }
      }
      if (maj < 0) {
        std::string who;
        for (const auto& e : list) who += (who.empty() ? "" : ", ") + Uid(votes[static_cast<size_t>(e.first)]);
        o.notes.push_back("micro-batch " + std::to_string(mb) + ": recomputed gradients differ between " + who +
                          "; recomputing it with a third opinion");
        o.unresolved = true;
      }
      o.disputed.Set(mb);
    }
  }
  // 5. Every micro-batch is in the sum exactly once.
  MicroSet all;
  bool overlap = false;
  for (const auto& r : votes) {
    overlap |= all.Intersects(r.held);
    all |= r.held;
  }
  const bool covered = c.partial ? !all.Empty() : all == MicroSet::All(c.M);
  // Quarantine never leaves fewer than `quarantine_floor` members. One member alone has nothing to compare its
  // parameters or gradients with, so a silent corruption would go into the model unseen; a faulty second member
  // whose faults are still detected and recovered from (at some cost in throughput) is the safer choice.
  // Deterministic: the highest-indexed flagged members are kept first.
  {
    int left = n;
    for (int k = 0; k < n; ++k) left -= quarantine[static_cast<size_t>(k)] ? 1 : 0;
    for (int k = n - 1; k >= 0 && left < std::min(c.quarantine_floor, n); --k) {
      if (!quarantine[static_cast<size_t>(k)]) continue;
      quarantine[static_cast<size_t>(k)] = false;
      ++left;
      o.notes.push_back(Uid(votes[static_cast<size_t>(k)]) + ": repeated faults, but kept: quarantining it would leave " +
                        std::to_string(left - 1) + " member" + (left - 1 == 1 ? "" : "s") + " (--quarantine-floor " +
                        std::to_string(c.quarantine_floor) + ")");
    }
  }
  for (int k = 0; k < n; ++k) {
    if (quarantine[static_cast<size_t>(k)]) {
      o.quarantine.push_back(k);
      o.notes.push_back(Uid(votes[static_cast<size_t>(k)]) + ": repeated faults; quarantined");
    }
    if (clear[static_cast<size_t>(k)]) o.clear_holdings.push_back(k);
  }
  if (!o.notes.empty() || o.rollback || !o.quarantine.empty()) {
    o.reason = o.notes.empty() ? "state mismatch" : o.notes.front();
    return o;
  }
  if (overlap || !covered) {
    o.reason = std::string("internal: the step's micro-batches are ") + (overlap ? "held twice" : "not all held") +
               " (" + all.ToString() + "); recomputing them";
    o.clear_holdings.clear();
    for (int k = 0; k < n; ++k) o.clear_holdings.push_back(k);
    return o;
  }
  double sum = 0;
  for (int i = 0; i < c.M; ++i)
    for (const auto& r : votes) sum += r.loss[i];
  o.loss = sum / (c.partial ? all.Count() : c.M);
  o.commit = true;
  return o;
}

// ---- state synchronisation ----

SyncPlan PlanSync(const std::vector<SyncRecord>& recs) {
  SyncPlan p;
  const int n = static_cast<int>(recs.size());
  p.held.assign(static_cast<size_t>(n), MicroSet{});
  for (int k = 0; k < n; ++k) {
    const auto& r = recs[static_cast<size_t>(k)];
    if (!r.has_state) continue;
    if (p.source < 0 || std::make_pair(r.epoch, r.step) > std::make_pair(p.epoch, p.step)) {
      p.source = k;
      p.epoch = r.epoch;
      p.step = r.step;
    }
  }
  if (p.source < 0) return p;
  // Among the members at the newest (epoch, step), the most common hash wins (ties: lowest index).
  std::map<uint64_t, int> count;
  for (const auto& r : recs)
    if (r.has_state && r.epoch == p.epoch && r.step == p.step) ++count[r.state_hash];
  int best = -1;
  for (int k = 0; k < n; ++k) {
    const auto& r = recs[static_cast<size_t>(k)];
    if (!r.has_state || r.epoch != p.epoch || r.step != p.step) continue;
    if (best < 0) {
      best = k;
      continue;
    }
    const auto& b = recs[static_cast<size_t>(best)];
    if (std::make_pair(count[r.state_hash], r.self_checked != 0) > std::make_pair(count[b.state_hash], b.self_checked != 0))
      best = k;
  }
  p.source = best;
  p.state_hash = recs[static_cast<size_t>(best)].state_hash;
  for (int k = 0; k < n; ++k) {
    const auto& r = recs[static_cast<size_t>(k)];
    const bool same = r.has_state && r.epoch == p.epoch && r.step == p.step && r.state_hash == p.state_hash;
    if (!same) {
      p.receivers.push_back(k);
      continue;
    }
    if (r.held_epoch == p.epoch && r.held_step == p.step) p.held[static_cast<size_t>(k)] = r.held;
  }
  // Holdings must be disjoint: if two members claim the same micro-batch (cannot happen by construction),
  // nobody keeps anything.
  MicroSet all;
  for (const auto& h : p.held) {
    if (all.Intersects(h)) {
      for (auto& x : p.held) x = MicroSet{};
      break;
    }
    all |= h;
  }
  return p;
}

}  // namespace keel
