// corpus.cc: directory walking, binary detection and concatenation of the training corpus.
#include "data/corpus.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include "core/env.h"
#include "data/utf8.h"

namespace keel {

namespace fs = std::filesystem;

std::string WhyNotText(std::string_view bytes) {
  const std::string_view head = bytes.substr(0, std::min(bytes.size(), kBinarySniffBytes));
  if (head.find('\0') != std::string_view::npos) return "contains a NUL byte";
  size_t bad = 0;
  if (!utf8::Valid(bytes, &bad)) return "not valid UTF-8 at byte " + std::to_string(bad);
  return "";
}

namespace {

// Canonical (symlink-free, absolute) form of path, or an error naming it.
Result<std::string> Canonical(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::canonical(path, ec);
  if (ec) return IoError(path + ": cannot resolve path: " + ec.message());
  return p.string();
}

class Walker {
 public:
  explicit Walker(CollectStats* stats) : stats_(stats) {}

  // Adds the text files of one input; returns how many text files it contained (duplicates included).
  Result<size_t> Input(const std::string& path) {
    Env* env = DefaultEnv();
    if (!env->Exists(path)) {
      std::error_code ec;
      if (fs::is_symlink(fs::symlink_status(path, ec))) return NotFound(path + ": dangling symlink");
      return NotFound(path + ": no such file or directory");
    }
    if (env->IsDir(path)) {
      KEEL_ASSIGN_OR_RETURN(std::string real, Canonical(path));
      if (seen_dirs_.count(real)) {  // the same directory given twice (or inside an earlier input)
        Count(&CollectStats::duplicates);
        return size_t{1};
      }
      KEEL_ASSIGN_OR_RETURN(size_t n, Dir(path));
      if (n == 0) return InvalidArgument("no text files in " + path);
      return n;
    }
    std::error_code ec;
    const fs::file_status st = fs::status(path, ec);
    if (ec || !fs::is_regular_file(st)) return InvalidArgument(path + ": not a regular file or directory");
    KEEL_ASSIGN_OR_RETURN(std::string why, Classify(path));
    if (!why.empty()) return InvalidArgument(path + ": not a text file (" + why + ")");
    KEEL_RETURN_IF_ERROR(Add(path));
    return size_t{1};
  }

  std::vector<std::string> TakeFiles() { return std::move(files_); }

 private:
  Result<size_t> Dir(const std::string& dir) {
    KEEL_ASSIGN_OR_RETURN(std::string real, Canonical(dir));
    // A symlink cycle or a directory already walked (a repeated input, or an input inside an earlier one): its
    // files are collected already; what it contained counts, so that its parent is not "without text files".
    if (auto it = seen_dirs_.find(real); it != seen_dirs_.end()) return it->second;
    seen_dirs_[real] = 0;
    KEEL_ASSIGN_OR_RETURN(std::vector<std::string> names, DefaultEnv()->ListDir(dir));
    size_t found = 0;
    for (const std::string& name : names) {
      const std::string path = JoinPath(dir, name);
      if (name[0] == '.') {
        Count(&CollectStats::skipped_hidden);
        continue;
      }
      std::error_code ec;
      const fs::file_status st = fs::status(path, ec);  // follows symlinks
      const bool broken_link = ec == std::errc::no_such_file_or_directory || ec == std::errc::not_a_directory ||
                               ec == std::errc::too_many_symbolic_link_levels;
      if (ec && !broken_link) return IoError(path + ": cannot read: " + ec.message());  // EACCES, EIO
      if (ec || !fs::exists(st)) {
        Count(&CollectStats::skipped_other);  // dangling symlink (or a symlink loop)
        continue;
      }
      if (fs::is_directory(st)) {
        KEEL_ASSIGN_OR_RETURN(size_t n, Dir(path));
        found += n;
      } else if (fs::is_regular_file(st)) {
        KEEL_ASSIGN_OR_RETURN(std::string why, Classify(path));
        if (!why.empty()) {
          Count(&CollectStats::skipped_binary);
          continue;
        }
        KEEL_RETURN_IF_ERROR(Add(path));
        ++found;
      } else {
        Count(&CollectStats::skipped_other);
      }
    }
    seen_dirs_[real] = found;
    return found;
  }

  // "" for a text file, else why it is not one.
  Result<std::string> Classify(const std::string& path) {
    KEEL_ASSIGN_OR_RETURN(MappedFile m, DefaultEnv()->Map(path));
    return WhyNotText(std::string_view(reinterpret_cast<const char*>(m.data()), m.size()));
  }

  Status Add(const std::string& path) {
    KEEL_ASSIGN_OR_RETURN(std::string real, Canonical(path));
    if (seen_files_.insert(real).second) {
      files_.push_back(path);
    } else {
      Count(&CollectStats::duplicates);
    }
    return Status::Ok();
  }

  void Count(size_t CollectStats::*field) {
    if (stats_) ++(stats_->*field);
  }

  CollectStats* stats_;
  std::set<std::string> seen_files_;
  std::map<std::string, size_t> seen_dirs_;  // canonical directory -> text files found in it (0 while walking)
  std::vector<std::string> files_;
};

}  // namespace

Result<std::vector<std::string>> CollectTextFiles(const std::vector<std::string>& inputs, CollectStats* stats) {
  if (inputs.empty()) return InvalidArgument("no input files or directories given");
  if (stats) *stats = CollectStats();
  Walker walker(stats);
  for (const std::string& in : inputs) {
    if (in.empty()) return InvalidArgument("empty input path");
    KEEL_ASSIGN_OR_RETURN(size_t n, walker.Input(in));
    (void)n;
  }
  return walker.TakeFiles();
}

Result<std::string> ReadCorpus(const std::vector<std::string>& files) {
  std::string text;
  for (size_t i = 0; i < files.size(); ++i) {
    KEEL_ASSIGN_OR_RETURN(std::string body, DefaultEnv()->ReadFile(files[i]));
    const std::string why = WhyNotText(body);
    if (!why.empty()) return InvalidArgument(files[i] + ": not a text file (" + why + ")");
    if (i > 0) text += '\n';
    text += body;
  }
  if (text.find_first_not_of(" \t\n\r\v\f") == std::string::npos) {
    return InvalidArgument("corpus is empty: " + std::to_string(files.size()) +
                           " file(s) with no non-whitespace text");
  }
  return text;
}

}  // namespace keel
