// sigpipe.h: makes a write to a socket whose peer is gone an error (EPIPE), not a process-killing SIGPIPE.
//
// Gloo's TCP transport sends with writev(), which has no MSG_NOSIGNAL, and hiredis uses write(); with SIGPIPE at
// its default disposition a member that writes to a peer that just died (SIGKILL, crash) is itself killed, so one
// dead worker takes its survivors with it. keel treats a dead peer as a normal event, so every entry point that
// opens such sockets (ConnectGlooCommunicator, OpenStore for redis://) calls IgnoreSigpipe() first.
//
// Contract: process-wide and idempotent; it changes SIGPIPE only when it is at SIG_DFL, so a program that
// installed its own handler keeps it. Every call checks again (one sigaction), so a child that reset SIGPIPE
// after fork() is covered when it connects. Thread-safe (a mutex orders concurrent calls).
#pragma once

namespace keel {

void IgnoreSigpipe();

}  // namespace keel
