// cli_util.cc: implementation of the CLI helpers.
#include "tools/keel/cli_util.h"

#include <unistd.h>

#include <charconv>
#include <csignal>
#include <cstdlib>
#include <set>

#include "core/env.h"
#include "export/export.h"

namespace keel::cli {

namespace {

// Integer option values are decimal: CLI11 reads them with strtoll(..., 0), so "0100" was 64 (octal) and "0x10"
// 16, and a value beyond int64 saturated silently. Leading zeros are stripped (0100 is 100); anything but digits
// (with a leading '-' for signed options), or a value outside int64 (uint64 for unsigned options), is refused.
CLI::Validator DecimalInteger(bool is_unsigned) {
  return CLI::Validator(
      [is_unsigned](std::string& v) -> std::string {
        const std::string range =
            is_unsigned ? "[0, 18446744073709551615]" : "[-9223372036854775808, 9223372036854775807]";
        const std::string bad = "must be a decimal integer in " + range + ", got '" + v + "'";
        const bool negative = !is_unsigned && !v.empty() && v[0] == '-';
        size_t i = negative ? 1 : 0;
        if (i == v.size() || v.find_first_not_of("0123456789", i) != std::string::npos) return bad;
        while (i + 1 < v.size() && v[i] == '0') ++i;
        const std::string digits = (negative ? "-" : "") + v.substr(i);
        std::errc ec;
        if (is_unsigned) {
          uint64_t x = 0;
          ec = std::from_chars(digits.data(), digits.data() + digits.size(), x).ec;
        } else {
          int64_t x = 0;
          ec = std::from_chars(digits.data(), digits.data() + digits.size(), x).ec;
        }
        if (ec != std::errc()) return bad;
        v = digits == "-0" ? "0" : digits;
        return "";
      },
      "");
}

}  // namespace

void SetUpOptions(CLI::App& app) {
  // Once per app: Parse calls it again after a caller's own call (the CLI is single-threaded).
  static std::set<const CLI::App*> prepared;
  if (!prepared.insert(&app).second) return;
  // A flag given twice: the last one wins, in every subcommand (train's --config fields rely on it, and scripts
  // append overrides to a base command line). Options declared to take every value (--inject) keep that.
  for (CLI::Option* opt : app.get_options()) {
    if (opt->get_multi_option_policy() == CLI::MultiOptionPolicy::Throw)
      opt->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    const std::string type = opt->get_type_name();
    if (opt->get_expected_min() > 0 && (type == "INT" || type == "UINT")) opt->transform(DecimalInteger(type == "UINT"));
  }
}

std::string DescribeParseError(const CLI::ParseError& e) {
  std::string what = e.what();
  // A conversion error after the DecimalInteger check is a decimal integer that does not fit the flag's type (a
  // 32-bit int for most flags). CLI11 says "Could not convert: --port = 99999999999".
  const std::string prefix = "Could not convert: ";
  const size_t eq = what.find(" = ");
  if (dynamic_cast<const CLI::ConversionError*>(&e) && what.rfind(prefix, 0) == 0 && eq != std::string::npos) {
    // A flag given twice lists every value ("1,99999999999"); the last one is the flag's value (TakeLast).
    std::string value = what.substr(eq + 3);
    if (value.find(',') != std::string::npos) value = value.substr(value.rfind(',') + 1);
    const size_t digits = !value.empty() && value[0] == '-' ? 1 : 0;
    const bool integer = value.size() > digits && value.find_first_not_of("0123456789", digits) == std::string::npos;
    if (integer)  // (anything else, "--lr abc", keeps CLI11's message)
      return what.substr(prefix.size(), eq - prefix.size()) + ": " + value + " is out of range for this flag";
  }
  return what;
}

int Parse(CLI::App& app, int argc, char** argv) {
  SetUpOptions(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "keel %s: %s\n", app.get_name().c_str(), DescribeParseError(e).c_str());
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
// A worker started by keel's launcher (KEEL_SUPERVISED) takes repeated signals as one stop request: it gets one
// from the launcher and often one directly too (a batch system's SIGTERM to every process, `pkill keel`), and the
// second must not kill it in the middle of its stop checkpoint. The launcher escalates with SIGKILL instead.
// A worker whose launcher died (its parent changed: PR_SET_PDEATHSIG sent the first SIGTERM) has nobody left to
// escalate, so a second signal kills it again as for an unsupervised process.
volatile sig_atomic_t g_supervised = 0;
volatile pid_t g_launcher = 0;

void OnStopSignal(int sig) {
  const bool supervised = g_supervised && ::getppid() == g_launcher;  // (getppid is async-signal-safe)
  if (StopFlag().exchange(true) && !supervised) {
    std::signal(sig, SIG_DFL);
    std::raise(sig);
  }
}
}  // namespace

void InstallStopHandlers() {
  const char* sup = std::getenv("KEEL_SUPERVISED");
  g_supervised = sup != nullptr && std::string(sup) == "1";
  g_launcher = ::getppid();
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

Result<WeightDtype> ParseDecodeDtype(const std::string& value) {
  for (WeightDtype d : {WeightDtype::kF32, WeightDtype::kF16, WeightDtype::kBF16})
    if (value == WeightDtypeName(d)) return d;
  return InvalidArgument("--dtype must be f32, f16 or bf16, got '" + value + "'");
}

Result<bool> ParseKvDtype(const std::string& value) {
  if (value == "f32" || value == "f16") return value == "f16";
  return InvalidArgument("--kv-dtype must be f32 or f16, got '" + value + "'");
}

Status CheckDecodeParams(const TrainingSnapshot& s, const std::string& where, WeightDtype dtype) {
  // bf16's largest finite value is 0x7f7f (3.3895e38): an fp32 value beyond rounds to inf.
  const double largest = dtype == WeightDtype::kF16 ? kF16Max : dtype == WeightDtype::kBF16 ? 3.3895313892515355e38
                                                                                              : HUGE_VAL;
  return CheckFiniteParams(s, where, [largest](const ParamTensor& t) {
    return t.shape.size() >= 2 && t.name != "wpe" ? largest : HUGE_VAL;
  });
}

}  // namespace keel::cli
