// http_api.cc: parsing and validating OpenAI-style completion requests, the chat template, and the response JSON.
#include "serve/http_api.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

namespace keel {

namespace {

using nlohmann::json;

constexpr size_t kMaxStops = 4;
constexpr size_t kMaxStopBytes = 256;
constexpr int kMaxTokensLimit = 1 << 30;

Status Bad(std::string* param_out, const std::string& param, const std::string& msg) {
  if (param_out) *param_out = param;
  return InvalidArgument(msg);
}

const char* TypeName(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::object: return "an object";
    case json::value_t::array: return "an array";
    case json::value_t::string: return "a string";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "an integer";
    case json::value_t::number_float: return "a number";
    default: return "an unsupported value";
  }
}

// An integer field (JSON integers, or floats with an integral value such as 16.0), range-checked.
Status GetInt(const json& v, const std::string& name, int64_t lo, int64_t hi, int64_t* out, std::string* param) {
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(hi))
      return Bad(param, name, "'" + name + "' must be at most " + std::to_string(hi));
    *out = static_cast<int64_t>(u);
  } else if (v.is_number_integer()) {
    *out = v.get<int64_t>();
  } else if (v.is_number_float()) {
    double d = v.get<double>();
    if (!std::isfinite(d) || d != std::floor(d) || d < -9.0e18 || d > 9.0e18)
      return Bad(param, name, "'" + name + "' must be an integer");
    *out = static_cast<int64_t>(d);
  } else {
    return Bad(param, name, "'" + name + "' must be an integer, not " + std::string(TypeName(v)));
  }
  if (*out < lo || *out > hi)
    return Bad(param, name,
               "'" + name + "' must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
                   std::to_string(*out));
  return Status::Ok();
}

Status GetNumber(const json& v, const std::string& name, double lo, double hi, bool lo_open, double* out,
                 std::string* param) {
  if (!v.is_number()) return Bad(param, name, "'" + name + "' must be a number, not " + std::string(TypeName(v)));
  double d = v.get<double>();
  bool ok = std::isfinite(d) && (lo_open ? d > lo : d >= lo) && d <= hi;
  if (!ok) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "'%s' must be in %s%g, %g], got %g", name.c_str(), lo_open ? "(" : "[", lo, hi, d);
    return Bad(param, name, buf);
  }
  *out = d;
  return Status::Ok();
}

Status GetBool(const json& v, const std::string& name, bool* out, std::string* param) {
  if (!v.is_boolean()) return Bad(param, name, "'" + name + "' must be a boolean, not " + std::string(TypeName(v)));
  *out = v.get<bool>();
  return Status::Ok();
}

Status ParseStop(const json& v, std::vector<std::string>* out, std::string* param) {
  if (v.is_null()) return Status::Ok();
  std::vector<const json*> items;
  if (v.is_string()) {
    items.push_back(&v);
  } else if (v.is_array()) {
    if (v.size() > kMaxStops)
      return Bad(param, "stop", "'stop' holds at most " + std::to_string(kMaxStops) + " strings");
    for (const auto& e : v) items.push_back(&e);
  } else {
    return Bad(param, "stop", "'stop' must be a string or an array of strings, not " + std::string(TypeName(v)));
  }
  for (const json* e : items) {
    if (!e->is_string()) return Bad(param, "stop", "'stop' must be a string or an array of strings");
    const std::string& s = e->get_ref<const std::string&>();
    if (s.empty()) return Bad(param, "stop", "'stop' strings must not be empty");
    if (s.size() > kMaxStopBytes)
      return Bad(param, "stop", "'stop' strings must be at most " + std::to_string(kMaxStopBytes) + " bytes");
    out->push_back(s);
  }
  return Status::Ok();
}

Status ParseContent(const json& v, size_t i, std::string* out, std::string* param) {
  const std::string name = "messages[" + std::to_string(i) + "].content";
  if (v.is_string()) {
    *out = v.get<std::string>();
    return Status::Ok();
  }
  if (v.is_array()) {
    // Content parts: only text parts are supported.
    for (const auto& part : v) {
      if (!part.is_object()) return Bad(param, name, "'" + name + "' parts must be objects");
      auto t = part.find("type");
      if (t == part.end() || !t->is_string() || t->get_ref<const std::string&>() != "text")
        return Bad(param, name, "'" + name + "': only parts of type \"text\" are supported");
      auto text = part.find("text");
      if (text == part.end() || !text->is_string())
        return Bad(param, name, "'" + name + "': a text part needs a string 'text'");
      *out += text->get_ref<const std::string&>();
    }
    return Status::Ok();
  }
  return Bad(param, name, "'" + name + "' must be a string or an array of content parts, not " +
                              std::string(TypeName(v)));
}

Status ParsePrompt(const json& v, const ParseOptions& o, CompletionRequest* r, std::string* param) {
  if (v.is_string()) {
    r->prompt = v.get<std::string>();
    return Status::Ok();
  }
  if (!v.is_array())
    return Bad(param, "prompt",
               "'prompt' must be a string, an array of one string or an array of token ids, not " +
                   std::string(TypeName(v)));
  if (v.empty()) return Bad(param, "prompt", "'prompt' must not be empty");
  if (v[0].is_string()) {
    if (v.size() != 1) return Bad(param, "prompt", "only one prompt per request is supported");
    r->prompt = v[0].get<std::string>();
    return Status::Ok();
  }
  if (v[0].is_array()) return Bad(param, "prompt", "only one prompt per request is supported");
  r->prompt_is_tokens = true;
  r->prompt_tokens.reserve(v.size());
  for (const auto& e : v) {
    int64_t id = 0;
    if (!e.is_number_integer() && !e.is_number_unsigned())
      return Bad(param, "prompt", "'prompt' token arrays must hold integers only");
    const bool inside = e.is_number_unsigned() ? e.get<uint64_t>() < static_cast<uint64_t>(o.vocab_size)
                                               : e.get<int64_t>() >= 0 && e.get<int64_t>() < o.vocab_size;
    if (!inside)
      return Bad(param, "prompt", "token id " + e.dump() + " in 'prompt' is outside the vocabulary [0, " +
                                      std::to_string(o.vocab_size) + ")");
    id = e.get<int64_t>();
    r->prompt_tokens.push_back(static_cast<int32_t>(id));
  }
  return Status::Ok();
}

Status Parse(std::string_view body, ApiEndpoint ep, const ParseOptions& o, CompletionRequest* r, std::string* param) {
  json j = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad(param, "", "the request body is not valid JSON");
  if (!j.is_object()) return Bad(param, "", "the request body must be a JSON object");
  r->endpoint = ep;
  // Defaults (OpenAI's).
  r->sampling.temperature = 1.0f;
  r->sampling.top_p = 1.0f;
  r->sampling.top_k = 0;
  auto field = [&](const char* name) -> const json* {
    auto it = j.find(name);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  };
  if (const json* v = field("model")) {
    if (!v->is_string()) return Bad(param, "model", "'model' must be a string, not " + std::string(TypeName(*v)));
    r->model = v->get<std::string>();
    if (!o.model_name.empty() && r->model != o.model_name) {
      if (param) *param = "model";
      return NotFound("the model '" + r->model + "' does not exist; this server serves '" + o.model_name + "'");
    }
  }
  if (ep == ApiEndpoint::kCompletions) {
    const json* v = field("prompt");
    if (!v) return Bad(param, "prompt", "'prompt' is required");
    KEEL_RETURN_IF_ERROR(ParsePrompt(*v, o, r, param));
  } else {
    const json* v = field("messages");
    if (!v) return Bad(param, "messages", "'messages' is required");
    if (!v->is_array() || v->empty()) return Bad(param, "messages", "'messages' must be a non-empty array");
    for (size_t i = 0; i < v->size(); ++i) {
      const json& m = (*v)[i];
      const std::string name = "messages[" + std::to_string(i) + "]";
      if (!m.is_object()) return Bad(param, name, "'" + name + "' must be an object");
      auto role = m.find("role");
      if (role == m.end() || !role->is_string())
        return Bad(param, name + ".role", "'" + name + ".role' must be a string");
      const std::string& rs = role->get_ref<const std::string&>();
      if (rs != "system" && rs != "user" && rs != "assistant" && rs != "developer")
        return Bad(param, name + ".role",
                   "'" + name + ".role' must be \"system\", \"user\" or \"assistant\", got \"" + rs + "\"");
      auto content = m.find("content");
      if (content == m.end()) return Bad(param, name + ".content", "'" + name + ".content' is required");
      ChatMessage cm;
      cm.role = rs == "developer" ? "system" : rs;
      KEEL_RETURN_IF_ERROR(ParseContent(*content, i, &cm.content, param));
      r->messages.push_back(std::move(cm));
    }
    r->prompt = RenderChatPrompt(r->messages);
  }
  double d = 0;
  int64_t k = 0;
  if (const json* v = field("temperature")) {
    KEEL_RETURN_IF_ERROR(GetNumber(*v, "temperature", 0.0, 2.0, false, &d, param));
    r->sampling.temperature = static_cast<float>(d);
  }
  if (const json* v = field("top_p")) {
    KEEL_RETURN_IF_ERROR(GetNumber(*v, "top_p", 0.0, 1.0, true, &d, param));
    r->sampling.top_p = static_cast<float>(d);
    if (!(r->sampling.top_p > 0.0f)) return Bad(param, "top_p", "'top_p' must be in (0, 1]");
  }
  if (const json* v = field("top_k")) {
    KEEL_RETURN_IF_ERROR(GetInt(*v, "top_k", 0, std::numeric_limits<int32_t>::max(), &k, param));
    r->sampling.top_k = static_cast<int>(k);
  }
  const char* max_name = "max_tokens";
  const json* mt = field("max_tokens");
  if (!mt && ep == ApiEndpoint::kChatCompletions) {
    mt = field("max_completion_tokens");
    max_name = "max_completion_tokens";
  }
  if (mt) {
    KEEL_RETURN_IF_ERROR(GetInt(*mt, max_name, 0, kMaxTokensLimit, &k, param));
    r->max_tokens = static_cast<int>(k);
  }
  if (const json* v = field("stop")) KEEL_RETURN_IF_ERROR(ParseStop(*v, &r->stop, param));
  if (const json* v = field("seed")) {
    if (v->is_number_unsigned()) {
      r->sampling.seed = v->get<uint64_t>();
    } else {
      KEEL_RETURN_IF_ERROR(GetInt(*v, "seed", std::numeric_limits<int64_t>::min(),
                                  std::numeric_limits<int64_t>::max(), &k, param));
      r->sampling.seed = static_cast<uint64_t>(k);
    }
    r->seed_given = true;
  }
  if (const json* v = field("n")) {
    KEEL_RETURN_IF_ERROR(GetInt(*v, "n", 1, std::numeric_limits<int32_t>::max(), &k, param));
    if (k != 1) return Bad(param, "n", "only n = 1 is supported");
  }
  if (const json* v = field("best_of")) {
    KEEL_RETURN_IF_ERROR(GetInt(*v, "best_of", 1, std::numeric_limits<int32_t>::max(), &k, param));
    if (k != 1) return Bad(param, "best_of", "only best_of = 1 is supported");
  }
  if (const json* v = field("stream")) KEEL_RETURN_IF_ERROR(GetBool(*v, "stream", &r->stream, param));
  if (const json* v = field("stream_options")) {
    if (!v->is_object()) return Bad(param, "stream_options", "'stream_options' must be an object");
    auto u = v->find("include_usage");
    if (u != v->end() && !u->is_null())
      KEEL_RETURN_IF_ERROR(GetBool(*u, "stream_options.include_usage", &r->include_usage, param));
  }
  if (const json* v = field("return_tokens")) KEEL_RETURN_IF_ERROR(GetBool(*v, "return_tokens", &r->return_tokens, param));
  // Fields keel does not implement are refused when they would change the answer (a client asking for logprobs
  // or a repetition penalty must not silently get a response without them); their neutral values are accepted,
  // since OpenAI clients send e.g. "presence_penalty": 0 by default.
  struct Unsupported {
    const char* name;
    double neutral;  // for numbers
  };
  for (const Unsupported u : {Unsupported{"logprobs", 0}, {"top_logprobs", 0}, {"echo", 0}, {"suffix", 0},
                              {"logit_bias", 0}, {"presence_penalty", 0}, {"frequency_penalty", 0},
                              {"repeat_penalty", 1}, {"min_p", 0}, {"tools", 0}, {"functions", 0}}) {
    const json* v = field(u.name);
    if (!v) continue;
    const bool active = v->is_boolean()  ? v->get<bool>()
                        : v->is_number() ? v->get<double>() != u.neutral
                        : v->is_string() ? !v->get<std::string>().empty()
                        : v->is_array() || v->is_object() ? !v->empty()
                                                          : true;
    if (active)
      return Bad(param, u.name, std::string("'") + u.name + "' is not supported by keel serve (send it unset" +
                                    (u.neutral != 0 ? " or " + json(u.neutral).dump() : std::string(" or 0/false/empty")) +
                                    ")");
  }
  if (const json* v = field("response_format")) {
    const bool text = v->is_object() && v->contains("type") && (*v)["type"] == "text";
    if (!text) return Bad(param, "response_format", "'response_format' is not supported by keel serve (only {\"type\": \"text\"})");
  }
  return Status::Ok();
}

}  // namespace

Result<CompletionRequest> ParseCompletionRequest(std::string_view body, ApiEndpoint endpoint, const ParseOptions& o,
                                                 std::string* error_param) {
  if (error_param) error_param->clear();
  CompletionRequest r;
  try {
    Status s = Parse(body, endpoint, o, &r, error_param);
    if (!s.ok()) return s;
  } catch (const std::exception& e) {  // defensive: the checks above should leave nothing to throw
    if (error_param) error_param->clear();
    return InvalidArgument(std::string("invalid request: ") + e.what());
  }
  return r;
}

std::string RenderChatPrompt(const std::vector<ChatMessage>& messages) {
  std::string out;
  for (const auto& m : messages) {
    out += m.role == "system" ? "System: " : m.role == "user" ? "User: " : "Assistant: ";
    out += m.content;
    out += '\n';
  }
  out += "Assistant:";
  return out;
}

std::vector<std::string> ChatStops(const std::vector<std::string>& client_stops) {
  std::vector<std::string> s = client_stops;
  s.push_back("\nUser:");
  s.push_back("\nSystem:");
  return s;
}

nlohmann::json ErrorJson(const std::string& message, const std::string& type, const std::string& param,
                         const std::string& code) {
  json e = {{"message", message}, {"type", type}, {"param", nullptr}, {"code", nullptr}};
  if (!param.empty()) e["param"] = param;
  if (!code.empty()) e["code"] = code;
  return json{{"error", e}};
}

ErrorKind ErrorKindForStatus(int s) {
  switch (s) {
    case 400: return {"invalid_request_error", ""};
    case 401: return {"authentication_error", "invalid_api_key"};
    case 404: return {"invalid_request_error", "not_found"};
    case 405: return {"invalid_request_error", "method_not_allowed"};
    case 411: return {"invalid_request_error", "length_required"};
    case 415: return {"invalid_request_error", "unsupported_media_type"};
    case 413: return {"invalid_request_error", "request_too_large"};
    case 429: return {"rate_limit_error", "queue_full"};
    case 503: return {"server_error", "unavailable"};
    default: return {s >= 500 ? "server_error" : "invalid_request_error", ""};
  }
}

std::string DumpJson(const nlohmann::json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

nlohmann::json UsageJson(const Usage& u) {
  return json{{"prompt_tokens", u.prompt_tokens},
              {"completion_tokens", u.completion_tokens},
              {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}

nlohmann::json CompletionResponse(const CompletionRequest& r, const std::string& id, int64_t created,
                                  const std::string& model, const std::string& text, const std::string& finish_reason,
                                  const Usage& usage, const std::vector<int32_t>* tokens) {
  json choice;
  if (r.endpoint == ApiEndpoint::kCompletions) {
    choice = {{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", finish_reason}};
  } else {
    choice = {{"index", 0},
              {"message", {{"role", "assistant"}, {"content", text}}},
              {"logprobs", nullptr},
              {"finish_reason", finish_reason}};
  }
  if (tokens) choice["tokens"] = *tokens;
  return json{{"id", id},
              {"object", r.endpoint == ApiEndpoint::kCompletions ? "text_completion" : "chat.completion"},
              {"created", created},
              {"model", model},
              {"choices", json::array({choice})},
              {"usage", UsageJson(usage)}};
}

nlohmann::json StreamChunk(const CompletionRequest& r, const std::string& id, int64_t created, const std::string& model,
                           const std::string& text, bool role_delta, const std::string& finish_reason,
                           const std::vector<int32_t>* tokens) {
  json choice;
  if (r.endpoint == ApiEndpoint::kCompletions) {
    choice = {{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
  } else {
    json delta = json::object();
    if (role_delta) {
      delta["role"] = "assistant";
      delta["content"] = "";
    } else if (!text.empty() || finish_reason.empty()) {
      delta["content"] = text;
    }
    choice = {{"index", 0}, {"delta", delta}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
  }
  if (!finish_reason.empty()) choice["finish_reason"] = finish_reason;
  if (tokens) choice["tokens"] = *tokens;
  return json{{"id", id},
              {"object", r.endpoint == ApiEndpoint::kCompletions ? "text_completion" : "chat.completion.chunk"},
              {"created", created},
              {"model", model},
              {"choices", json::array({choice})}};
}

nlohmann::json StreamUsageChunk(const CompletionRequest& r, const std::string& id, int64_t created,
                                const std::string& model, const Usage& usage) {
  return json{{"id", id},
              {"object", r.endpoint == ApiEndpoint::kCompletions ? "text_completion" : "chat.completion.chunk"},
              {"created", created},
              {"model", model},
              {"choices", json::array()},
              {"usage", UsageJson(usage)}};
}

}  // namespace keel
