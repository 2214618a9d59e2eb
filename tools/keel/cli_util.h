// cli_util.h: shared helpers for the subcommands: CLI11 parsing with one-line errors, Status reporting,
// JSON config files whose fields flags override, and the Ctrl-C / SIGTERM stop flag.
#pragma once
#include <atomic>
#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "core/status.h"

namespace keel::cli {

// Parses argv (a flag given twice: the last value wins, unless the option takes all values); on error prints "keel <cmd>: <message>" (one line) and returns the exit code to use (>= 0) —
// or -1 if parsing succeeded and the command should run.
int Parse(CLI::App& app, int argc, char** argv);

// Prints "keel <cmd>: <message>" to stderr and returns 1.
int Fail(const std::string& cmd, const Status& s);

// Stop flag set by SIGINT/SIGTERM once InstallStopHandlers() ran (second signal: default action).
std::atomic<bool>& StopFlag();
void InstallStopHandlers();

// Reads a JSON object from path (errors name the file).
Result<nlohmann::json> ReadJsonFile(const std::string& path);

}  // namespace keel::cli
