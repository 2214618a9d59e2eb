// completion_request_fuzz.cc: libFuzzer target for the request parser of `keel serve` (serve/http_api.h):
// arbitrary bytes as a /v1/completions and a /v1/chat/completions body must parse or fail with a Status — no
// crash, leak, undefined behaviour or exception — and whatever parses must serialise into responses.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "serve/http_api.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  const keel::ParseOptions o{"keel", 256};
  for (auto ep : {keel::ApiEndpoint::kCompletions, keel::ApiEndpoint::kChatCompletions}) {
    std::string param;
    auto r = keel::ParseCompletionRequest(body, ep, o, &param);
    if (!r.ok()) {
      // Errors carry a message; the error body serialises.
      if (r.status().message().empty()) __builtin_trap();
      (void)keel::DumpJson(keel::ErrorJson(r.status().message(), "invalid_request_error", param));
      continue;
    }
    const keel::CompletionRequest& q = r.value();
    if (q.sampling.temperature < 0 || q.sampling.temperature > 2 || !(q.sampling.top_p > 0) || q.sampling.top_p > 1 ||
        q.sampling.top_k < 0 || q.max_tokens < -1)
      __builtin_trap();
    for (int32_t t : q.prompt_tokens)
      if (t < 0 || t >= o.vocab_size) __builtin_trap();
    // The generated text may be any bytes; the prompt stands in for it here.
    std::vector<int32_t> toks = q.prompt_tokens;
    (void)keel::DumpJson(keel::CompletionResponse(q, "id", 0, "keel", q.prompt, "stop", {1, 2}, &toks));
    (void)keel::DumpJson(keel::StreamChunk(q, "id", 0, "keel", q.prompt, false, ""));
    (void)keel::ChatStops(q.stop);
  }
  return 0;
}
