// membership_util.h: small helpers shared by membership.cc and membership_watch.cc (internal, not installed):
// JSON field access that tolerates what another process wrote, and log formatting.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace keel::membership_detail {

inline std::string Dump(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

inline int64_t IntOr(const nlohmann::json& j, const char* k, int64_t fallback) {
  if (!j.is_object() || !j.contains(k) || !j[k].is_number_integer()) return fallback;
  return j[k].get<int64_t>();
}
inline std::string StrOr(const nlohmann::json& j, const char* k, const std::string& fallback) {
  if (!j.is_object() || !j.contains(k) || !j[k].is_string()) return fallback;
  return j[k].get<std::string>();
}

inline std::string Secs(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2fs", s);
  return buf;
}

inline std::string UidList(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';  // (not (i ? "," : "") + ...: GCC 12 warns falsely (-Wrestrict) on that form)
    s += std::to_string(v[i]);
  }
  return "[" + s + "]";
}

}  // namespace keel::membership_detail
