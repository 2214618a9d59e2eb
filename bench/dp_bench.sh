#!/usr/bin/env bash
# bench/dp_bench.sh: data-parallel scaling on one machine, in one run, on config (b) of the foundation issue
# (6 layers, 6 heads, dim 384, ctx 256, vocab 8192, batch 8): tokens/s of 1 worker x 2 threads vs 2 workers x
# 1 thread (deterministic and --fast), the cost of deterministic mode, and the allreduce bandwidth against a
# plain loopback TCP copy (bench/allreduce_bench). Not a test.   bash bench/dp_bench.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-8}
KEEL=./build/keel
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
printf 'the quick brown fox jumps over the lazy dog %s\n' $(seq 1 40000) > "$WORK/corpus.txt"
$KEEL prepare --input "$WORK/corpus.txt" --out "$WORK/data" --tokenizer byte >/dev/null 2>&1
MODEL="--layers 6 --heads 6 --dim 384 --ctx 256 --vocab 8192 --batch 8 --grad-accum 2"

run() {  # name, extra flags
  local out="$WORK/$1"
  $KEEL train --data "$WORK/data" --out "$out" $MODEL --steps $((STEPS + 2)) --no-progress --eval-every 0 \
    --eval-batches 1 --checkpoint-every 0 $2 >"$WORK/$1.log" 2>&1 || { cat "$WORK/$1.log"; exit 1; }
  /usr/bin/python3 -c "
import json, statistics, sys
rows = [json.loads(l) for l in open('$out/metrics.jsonl')][2:]
print(round(statistics.median(r['tokens_per_s'] for r in rows)))"
}

echo "data-parallel scaling, config (b) with --grad-accum 2 (global batch 16 x 256 tokens), $STEPS timed steps, $(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p')"
a=$(run w1t2 "--threads 2")
b=$(run w2t1 "--nproc 2 --threads 1")
c=$(run w1t2fast "--threads 2 --fast")
d=$(run w2t1fast "--nproc 2 --threads 1 --fast")
echo
echo "| setup | deterministic tok/s | --fast tok/s | deterministic cost |"
echo "|---|---|---|---|"
/usr/bin/python3 -c "
a,b,c,d=$a,$b,$c,$d
print(f'| 1 worker x 2 threads | {a} | {c} | {100*(c/a-1):.1f}% |')
print(f'| 2 workers x 1 thread | {b} | {d} | {100*(d/b-1):.1f}% |')
print()
print(f'2 workers x 1 thread reach {100*b/a:.0f}% (deterministic) and {100*d/c:.0f}% (--fast) of 1 worker x 2 threads.')"
echo
PARAMS=$(/usr/bin/python3 -c "
L,C,V,T=6,384,8192,256
print(V*C+T*C+L*(12*C*C+13*C)+2*C)")
./build/bench/allreduce_bench "$PARAMS"
