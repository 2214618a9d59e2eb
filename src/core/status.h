// status.h: the error type of libkeel. Failures caused by the world (files, peers, devices, bad input)
// are returned as a Status or a Result<T>; asserts are reserved for programmer bugs.
// Thread safety: values; safe to copy between threads.
#pragma once
#include <cassert>
#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace keel {

enum class Code { kOk = 0, kInvalidArgument, kNotFound, kIo, kCorrupt, kUnavailable, kTimeout, kAborted, kInternal };

class Status {
 public:
  Status() = default;
  Status(Code code, std::string msg) : code_(code), msg_(std::move(msg)) {}
  static Status Ok() { return {}; }
  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return msg_; }
  std::string ToString() const { return ok() ? "ok" : msg_; }
  // Prefixes context ("while X: ") to the message; keeps the code.
  Status Wrap(const std::string& context) const { return ok() ? *this : Status(code_, context + ": " + msg_); }

 private:
  Code code_ = Code::kOk;
  std::string msg_;
};

inline Status InvalidArgument(std::string m) { return {Code::kInvalidArgument, std::move(m)}; }
inline Status NotFound(std::string m) { return {Code::kNotFound, std::move(m)}; }
inline Status IoError(std::string m) { return {Code::kIo, std::move(m)}; }
inline Status Corrupt(std::string m) { return {Code::kCorrupt, std::move(m)}; }
inline Status Unavailable(std::string m) { return {Code::kUnavailable, std::move(m)}; }
inline Status Timeout(std::string m) { return {Code::kTimeout, std::move(m)}; }
inline Status Aborted(std::string m) { return {Code::kAborted, std::move(m)}; }
inline Status Internal(std::string m) { return {Code::kInternal, std::move(m)}; }

// Result<T>: a value or a non-ok Status (a small std::expected).
template <typename T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}                       // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) { assert(!std::get<Status>(v_).ok()); }  // NOLINT
  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { assert(ok()); return std::get<T>(v_); }
  const T& value() const& { assert(ok()); return std::get<T>(v_); }
  T&& value() && { assert(ok()); return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace keel

#define KEEL_CONCAT_INNER(a, b) a##b
#define KEEL_CONCAT(a, b) KEEL_CONCAT_INNER(a, b)
// Returns the Status from the enclosing function if expr is not ok.
#define KEEL_RETURN_IF_ERROR(expr)                  \
  do {                                              \
    ::keel::Status _keel_st = (expr);               \
    if (!_keel_st.ok()) return _keel_st;            \
  } while (0)
// KEEL_ASSIGN_OR_RETURN(auto x, MakeX()): binds the value or returns the error.
#define KEEL_ASSIGN_OR_RETURN(lhs, expr) KEEL_ASSIGN_OR_RETURN_IMPL(KEEL_CONCAT(_keel_r, __LINE__), lhs, expr)
#define KEEL_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return tmp.status();              \
  lhs = std::move(tmp).value()
