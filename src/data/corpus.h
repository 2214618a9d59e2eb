// corpus.h: finding the text files of a training corpus and reading them into one string.
//
// Contract:
//  - CollectTextFiles expands each input (a file or a directory) into text files. Directories are walked
//    recursively in sorted name order, so the result is deterministic for a given tree. Symlinks are
//    followed, but each real file (and each real directory) is visited once: files are deduplicated by
//    their canonical path, keeping the first path seen. Inside directories, entries whose names start
//    with '.' (.git, editor swap files) and non-regular files (fifos, sockets, devices) are skipped.
//  - A file is text when its first 8 KiB contain no NUL byte and the whole file is well-formed UTF-8.
//    Binary files found while walking a directory are skipped (counted in CollectStats); a binary file
//    named directly as an input is an error, since the caller asked for it explicitly.
//  - Errors (one line, naming the path): an input that does not exist; an input directory that yields
//    no text files ("no text files in DIR"); an unreadable file or directory.
//  - ReadCorpus concatenates the files in order, separated by "\n". It re-checks that each file is still
//    text and fails with "corpus is empty" when the result is empty or whitespace only.
// File contents are read through keel::DefaultEnv(); path resolution (canonical paths, file types) uses
// std::filesystem because Env has no such queries.
// Thread safety: reentrant; no shared state.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace keel {

// How many bytes at the start of a file are checked for NUL.
inline constexpr size_t kBinarySniffBytes = 8192;

struct CollectStats {
  size_t skipped_binary = 0;     // binary files skipped inside directories
  size_t skipped_hidden = 0;     // dot-entries skipped inside directories
  size_t skipped_other = 0;      // non-regular files and dangling symlinks skipped inside directories
  size_t duplicates = 0;         // paths that resolved to a file already collected
};

// Returns "" if bytes look like text (see above), else a short reason ("contains a NUL byte",
// "not valid UTF-8 at byte 123").
std::string WhyNotText(std::string_view bytes);

// Expands inputs into the deduplicated, deterministic list of text files. stats may be null.
Result<std::vector<std::string>> CollectTextFiles(const std::vector<std::string>& inputs,
                                                  CollectStats* stats = nullptr);

// Reads and concatenates files (separated by "\n").
Result<std::string> ReadCorpus(const std::vector<std::string>& files);

}  // namespace keel
