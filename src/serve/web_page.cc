// web_page.cc: the page served at / (see web_page.h).
#include "serve/web_page.h"

namespace keel {

const std::string& WebPageHtml() {
  static const std::string kPage = R"KEELHTML(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>keel serve</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 56rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.3rem; } h1 small { color: #777; font-weight: normal; }
  textarea { width: 100%; box-sizing: border-box; font: 1rem/1.4 ui-monospace, monospace; }
  .controls { display: flex; flex-wrap: wrap; gap: .6rem 1rem; margin: .6rem 0; align-items: end; }
  .controls label { display: flex; flex-direction: column; font-size: .8rem; color: #555; }
  .controls input { width: 6.5rem; }
  pre { white-space: pre-wrap; word-break: break-word; background: #f6f6f4; padding: 1rem; min-height: 6rem;
        font: 1rem/1.4 ui-monospace, monospace; border-radius: 4px; }
  #generated { color: #0a5; }
  #status { font-size: .85rem; color: #666; }
</style>
</head>
<body>
<h1>keel serve <small id="model"></small></h1>
<form id="form">
  <textarea id="prompt" rows="5" placeholder="Type a prompt">Once upon a time</textarea>
  <div class="controls">
    <label>temperature <input id="temperature" type="number" step="0.01" min="0" max="2" value="0.8"></label>
    <label>top-k <input id="top_k" type="number" step="1" min="0" value="40"></label>
    <label>top-p <input id="top_p" type="number" step="0.01" min="0.01" max="1" value="0.95"></label>
    <label>max tokens <input id="max_tokens" type="number" step="1" min="0" value="200"></label>
    <label>API key <input id="api_key" type="password" autocomplete="off"></label>
    <button id="run" type="submit">Generate</button>
    <button id="stop" type="button" disabled>Stop</button>
  </div>
</form>
<pre id="output"><span id="prompt_echo"></span><span id="generated"></span></pre>
<div id="status" data-state="idle">idle</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let controller = null;

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function requestBody() {
  // An empty box is left out (the server's default applies) rather than sent as 0, which would mean greedy
  // sampling or no tokens at all.
  const body = { prompt: $("prompt").value, stream: true };
  const put = (id, parse) => { const v = $(id).value.trim(); if (v !== "") body[id] = parse(v); };
  put("temperature", Number);
  put("top_k", (v) => parseInt(v, 10));
  put("top_p", Number);
  put("max_tokens", (v) => parseInt(v, 10));
  return body;
}

async function run() {
  if (controller) controller.abort();
  const ctl = new AbortController();
  controller = ctl;
  const body = requestBody();
  const headers = { "Content-Type": "application/json" };
  if ($("api_key").value) headers["Authorization"] = "Bearer " + $("api_key").value;
  $("prompt_echo").textContent = body.prompt;
  $("generated").textContent = "";
  $("run").disabled = true;
  $("stop").disabled = false;
  setStatus("running", "generating...");
  let chunks = 0, finish = "", tokens = 0;
  const t0 = performance.now();
  try {
    const res = await fetch("/v1/completions", { method: "POST", headers, body: JSON.stringify(body), signal: ctl.signal });
    if (!res.ok) {
      let msg = res.status + " " + res.statusText;
      try { const j = await res.json(); if (j.error) msg = j.error.message; } catch (e) {}
      throw new Error(msg);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i);
        buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message);
          const c = j.choices && j.choices[0];
          if (!c) continue;
          if (c.text) { $("generated").textContent += c.text; chunks++; }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
    const secs = (performance.now() - t0) / 1000;
    setStatus("done", "done" + (finish ? " (" + finish + ")" : "") + ": " + chunks + " chunks in " + secs.toFixed(2) + " s");
  } catch (e) {
    if (e.name === "AbortError") setStatus("stopped", "stopped");
    else setStatus("error", "error: " + e.message);
  } finally {
    if (controller === ctl) controller = null;
    $("run").disabled = false;
    $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", (e) => { e.preventDefault(); run(); });
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });

const params = new URLSearchParams(location.search);
for (const k of ["prompt", "temperature", "top_k", "top_p", "max_tokens"])
  if (params.has(k)) $(k).value = params.get(k);
// The model's name (/v1/models needs the key when the server has one: asked again once a key is typed).
function showModel() {
  const headers = $("api_key").value ? {"Authorization": "Bearer " + $("api_key").value} : {};
  fetch("/v1/models", {headers}).then((r) => r.ok ? r.json() : null).then((j) => {
    if (j && j.data && j.data[0]) $("model").textContent = j.data[0].id;
  }).catch(() => {});
}
$("api_key").addEventListener("change", showModel);
showModel();
if (params.get("autorun") === "1") run();
</script>
</body>
</html>
)KEELHTML";
  return kPage;
}

}  // namespace keel
