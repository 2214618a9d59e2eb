#!/usr/bin/env bash
# chaos.sh: the same training job twice — without faults, then under a random fault schedule with automatic
# restarts — and a comparison (bench/chaos.py): faults injected/detected/recovered, p50/p99 detection and
# recovery time per kind, steps redone, goodput, and whether the final weights are bit-identical.
#
#   bench/chaos.sh [OUT_DIR]        (env: KEEL, STEPS, EVERY, SEED, KINDS, NPROC, BATCH, ACCUM, HANG_SECS)
#
# Defaults: config (a) — 4 layers, 4 heads, dim 256, ctx 256, vocab 8192 (byte data padded), 4 workers x 1 thread,
# one fault every ~15 s from {crash, hang, nan, bitflip}, the launcher restarting crashed workers.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
KEEL="${KEEL:-$HERE/../build/keel}"
OUT="${1:-/tmp/keel-chaos}"
STEPS="${STEPS:-300}"
EVERY="${EVERY:-15}"
SEED="${SEED:-1}"
KINDS="${KINDS:-crash+hang+nan+bitflip}"
NPROC="${NPROC:-4}"
BATCH="${BATCH:-1}"
ACCUM="${ACCUM:-8}"
HANG_SECS="${HANG_SECS:-3}"
mkdir -p "$OUT"
if [ ! -f "$OUT/data/meta.json" ]; then
  "$KEEL" prepare --input /usr/share/games/fortunes --out "$OUT/data" --tokenizer byte
fi
ARGS=(train --data "$OUT/data" --layers 4 --heads 4 --dim 256 --ctx 256 --vocab 8192 --batch "$BATCH"
      --grad-accum "$ACCUM" --steps "$STEPS" --lr 1e-3 --warmup 20 --threads 1 --checkpoint-every 50 --keep 2
      --eval-every 100 --eval-batches 2 --no-progress --nproc "$NPROC")
rm -rf "$OUT/clean" "$OUT/faulty"
echo "== $(date -u +%FT%TZ) $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== clean run: ${ARGS[*]} --elastic"
/usr/bin/time -f "clean wall %e s" "$KEEL" "${ARGS[@]}" --elastic --out "$OUT/clean" > "$OUT/clean.log" 2>&1
tail -n 2 "$OUT/clean.log"
SPEC="random:every=$EVERY,seed=$SEED,kinds=$KINDS,secs=$HANG_SECS"
echo "== faulty run: --max-restarts 1000 --inject '$SPEC'"
KEEL_ALLOW_FAULT_INJECTION=1 /usr/bin/time -f "faulty wall %e s" "$KEEL" "${ARGS[@]}" --max-restarts 1000 \
  --inject "$SPEC" --out "$OUT/faulty" > "$OUT/faulty.log" 2>&1 || true
tail -n 2 "$OUT/faulty.log"
echo "== $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== comparison"
python3 "$HERE/chaos.py" "$OUT/clean" "$OUT/faulty" --json "$OUT/chaos.json"
