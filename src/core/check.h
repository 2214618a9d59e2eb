// check.h: KEEL_CHECK, a precondition check that stays in release builds.
//
// For programmer errors only (a caller breaking a documented precondition), never for what the world can cause
// (I/O, peers, input: those are Status errors). Used where a broken precondition would otherwise write out of
// bounds silently once NDEBUG removes an assert: the process stops with one line naming the check.
#pragma once
#include <cstdio>
#include <cstdlib>

#define KEEL_CHECK(cond, what)                                                                   \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      std::fprintf(stderr, "keel: internal error: %s (%s:%d: %s)\n", what, __FILE__, __LINE__, #cond); \
      std::abort();                                                                              \
    }                                                                                            \
  } while (0)
