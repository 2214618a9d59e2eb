#!/usr/bin/env bash
# bench/serve_bench.sh: keel serve's decode speed and behaviour under load, on one model and prompt, in one run.
#   1. single-stream decode tokens/s, in process (keel sample --timings: keel serve's engine and kernels without
#      HTTP) against a KV-cached PyTorch implementation of the same model (bench/serve_bench_torch.py, same
#      thread count) and, when LLAMA_CPP_BIN points at llama.cpp's llama-bench or llama-cli, llama.cpp running
#      keel's own GGUF exports (f32 and f16) of the model — ROUNDS (default 3) rounds taken in turn, medians —
#      then keel serve over HTTP (LOAD_DTYPE and --dtype f16). keel's --dtype bf16 runs in process too (llama.cpp
#      is not given a bf16 file: keel exports f32, f16 and q8_0). Never downloads or builds llama.cpp.
#   2. aggregate generated tokens/s and p50/p99 time-to-first-token with 1, 4 and 16 concurrent streaming clients
#      (keel serve --parallel 16 --dtype LOAD_DTYPE, default f32; each client sends REQS requests back to back,
#      temperature 0.8), and 16 again with --no-prompt-cache (every request's prompt fed in full, as for prompts
#      that share no prefix). The ratios are against the single stream over HTTP at the same LOAD_DTYPE.
# Prints Markdown tables.
#
#   bash bench/serve_bench.sh [THREADS] [DECODE_TOKENS]      (defaults: all cores, 128)
# Model shape (env): LAYERS HEADS DIM CTX VOCAB (default 12 12 768 512 50257: GPT-2 small's shape, the byte
# tokenizer padded to GPT-2's vocabulary so the LM head is the real 50257 x 768 matrix-vector product). The
# weights come from one training step: decode speed does not depend on their values. Needs build/keel
# (scripts/build) and Debian's python3-torch (/usr/bin/python3). Not a test: figures vary with the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-$(nproc)}
TOKENS=${2:-128}
LAYERS=${LAYERS:-12} HEADS=${HEADS:-12} DIM=${DIM:-768} CTX=${CTX:-512} VOCAB=${VOCAB:-50257}
REQS=${REQS:-4}
LOAD_TOKENS=${LOAD_TOKENS:-64}
LOAD_DTYPE=${LOAD_DTYPE:-f32}
KV_DTYPE=${KV_DTYPE:-f32}  # keel's KV cache values (--kv-dtype) everywhere keel decodes
PY=/usr/bin/python3
KEEL=./build/keel
WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "preparing a ${LAYERS}L/${HEADS}H/${DIM}C ctx ${CTX} vocab ${VOCAB} model..." >&2
printf 'the quick brown fox jumps over the lazy dog %s\n' $(seq 1 20000) > "$WORK/corpus.txt"
$KEEL prepare --input "$WORK/corpus.txt" --out "$WORK/data" --tokenizer byte >/dev/null 2>&1
$KEEL train --data "$WORK/data" --out "$WORK/run" --layers "$LAYERS" --heads "$HEADS" --dim "$DIM" --ctx "$CTX" \
  --vocab "$VOCAB" --batch 1 --steps 1 --threads "$THREADS" --no-progress --eval-every 0 --eval-batches 1 \
  --keep 1 >"$WORK/train.log" 2>&1 || { cat "$WORK/train.log"; exit 1; }
CKPT=$(ls -d "$WORK"/run/ckpt-* | tail -n 1)

# The same prompt everywhere: 32 bytes = 32 byte-tokenizer ids.
PROMPT="The quick brown fox jumps over t"
IDS=$($PY -c "import sys; print(','.join(str(b) for b in sys.argv[1].encode()))" "$PROMPT")

start_server() {  # extra flags
  $KEEL serve "$CKPT" --port 0 --threads "$THREADS" --model-name bench --kv-dtype "$KV_DTYPE" "$@" \
    >"$WORK/serve.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    PORT=$(sed -n 's/.*listening on http:\/\/[^:]*:\([0-9]*\).*/\1/p' "$WORK/serve.log")
    [ -n "$PORT" ] && return 0
    sleep 0.1
  done
  cat "$WORK/serve.log"
  exit 1
}
stop_server() {
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || true
  SERVER_PID=""
}

echo "single-stream decode over HTTP (f16 weights)..." >&2
start_server --parallel 16 --dtype f16
KEEL_SINGLE16=$($PY bench/serve_bench_client.py single --port "$PORT" --prompt-ids "$IDS" --tokens "$TOKENS")
stop_server

# llama.cpp decode rate on keel's GGUF export of the same checkpoint at weight dtype $1 (f32 or f16).
llama_rate() {
  [ -f "$WORK/model-$1.gguf" ] || $KEEL export "$CKPT" --format gguf --dtype "$1" --out "$WORK/model-$1.gguf" \
    >"$WORK/export.log" 2>&1 || { cat "$WORK/export.log" >&2; return 1; }
  case "$(basename "$LLAMA_CPP_BIN")" in
    *bench*)
      "$LLAMA_CPP_BIN" -m "$WORK/model-$1.gguf" -p 0 -n "$TOKENS" -t "$THREADS" -r 1 -o json 2>/dev/null |
        $PY -c "import json,sys; r=[x for x in json.load(sys.stdin) if x.get('n_gen',0)>0]; print(r[0]['avg_ts'])"
      ;;
    *)
      "$LLAMA_CPP_BIN" -m "$WORK/model-$1.gguf" -p "$PROMPT" -n "$TOKENS" -t "$THREADS" --temp 0 --ignore-eos \
        -no-cnv >"$WORK/llama.out" 2>"$WORK/llama.err" </dev/null || true
      local r
      r=$(sed -n 's/.*eval time.*runs *(.*, *\([0-9.]*\) tokens per second).*/\1/p' "$WORK/llama.err" |
        grep -v prompt | tail -n 1)
      [ -n "$r" ] || r=$(grep -E "^.*[^t] eval time" "$WORK/llama.err" | sed -n 's/.*, *\([0-9.]*\) tokens per second.*/\1/p' | tail -n 1)
      echo "$r"
      ;;
  esac
}
# keel's decode rate in process (keel sample --timings: the same engine and kernels as keel serve, no HTTP), as
# llama-bench and the PyTorch script measure theirs.
keel_rate() {
  $KEEL sample --ckpt "$CKPT" --prompt "$PROMPT" -n "$TOKENS" --temperature 0 --ignore-eos --threads "$THREADS" \
    --dtype "$1" --kv-dtype "$KV_DTYPE" --timings 2>&1 >/dev/null | sed -n 's/.*= \([0-9.]*\) tokens\/s$/\1/p'
}
# In-process rates, ROUNDS rounds in turn (keel, llama.cpp, PyTorch), so that drift in the machine's memory
# bandwidth (it moves by 10-20 % over minutes on a shared host) hits every implementation alike; medians reported.
ROUNDS=${ROUNDS:-3}
KEEL_IN=() KEEL_IN16=() KEEL_INBF=() LLAMA=() LLAMA16=() TORCH=()
for round in $(seq 1 "$ROUNDS"); do
  echo "in-process single-stream decode, round $round of $ROUNDS..." >&2
  KEEL_IN+=("$(keel_rate f32)")
  KEEL_IN16+=("$(keel_rate f16)")
  KEEL_INBF+=("$(keel_rate bf16 || true)")  # empty where the CPU lacks AVX2 (no bf16 decode)
  if [ -n "${LLAMA_CPP_BIN:-}" ]; then
    LLAMA+=("$(llama_rate f32)")
    LLAMA16+=("$(llama_rate f16)")
  fi
  TORCH+=("$($PY bench/serve_bench_torch.py "$CKPT" --prompt-ids "$IDS" --tokens "$TOKENS" --threads "$THREADS" \
    --vocab-limit 256 2>/dev/null | tail -n 1)")
done
join() { local IFS=,; echo "$*"; }

echo "single-stream decode over HTTP ($LOAD_DTYPE)..." >&2
start_server --parallel 16 --dtype "$LOAD_DTYPE"
KEEL_SINGLE=$($PY bench/serve_bench_client.py single --port "$PORT" --prompt-ids "$IDS" --tokens "$TOKENS")

echo "load: 1, 4, 16 clients..." >&2
LOADS=()
for c in 1 4 16; do
  LOADS+=("$($PY bench/serve_bench_client.py load --port "$PORT" --prompt-ids "$IDS" --tokens "$LOAD_TOKENS" \
    --clients "$c" --requests "$REQS")")
done
stop_server
# The same prompt every time lets the prompt cache skip all but its last token; without it (as with prompts
# that share nothing) every request's 32 prompt tokens take rows of the batched steps.
echo "load: 16 clients, --no-prompt-cache..." >&2
start_server --parallel 16 --dtype "$LOAD_DTYPE" --no-prompt-cache
LOADS+=("$($PY bench/serve_bench_client.py load --port "$PORT" --prompt-ids "$IDS" --tokens "$LOAD_TOKENS" \
  --clients 16 --requests "$REQS" | sed 's/"clients": 16/"clients": "16, --no-prompt-cache"/')")
stop_server

$PY - "$THREADS" "$TOKENS" "$LAYERS/$HEADS/$DIM ctx $CTX vocab $VOCAB" "$KEEL_SINGLE" "$(join "${TORCH[@]}")" \
  "$(join "${LLAMA[@]}")" "$LOAD_TOKENS" "$REQS" "$KEEL_SINGLE16" "$(join "${LLAMA16[@]}")" "$(join "${KEEL_IN[@]}")" \
  "$(join "${KEEL_IN16[@]}")" "$(join "${KEEL_INBF[@]}")" "$LOAD_DTYPE" "${LOADS[@]}" <<'PY'
import json, platform, statistics, subprocess, sys
threads, tokens, shape, keel, torch_r, llama, load_tokens, reqs, keel16, llama16, kin, kin16, kinbf, ldt = sys.argv[1:15]
loads = [json.loads(x) for x in sys.argv[15:]]
k, k16 = json.loads(keel), json.loads(keel16)
torch_runs = [json.loads(x) for x in torch_r.replace("},{", "}\n{").splitlines() if x.strip()]
rates = lambda s: [float(x) for x in s.split(",") if x.strip()]
med = lambda xs: statistics.median(xs) if xs else None
show = lambda xs: " / ".join(f"{x:.1f}" for x in xs)
t = {"decode_tok_s": med([r["decode_tok_s"] for r in torch_runs]), "torch": torch_runs[0]["torch"]}
ki, ki16, ll, ll16 = med(rates(kin)), med(rates(kin16)), med(rates(llama)), med(rates(llama16))
kibf = med(rates(kinbf))
cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True, text=True).stdout.strip()
import os
print(f"keel serve benchmark: {shape} (byte tokenizer), {threads} threads, {cpu}, PyTorch {t['torch']}, "
      f"keel's KV cache {os.environ.get('KV_DTYPE', 'f32')}")
print()
print(f"Single-stream greedy decode, 32-token prompt, {tokens} new tokens (decode steps only). In process: median of"
      f" {len(rates(kin))} rounds taken in turn (each round's figures after the median):")
print()
print("| implementation | weights | decode tok/s | rounds | keel / it |")
print("|---|---|---|---|---|")
kd, kd16 = k["decode_tok_s"], k16["decode_tok_s"]
tt = t["decode_tok_s"]
print(f"| keel (in process: keel sample --timings) | f32 | {ki:.1f} | {show(rates(kin))} | |")
print(f"| keel --dtype f16 (in process) | f16 | {ki16:.1f} | {show(rates(kin16))} | |")
if kibf:
    print(f"| keel --dtype bf16 (in process) | bf16 | {kibf:.1f} | {show(rates(kinbf))} | |")
print(f"| PyTorch, KV cache (in process) | f32 | {tt:.1f} | {show([r['decode_tok_s'] for r in torch_runs])} |"
      f" {ki/tt:.2f}x (keel f32), {ki16/tt:.2f}x (keel f16) |")
if ll:
    print(f"| llama.cpp (llama-bench), keel's GGUF export | f32 | {ll:.1f} | {show(rates(llama))} | {ki/ll:.2f}x (keel f32) |")
if ll16:
    print(f"| llama.cpp (llama-bench), keel's GGUF export | f16 | {ll16:.1f} | {show(rates(llama16))} | {ki16/ll16:.2f}x (keel f16) |")
if not ll:
    print("| llama.cpp | | not run (set LLAMA_CPP_BIN) | | |")
print(f"| keel serve (over HTTP, streaming) | {ldt} | {kd:.1f} | 1 | {kd/tt:.2f}x PyTorch" +
      (f", {kd/ll:.2f}x llama.cpp |" if ll and ldt == "f32" else " |"))
print(f"| keel serve --dtype f16 (over HTTP) | f16 | {kd16:.1f} | 1 | {kd16/tt:.2f}x PyTorch" + (f", {kd16/ll16:.2f}x llama.cpp |" if ll16 else " |"))
print()
print(f"keel serve --parallel 16 --dtype {ldt} under load: each client sends {reqs} streaming requests back to back "
      f"(32-token prompt, {load_tokens} new tokens, temperature 0.8); ratios against the {ldt} single stream over HTTP"
      f" ({kd:.1f} tok/s):")
print()
print("| concurrent clients | aggregate tok/s | vs single-stream | TTFT p50 | TTFT p99 | requests |")
print("|---|---|---|---|---|---|")
for l in loads:
    l["x_single"] = l["agg_tok_s"] / kd
    err = f" ({len(l['errors'])} errors: {l['errors'][0]})" if l["errors"] else ""
    print(f"| {l['clients']} | {l['agg_tok_s']:.1f} | {l['x_single']:.1f}x | {l['ttft_p50_ms']:.0f} ms | {l['ttft_p99_ms']:.0f} ms "
          f"| {l['requests']}{err} |")
PY
