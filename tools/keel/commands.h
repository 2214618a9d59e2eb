// commands.h: the registry of keel subcommands. Each cmd_*.cc defines one Run function; the CLI stays thin:
// it parses flags (CLI11), calls libkeel, and turns a Status into a one-line error and an exit code.
#pragma once
#include <string>
#include <vector>

namespace keel::cli {

struct Command {
  const char* name;
  int (*run)(int argc, char** argv);
};
const std::vector<Command>& Commands();

int RunPrepare(int argc, char** argv);
int RunTrain(int argc, char** argv);
int RunSample(int argc, char** argv);
int RunInfo(int argc, char** argv);
int RunExport(int argc, char** argv);
int RunServe(int argc, char** argv);

}  // namespace keel::cli
