// launcher.cc: fork/exec of the workers, output relay, signal forwarding and the waitpid loop.
#include "train/launcher.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>

extern char** environ;

namespace keel {
namespace {

using Clock = std::chrono::steady_clock;

// ---- signals: the handler only counts and wakes poll() through a self-pipe ----
int g_wake_pipe[2] = {-1, -1};
volatile sig_atomic_t g_signals = 0;

void OnSignal(int) {
  int saved = errno;
  g_signals = g_signals + 1;
  if (g_wake_pipe[1] >= 0) {
    char c = 's';
    ssize_t rv = ::write(g_wake_pipe[1], &c, 1);
    (void)rv;
  }
  errno = saved;
}

class SignalScope {
 public:
  SignalScope() {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_handler = OnSignal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
    // SIGCHLD at its default: ignored (SIG_IGN survives exec, so a parent can leave it so), the kernel reaps the
    // workers itself and waitpid() never reports their exits.
    struct sigaction dfl;
    std::memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGCHLD, &dfl, &old_chld_);
  }
  ~SignalScope() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
    sigaction(SIGCHLD, &old_chld_, nullptr);
  }

 private:
  struct sigaction old_int_, old_term_, old_chld_;
};

void WriteAll(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::write(fd, s.data() + off, s.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

std::string DescribeStatus(int st) {
  if (WIFEXITED(st)) return "exited with status " + std::to_string(WEXITSTATUS(st));
  if (WIFSIGNALED(st)) {
    int sig = WTERMSIG(st);
    const char* abbrev = sigabbrev_np(sig);
    return "was killed by signal " + std::to_string(sig) + (abbrev ? std::string(" (SIG") + abbrev + ")" : "");
  }
  return "ended with wait status " + std::to_string(st);
}

// Removes ANSI "erase line" sequences the trainer uses for its live progress line.
std::string StripAnsi(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\033' && i + 1 < s.size() && s[i + 1] == '[') {
      size_t j = i + 2;
      while (j < s.size() && (std::isdigit(static_cast<unsigned char>(s[j])) || s[j] == ';')) ++j;
      if (j < s.size()) {
        i = j;
        continue;
      }
    }
    out += s[i];
  }
  return out;
}

// Relays worker output as "[rank R] line" and keeps rank 0's progress line at the bottom of a terminal.
class Relay {
 public:
  Relay(int out_fd, bool tty, bool prefix, int nproc) : fd_(out_fd), tty_(tty), prefix_(prefix), bufs_(nproc) {}

  void OnData(int local, int rank, const char* data, size_t n) {
    std::string& buf = bufs_[static_cast<size_t>(local)];
    buf.append(data, n);
    size_t start = 0;
    for (size_t i = 0; i < buf.size(); ++i) {
      if (buf[i] != '\n' && buf[i] != '\r') continue;
      std::string seg = StripAnsi(buf.substr(start, i - start));
      if (buf[i] == '\n') {
        if (rank == 0) SetProgress("");  // rank 0 moved on from its progress line
        if (!seg.empty()) Line(rank, seg);
      } else if (!seg.empty()) {
        if (tty_ && rank == 0) SetProgress(seg);
        else Line(rank, seg);
      }
      start = i + 1;
    }
    buf.erase(0, start);
    if (tty_ && rank == 0) {
      std::string partial = StripAnsi(buf);
      if (!partial.empty()) SetProgress(partial);
    }
  }

  // Flushes what is left of a worker's output (its stream ended).
  void OnEof(int local, int rank) {
    std::string& buf = bufs_[static_cast<size_t>(local)];
    std::string seg = StripAnsi(buf);
    buf.clear();
    if (rank == 0) SetProgress("");
    if (!seg.empty()) Line(rank, seg);
  }

  // A line of the launcher's own.
  void Own(const std::string& line) { Emit(line); }

  // The last "error: ..." a worker printed (without its prefix), or "": what the launcher's own failure line
  // repeats, so that its last line says why and not only that a worker exited.
  std::string LastError(int rank) const {
    auto it = last_error_.find(rank);
    return it == last_error_.end() ? std::string() : it->second;
  }
  void ForgetError(int rank) { last_error_.erase(rank); }  // a restarted worker's new life

  void Finish() { SetProgress(""); }

 private:
  std::string Tag(int rank) const { return prefix_ ? "[rank " + std::to_string(rank) + "] " : ""; }
  void Line(int rank, const std::string& s) {
    // keel's own error lines ("keel train: error: ..."), not any line that happens to hold the words.
    if (const size_t e = s.find(": error: "); s.rfind("keel ", 0) == 0 && e != std::string::npos)
      last_error_[rank] = s.substr(e + 9, 300);
    Emit(Tag(rank) + s);
  }
  void Emit(const std::string& line) {
    std::string out;
    if (shown_) out += "\r\033[K";
    out += line + "\n";
    if (!progress_.empty()) out += Tag(0) + progress_;
    shown_ = !progress_.empty();
    WriteAll(fd_, out);
  }
  void SetProgress(const std::string& p) {
    if (p == progress_) return;
    progress_ = p;
    std::string out = shown_ ? "\r\033[K" : "";
    if (!p.empty()) out += Tag(0) + p;
    else if (shown_ && !tty_) out += "\n";
    shown_ = !p.empty();
    WriteAll(fd_, out);
  }

  int fd_;
  bool tty_, prefix_;
  std::vector<std::string> bufs_;
  std::string progress_;
  bool shown_ = false;
  std::map<int, std::string> last_error_;
};

struct Worker {
  int local = 0, rank = 0;
  pid_t pid = -1;
  int out_fd = -1;   // read end of its stdout/stderr (pipe or pty master)
  bool running = false;
  int status = 0;
  int restarts = 0;
  std::chrono::steady_clock::time_point started;  // of its current (or last) life
  int short_lives = 0;  // consecutive lives shorter than kShortLife_s (a worker failing at start-up)
  // A restart waiting out its backoff (see RestartDelay); max() when none is due.
  std::chrono::steady_clock::time_point restart_at = std::chrono::steady_clock::time_point::max();
  std::string restart_why;
};

// Restart backoff: a worker that fails again within kShortLife_s of its (re)start is probably failing at start-up
// (a bad flag on one host, a missing file, a device that will not open): restarting it at once would burn the
// whole --max-restarts budget in a second. The first restart is immediate (a crash mid-run should rejoin quickly);
// from the second consecutive short life on, the restart waits 1, 2, 4, ... seconds, at most kMaxRestartDelay_s.
constexpr double kShortLife_s = 10;
constexpr double kMaxRestartDelay_s = 30;
double RestartDelay(int short_lives) {
  if (short_lives <= 1) return 0;
  return std::min(kMaxRestartDelay_s, std::ldexp(1.0, std::min(short_lives - 2, 10)));
}

// Opens a pseudo-terminal in raw mode (no "\n" -> "\r\n"): the master for the launcher, the slave for rank 0.
bool OpenPty(int* master, int* slave) {
  int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
  if (m < 0) return false;
  if (grantpt(m) != 0 || unlockpt(m) != 0) {
    ::close(m);
    return false;
  }
  const char* name = ptsname(m);
  int s = name ? ::open(name, O_RDWR | O_NOCTTY | O_CLOEXEC) : -1;
  if (s < 0) {
    ::close(m);
    return false;
  }
  struct termios t;
  if (tcgetattr(s, &t) == 0) {
    cfmakeraw(&t);
    tcsetattr(s, TCSANOW, &t);
  }
  *master = m;
  *slave = s;
  return true;
}

class Attempt {
 public:
  Attempt(const LaunchOptions& o, Relay* relay) : o_(o), relay_(relay) {}
  ~Attempt() {
    for (auto& w : workers_) {
      if (w.running) {
        ::kill(w.pid, SIGKILL);
        ::waitpid(w.pid, nullptr, 0);
      }
      if (w.out_fd >= 0) ::close(w.out_fd);
    }
  }

  Status Start() {
    std::set<std::string> ours = {"KEEL_RANK", "KEEL_WORLD_SIZE", "KEEL_LOCAL_RANK", "KEEL_LOCAL_WORLD_SIZE",
                                  "KEEL_NODE_RANK", "KEEL_NNODES", "KEEL_RESTART", "KEEL_SUPERVISED"};
    for (const auto& [k, v] : o_.env) ours.insert(k);
    for (char** e = environ; e && *e; ++e) {
      std::string kv = *e;
      std::string key = kv.substr(0, kv.find('='));
      if (!ours.count(key)) base_env_.push_back(kv);
    }
    for (const auto& [k, v] : o_.env) base_env_.push_back(k + "=" + v);
    for (int local = 0; local < o_.nproc; ++local) {
      Worker w;
      w.local = local;
      w.rank = o_.node_rank * o_.nproc + local;
      KEEL_RETURN_IF_ERROR(Spawn(&w, 0));
      workers_.push_back(w);
    }
    std::string line = "launcher: started " + std::to_string(o_.nproc) + " worker(s) of " +
                       std::to_string(o_.nproc * o_.nnodes) + " (node " + std::to_string(o_.node_rank) + " of " +
                       std::to_string(o_.nnodes) + "):";
    for (const auto& w : workers_) line += " rank " + std::to_string(w.rank) + " pid " + std::to_string(w.pid) + ";";
    line.pop_back();
    relay_->Own(line);
    return Status::Ok();
  }

  // Starts (or restarts) one worker.
  Status Spawn(Worker* wp, int restart) {
    Worker& w = *wp;
    const int world = o_.nproc * o_.nnodes;
    const bool tty = isatty(STDERR_FILENO);
    // Everything the child needs is built before fork (after fork only async-signal-safe calls).
    std::vector<std::string> argv_s = {o_.exe};
    argv_s.insert(argv_s.end(), o_.args.begin(), o_.args.end());
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t parent = getpid();
    {
      const int local = w.local;
      std::vector<std::string> env_s = base_env_;
      if (restart > 0) env_s.push_back("KEEL_RESTART=" + std::to_string(restart));
      env_s.push_back("KEEL_RANK=" + std::to_string(w.rank));
      env_s.push_back("KEEL_SUPERVISED=1");  // repeated SIGTERMs are one stop request (see Wait)
      env_s.push_back("KEEL_WORLD_SIZE=" + std::to_string(world));
      env_s.push_back("KEEL_LOCAL_RANK=" + std::to_string(local));
      env_s.push_back("KEEL_LOCAL_WORLD_SIZE=" + std::to_string(o_.nproc));
      env_s.push_back("KEEL_NODE_RANK=" + std::to_string(o_.node_rank));
      env_s.push_back("KEEL_NNODES=" + std::to_string(o_.nnodes));
      std::vector<char*> envp;
      for (auto& e : env_s) envp.push_back(e.data());
      envp.push_back(nullptr);

      int rd = -1, wr = -1;
      if (!(tty && w.rank == 0 && OpenPty(&rd, &wr))) {
        int p[2];
        if (::pipe2(p, O_CLOEXEC) != 0) return IoError(std::string("launcher: pipe: ") + std::strerror(errno));
        rd = p[0];
        wr = p[1];
      }
      pid_t pid = ::fork();
      if (pid < 0) {
        int e = errno;
        ::close(rd);
        ::close(wr);
        return IoError(std::string("launcher: fork: ") + std::strerror(e));
      }
      if (pid == 0) {
        // Child: own process group (terminal signals reach only the launcher), die with the launcher.
        ::setpgid(0, 0);
        ::prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (::getppid() != parent) ::_exit(1);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, nullptr);
        ::dup2(wr, STDOUT_FILENO);
        ::dup2(wr, STDERR_FILENO);
        ::execve(argv[0], argv.data(), envp.data());
        const char msg[] = "keel launcher: cannot execute the worker binary\n";
        ssize_t rv = ::write(STDERR_FILENO, msg, sizeof(msg) - 1);
        (void)rv;
        ::_exit(127);
      }
      ::close(wr);
      w.pid = pid;
      w.out_fd = rd;
      w.running = true;
      w.restarts = restart;
      w.started = std::chrono::steady_clock::now();
    }
    return Status::Ok();
  }

  LaunchResult Wait() {
    LaunchResult res;
    bool any_ok = false;
    // 0, not g_signals: a signal that arrived while the workers were being started (after g_signals was reset)
    // must be forwarded too.
    int handled_signals = 0;
    std::string first_failure;
    auto kill_at = Clock::time_point::max();
    bool finish_armed = false;
    auto drain_until = Clock::time_point::max();
    Clock::time_point first_stop_at;  // when the first stop request was forwarded
    std::vector<char> buf(1 << 16);
    for (;;) {
      int running = 0, open = 0;
      for (const auto& w : workers_) {
        running += w.running || w.restart_at != Clock::time_point::max();  // a pending restart counts as running
        open += w.out_fd >= 0;
      }
      if (running == 0 && (open == 0 || Clock::now() >= drain_until)) break;
      if (running == 0 && drain_until == Clock::time_point::max())
        drain_until = Clock::now() + std::chrono::seconds(2);

      std::vector<pollfd> pfds;
      std::vector<int> owner;
      pfds.push_back({g_wake_pipe[0], POLLIN, 0});
      owner.push_back(-1);
      for (size_t i = 0; i < workers_.size(); ++i) {
        if (workers_[i].out_fd < 0) continue;
        pfds.push_back({workers_[i].out_fd, POLLIN, 0});
        owner.push_back(static_cast<int>(i));
      }
      int rv = ::poll(pfds.data(), pfds.size(), 50);
      if (rv < 0 && errno != EINTR) {
        // The launcher cannot watch its workers any more: stop them (~Attempt kills and reaps what is left) and
        // fail the job, rather than report a success nobody checked (unless a worker already finished it).
        const int e = errno;
        if (first_failure.empty()) first_failure = std::string("launcher: poll failed: ") + std::strerror(e);
        if (!o_.elastic) any_ok = false;
        break;
      }
      for (size_t j = 0; rv > 0 && j < pfds.size(); ++j) {
        if (!(pfds[j].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        if (owner[j] < 0) {
          char tmp[64];
          while (::read(g_wake_pipe[0], tmp, sizeof(tmp)) > 0) {
          }
          continue;
        }
        Worker& w = workers_[static_cast<size_t>(owner[j])];
        ssize_t n = ::read(w.out_fd, buf.data(), buf.size());
        if (n > 0) {
          relay_->OnData(w.local, w.rank, buf.data(), static_cast<size_t>(n));
        } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {  // EOF, or EIO from a pty whose slave closed
          relay_->OnEof(w.local, w.rank);
          ::close(w.out_fd);
          w.out_fd = -1;
        }
      }

      // Forward every SIGINT/SIGTERM the launcher received as one SIGTERM to each worker.
      const int sigs = g_signals;
      if (sigs != handled_signals) {
        // The first stop request is forwarded as one SIGTERM; a second one (or two at once) kills the workers. A
        // worker counts its SIGTERMs as one stop request (KEEL_SUPERVISED), because under a batch system or
        // `pkill keel` it gets one directly as well as the one forwarded here, and the second must not cut its
        // stop checkpoint short. So the escalation is the launcher's, by SIGKILL.
        // "Again" means a second request at least a second after the first: GNU timeout, a batch system or a
        // shell's kill of the process group deliver the same request twice within microseconds.
        const bool again = res.stopped_by_signal && Clock::now() - first_stop_at >= std::chrono::seconds(1);
        const bool duplicate = res.stopped_by_signal && !again;
        handled_signals = sigs;
        if (!res.stopped_by_signal) first_stop_at = Clock::now();
        res.stopped_by_signal = true;
        if (duplicate) {
          relay_->Own("launcher: a repeated stop request within a second of the first is taken as the same one "
                      "(signal again later to kill the workers)");
        } else if (!again) {
          relay_->Own("launcher: stop requested; forwarding SIGTERM to the workers (they stop at the next step "
                      "boundary with a checkpoint; signal again to kill them)");
          // SIGCONT too: a stopped worker (SIGSTOP, a debugger detached) leaves SIGTERM pending forever.
          for (auto& w : workers_)
            if (w.running) ::kill(w.pid, SIGTERM), ::kill(w.pid, SIGCONT);
        } else {
          relay_->Own("launcher: stop requested again; killing the workers (SIGKILL)");
          for (auto& w : workers_)
            if (w.running) ::kill(w.pid, SIGKILL);
        }
      }

      // Reap: every worker that has exited, those killed by a signal first. When one is SIGKILLed (the OOM
      // killer, a user), its peers fail on the broken connection a moment later, and both are often found in the
      // same sweep: the root cause is the killed one, not the first rank that reported the lost peer.
      std::vector<std::pair<Worker*, int>> exited;
      for (auto& w : workers_) {
        if (!w.running) continue;
        int st = 0;
        if (::waitpid(w.pid, &st, WNOHANG) == w.pid) exited.push_back({&w, st});
      }
      std::stable_partition(exited.begin(), exited.end(), [](const auto& e) { return WIFSIGNALED(e.second); });
      // Whether the job finished counts for the whole sweep (a worker that crashed in the same sweep is not restarted).
      for (const auto& e : exited) any_ok |= WIFEXITED(e.second) && WEXITSTATUS(e.second) == 0;
      for (auto& [wp, st] : exited) {
        Worker& w = *wp;
        w.running = false;
        w.status = st;
        const bool ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
        if (ok) any_ok = true;
        if (o_.on_exit) o_.on_exit(w.rank, w.pid, st);
        // What it wrote before exiting, first: its error line, if it printed one, goes into the message.
        auto drain = [&] {
          for (; w.out_fd >= 0;) {
            pollfd pf = {w.out_fd, POLLIN, 0};
            if (::poll(&pf, 1, 0) <= 0 || !(pf.revents & POLLIN)) break;
            ssize_t n = ::read(w.out_fd, buf.data(), buf.size());
            if (n <= 0) break;
            relay_->OnData(w.local, w.rank, buf.data(), static_cast<size_t>(n));
          }
        };
        auto describe = [&] {
          const std::string why = relay_->LastError(w.rank);
          return "worker rank " + std::to_string(w.rank) + " (pid " + std::to_string(w.pid) + ") " +
                 DescribeStatus(st) + (why.empty() ? "" : " (" + why + ")");
        };
        if (!ok) drain();
        if (!ok && o_.elastic) {
          // Elastic: the others carry on (they re-form without it); this one is restarted if allowed.
          const std::string what = describe();
          if (first_failure.empty()) first_failure = what;
          const bool quarantined = WIFEXITED(st) && WEXITSTATUS(st) == kExitQuarantined;
          if (quarantined) {
            relay_->Own("launcher: " + what + ": quarantined after repeated faults; not restarted");
          } else if (res.stopped_by_signal) {
            relay_->Own("launcher: " + what + " while stopping; not restarted");
          } else if (any_ok) {
            relay_->Own("launcher: " + what + " after the job finished; not restarted");
          } else if (restarts_used_ < o_.max_restarts) {
            ++restarts_used_;
            relay_->ForgetError(w.rank);
            if (w.out_fd >= 0) {  // what it wrote before dying (drained above), then its new incarnation's stream
              relay_->OnEof(w.local, w.rank);
              ::close(w.out_fd);
              w.out_fd = -1;
            }
            const double life_s = std::chrono::duration<double>(Clock::now() - w.started).count();
            w.short_lives = life_s < kShortLife_s ? w.short_lives + 1 : 0;
            const double delay_s = RestartDelay(w.short_lives);
            w.restarts = restarts_used_;
            w.restart_why = what;
            w.restart_at = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(delay_s));
            if (delay_s > 0) {
              char d[32];
              std::snprintf(d, sizeof(d), "%g", delay_s);
              relay_->Own("launcher: " + what + "; it failed " + std::to_string(w.short_lives) +
                          " times in a row within " + std::to_string(static_cast<int>(kShortLife_s)) +
                          " s of its start: restarting it in " + d + " s (restart " + std::to_string(restarts_used_) +
                          " of " + std::to_string(o_.max_restarts) + ")");
            }
          } else {
            relay_->Own("launcher: " + what + "; no restarts left (--max-restarts " + std::to_string(o_.max_restarts) +
                        "): the job continues without it");
          }
          continue;
        }
        if (!ok && first_failure.empty()) {
          first_failure = describe();
          relay_->Own("launcher: " + first_failure + "; stopping the other workers");
          for (auto& other : workers_)
            if (other.running) ::kill(other.pid, SIGTERM), ::kill(other.pid, SIGCONT);
          kill_at = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                       std::chrono::duration<double>(o_.kill_grace_s));
        }
      }
      // Elastic: once a worker has finished the job, the others finish too (they find it done), except one left
      // stopped (SIGSTOP, evicted long ago), which would keep the launcher waiting forever: it is woken. Nothing is
      // killed on a timer here: the leader may still be writing the final checkpoint (large models, slow disks).
      if (o_.elastic && any_ok && !finish_armed) {
        finish_armed = true;
        for (auto& w : workers_)
          if (w.running) ::kill(w.pid, SIGCONT);
      }
      // Restarts that are due (at once, or after their backoff). One cancelled by a stop or a finished job is
      // not made.
      for (auto& w : workers_) {
        if (w.restart_at == Clock::time_point::max()) continue;
        if (res.stopped_by_signal || any_ok) {
          w.restart_at = Clock::time_point::max();
          relay_->Own("launcher: the restart of worker rank " + std::to_string(w.rank) + " is cancelled (" +
                      (any_ok ? "the job finished" : "stopping") + ")");
          continue;
        }
        if (Clock::now() < w.restart_at) continue;
        w.restart_at = Clock::time_point::max();
        Status sp = Spawn(&w, w.restarts);
        relay_->Own("launcher: " + w.restart_why + "; restarting it (restart " + std::to_string(w.restarts) + " of " +
                    std::to_string(o_.max_restarts) + ", pid " + std::to_string(w.pid) + ")" +
                    (sp.ok() ? "" : ": failed: " + sp.message()));
        if (o_.on_restart && sp.ok()) o_.on_restart(w.rank, w.pid, w.restarts, w.restart_why);
      }
      if (Clock::now() >= kill_at) {
        for (auto& w : workers_)
          if (w.running) ::kill(w.pid, SIGKILL);
        kill_at = Clock::time_point::max();
      }
    }
    if (o_.elastic) {
      // The job succeeded if a worker finished it (others may have failed along the way).
      if (!any_ok) {
        res.exit_code = 1;
        res.message = first_failure.empty() ? "no worker finished" : first_failure;
      }
      return res;
    }
    if (!first_failure.empty()) {
      res.exit_code = 1;
      res.message = first_failure;
    }
    return res;
  }

 private:
  const LaunchOptions& o_;
  Relay* relay_;
  std::vector<Worker> workers_;
  std::vector<std::string> base_env_;
  int restarts_used_ = 0;
};

}  // namespace

Result<LaunchResult> LaunchWorkers(const LaunchOptions& o) {
  if (o.nproc < 1) return InvalidArgument("--nproc must be at least 1");
  if (o.max_restarts < 0) return InvalidArgument("--max-restarts must be >= 0");
  if (o.max_restarts > 0 && !o.elastic)
    return InvalidArgument("--max-restarts needs elastic training (restarted workers rejoin a running group)");
  if (::pipe2(g_wake_pipe, O_CLOEXEC | O_NONBLOCK) != 0)
    return IoError(std::string("launcher: pipe: ") + std::strerror(errno));
  g_signals = 0;
  LaunchResult result;
  {
    SignalScope signals;
    Relay relay(STDERR_FILENO, isatty(STDERR_FILENO), o.prefix_output, o.nproc);
    // One attempt. Elastic jobs restart individual workers inside it (they rejoin the running group); static
    // jobs end at the first failure.
    Attempt attempt(o, &relay);
    Status s = attempt.Start();
    if (!s.ok()) {
      relay.Finish();
      ::close(g_wake_pipe[0]);
      ::close(g_wake_pipe[1]);
      g_wake_pipe[0] = g_wake_pipe[1] = -1;
      return s;
    }
    result = attempt.Wait();
    relay.Finish();
  }
  ::close(g_wake_pipe[0]);
  ::close(g_wake_pipe[1]);
  g_wake_pipe[0] = g_wake_pipe[1] = -1;
  return result;
}

}  // namespace keel
