#!/usr/bin/env bash
# scripts/gpu_profile.sh: where a GPU training step's time goes (keel issue 6), in one short device call: the GPU
# tests of cuda_host_test (incl. the op profiler's), then a few GPT-2 124M training steps (ctx 1024, B = 16) with
# KEEL_CUDA_PROFILE=1, whose per-op device-time tables (src/backend/cuda/op_profile.h) and per-step phases are
# printed and saved under $OUT (or ./gpu_profile_out). Uses the prebuilt gpu_bundle/ (scripts/gpu_check.sh
# --make-bundle) when present, else build/.
#   Device tool: run(command="bash scripts/gpu_profile.sh", carry=["gpu_bundle"], timeout_s=180)
# Env: KEEL_CUDA_MATMUL (default bf16), STEPS (6). The first table also holds the start-up parameter upload and
# the first step's state hash (download); --peak-gflops skips the start-up GEMM-peak measurement (MFU against the
# H100's bf16 datasheet peak).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-$PWD/gpu_profile_out}
mkdir -p "$OUTDIR"
BIN=$PWD/build
LIBS=/usr/local/cuda/lib64
PIPLIBS=$(python3 -c "import nvidia, glob, os; print(':'.join(sorted({os.path.dirname(p) for r in nvidia.__path__ for p in glob.glob(os.path.join(r, '*', 'lib', '*.so*'))})))" 2>/dev/null)
[ -n "$PIPLIBS" ] && LIBS=$LIBS:$PIPLIBS
if [ -x gpu_bundle/bin/keel ]; then
  BIN=$PWD/gpu_bundle/bin
  LIBS=$PWD/gpu_bundle/lib:$LIBS
fi
export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
HOST_TEST=$BIN/cuda_host_test
[ -x "$HOST_TEST" ] || HOST_TEST=$BIN/tests/cuda_host_test
timeout 60 "$HOST_TEST" --gtest_filter='CudaGpu.*:NcclGpu.*' 2>&1 | tail -n 4 | tee "$OUTDIR/host_test.txt"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
printf 'the quick brown fox jumps over the lazy dog %s\n' $(seq 1 60000) > "$WORK/corpus.txt"
"$BIN/keel" prepare --input "$WORK/corpus.txt" --out "$WORK/data" --tokenizer byte >/dev/null 2>&1
KEEL_CUDA_PROFILE=1 KEEL_CUDA_MATMUL=${KEEL_CUDA_MATMUL:-bf16} timeout 120 "$BIN/keel" train --device cuda \
  --data "$WORK/data" --out "$WORK/run" --layers 12 --heads 12 --dim 768 --ctx 1024 --vocab 50304 --batch 16 \
  --steps "${STEPS:-6}" --peak-gflops 989000 --no-progress --eval-every 0 --eval-batches 1 --checkpoint-every 0 --keep 1 \
  >"$OUTDIR/train.log" 2>&1
echo "keel train exit $?"
cp "$WORK/run/metrics.jsonl" "$OUTDIR/" 2>/dev/null
python3 - "$WORK/run/metrics.jsonl" <<'PY' 2>/dev/null | tee "$OUTDIR/phases.txt"
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    print(f"step {r['step']}: {r['step_ms']:.1f} ms, {r['tokens_per_s']:.0f} tok/s, phases {r.get('phase_ms')}")
PY
sed -n '/KEEL_CUDA_PROFILE/,$p' "$OUTDIR/train.log"
