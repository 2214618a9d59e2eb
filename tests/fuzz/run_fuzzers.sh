#!/usr/bin/env bash
# tests/fuzz/run_fuzzers.sh: builds keel's libFuzzer targets with clang++ (-fsanitize=fuzzer,address,undefined,
# linking the few keel sources each needs — the main build may use g++) and runs each one briefly from its seed
# corpus in tests/fuzz/corpus/<name>/. Any crash, sanitizer report, leak or timeout fails the run.
#
#   bash tests/fuzz/run_fuzzers.sh SOURCE_DIR BUILD_DIR [SECONDS_PER_TARGET] [TARGET...]
#
# Targets: completion_request (serve/http_api.cc), safetensors (formats/safetensors.cc), gguf (export/gguf.cc;
# skipped when that source is absent). Builds are incremental (make -j2 with dependency files). New inputs
# libFuzzer finds go to BUILD_DIR/<name>.corpus, never into the source tree. ctest runs this as fuzz_smoke.
set -euo pipefail
SRC=$(cd "${1:?source dir}" && pwd)
OUT=${2:?build dir}
SECS=${3:-10}
shift $(( $# >= 3 ? 3 : $# ))
CXX=${KEEL_FUZZ_CXX:-clang++}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

command -v "$CXX" >/dev/null || { echo "run_fuzzers: $CXX not found (scripts/setup installs clang)"; exit 1; }

declare -A SOURCES=(
  [completion_request]="tests/fuzz/completion_request_fuzz.cc src/serve/http_api.cc"
  [safetensors]="tests/fuzz/safetensors_fuzz.cc src/formats/safetensors.cc src/formats/half.cc src/core/env.cc"
  [gguf]="tests/fuzz/gguf_fuzz.cc src/export/gguf.cc src/formats/half.cc src/core/env.cc"
)
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(completion_request safetensors gguf)

# A Makefile: one object per (source) shared between targets, header dependencies tracked with -MMD.
MK="$OUT/Makefile"
{
  echo "CXX := $CXX"
  echo "CXXFLAGS := -std=c++20 -O1 -g -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined \\"
  echo "  -fno-omit-frame-pointer -I$SRC/src -DKEEL_VERSION=\\\"fuzz\\\" -MMD -MP"
  echo "LDFLAGS := -fsanitize=fuzzer,address,undefined"
  echo "all:"
} > "$MK"
BUILT=()
declare -A OBJ_RULES=()
for t in "${TARGETS[@]}"; do
  srcs=${SOURCES[$t]:-}
  [ -n "$srcs" ] || { echo "run_fuzzers: unknown target $t"; exit 1; }
  missing=""
  for s in $srcs; do [ -f "$SRC/$s" ] || missing="$s"; done
  if [ -n "$missing" ]; then
    echo "run_fuzzers: skipping $t ($missing is not in this checkout)"
    continue
  fi
  objs=""
  for s in $srcs; do
    o="obj/${s//\//_}.o"
    objs="$objs $o"
    if [ -z "${OBJ_RULES[$o]:-}" ]; then
      OBJ_RULES[$o]=1
      printf '%s: %s\n\t@mkdir -p obj\n\t$(CXX) $(CXXFLAGS) -c $< -o $@\n' "$o" "$SRC/$s" >> "$MK"
    fi
  done
  printf '%s_fuzz:%s\n\t$(CXX) $(LDFLAGS) $^ -o $@\nall: %s_fuzz\n' "$t" "$objs" "$t" >> "$MK"
  BUILT+=("$t")
done
echo "-include obj/*.d" >> "$MK"
[ ${#BUILT[@]} -gt 0 ] || { echo "run_fuzzers: nothing to build"; exit 0; }

echo "run_fuzzers: building ${BUILT[*]} with $CXX"
make -s -C "$OUT" -j2 all

status=0
for t in "${BUILT[@]}"; do
  work="$OUT/$t.corpus"
  mkdir -p "$work"
  echo "run_fuzzers: $t for ${SECS}s"
  if ! (cd "$OUT" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
        "./${t}_fuzz" "$work" "$SRC/tests/fuzz/corpus/$t" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 \
        -max_len=16384 -print_final_stats=1 > "$OUT/$t.log" 2>&1); then
    echo "run_fuzzers: $t FAILED; its log ($OUT/$t.log) ends:"
    tail -n 60 "$OUT/$t.log"
    status=1
  else
    grep -E "^(#[0-9]+.*DONE|stat::number_of_executed_units)" "$OUT/$t.log" | tail -n 2 || true
  fi
done
exit $status
