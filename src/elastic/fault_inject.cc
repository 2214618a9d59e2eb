// fault_inject.cc: parsing and firing of injected faults.
#include "elastic/fault_inject.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "core/hash.h"
#include "elastic/events.h"

namespace keel {

const char* FaultKindName(FaultSpec::Kind k) {
  switch (k) {
    case FaultSpec::kCrash: return "crash";
    case FaultSpec::kHang: return "hang";
    case FaultSpec::kSlow: return "slow";
    case FaultSpec::kNan: return "nan";
    case FaultSpec::kBitflip: return "bitflip";
    case FaultSpec::kTruncateCkpt: return "truncate-ckpt";
    case FaultSpec::kRandom: return "random";
    case FaultSpec::kStall: return "stall";
    case FaultSpec::kCorrupt: return "corrupt";
    case FaultSpec::kSpike: return "spike";
    case FaultSpec::kDeaf: return "deaf";
    case FaultSpec::kFreeze: return "freeze";
    case FaultSpec::kDeviceFail: return "device-fail";
    case FaultSpec::kLink: return "link";
  }
  return "?";
}

namespace {

std::vector<std::string> SplitOn(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == sep) {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  out.push_back(cur);
  return out;
}

std::string Trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t i = 0;
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  return s.substr(i);
}

bool KindFromName(const std::string& n, FaultSpec::Kind* k) {
  const FaultSpec::Kind all[] = {FaultSpec::kCrash, FaultSpec::kHang,         FaultSpec::kSlow,   FaultSpec::kNan,
                                 FaultSpec::kBitflip, FaultSpec::kTruncateCkpt, FaultSpec::kRandom, FaultSpec::kStall,
                                 FaultSpec::kCorrupt, FaultSpec::kSpike, FaultSpec::kDeaf, FaultSpec::kLink,
                                 FaultSpec::kFreeze, FaultSpec::kDeviceFail};
  for (auto x : all)
    if (n == FaultKindName(x)) {
      *k = x;
      return true;
    }
  return false;
}

bool ParseNum(const std::string& s, double* out) {
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != 0 || !std::isfinite(v)) return false;
  *out = v;
  return true;
}

// The numeric keys each kind reads (a key another kind reads would be silently ignored).
bool KeyApplies(FaultSpec::Kind kind, const std::string& k) {
  const char* keys = "";
  switch (kind) {
    case FaultSpec::kCrash: case FaultSpec::kNan: case FaultSpec::kBitflip: keys = "rank step"; break;
    case FaultSpec::kHang: case FaultSpec::kStall: case FaultSpec::kDeaf: case FaultSpec::kFreeze:
      keys = "rank step secs"; break;
    case FaultSpec::kSlow: keys = "rank step factor steps busy"; break;
    case FaultSpec::kCorrupt: keys = "rank step steps"; break;
    case FaultSpec::kSpike: keys = "rank step factor"; break;
    case FaultSpec::kTruncateCkpt: keys = "rank step secs"; break;
    case FaultSpec::kLink: keys = "rank mbit latency_ms"; break;  // (slow for the whole run)
    case FaultSpec::kRandom: keys = "every seed secs start ranks"; break;
    case FaultSpec::kDeviceFail: keys = "step"; break;
  }
  const std::string list = std::string(" ") + keys + " ";
  return list.find(" " + k + " ") != std::string::npos;
}

}  // namespace

Result<std::vector<FaultSpec>> ParseFaultSpec(const std::string& spec) {
  std::vector<FaultSpec> out;
  for (std::string item : SplitOn(spec, ';')) {
    item = Trim(item);
    if (item.empty()) continue;
    const std::string bad = "--inject: '" + item + "': ";
    size_t colon = item.find(':');
    FaultSpec f;
    bool secs_set = false, factor_set = false;
    if (!KindFromName(Trim(item.substr(0, colon)), &f.kind))
      return InvalidArgument(bad + "unknown fault kind (crash, hang, freeze, slow, stall, deaf, nan, corrupt, spike, "
                                   "bitflip, truncate-ckpt, link, device-fail, random)");
    if (colon != std::string::npos) {
      for (std::string kv : SplitOn(item.substr(colon + 1), ',')) {
        kv = Trim(kv);
        if (kv.empty()) continue;
        size_t eq = kv.find('=');
        if (eq == std::string::npos) return InvalidArgument(bad + "expected key=value, got '" + kv + "'");
        std::string k = Trim(kv.substr(0, eq)), v = Trim(kv.substr(eq + 1));
        double x = 0;
        if (k == "kinds") {
          if (f.kind != FaultSpec::kRandom) return InvalidArgument(bad + "key 'kinds' applies to random only");
          for (const std::string& name : SplitOn(v, '+')) {
            FaultSpec::Kind kk;
            if (!KindFromName(Trim(name), &kk) || kk == FaultSpec::kRandom || kk == FaultSpec::kTruncateCkpt ||
                kk == FaultSpec::kSlow || kk == FaultSpec::kStall || kk == FaultSpec::kCorrupt ||
                kk == FaultSpec::kSpike || kk == FaultSpec::kDeaf || kk == FaultSpec::kLink || kk == FaultSpec::kFreeze ||
                kk == FaultSpec::kDeviceFail)
              return InvalidArgument(bad + "kinds: '" + name + "' is not one of crash, hang, nan, bitflip");
            f.kinds.push_back(kk);
          }
          continue;
        }
        if (k == "then") {
          if (f.kind != FaultSpec::kTruncateCkpt) return InvalidArgument(bad + "key 'then' applies to truncate-ckpt only");
          if (v != "kill" && v != "hang" && v != "freeze") return InvalidArgument(bad + "then must be kill, hang or freeze");
          f.then_kill = v == "kill";
          f.then_freeze = v == "freeze";
          continue;
        }
        if (!ParseNum(v, &x)) return InvalidArgument(bad + k + "=" + v + " is not a number");
        if (!KeyApplies(f.kind, k)) return InvalidArgument(bad + "key '" + k + "' does not apply to this kind");
        // Upper bounds keep the casts defined and step + steps far from overflow; counts must be whole.
        constexpr double kMaxCount = 1e15, kMaxSecs = 7 * 86400;
        const bool whole = x == std::floor(x);
        if (k == "rank" && whole && x >= 0 && x <= 1e6) f.rank = static_cast<int>(x);
        else if (k == "step" && whole && x >= 0 && x <= kMaxCount) f.step = static_cast<int64_t>(x);
        else if (k == "secs" && x > 0 && x <= kMaxSecs) f.secs = x, secs_set = true;
        else if (k == "factor" && x >= 1 && x <= 1e9) f.factor = x, factor_set = true;
        else if (k == "busy" && (x == 0 || x == 1)) f.busy = x == 1;
        else if (k == "steps" && whole && x >= 1 && x <= kMaxCount) f.steps = static_cast<int64_t>(x), f.steps_set = true;
        else if (k == "every" && x > 0 && x <= kMaxSecs) f.every = x;
        else if (k == "start" && x >= 0 && x <= kMaxSecs) f.start = x;
        else if (k == "seed" && whole && x >= 0 && x <= 9007199254740992.0) f.seed = static_cast<uint64_t>(x);
        else if (k == "ranks" && whole && x >= 1 && x <= 1e6) f.ranks = static_cast<int>(x);
        else if (k == "mbit" && x > 0) f.mbit = x;
        else if (k == "latency_ms" && x >= 0 && x <= kMaxSecs * 1000) f.latency_ms = x;
        else return InvalidArgument(bad + "out-of-range value " + k + "=" + v);
      }
    }
    if (f.kind == FaultSpec::kTruncateCkpt && secs_set && !f.then_freeze)
      return InvalidArgument(bad + "secs applies only with then=freeze");
    // Per-kind defaults for what the item did not give (an explicit value equal to another kind's default stays).
    if (!secs_set) f.secs = f.kind == FaultSpec::kStall || f.kind == FaultSpec::kDeaf ? 30 : 5;
    if (!factor_set) f.factor = f.kind == FaultSpec::kSpike ? 100 : 3;
    if (f.kind == FaultSpec::kRandom) {
      if (f.kinds.empty()) f.kinds = {FaultSpec::kCrash, FaultSpec::kHang, FaultSpec::kNan, FaultSpec::kBitflip};
    } else {
      if (f.kind == FaultSpec::kLink) {
        if (f.step < 0) f.step = 0;  // a link is slow for the whole run
        if (f.mbit <= 0 && f.latency_ms <= 0) return InvalidArgument(bad + "needs mbit=B and/or latency_ms=L");
      }
      if (f.step < 0) return InvalidArgument(bad + "needs step=S");
      if (f.rank < 0 && f.kind != FaultSpec::kTruncateCkpt && f.kind != FaultSpec::kDeviceFail)
        return InvalidArgument(bad + "needs rank=R");
    }
    out.push_back(f);
  }
  return out;
}

Result<std::unique_ptr<FaultInjector>> FaultInjector::Create(const std::string& spec, int rank, int world) {
  if (Trim(spec).empty()) return std::unique_ptr<FaultInjector>();
  const char* allow = std::getenv("KEEL_ALLOW_FAULT_INJECTION");
  if (!allow || std::string(allow) != "1")
    return InvalidArgument("fault injection (--inject / KEEL_INJECT) is refused unless the environment also has "
                           "KEEL_ALLOW_FAULT_INJECTION=1 (it kills and corrupts workers on purpose)");
  KEEL_ASSIGN_OR_RETURN(auto specs, ParseFaultSpec(spec));
  return std::unique_ptr<FaultInjector>(new FaultInjector(std::move(specs), rank, world));
}

FaultInjector::FaultInjector(std::vector<FaultSpec> specs, int rank, int world)
    : specs_(std::move(specs)), rank_(rank), world_(std::max(1, world)) {
  // The random schedule: identical in every worker (a function of the spec and the job's start time).
  double t0 = EventLog::Now();
  if (const char* v = std::getenv("KEEL_INJECT_T0")) t0 = std::atof(v);
  for (size_t s = 0; s < specs_.size(); ++s) {
    const FaultSpec& f = specs_[s];
    if (f.kind != FaultSpec::kRandom) continue;
    if (first_random_ < 0) first_random_ = static_cast<int>(s);
    Rng rng(MixKey(f.seed, 0xFA017ull));
    const int ranks = f.ranks > 0 ? f.ranks : world_;
    double t = t0 + (f.start >= 0 ? f.start : f.every);
    for (int k = 0; k < 100000 && t < t0 + 7 * 86400; ++k) {
      Timed e;
      e.t = t;
      e.kind = f.kinds[rng.Below(f.kinds.size())];
      e.rank = static_cast<int>(rng.Below(static_cast<uint64_t>(ranks)));
      e.index = k;
      e.spec = static_cast<int>(s);
      e.secs = f.secs;
      e.window = std::max(1.0, f.every / 2);
      timed_.push_back(e);
      t += f.every * (0.5 + static_cast<double>(rng.Uniform()));
    }
  }
  // Several random items: one schedule in time order (DueRandom stops at the first future entry).
  std::stable_sort(timed_.begin(), timed_.end(), [](const Timed& a, const Timed& b) { return a.t < b.t; });
}

bool FaultInjector::Claim(const std::string& id) {
  if (std::find(claimed_local_.begin(), claimed_local_.end(), id) != claimed_local_.end()) return false;
  claimed_local_.push_back(id);
  return claim_ ? claim_(id) : true;
}

void FaultInjector::Record(FaultSpec::Kind kind, int64_t step, const std::string& id, const std::string& detail) {
  // step=S counts from 0 while the step lines count from 1, so the line names both; truncate-ckpt's S is the
  // checkpoint's step (ckpt-0000000S).
  if (kind == FaultSpec::kTruncateCkpt)
    std::fprintf(stderr, "inject: %s of the checkpoint of step %lld (%s)%s%s\n", FaultKindName(kind),
                 static_cast<long long>(step), id.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  else
    std::fprintf(stderr, "inject: %s at step=%lld, the step logged as 'step %lld' (%s)%s%s\n", FaultKindName(kind),
                 static_cast<long long>(step), static_cast<long long>(step + 1), id.c_str(),
                 detail.empty() ? "" : ": ", detail.c_str());
  std::fflush(stderr);
  if (events_) events_->Emit("inject", {{"kind", FaultKindName(kind)}, {"step", step}, {"id", id}, {"detail", detail}});
}

bool FaultInjector::DueRandom(FaultSpec::Kind kind, int64_t step, double* secs) {
  if (timed_.empty()) return false;
  const double now = EventLog::Now();
  for (const auto& e : timed_) {
    if (e.t > now) break;
    if (e.kind != kind || e.rank != rank_ || now - e.t > e.window) continue;
    // The first random item keeps the ids "random/K"; later ones are "random<S>/K" (S: the item's index).
    const std::string id = (e.spec == first_random_ ? std::string("random/") : "random" + std::to_string(e.spec) + "/") +
                           std::to_string(e.index);
    if (!Claim(id)) continue;
    *secs = e.secs;
    Record(kind, step, id, "scheduled at +" + std::to_string(static_cast<int>(now - e.t)) + "s late");
    return true;
  }
  return false;
}

bool FaultInjector::AfterMicroBatch(int64_t step) {
  std::lock_guard<std::mutex> l(mu_);
  for (size_t s = 0; s < specs_.size(); ++s) {
    const FaultSpec& f = specs_[s];
    if ((f.kind != FaultSpec::kCrash && f.kind != FaultSpec::kHang) || f.rank != rank_ || f.step != step) continue;
    const std::string id = std::string(FaultKindName(f.kind)) + "/" + std::to_string(s);
    if (!Claim(id)) continue;
    if (f.kind == FaultSpec::kCrash) {
      Record(f.kind, step, id, "SIGKILL");
      ::raise(SIGKILL);
    }
    Record(f.kind, step, id, "SIGSTOP for " + std::to_string(f.secs) + " s");
    HangProcessFor(f.secs);
    return true;
  }
  double secs = 5;
  if (DueRandom(FaultSpec::kCrash, step, &secs)) ::raise(SIGKILL);
  if (DueRandom(FaultSpec::kHang, step, &secs)) {
    HangProcessFor(secs);
    return true;
  }
  return false;
}

bool FaultInjector::CorruptGradient(int64_t step, float* grads, size_t n, bool first) {
  std::lock_guard<std::mutex> l(mu_);
  if (n == 0) return false;
  bool fire = false;
  std::string id;
  const size_t idx = static_cast<size_t>(MixKey(static_cast<uint64_t>(step), 77) % n);
  auto flip = [&] {
    uint32_t w;
    std::memcpy(&w, grads + idx, 4);
    w ^= uint32_t{1} << 21;  // a mantissa bit: still finite
    std::memcpy(grads + idx, &w, 4);
  };
  for (size_t s = 0; s < specs_.size() && !fire; ++s) {
    const FaultSpec& f = specs_[s];
    if ((f.kind != FaultSpec::kNan && f.kind != FaultSpec::kCorrupt) || f.rank != rank_) continue;
    id = std::string(FaultKindName(f.kind)) + "/" + std::to_string(s);
    if (f.kind == FaultSpec::kCorrupt && f.steps_set) {  // persistent: every gradient, recorded once
      if (step < f.step || step - f.step >= f.steps) continue;
      flip();
      if (Claim(id))
        Record(f.kind, step, id, "every gradient this worker computes for " + std::to_string(f.steps) +
                                     " steps gets mantissa bit 21 of one value flipped");
      return true;
    }
    if (!first || f.step != step || !Claim(id)) continue;
    if (f.kind == FaultSpec::kCorrupt) {
      flip();
      Record(f.kind, step, id, "gradient " + std::to_string(idx) + " mantissa bit 21 flipped");
      return true;
    }
    fire = true;
    Record(f.kind, step, id, "NaN in a gradient");
  }
  double secs = 0;
  if (!fire && first && DueRandom(FaultSpec::kNan, step, &secs)) fire = true;
  if (!fire) return false;
  grads[idx] = std::nanf("");
  return true;
}

bool FaultInjector::FlipParamBit(int64_t step, float* params, size_t n) {
  std::lock_guard<std::mutex> l(mu_);
  if (n == 0) return false;
  bool fire = false;
  std::string id = "bitflip";
  for (size_t s = 0; s < specs_.size() && !fire; ++s) {
    const FaultSpec& f = specs_[s];
    if (f.kind != FaultSpec::kBitflip || f.rank != rank_ || f.step != step) continue;
    id = "bitflip/" + std::to_string(s);
    if (Claim(id)) fire = true;
  }
  double secs = 0;
  const bool random = !fire && DueRandom(FaultSpec::kBitflip, step, &secs);
  if (!fire && !random) return false;
  const uint64_t h = MixKey(static_cast<uint64_t>(step), 0xB17F11Bull + static_cast<uint64_t>(rank_));
  const size_t idx = static_cast<size_t>(h % n);
  const int bit = static_cast<int>((h >> 40) % 31);
  uint32_t w;
  std::memcpy(&w, params + idx, 4);
  w ^= uint32_t{1} << bit;
  std::memcpy(params + idx, &w, 4);
  if (fire) Record(FaultSpec::kBitflip, step, id, "parameter " + std::to_string(idx) + " bit " + std::to_string(bit));
  return true;
}

double FaultInjector::SlowFactor(int64_t step) {
  std::lock_guard<std::mutex> l(mu_);
  double f = 1;
  for (size_t s = 0; s < specs_.size(); ++s) {
    const FaultSpec& x = specs_[s];
    if (x.kind != FaultSpec::kSlow || x.rank != rank_ || step < x.step || step >= x.step + x.steps) continue;
    const std::string id = "slow/" + std::to_string(s);
    if (Claim(id)) Record(x.kind, step, id, "x" + std::to_string(x.factor) + " for " + std::to_string(x.steps) + " steps");
    f = std::max(f, x.factor);
  }
  return f;
}

void FaultInjector::SlowDown(int64_t step, double compute_s) {
  const double f = SlowFactor(step);
  if (f <= 1 || !(compute_s > 0)) return;
  bool busy = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (const FaultSpec& x : specs_)
      if (x.kind == FaultSpec::kSlow && x.rank == rank_ && step >= x.step && step < x.step + x.steps) busy |= x.busy;
  }
  const auto wait = std::chrono::duration<double>((f - 1) * compute_s);
  if (!busy) return std::this_thread::sleep_for(wait);
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::nanoseconds>(wait);
  volatile uint64_t spin = 0;
  while (std::chrono::steady_clock::now() < until)
    for (int i = 0; i < 1000; ++i) spin = spin + 1;
}

bool FaultInjector::LinkLimit(double* mbit, double* latency_ms) {
  std::lock_guard<std::mutex> l(mu_);
  for (size_t s = 0; s < specs_.size(); ++s) {
    const FaultSpec& x = specs_[s];
    if (x.kind != FaultSpec::kLink || x.rank != rank_) continue;
    *mbit = x.mbit;
    *latency_ms = x.latency_ms;
    // Recorded once per process (a restarted worker's link is still slow): not claimed through the store.
    Record(x.kind, 0, "link/" + std::to_string(s),
           std::to_string(x.mbit) + " Mbit/s, " + std::to_string(x.latency_ms) + " ms latency");
    return true;
  }
  return false;
}

double FaultInjector::LossFactor(int64_t step) {
  std::lock_guard<std::mutex> l(mu_);
  for (size_t s = 0; s < specs_.size(); ++s) {
    const FaultSpec& f = specs_[s];
    if (f.kind != FaultSpec::kSpike || f.rank != rank_ || f.step != step) continue;
    const std::string id = "spike/" + std::to_string(s);
    if (!Claim(id)) continue;
    const double factor = f.factor;
    Record(f.kind, step, id, "loss x" + std::to_string(factor));
    return factor;
  }
  return 1;
}

bool FaultInjector::DeviceFails(int64_t step) {
  std::lock_guard<std::mutex> l(mu_);
  for (size_t s = 0; s < specs_.size(); ++s) {
    const FaultSpec& f = specs_[s];
    if (f.kind != FaultSpec::kDeviceFail || step < f.step) continue;
    const std::string id = "device-fail/" + std::to_string(s);
    if (std::find(claimed_local_.begin(), claimed_local_.end(), id) == claimed_local_.end()) {
      claimed_local_.push_back(id);
      Record(f.kind, step, id, "the device reports a failure from now on");
    }
    return true;
  }
  return false;
}

bool FaultInjector::DeafCollective(int64_t step, double* secs) {
  std::lock_guard<std::mutex> l(mu_);
  for (size_t s = 0; s < specs_.size(); ++s) {
    const FaultSpec& f = specs_[s];
    if (f.kind != FaultSpec::kDeaf || f.rank != rank_ || f.step != step) continue;
    const std::string id = "deaf/" + std::to_string(s);
    if (!Claim(id)) continue;
    *secs = f.secs;
    Record(f.kind, step, id, "the communication thread blocks for " + std::to_string(*secs) + " s, deaf to Abort");
    return true;
  }
  return false;
}

bool FaultInjector::FreezeHeartbeat(int64_t step, double* secs) {
  std::lock_guard<std::mutex> l(mu_);
  for (size_t s = 0; s < specs_.size(); ++s) {
    const FaultSpec& f = specs_[s];
    if (f.kind != FaultSpec::kFreeze || f.rank != rank_ || f.step != step) continue;
    const std::string id = "freeze/" + std::to_string(s);
    if (!Claim(id)) continue;
    *secs = f.secs;
    Record(f.kind, step, id, "SIGSTOP for " + std::to_string(f.secs) + " s, raised by the heartbeat thread between "
                             "its clock reading and its reads of the peers");
    return true;
  }
  return false;
}

bool FaultInjector::StallCollective(int64_t step, double* secs) {
  std::lock_guard<std::mutex> l(mu_);
  for (size_t s = 0; s < specs_.size(); ++s) {
    const FaultSpec& f = specs_[s];
    if (f.kind != FaultSpec::kStall || f.rank != rank_ || f.step != step) continue;
    const std::string id = "stall/" + std::to_string(s);
    if (!Claim(id)) continue;
    *secs = f.secs;
    Record(f.kind, step, id, "the gradient reduce sends nothing for " + std::to_string(f.secs) + " s");
    return true;
  }
  return false;
}

bool FaultInjector::TruncateCheckpoint(int64_t step, bool* then_kill, double* freeze_s) {
  std::lock_guard<std::mutex> l(mu_);
  for (size_t s = 0; s < specs_.size(); ++s) {
    const FaultSpec& f = specs_[s];
    if (f.kind != FaultSpec::kTruncateCkpt || f.step != step || (f.rank >= 0 && f.rank != rank_)) continue;
    const std::string id = "truncate-ckpt/" + std::to_string(s);
    if (!Claim(id)) continue;
    *then_kill = f.then_kill;
    *freeze_s = f.then_freeze ? (f.secs > 0 ? f.secs : 5.0) : 0.0;
    Record(f.kind, step, id, f.then_kill ? "then SIGKILL" : f.then_freeze ? "then freeze" : "then stall");
    return true;
  }
  return false;
}

void HangProcessFor(double secs) {
  const pid_t parent = getpid();
  struct timespec ts;
  ts.tv_sec = static_cast<time_t>(secs);
  ts.tv_nsec = static_cast<long>((secs - std::floor(secs)) * 1e9);
  pid_t helper = fork();
  if (helper == 0) {
    // Only async-signal-safe calls in the child of a multi-threaded process. The helper must not hold the
    // worker's sockets and pipes (a killed worker's peers would see no FIN, the launcher's relay no EOF), and it
    // dies with the worker (so it never wakes a pid the kernel gave to someone else).
    ::syscall(SYS_close_range, 0U, ~0U, 0U);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(0);
    while (nanosleep(&ts, &ts) != 0) {
      if (errno != EINTR) ::_exit(0);
    }
    ::kill(parent, SIGCONT);
    ::_exit(0);
  }
  if (helper < 0) return;
  ::raise(SIGSTOP);
  // Woken: by the helper, or earlier by someone else (the launcher wakes a stopped worker at the end of the job),
  // as a real SIGSTOP/SIGCONT pair would end. The helper is not waited for.
  ::kill(helper, SIGKILL);
  ::waitpid(helper, nullptr, 0);
}

}  // namespace keel
