// http_api.h: the OpenAI-compatible request and response formats of `keel serve`, independent of any HTTP library
// (so the request parser can be fuzzed on its own: tests/fuzz/completion_request_fuzz.cc).
//
// Requests (POST /v1/completions, POST /v1/chat/completions; JSON objects):
//   model        string, optional; when given it must equal the served model's name (else 404 model_not_found)
//   prompt       completions: a string, an array of one string, or an array of token ids
//   messages     chat: a non-empty array of {role: "system"|"user"|"assistant", content: string or an array of
//                {type: "text", text: string} parts}
//   temperature  number in [0, 2], default 1 (0 = greedy)
//   top_p        number in (0, 1], default 1 (off)
//   top_k        integer >= 0, default 0 (off) — an extension, as in llama.cpp's server
//   max_tokens   integer >= 0 (chat also accepts max_completion_tokens); default 16 for completions (as OpenAI),
//                the rest of the context for chat. Generation always stops at the end of the context.
//   stop         a string or an array of up to 4 non-empty strings (at most 256 bytes each)
//   seed         integer; default: a fresh random seed per request
//   n            must be 1 when given
//   stream       bool; stream_options.include_usage adds a final chunk with the token counts
//   return_tokens  bool, an extension: each choice also carries "tokens", the generated token ids
// Unknown fields are ignored (clients send e.g. "user" or "presence_penalty").
//
// The chat template (keel's models are base language models) renders each message as "<Role>: <content>\n" with
// Role = System, User or Assistant, then "Assistant:"; generation also stops at "\nUser:" and "\nSystem:",
// and a single leading space of the reply is dropped. See docs/serving.md.
//
// Thread safety: pure functions.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/status.h"
#include "serve/sampling.h"

namespace keel {

enum class ApiEndpoint { kCompletions, kChatCompletions };

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

struct CompletionRequest {
  ApiEndpoint endpoint = ApiEndpoint::kCompletions;
  std::string model;                   // empty: not given
  std::string prompt;                  // completions with a text prompt; chat: the rendered template
  std::vector<int32_t> prompt_tokens;  // completions with a token-id prompt (then prompt is empty)
  bool prompt_is_tokens = false;
  std::vector<ChatMessage> messages;   // chat
  SamplingParams sampling;             // seed set only when seed_given
  bool seed_given = false;
  int max_tokens = -1;                 // -1: the endpoint's default
  std::vector<std::string> stop;       // the client's stop strings (chat adds the template's in ChatStops())
  bool stream = false;
  bool include_usage = false;
  bool return_tokens = false;
};

struct ParseOptions {
  std::string model_name;  // the served model's id
  int vocab_size = 0;      // token ids in a prompt must be in [0, vocab_size)
};

// Parses and validates a request body. Errors: kInvalidArgument (HTTP 400) for malformed JSON, wrong types and
// out-of-range values, kNotFound (HTTP 404) for another model name. *error_param (if given) receives the
// offending field ("" when none applies). Never throws.
Result<CompletionRequest> ParseCompletionRequest(std::string_view body, ApiEndpoint endpoint, const ParseOptions& o,
                                                 std::string* error_param = nullptr);

// The chat template: "System: ...\nUser: ...\nAssistant: ...\n" ... "Assistant:".
std::string RenderChatPrompt(const std::vector<ChatMessage>& messages);
// The stop strings a chat request generates with: the client's plus the template's.
std::vector<std::string> ChatStops(const std::vector<std::string>& client_stops);

// {"error": {"message", "type", "param", "code"}} — OpenAI's error shape. Empty param/code become null.
nlohmann::json ErrorJson(const std::string& message, const std::string& type, const std::string& param = "",
                         const std::string& code = "");
// The error type and code OpenAI uses for an HTTP status (e.g. 401 -> authentication_error/invalid_api_key).
struct ErrorKind {
  std::string type, code;
};
ErrorKind ErrorKindForStatus(int http_status);

// Serialises JSON for the wire; invalid UTF-8 in strings (a model may emit any bytes) becomes U+FFFD.
std::string DumpJson(const nlohmann::json& j);

struct Usage {
  int prompt_tokens = 0, completion_tokens = 0;
};
nlohmann::json UsageJson(const Usage& u);

// Complete (non-streaming) responses. finish_reason: "stop" or "length".
nlohmann::json CompletionResponse(const CompletionRequest& r, const std::string& id, int64_t created,
                                  const std::string& model, const std::string& text, const std::string& finish_reason,
                                  const Usage& usage, const std::vector<int32_t>* tokens = nullptr);
// One streaming chunk (the payload of a "data: " event). text: the new text (chat: delta.content); role_delta:
// the chat's first chunk ({"role": "assistant", "content": ""}); finish_reason: "" for none (null).
nlohmann::json StreamChunk(const CompletionRequest& r, const std::string& id, int64_t created, const std::string& model,
                           const std::string& text, bool role_delta, const std::string& finish_reason,
                           const std::vector<int32_t>* tokens = nullptr);
// The final usage chunk (stream_options.include_usage): empty choices and a usage object.
nlohmann::json StreamUsageChunk(const CompletionRequest& r, const std::string& id, int64_t created,
                                const std::string& model, const Usage& usage);

}  // namespace keel
