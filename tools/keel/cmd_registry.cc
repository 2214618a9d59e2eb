// cmd_registry.cc: the table of subcommands.
#include "tools/keel/commands.h"

namespace keel::cli {

const std::vector<Command>& Commands() {
  static const std::vector<Command> kCommands = {
      {"prepare", RunPrepare}, {"train", RunTrain}, {"sample", RunSample}, {"info", RunInfo}, {"export", RunExport},
      {"serve", RunServe}};
  return kCommands;
}

}  // namespace keel::cli
