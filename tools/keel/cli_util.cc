// cli_util.cc: implementation of the CLI helpers.
#include "tools/keel/cli_util.h"

#include <charconv>
#include <csignal>

#include "core/env.h"

namespace keel::cli {

int Parse(CLI::App& app, int argc, char** argv) {
  // A flag given twice: the last one wins, in every subcommand (train's --config fields rely on it, and scripts
  // append overrides to a base command line). Options declared to take every value (--inject) keep that.
  for (CLI::Option* opt : app.get_options())
    if (opt->get_multi_option_policy() == CLI::MultiOptionPolicy::Throw)
      opt->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "keel %s: %s\n", app.get_name().c_str(), e.what());
    return 2;
  }
  return -1;
}

int Fail(const std::string& cmd, const Status& s) {
  std::fprintf(stderr, "keel %s: error: %s\n", cmd.c_str(), s.message().c_str());
  return 1;
}

CLI::Validator SeedValidator() {
  return CLI::Validator(
      [](std::string& v) -> std::string {
        uint64_t seed = 0;
        // from_chars takes digits only for an unsigned type (no sign, space or base prefix) and reports overflow.
        auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), seed, 10);
        if (v.empty() || ec != std::errc() || end != v.data() + v.size())
          return "must be a decimal integer in [0, 18446744073709551615], got '" + v + "'";
        return "";
      },
      "");
}

Status CheckNotEmpty(const CLI::App& app, std::initializer_list<const char*> flags) {
  for (const char* flag : flags) {
    const CLI::Option* opt = app.get_option(flag);
    // results(): every value given, in order; the last one is the flag's value (Parse: the last one wins).
    if (opt->count() > 0 && opt->results().back().empty())
      return InvalidArgument(std::string(flag) + " must not be empty");
  }
  return Status::Ok();
}

std::atomic<bool>& StopFlag() {
  static std::atomic<bool> flag{false};
  return flag;
}

namespace {
void OnStopSignal(int sig) {
  if (StopFlag().exchange(true)) {
    std::signal(sig, SIG_DFL);
    std::raise(sig);
  }
}
}  // namespace

void InstallStopHandlers() {
  std::signal(SIGINT, OnStopSignal);
  std::signal(SIGTERM, OnStopSignal);
}

Result<nlohmann::json> ReadJsonFile(const std::string& path) {
  KEEL_ASSIGN_OR_RETURN(std::string text, DefaultEnv()->ReadFile(path));
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded()) return InvalidArgument(path + ": not valid JSON");
  if (!j.is_object()) return InvalidArgument(path + ": expected a JSON object");
  return j;
}

}  // namespace keel::cli
