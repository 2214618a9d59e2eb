#!/usr/bin/env bash
# bench/gpu_train_bench.sh: keel's CUDA backend vs PyTorch on GPT-2 124M (12 layers, 12 heads, dim 768, ctx 1024,
# vocab 50304), one GPU, in one run (keel issue 6). Prints a Markdown table: tokens/s, step time, and MFU with
# llm.c's estimate (flops/token = 6 N + 6 L C T) against the bf16 dense peak (PEAK_TFLOPS, default 989 = H100
# SXM; the H200 has the same compute peak).
#
#   KEEL=build/keel bash bench/gpu_train_bench.sh        (env: B=16 STEPS=10 PEAK_TFLOPS=989 PYTHON=python3
#                                                         TORCH_SDPA=1 adds a PyTorch row with flash attention)
# Rows: keel fp32 (plain fp32 GEMMs), keel with KEEL_CUDA_MATMUL=bf16 (fp32 buffers, bf16 tensor-core GEMMs),
# PyTorch torch.compile + bf16 autocast of bench/torch_gpt.py (bench/gpu_train_bench.py), same B and T.
# keel's step is the whole trainer step as a user sees it (one worker, one micro-batch: the gradient is rounded on
# the device; the notes column shows the trainer's phases, median ms).
# Not a test: figures vary with the machine. Needs a GPU, keel built with KEEL_CUDA=ON, and PyTorch with CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEL=${KEEL:-./build/keel}
PY=${PYTHON:-python3}
B=${B:-16}
STEPS=${STEPS:-10}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
L=12 H=12 C=768 T=1024 V=50304
WORK=$(mktemp -d)
# BENCH_LOGS=DIR keeps the runs' logs (keel-*.log, torch.err) there.
trap 'if [ -n "${BENCH_LOGS:-}" ]; then cp "$WORK"/*.log "$WORK"/torch.err "$BENCH_LOGS"/ 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT

printf 'the quick brown fox jumps over the lazy dog %s\n' $(seq 1 60000) > "$WORK/corpus.txt"
$KEEL prepare --input "$WORK/corpus.txt" --out "$WORK/data" --tokenizer byte >/dev/null 2>&1

# N for GPT-2 with keel's layout: wte, wpe, 12 C^2 + 13 C per layer, final LayerNorm.
N=$(( V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C ))

run_keel() {  # matmul precision
  local out="$WORK/run-$1"
  if ! KEEL_CUDA_MATMUL=$1 timeout 600 $KEEL train --device cuda --data "$WORK/data" --out "$out" --layers $L \
      --heads $H --dim $C --ctx $T --vocab $V --batch "$B" --steps $((STEPS + 2)) --no-progress --eval-every 0 \
      --eval-batches 1 --checkpoint-every 0 --keep 1 >"$WORK/keel-$1.log" 2>&1; then
    echo "{\"error\": \"keel train failed: $(tail -n 1 "$WORK/keel-$1.log" | tr -d '"\\')\"}"
    return
  fi
  # Median over the timed steps (the first two are warmup).
  "$PY" - "$out/metrics.jsonl" "$N" "$L" "$C" "$T" "$PEAK_TFLOPS" <<'PY'
import json, math, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][2:]
n, L, C, T, peak = (float(x) for x in sys.argv[2:])
tps = statistics.median(r["tokens_per_s"] for r in rows)
ms = statistics.median(r["step_ms"] for r in rows)
mfu = (6 * n + 6 * L * C * T) * tps / (peak * 1e12)
# Where a step's time goes (the trainer's phases: forward + backward + gradient rounding, vote, optimizer).
phases = {k: statistics.median(r["phase_ms"][k] for r in rows) for k in rows[0].get("phase_ms", {})}
print(json.dumps({"tokens_per_s": tps, "step_ms": ms, "mfu": mfu, "last_loss": rows[-1].get("loss"),
                  "loss_finite": all(math.isfinite(r.get("loss", 0.0)) for r in rows), "phase_ms": phases}))
PY
}

run_torch() {  # extra args
  "$PY" bench/gpu_train_bench.py --layers $L --heads $H --dim $C --ctx $T --vocab $V --batch "$B" --steps "$STEPS" \
    --peak-tflops "$PEAK_TFLOPS" "$@" 2>"$WORK/torch.err" | tail -n 1 || true
}

row() {  # label json
  "$PY" - "$1" "$2" <<'PY'
import json, sys
label = sys.argv[1]
try:
    r = json.loads(sys.argv[2])
except Exception:
    r = {"error": "no result: " + sys.argv[2][:200]}
if "error" in r:
    print(f"| {label} | - | - | - | {r['error']} |")
else:
    print(f"| {label} | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | {100 * r['mfu']:.1f}% | "
          f"last loss {r.get('last_loss'):.4f}, finite {r.get('loss_finite')}"
          + ("; phases ms " + ", ".join(f"{k} {v:.1f}" for k, v in r["phase_ms"].items()) if r.get("phase_ms") else "")
          + " |")
PY
}

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || echo "unknown GPU")
echo "GPT-2 124M (N = $N, L=$L C=$C T=$T V=$V), B=$B, $STEPS timed steps, $GPU, $(date -u +%F);" \
     "MFU = (6N + 6LCT) x tokens/s / $PEAK_TFLOPS TFLOP/s"
echo
echo "| run | tokens/s | step ms | MFU | notes |"
echo "|---|---|---|---|---|"
row "keel --device cuda, fp32 GEMMs" "$(run_keel fp32)"
row "keel --device cuda, KEEL_CUDA_MATMUL=bf16" "$(run_keel bf16)"
row "PyTorch torch.compile, bf16 autocast, attention as torch_gpt.py" "$(run_torch --dtype bf16 --attn manual)"
if [ "${TORCH_SDPA:-0}" = 1 ]; then
  row "PyTorch torch.compile, bf16 autocast, SDPA (flash) attention" "$(run_torch --dtype bf16 --attn sdpa)"
fi
if [ -s "$WORK/torch.err" ] && grep -qi "error" "$WORK/torch.err"; then
  echo
  echo "PyTorch stderr (last lines):"
  tail -n 5 "$WORK/torch.err"
fi
