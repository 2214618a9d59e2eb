// cli_util.h: shared helpers for the subcommands: CLI11 parsing with one-line errors, Status reporting,
// JSON config files whose fields flags override, and the Ctrl-C / SIGTERM stop flag.
#pragma once
#include <atomic>
#include <cstdio>
#include <initializer_list>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "core/status.h"
#include "train/checkpoint_io.h"

namespace keel::cli {

// `keel sample` / `keel serve --dtype`: the decode copy of the weight matrices, f32, f16 or bf16; anything else is
// "--dtype must be f32, f16 or bf16, got 'X'".
Result<WeightDtype> ParseDecodeDtype(const std::string& value);
// `--kv-dtype`: the KV cache's values, f32 or f16 (true); anything else is "--kv-dtype must be f32 or f16, got 'X'".
Result<bool> ParseKvDtype(const std::string& value);
// The loaded model's parameters are finite and, with f16 or bf16, the matrices within that type's range (a value
// beyond would become inf and the logits NaN; wpe stays fp32 in the decode state). Errors name `where`.
Status CheckDecodeParams(const TrainingSnapshot& s, const std::string& where, WeightDtype dtype);

// Parses argv (a flag given twice: the last value wins, unless the option takes all values); on error prints "keel <cmd>: <message>" (one line) and returns the exit code to use (>= 0) —
// or -1 if parsing succeeded and the command should run.
int Parse(CLI::App& app, int argc, char** argv);

// CLI11's message for a parse error, with "Could not convert: --port = 99999999999" (a decimal integer too large
// for the flag's type) said as "--port: 99999999999 is out of range for this flag".
std::string DescribeParseError(const CLI::ParseError& e);
// What Parse sets up on the options (last value wins, decimal-only integers), for a caller that checks values
// before Parse (train's --config fields); Parse does it once per app whether or not this ran first.
void SetUpOptions(CLI::App& app);

// Prints "keel <cmd>: <message>" to stderr and returns 1.
int Fail(const std::string& cmd, const Status& s);

// Validator for --seed: a decimal integer in [0, 2^64-1]. CLI11's own conversion to uint64_t wraps -1 to
// 2^64-1, saturates 99999999999999999999 and takes 0x/0b forms: each would silently run another seed.
CLI::Validator SeedValidator();

// kInvalidArgument "FLAG must not be empty" for the first of flags given with an empty last value: an empty
// value (an unset shell variable in --host "$HOST") would otherwise silently mean the flag's default.
Status CheckNotEmpty(const CLI::App& app, std::initializer_list<const char*> flags);

// Stop flag set by SIGINT/SIGTERM once InstallStopHandlers() ran (second signal: default action, except in a
// worker of keel's launcher, KEEL_SUPERVISED=1, where repeats are the same stop request and the launcher kills).
std::atomic<bool>& StopFlag();
void InstallStopHandlers();

// Reads a JSON object from path (errors name the file).
Result<nlohmann::json> ReadJsonFile(const std::string& path);

}  // namespace keel::cli
