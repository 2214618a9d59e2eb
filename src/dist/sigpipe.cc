// sigpipe.cc: IgnoreSigpipe(); see sigpipe.h for why the library turns SIGPIPE off.
#include "dist/sigpipe.h"

#include <csignal>
#include <mutex>

namespace keel {

void IgnoreSigpipe() {
  // Checked on every call, not once: a program (or a forked child) may have put SIGPIPE back to SIG_DFL since.
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  struct sigaction old {};
  if (sigaction(SIGPIPE, nullptr, &old) != 0) return;
  if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler == SIG_DFL) {
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    sigaction(SIGPIPE, &ign, nullptr);
  }
}

}  // namespace keel
