#!/usr/bin/env bash
# bench/train_bench.sh: keel vs PyTorch training throughput on the same GPT-2 architecture, batch and thread
# count, in one run (the issue's configs a, b, c). Prints a Markdown table: tokens/s for both, their ratio,
# peak RSS for both, and keel's MFU against the sgemm peak keel measures at start-up.
#
#   bash bench/train_bench.sh [THREADS] [STEPS]     (defaults: all cores, 8 timed steps)
# Needs build/keel (scripts/build) and Debian's python3-torch. Not a test: figures vary with the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-$(nproc)}
STEPS=${2:-8}
KEEL=./build/keel
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# keel needs a data dir; the byte tokenizer is instant and --vocab pads the model to the config's vocabulary.
printf 'the quick brown fox jumps over the lazy dog %s\n' $(seq 1 40000) > "$WORK/corpus.txt"
$KEEL prepare --input "$WORK/corpus.txt" --out "$WORK/data" --tokenizer byte >/dev/null 2>&1

run_keel() {  # layers heads dim ctx vocab batch
  local out="$WORK/run-$1-$3-$5"
  /usr/bin/time -f "%M" -o "$WORK/rss" $KEEL train --data "$WORK/data" --out "$out" --layers "$1" --heads "$2" \
    --dim "$3" --ctx "$4" --vocab "$5" --batch "$6" --steps $((STEPS + 2)) --threads "$THREADS" --no-progress \
    --eval-every 0 --eval-batches 1 --checkpoint-every 0 --keep 1 >"$WORK/keel.log" 2>&1
  local peak
  peak=$(grep -o 'gemm peak [0-9]*' "$WORK/keel.log" | awk '{print $3}')
  # Median over the timed steps (the first two are warmup), like the PyTorch side.
  /usr/bin/python3 - "$out/metrics.jsonl" "$(cat "$WORK/rss")" "$peak" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][2:]
ms = statistics.median(r["step_ms"] for r in rows)
tps = statistics.median(r["tokens_per_s"] for r in rows)
mfu = statistics.median(r["mfu"] for r in rows)
print(json.dumps({"tokens_per_s": tps, "step_ms": ms, "peak_rss_mb": int(sys.argv[2]) / 1024, "mfu": mfu,
                  "gemm_peak_gflops": float(sys.argv[3] or 0)}))
PY
}

run_torch() {
  /usr/bin/python3 bench/train_bench.py --layers "$1" --heads "$2" --dim "$3" --ctx "$4" --vocab "$5" \
    --batch "$6" --steps "$STEPS" --threads "$THREADS" 2>/dev/null | tail -n 1
}

echo "keel vs PyTorch $( /usr/bin/python3 -c 'import torch; print(torch.__version__)'), $THREADS threads, $STEPS timed steps, $(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores), load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| config | keel tok/s | PyTorch tok/s | ratio | keel peak RSS | PyTorch peak RSS | keel MFU (vs measured sgemm peak) |"
echo "|---|---|---|---|---|---|---|"
for cfg in "a 4 4 256 256 8192 8" "b 6 6 384 256 8192 8" "c 12 12 768 64 50257 4"; do
  set -- $cfg
  name=$1; shift
  k=$(run_keel "$@")
  t=$(run_torch "$@")
  /usr/bin/python3 - "$name ($1L/$2H/$3C, T=$4, V=$5, B=$6)" "$k" "$t" <<'PY'
import json, sys
k, t = json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"| {sys.argv[1]} | {k['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {k['tokens_per_s']/t['tokens_per_s']:.2f}x "
      f"| {k['peak_rss_mb']:.0f} MB | {t['peak_rss_mb']:.0f} MB | {100*k['mfu']:.0f}% of {k['gemm_peak_gflops']:.0f} GFLOP/s |")
PY
done
echo
echo "load average at end $(cut -d' ' -f1-3 /proc/loadavg) (timings are only comparable on an idle machine; keel and PyTorch alternate per config)"
