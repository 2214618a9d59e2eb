// cmd_stubs.cc: TEMPORARY placeholders while the subcommands are written (removed before submission).
#include <cstdio>

#include "tools/keel/commands.h"

namespace keel::cli {
int RunPrepare(int, char**) { std::fprintf(stderr, "not yet\n"); return 1; }
int RunTrain(int, char**) { std::fprintf(stderr, "not yet\n"); return 1; }
int RunSample(int, char**) { std::fprintf(stderr, "not yet\n"); return 1; }
int RunInfo(int, char**) { std::fprintf(stderr, "not yet\n"); return 1; }
}  // namespace keel::cli
