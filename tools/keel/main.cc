// main.cc: the keel command-line entry point; dispatches to one subcommand per cmd_*.cc file.
#include <cstdio>
#include <cstring>
#include <string>

#include "tools/keel/commands.h"

namespace {
void Usage() {
  std::fprintf(stderr,
               "usage: keel <command> [options]\n"
               "commands:\n"
               "  prepare   tokenize text files into training shards\n"
               "  train     train a GPT model (one or many workers)\n"
               "  sample    generate text from a checkpoint\n"
               "  info      describe a data dir, run dir or checkpoint\n"
               "  export    write a model as GGUF (llama.cpp) or Hugging Face safetensors\n"
               "  serve     serve a model over HTTP (OpenAI-compatible API, web page)\n"
               "run 'keel <command> --help' for the options of a command\n");
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    Usage();
    return argc < 2 ? 2 : 0;
  }
  if (!std::strcmp(argv[1], "--version")) {
    std::printf("keel %s\n", KEEL_VERSION);
    return 0;
  }
  std::string cmd = argv[1];
  for (const auto& c : keel::cli::Commands()) {
    if (cmd == c.name) return c.run(argc - 1, argv + 1);
  }
  // One line (the usage would bury it); `keel --help` lists the commands.
  std::fprintf(stderr, "keel: unknown command '%s' (run 'keel --help' for the commands)\n", cmd.c_str());
  return 2;
}
