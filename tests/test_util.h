// test_util.h: helpers shared by keel's tests (temporary directories, running the keel binary).
#pragma once
#include <cstdlib>
#include <string>
#include <vector>

namespace keel::testing {

// A fresh empty directory under $TMPDIR (or /tmp), removed when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};
// Runs a shell command line, capturing its output.
CommandResult RunCommand(const std::string& cmdline);
// The keel binary built alongside the tests, or $KEEL_TEST_BINARY when set (scripts/gpu_check.sh runs the tests from
// a bundle copied to another machine, where the build path does not exist).
std::string KeelBinary();
// Runs KeelBinary() with the given arguments (shell-quoted by the caller).
CommandResult RunKeel(const std::string& args);
void WriteText(const std::string& path, const std::string& text);
// The names of dir's entries, sorted (to assert that no temporary was left behind).
std::vector<std::string> DirEntries(const std::string& dir);
// Splits a command line at spaces (no quoting): the argv for a Background job.
std::vector<std::string> Split(const std::string& s);

// Whether a missing dependency that scripts/setup installs (redis-server, chromium, PyTorch, fortunes) fails a test
// instead of skipping it: under CI (CI=true) and scripts/test (KEEL_REQUIRE_DEPS=1), where it means a broken
// setup; a skip there would pass unseen (ctest counts a skipped test as passed).
inline bool DepsRequired() {
  const char* ci = std::getenv("CI");
  const char* req = std::getenv("KEEL_REQUIRE_DEPS");
  return (ci && std::string(ci) == "true") || (req && std::string(req) == "1");
}

}  // namespace keel::testing

// Skips the test for a missing dependency, or fails it where DepsRequired().
#define KEEL_SKIP_UNLESS_REQUIRED(why)                                                     \
  do {                                                                                     \
    if (::keel::testing::DepsRequired()) {                                                 \
      FAIL() << (why) << " (a dependency scripts/setup installs; required under CI or KEEL_REQUIRE_DEPS=1)"; \
    } else {                                                                               \
      GTEST_SKIP() << (why);                                                               \
    }                                                                                      \
  } while (0)
