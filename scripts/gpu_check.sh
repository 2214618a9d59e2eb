#!/usr/bin/env bash
# scripts/gpu_check.sh: the CUDA backend's check on a GPU machine (keel issue 6), in one call. Stages:
#   1. keel with KEEL_CUDA=ON: a prebuilt bundle (gpu_bundle/, see below) or a build here (cmake + ninja);
#   2. backend_conformance_test (every op, and the GPT model, on cuda / cuda-tf32 / cuda-bf16 vs the CPU) and
#      cuda_host_test (incl. a one-member NCCL group) on the GPU;
#   3. portability: train a small model with --device cuda (fp32) for 300 steps; train the same run for 20 steps on
#      the CPU and compare the losses step by step; then sample greedily from the GPU run's checkpoint on the GPU
#      and on the CPU and compare the token ids; serve it with `keel serve --device cuda` (4 concurrent requests)
#      against CPU sampling; two elastic workers on the GPU, one SIGKILLed, against one process bit for bit;
#   4. bench/gpu_train_bench.sh (GPT-2 124M, ctx 1024: keel fp32, keel bf16 GEMMs, PyTorch torch.compile bf16).
# Every stage is logged under $OUT (the device tool's folder) or ./gpu_check_out; summary.md says PASS/FAIL per
# stage. Exit status: 0 only if stages 1-3 pass (the bench is informational).
#
#   bash scripts/gpu_check.sh                  run the check (on the GPU machine)
#   bash scripts/gpu_check.sh --make-bundle    (on the build machine) build keel, the two tests and collect them with
#                                              their non-system shared libraries into gpu_bundle/ (ignored by git via
#                                              .git/info/exclude) — for GPU machines without keel's build
#                                              dependencies (Gloo, sentencepiece, hiredis, httplib, OpenBLAS, GTest).
# Device tool: run(command="bash scripts/gpu_check.sh", carry=["gpu_bundle"], timeout_s=570).
# Env: SKIP_BENCH=1 skips stage 4 (per-op profile: scripts/gpu_profile.sh); CONF_TIMEOUT (300 s), TRAIN_TIMEOUT (240 s), TRAIN_STEPS (300), SAMPLE_TOKENS (200), BENCH_TIMEOUT (420 s); the bench's own
# variables (B, STEPS, TORCH_SDPA, ...) pass through.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUNDLE=$ROOT/gpu_bundle

if [ "${1:-}" = "--make-bundle" ]; then
  set -e
  BUILD=${BUILD_DIR:-build-cuda}
  # An existing build dir configured with the CUDA backend (e.g. build/) is used as it is.
  grep -q '^KEEL_CUDA:BOOL=ON' "$BUILD/CMakeCache.txt" 2>/dev/null ||
    cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKEEL_CUDA=ON -DKEEL_BENCH=OFF >/dev/null
  ninja -C "$BUILD" -j"${JOBS:-2}" keel keel_cuda_plugin backend_conformance_test cuda_host_test
  rm -rf "$BUNDLE"
  mkdir -p "$BUNDLE/bin" "$BUNDLE/lib"
  # The CUDA backend plugin goes beside the binaries: `--device cuda` loads it from there.
  for b in "$BUILD/keel" "$BUILD/libkeel_cuda_backend.so" "$BUILD/tests/backend_conformance_test" \
           "$BUILD/tests/cuda_host_test"; do
    cp "$b" "$BUNDLE/bin/"
    strip --strip-unneeded "$BUNDLE/bin/$(basename "$b")" || true
  done
  # Shared libraries the GPU machine may lack: everything ldd resolves except the C runtime and CUDA's own
  # libraries (those come from the GPU machine's CUDA 13 toolkit / driver; an older libstdc++ never replaces a newer).
  for b in "$BUNDLE"/bin/*; do ldd "$b"; done | awk '/=> \//{print $3}' | sort -u | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libstdc++.so*|libgcc_s.so*) ;;
      libcuda.so*|libcudart.so*|libcublas*.so*|libnccl.so*|libnvidia*) ;;
      *) cp -L "$lib" "$BUNDLE/lib/" ;;
    esac
  done
  grep -qx '/gpu_bundle/' .git/info/exclude 2>/dev/null || echo '/gpu_bundle/' >> .git/info/exclude
  du -sh "$BUNDLE" "$BUNDLE"/bin/* "$BUNDLE"/lib | sed 's/^/  /'
  echo "gpu_bundle ready: run(command=\"bash scripts/gpu_check.sh\", carry=[\"gpu_bundle\"], timeout_s=570)"
  exit 0
fi

OUTDIR=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUTDIR"
SUMMARY=$OUTDIR/summary.md
: > "$SUMMARY"
FAILED=0
note() { echo "$*" | tee -a "$SUMMARY"; }
stage() {  # name status detail
  note "- $1: $2${3:+ — $3}"
  [ "$2" = PASS ] || [ "$2" = INFO ] || FAILED=1
}
export PYTHONUNBUFFERED=1

note "# keel GPU check $(date -u '+%F %T') UTC"
note "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || echo 'nvidia-smi: not available')"
note ""

# CUDA libraries: the toolkit's, else PyTorch's pip wheels (nvidia-cublas, nvidia-nccl, nvidia-cuda-runtime).
LIBS=/usr/local/cuda/lib64:/usr/local/cuda/lib
PIPLIBS=$(python3 - 2>/dev/null <<'PY'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
print(":".join(sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "*", "lib", "*.so*"))})))
PY
)
[ -n "$PIPLIBS" ] && LIBS=$LIBS:$PIPLIBS

# ---- 1. keel ---------------------------------------------------------------------------------------------------
if [ -x "$BUNDLE/bin/keel" ]; then
  BIN=$BUNDLE/bin
  export LD_LIBRARY_PATH=$BUNDLE/lib:$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  KEEL=$BIN/keel
  export KEEL_TEST_BINARY=$KEEL  # the tests' compiled-in path to keel is the build machine's
  CONF=$BIN/backend_conformance_test
  HOST=$BIN/cuda_host_test
  stage "1 build" PASS "prebuilt gpu_bundle"
else
  export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  BUILD=$ROOT/build-gpu
  if cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKEEL_CUDA=ON -DKEEL_BENCH=OFF >"$OUTDIR/build.log" 2>&1 &&
     ninja -C "$BUILD" -j"$(nproc)" keel backend_conformance_test cuda_host_test >>"$OUTDIR/build.log" 2>&1; then
    stage "1 build" PASS "cmake -DKEEL_CUDA=ON ($(grep -o 'CUDA [0-9.]*, architectures [0-9;]*' "$OUTDIR/build.log" | head -n 1))"
  else
    stage "1 build" FAIL "see build.log (missing build dependencies? make a bundle: scripts/gpu_check.sh --make-bundle)"
    tail -n 20 "$OUTDIR/build.log"
    exit 1
  fi
  KEEL=$BUILD/keel
  CONF=$BUILD/tests/backend_conformance_test
  HOST=$BUILD/tests/cuda_host_test
fi

# ---- 2. conformance ----------------------------------------------------------------------------------------------
if timeout "${CONF_TIMEOUT:-300}" "$CONF" >"$OUTDIR/conformance.log" 2>&1; then
  if grep -q "SKIPPED" "$OUTDIR/conformance.log"; then
    stage "2 conformance" FAIL "CUDA cases skipped: $(grep -m1 'no CUDA device' "$OUTDIR/conformance.log")"
  else
    stage "2 conformance" PASS "$(grep -E '^(cuda|cpu)[a-z0-9_]*: [0-9]+ outputs' "$OUTDIR/conformance.log" | tr '\n' ';')"
  fi
else
  stage "2 conformance" FAIL "$(grep -E 'FAIL|Failure' "$OUTDIR/conformance.log" | head -n 5 | tr '\n' ' ')"
fi
if timeout 120 "$HOST" >"$OUTDIR/cuda_host.log" 2>&1; then
  stage "2 cuda_host_test" PASS "$(grep -E '^\[  (PASSED|SKIPPED) ' "$OUTDIR/cuda_host.log" | tr '\n' ' ')"
else
  stage "2 cuda_host_test" FAIL "$(grep -E 'Failure|FAILED' "$OUTDIR/cuda_host.log" | head -n 5 | tr '\n' ' ')"
fi

# ---- 3. portability: train on the GPU, sample on GPU and CPU -----------------------------------------------------
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cat README.md docs/*.md 2>/dev/null > "$WORK/corpus.txt"
for i in 1 2 3; do cat "$WORK/corpus.txt"; done > "$WORK/corpus3.txt"
PORT_STEPS=${TRAIN_STEPS:-300}
SMALL="--layers 4 --heads 4 --dim 128 --ctx 128 --batch 16 --steps $PORT_STEPS --lr 1e-3 --warmup 20 --seed 7 \
  --no-progress --eval-every 100 --eval-batches 4 --checkpoint-every $PORT_STEPS --keep 1"
if "$KEEL" prepare --input "$WORK/corpus3.txt" --out "$WORK/data" --tokenizer byte >"$OUTDIR/prepare.log" 2>&1 &&
   timeout "${TRAIN_TIMEOUT:-240}" "$KEEL" train --device cuda --data "$WORK/data" --out "$WORK/gpu-run" $SMALL >"$OUTDIR/train_gpu.log" 2>&1; then
  cp "$WORK/gpu-run/metrics.jsonl" "$OUTDIR/train_gpu_metrics.jsonl" 2>/dev/null
  stage "3 train --device cuda (fp32, $PORT_STEPS steps)" PASS "$(python3 - "$WORK/gpu-run/metrics.jsonl" <<'PY'
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
first, last = rows[0]["loss"], rows[-1]["loss"]
val = [r["val_loss"] for r in rows if "val_loss" in r]
ok = all(math.isfinite(r["loss"]) for r in rows) and last < first - 1.0
print(f"loss {first:.3f} -> {last:.3f}, val {val[-1] if val else 'n/a'}, {rows[-1]['tokens_per_s']:.0f} tok/s"
      + ("" if ok else " (NOT DECREASING AS EXPECTED)"))
PY
)"
  grep -q "NOT DECREASING" "$SUMMARY" && FAILED=1
else
  stage "3 train --device cuda" FAIL "$(tail -n 2 "$OUTDIR/train_gpu.log" | tr '\n' ' ')"
fi
# The same run on the CPU for its first 20 steps (same seed, data order and LR schedule): losses must track.
if [ -s "$WORK/gpu-run/metrics.jsonl" ] &&
   timeout 240 "$KEEL" train --device cpu --threads "$(nproc)" --data "$WORK/data" --out "$WORK/cpu-run" $SMALL \
     --stop-after 20 >"$OUTDIR/train_cpu.log" 2>&1; then
  res=$(python3 - "$WORK/gpu-run/metrics.jsonl" "$WORK/cpu-run/metrics.jsonl" <<'PY'
import json, sys
g = {r["step"]: r["loss"] for r in map(json.loads, open(sys.argv[1]))}
c = {r["step"]: r["loss"] for r in map(json.loads, open(sys.argv[2]))}
steps = sorted(set(g) & set(c))
worst = max(abs(g[s] - c[s]) / abs(c[s]) for s in steps)
print(("PASS" if steps and worst < 5e-3 else "FAIL") + f" {len(steps)} steps compared, worst relative loss difference {worst:.2e} (bound 5e-3)")
PY
)
  stage "3 GPU vs CPU training losses" "${res%% *}" "${res#* }"
else
  stage "3 GPU vs CPU training losses" FAIL "$(tail -n 2 "$OUTDIR/train_cpu.log" 2>/dev/null | tr '\n' ' ')"
fi
# Greedy sampling from the GPU run's checkpoint, on both devices.
NTOK=${SAMPLE_TOKENS:-200}
for d in cuda cpu; do
  timeout 120 "$KEEL" sample --ckpt "$WORK/gpu-run" --device "$d" --prompt "The " -n "$NTOK" --temperature 0 \
    --print-token-ids >"$OUTDIR/sample_$d.txt" 2>"$OUTDIR/sample_$d.err" || true
done
res=$(python3 - "$OUTDIR/sample_cuda.err" "$OUTDIR/sample_cpu.err" <<'PY'
import sys
def ids(p):
    for line in open(p, errors="replace"):
        if line.startswith("generated ids:"):
            return line.split()[2:]
    return None
g, c = ids(sys.argv[1]), ids(sys.argv[2])
if g is None or c is None:
    print("FAIL no token ids (see sample_*.err)")
elif g == c:
    print(f"PASS {len(g)} greedy tokens identical on GPU and CPU")
else:
    k = next((i for i, (a, b) in enumerate(zip(g, c)) if a != b), min(len(g), len(c)))
    print(f"FAIL greedy tokens diverge at token {k} of {len(g)} (gpu {g[k:k+5]} vs cpu {c[k:k+5]})")
PY
)
stage "3 greedy sampling GPU vs CPU" "${res%% *}" "${res#* }"

# ---- 3b. serving on the GPU: `keel serve --device cuda` with continuous batching, against CPU greedy sampling ------
# Four requests at once (different prompt lengths, so they join and leave the batch at different steps); each
# completion's text must equal `keel sample --device cpu --temperature 0` for the same prompt (byte tokenizer: text
# is tokens). Then SIGTERM: the server must exit 0.
if [ -d "$WORK/gpu-run" ]; then
  res=$(timeout 180 python3 - "$KEEL" "$WORK/gpu-run" "$OUTDIR/serve_gpu.log" <<'PY'
import json, re, signal, subprocess, sys, threading, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
keel, ckpt, logpath = sys.argv[1:4]
log = open(logpath, "w")
srv = subprocess.Popen([keel, "serve", ckpt, "--device", "cuda", "--port", "0", "--parallel", "4"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
port = []
def drain():
    for line in srv.stdout:
        log.write(line); log.flush()
        m = re.search(r"listening on http://[^:]+:([0-9]+)", line)
        if m: port.append(int(m.group(1)))
threading.Thread(target=drain, daemon=True).start()
t0 = time.time()
while not port and time.time() - t0 < 90 and srv.poll() is None: time.sleep(0.1)
if not port:
    print("FAIL the server did not start (see serve_gpu.log)"); sys.exit(0)
base = f"http://127.0.0.1:{port[0]}"
model = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
prompts = ["The ", "keel trains", "A checkpoint from any keel run is ", "Tests: "]
N = 48
def complete(p):
    body = json.dumps({"model": model, "prompt": p, "max_tokens": N, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["text"]
with ThreadPoolExecutor(4) as ex: got = list(ex.map(complete, prompts))
srv.send_signal(signal.SIGTERM)
try: code = srv.wait(30)
except subprocess.TimeoutExpired: code = "none (killed after 30 s)"; srv.kill()
bad = []
for p, g in zip(prompts, got):
    r = subprocess.run([keel, "sample", "--ckpt", ckpt, "--device", "cpu", "--prompt", p, "-n", str(N),
                        "--temperature", "0"], capture_output=True, text=True, errors="replace")
    want = r.stdout[len(p):].rstrip("\n") if r.stdout.startswith(p) else None
    log.write(f"prompt {p!r}\n  gpu serve: {g!r}\n  cpu sample: {want!r}\n")
    if want != g: bad.append(p)
ok = not bad and code == 0
print(("PASS" if ok else "FAIL") + f" {len(prompts)} concurrent completions on the GPU, {len(prompts) - len(bad)} equal to"
      f" CPU greedy sampling ({N} tokens each); exit status after SIGTERM: {code}")
PY
)
  [ -n "$res" ] || res="FAIL no result (timeout?)"
  stage "3b keel serve --device cuda vs CPU sampling" "${res%% *}" "${res#* }"
fi

# ---- 3c. fault tolerance on the GPU: two elastic workers sharing the GPU, one SIGKILLed mid-run -----------------
# The job must finish with weights and optimizer state bit-identical to one process computing the same 4
# micro-batches per step (keel's fixed-point reduction makes the result independent of the worker count). The
# survivor is slowed 20x after the kill so that the restarted worker (CUDA start-up: seconds) rejoins the running
# job and receives the state from it, rather than finding the job finished.
EL="--device cuda --data $WORK/data --layers 2 --heads 2 --dim 64 --ctx 64 --batch 4 --grad-accum 4 --steps 80 \
  --lr 1e-3 --warmup 5 --seed 3 --no-progress --checkpoint-every 80 --eval-every 0 --keep 1"
if timeout 120 "$KEEL" train $EL --out "$WORK/el-one" >"$OUTDIR/elastic_one.log" 2>&1 &&
   KEEL_ALLOW_FAULT_INJECTION=1 timeout 240 "$KEEL" train $EL --out "$WORK/el-two" --nproc 2 --elastic --max-restarts 2 \
     --inject "crash:rank=1,step=25;slow:rank=0,step=26,factor=20" >"$OUTDIR/elastic_two.log" 2>&1; then
  same=1
  for f in model.safetensors optim.safetensors; do
    cmp -s "$WORK/el-one/ckpt-00000080/$f" "$WORK/el-two/ckpt-00000080/$f" || same=0
  done
  restarted=$(grep -c "restarting" "$OUTDIR/elastic_two.log")
  rejoined=$(grep -c "received the training state" "$OUTDIR/elastic_two.log")
  if [ $same = 1 ] && [ "$restarted" -ge 1 ] && [ "$rejoined" -ge 1 ]; then
    stage "3c elastic on the GPU, worker killed at step 25" PASS "restarted, rejoined with the state from its peer; step 80 bit-identical to one process"
  else
    stage "3c elastic on the GPU, worker killed at step 25" FAIL "bit-identical: $same, restart lines: $restarted, state received: $rejoined"
  fi
else
  stage "3c elastic on the GPU, worker killed at step 25" FAIL "$(tail -n 2 "$OUTDIR/elastic_two.log" "$OUTDIR/elastic_one.log" 2>/dev/null | tr '\n' ' ')"
fi

# ---- 4. benchmark -------------------------------------------------------------------------------------------------
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  if KEEL=$KEEL BENCH_LOGS=$OUTDIR timeout "${BENCH_TIMEOUT:-420}" bash bench/gpu_train_bench.sh >"$OUTDIR/bench.md" 2>&1; then
    stage "4 bench (GPT-2 124M)" INFO "see bench.md"
  else
    stage "4 bench (GPT-2 124M)" INFO "did not finish; see bench.md"
  fi
  tee -a "$SUMMARY" < "$OUTDIR/bench.md"
fi

note ""
note "overall (stages 1-3): $([ $FAILED = 0 ] && echo PASS || echo FAIL)"
exit $FAILED
