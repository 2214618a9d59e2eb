// web_page.h: the self-contained HTML+JS page `keel serve` answers GET / with: type a prompt, pick temperature /
// top-k / top-p / max tokens, and watch the completion stream in (fetch + ReadableStream over the SSE endpoint).
// No external resources. Query parameters prefill the form: prompt, temperature, top_k, top_p, max_tokens;
// autorun=1 starts generating on load. When a run ends, #status gets data-state="done" (or "error"/"stopped")
// and #generated holds the streamed text; tests drive it in headless Chromium.
// Thread safety: returns a constant.
#pragma once
#include <string>

namespace keel {

const std::string& WebPageHtml();

}  // namespace keel
