#!/usr/bin/env bash
# Run the GPU test suite and the benchmarks from the source tree, in one call, with no installs.
#
#   bash benchmarks/gpu_run.sh                 # everything
#   FATTN_PKGS="msda swba" bash benchmarks/gpu_run.sh
#   FATTN_STEPS="tests sanitize bench" ...     # any of: env tests sanitize overhead launch-ab precompile bench
#                                              # (default: env tests bench). precompile: python -m
#                                              # benchmarks.precompile <pkg>, every autotuning candidate of the
#                                              # benchmark's shapes compiled in parallel processes first
#                                              # launch-ab: python -m benchmarks.overhead --ab (fattn.core.launch's
#                                              # shortcut on against off, interleaved in one process; launch-ab.txt)
#                                              # overhead: python -m benchmarks.overhead floor <pkgs> (host time
#                                              # against kernel time per call; overhead.txt)
#   FATTN_TESTS_K=""                           # pytest -k filter for the tests
#   FATTN_TEST_WORKERS=4                       # run each package's tests in N processes (pytest-xdist;
#                                              # default 8 where it is installed, 0 = one process)
#   FATTN_PKG_TIMEOUT=120                      # seconds allowed to each package's tests / benchmarks
#   FATTN_SANITIZE_K="not compile"             # pytest -k filter for the compute-sanitizer pass (one process:
#                                              # under pytest-xdist, memcheck finished no package in 85 s)
#   FATTN_SANITIZE_TOOL=racecheck              # compute-sanitizer's tool (default memcheck; racecheck,
#                                              # synccheck, initcheck)
#   FATTN_BENCH_K=""                           # pytest -k filter for benchmarks
#   FATTN_BENCH_COMPARE=1                      # fail on a >25% median regression against the stored
#                                              # baseline of this GPU model (benchmarks/baselines/<gpu>)
#   FATTN_BENCH_SAVE=baseline                  # store this run as that GPU model's baseline
#   FATTN_PACK_OUT=1                           # at the end, pack everything under $OUT into one
#                                              # results-<time>.tgz (the lent machine returns at most 8 files)
#   FATTN_TRITON_CACHE_OUT=1                   # pack Triton's compile cache and autotuning results into
#                                              # $OUT/triton-cache.tgz (if under 15 MiB; binaries only). Copied
#                                              # here as the git-ignored .triton-cache.tgz and carried to the
#                                              # next call (carry [".triton-cache.tgz"]; unpacked on entry when
#                                              # no .triton-cache/ is there), it spares a fresh machine the
#                                              # compiles and autotuning of every kernel already seen.
#
# Logs and results go to $OUT (default ./bench-out): tests.log, sanitize.log, bench.log, bench.json,
# report.txt, benchmarks.png, bench-progress.txt (a line per measurement, written as it is taken),
# bench-tuning.txt (every autotuning candidate's kernel time, for tunings not read from a cache). The last thing printed is a short table: tests per package and the
# benchmark comparison.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/bench-out}"
mkdir -p "$OUT"
PKGS="${FATTN_PKGS:-core deform msda swba rope2d fp8}"
STEPS="${FATTN_STEPS:-env tests bench}"
PY="${PYTHON:-python3}"

SRC="$REPO/core/src"
for p in deform msda swba rope2d fp8; do SRC="$SRC:$REPO/packages/$p/src"; done
export PYTHONPATH="$SRC:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
CACHE="$REPO/.triton-cache"
if [ -f "$REPO/.triton-cache.tgz" ] && [ ! -d "$CACHE" ]; then
  # A cache packed by an earlier call (FATTN_TRITON_CACHE_OUT=1), carried as the file itself.
  tar xzf "$REPO/.triton-cache.tgz" -C "$REPO" && echo "Triton cache: unpacked .triton-cache.tgz"
fi
if [ -d "$CACHE" ] || [ -n "${FATTN_TRITON_CACHE_OUT:-}" ]; then
  mkdir -p "$CACHE"
  # Autotuning results too: the same GPU model picks the same tiles, and re-timing every candidate
  # (plus compiling it) is most of a cold benchmark run's time.
  export TRITON_CACHE_DIR="$CACHE" TRITON_CACHE_AUTOTUNING=1
  echo "Triton cache: $CACHE ($(du -sh "$CACHE" | cut -f1) on entry)"
fi

test_path() { if [ "$1" = core ]; then echo core/tests; else echo "packages/$1/tests"; fi; }
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

# Tests are compile-bound (each new kernel variant is a Triton compile on one CPU core): with pytest-xdist
# (in the lent machines' image) they run in 8 processes by default; FATTN_TEST_WORKERS=0 for one process.
if "$PY" -c "import xdist" 2>/dev/null; then
  FATTN_TEST_WORKERS="${FATTN_TEST_WORKERS-8}"
  [ "$FATTN_TEST_WORKERS" = 0 ] && unset FATTN_TEST_WORKERS
elif [ -n "${FATTN_TEST_WORKERS:-}" ]; then
  echo "pytest-xdist is not installed: FATTN_TEST_WORKERS=$FATTN_TEST_WORKERS ignored, tests run in one process"
  unset FATTN_TEST_WORKERS
fi

declare -A RESULT
SUMMARY="$OUT/summary.tmp"
: >"$SUMMARY"

if has_step env; then
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'
  } 2>&1 | tee "$OUT/env.txt"
fi

if has_step tests; then
  : >"$OUT/tests.log"
  for p in $PKGS; do
    echo "=== tests: $p" | tee -a "$OUT/tests.log"
    start=$(date +%s)
    ${FATTN_PKG_TIMEOUT:+timeout $FATTN_PKG_TIMEOUT} "$PY" -m pytest "$(test_path "$p")" -q -rfE -p no:cacheprovider --durations=5 -k "${FATTN_TESTS_K:-}" ${FATTN_TEST_WORKERS:+-n $FATTN_TEST_WORKERS} 2>&1 | tee -a "$OUT/tests.log" >"$OUT/last.log"
    rc=${PIPESTATUS[0]}
    line=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT/last.log" | tail -1)
    echo "tests  $p  rc=$rc  $(( $(date +%s) - start ))s  $line" >>"$SUMMARY"
  done
fi

if has_step sanitize; then
  : >"$OUT/sanitize.log"
  for p in $PKGS; do
    tool="${FATTN_SANITIZE_TOOL:-memcheck}"
    echo "=== compute-sanitizer $tool: $p" | tee -a "$OUT/sanitize.log"
    start=$(date +%s)
    ${FATTN_PKG_TIMEOUT:+timeout $FATTN_PKG_TIMEOUT} compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
      "$PY" -m pytest "$(test_path "$p")" -q -x -p no:cacheprovider -k "${FATTN_SANITIZE_K:-not compile}" \
      >"$OUT/last.log" 2>&1
    rc=$?
    cat "$OUT/last.log" >>"$OUT/sanitize.log"
    errors=$(grep -cE "Invalid|ERROR SUMMARY: [1-9]|SUMMARY: [1-9][0-9]* hazard" "$OUT/last.log")
    line=$(grep -E "(passed|failed|error)" "$OUT/last.log" | tail -1)
    summ=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$OUT/last.log" | tail -1)
    echo "${tool:0:6} $p  rc=$rc  $(( $(date +%s) - start ))s  ${summ:-no summary}  $line  (error lines: $errors)" >>"$SUMMARY"
  done
fi

# benchmarks.overhead over the packages (not core): step name, the module's flags, the output file.
overhead_step() {
  local step=$1 flags=$2 file=$3 pkgs_o=""
  for p in $PKGS; do [ "$p" = core ] || pkgs_o="$pkgs_o $p"; done
  local start=$(date +%s)
  ${FATTN_PKG_TIMEOUT:+timeout $FATTN_PKG_TIMEOUT} "$PY" -m benchmarks.overhead $flags floor $pkgs_o 2>&1 \
    | grep -v -i "warn" | tee "$OUT/$file"
  echo "$step  rc=${PIPESTATUS[0]}  $(( $(date +%s) - start ))s  ($file)" >>"$SUMMARY"
}
has_step overhead && overhead_step overhead "" overhead.txt
has_step launch-ab && overhead_step launch-ab --ab launch-ab.txt

if has_step precompile; then
  for p in $PKGS; do
    [ "$p" = core ] && continue
    start=$(date +%s)
    ${FATTN_PKG_TIMEOUT:+timeout $FATTN_PKG_TIMEOUT} "$PY" -m benchmarks.precompile "$p" 2>&1 | tee -a "$OUT/precompile.log" | tail -1
    echo "precompile  $p  rc=${PIPESTATUS[0]}  $(( $(date +%s) - start ))s" >>"$SUMMARY"
  done
fi

if has_step bench; then
  : >"$OUT/bench.log"
  export FATTN_BENCH_PROGRESS="$OUT/bench-progress.txt" FATTN_BENCH_TUNING="$OUT/bench-tuning.txt"
  : >"$FATTN_BENCH_PROGRESS"
  : >"$FATTN_BENCH_TUNING"
  jsons=()
  for p in $PKGS; do
    [ "$p" = core ] && continue
    [ -f "benchmarks/bench_$p.py" ] || continue
    echo "=== bench: $p" | tee -a "$OUT/bench.log"
    start=$(date +%s)
    ${FATTN_PKG_TIMEOUT:+timeout $FATTN_PKG_TIMEOUT} "$PY" -m pytest "benchmarks/bench_$p.py" -q -p no:cacheprovider -k "${FATTN_BENCH_K:-}" \
      --benchmark-json="$OUT/bench-$p.json" --benchmark-columns=median,iqr,rounds \
      --benchmark-storage="file://$REPO/benchmarks/baselines/$("$PY" -c 'from benchmarks.harness import gpu_slug; print(gpu_slug())')" \
      ${FATTN_BENCH_COMPARE:+--benchmark-compare --benchmark-compare-fail=median:25%} \
      ${FATTN_BENCH_SAVE:+--benchmark-save="$FATTN_BENCH_SAVE"} \
      2>&1 | tee -a "$OUT/bench.log" >"$OUT/last.log"
    rc=${PIPESTATUS[0]}
    line=$(grep -E "(passed|failed|error|skipped)" "$OUT/last.log" | tail -1)
    echo "bench  $p  rc=$rc  $(( $(date +%s) - start ))s  $line" >>"$SUMMARY"
    jsons+=("$OUT/bench-$p.json")
  done
  if [ ${#jsons[@]} -gt 0 ]; then
    "$PY" - "$OUT/bench.json" "${jsons[@]}" <<'EOF'
import json, sys
out, *paths = sys.argv[1:]
merged = None
for p in paths:
    try:
        d = json.load(open(p))
    except (OSError, ValueError):
        continue
    if merged is None:
        merged = d
    else:
        merged["benchmarks"] += d["benchmarks"]
if merged is not None:
    json.dump(merged, open(out, "w"), indent=1)
EOF
    rm -f "${jsons[@]}"
    "$PY" -m benchmarks.report "$OUT/bench.json" --plots "$OUT" >"$OUT/report.txt" 2>&1
  fi
fi

rm -f "$OUT/last.log"
if [ -n "${FATTN_TRITON_CACHE_OUT:-}" ]; then
  # Only what loading a kernel needs: the cubins, the metadata and autotuning JSON and the compiled
  # launchers. Triton loads a kernel from its cache group without the IR stages (source, ttir, ttgir,
  # llir, ptx), which are 87% of it: after msda's benchmark, 84 MiB (12 packed) against 11 (2.6).
  tar czf "$OUT/triton-cache.tgz" -C "$REPO" --exclude='*.source' --exclude='*.ttir' --exclude='*.ttgir' \
    --exclude='*.llir' --exclude='*.ptx' .triton-cache
  size=$(stat -c %s "$OUT/triton-cache.tgz")
  if [ "$size" -gt $((15 * 1024 * 1024)) ]; then
    echo "triton cache: $((size / 1024 / 1024)) MiB packed, over the 16 MiB a file may come back with: dropped"
    rm -f "$OUT/triton-cache.tgz"
  else
    echo "triton cache: $((size / 1024)) KiB packed in triton-cache.tgz"
  fi
fi
echo
echo "================ fattn GPU run: $(head -2 "$OUT/env.txt" 2>/dev/null | tail -1)"
[ -s "$OUT/report.txt" ] && cat "$OUT/report.txt"
# A package cut off by its time limit wrote no JSON: show every measurement as it was taken instead.
if [ -s "$OUT/bench-progress.txt" ] && grep -qE "^bench .* rc=(12[4-9]|13[0-9])" "$SUMMARY"; then
  echo "(a benchmark run was cut off: every measurement as it was taken)"
  cat "$OUT/bench-progress.txt"
fi
echo
cat "$SUMMARY"
rm -f "$SUMMARY"
if [ -n "${FATTN_PACK_OUT:-}" ]; then
  # The lent GPU machine sends back at most 8 files from $OUT: one archive of every log and result
  # (triton-cache.tgz stays beside it, to be carried on its own). Several runs into sub-folders of one
  # $OUT: pack once, in the last.
  pack="$OUT/results-$(date +%H%M%S).tgz"
  tar czf "$pack" -C "$OUT" --exclude='results-*.tgz' --exclude='triton-cache.tgz' . &&
    find "$OUT" -mindepth 1 -not -name 'results-*.tgz' -not -name 'triton-cache.tgz' -delete &&
    echo "packed \$OUT into $(basename "$pack")"
fi
