#!/usr/bin/env bash
# The mamba_ssm anchor, a second command after bench/gpu_check.sh (skip it when GPU time is short):
# mamba_ssm's CUDA selective scan built from a carried sdist for sm_90 only, then timed beside ours at
# N=16 (bench/bench_anchor.py; rows to bench/results/anchor.csv).
#
#   carry bench/.cache/mamba_ssm-2.3.2.post1.tar.gz (on the CPU machine:
#     pip download --no-deps --no-binary :all: mamba-ssm==2.3.2.post1 -d bench/.cache)
#   OUT=/path bash bench/gpu_anchor.sh
#
# The build runs in the background (setsid) and is polled; if it has not finished after
# ANCHOR_WAIT_S (default 420 s) the script stops and a second call of this script (on the same,
# still warm machine) picks it up where it is: a finished build is reused, a running one polled.
# $OUT receives anchor.log (the build's tail and the benchmark) and anchor.csv when it exists.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}
PY=${PYTHON:-python3}
SDIST=${ANCHOR_SDIST:-bench/.cache/mamba_ssm-2.3.2.post1.tar.gz}
WAIT=${ANCHOR_WAIT_S:-420}
DIR=bench/.cache/anchor  # unpacked sources, the build, its pid and log (kept between calls)
mkdir -p "$OUT"
LOG="$OUT/anchor.log"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
say() { echo "$*" | tee -a "$LOG"; }

say "==== gpu_anchor $(date -u +%FT%TZ) git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  say "skipped: no CUDA device"
  exit 0
fi
mkdir -p "$DIR"
for tool in nvcc ninja; do command -v "$tool" > /dev/null || { say "MISSING: $tool"; exit 1; }; done
if [ ! -f "$SDIST" ]; then say "MISSING: the mamba-ssm sdist $SDIST (carry it; see the header of this script)"; exit 1; fi

built() { ls "$DIR"/build/selective_scan_cuda*.so > /dev/null 2>&1; }
running() { [ -f "$DIR/build.pid" ] && kill -0 "$(cat "$DIR/build.pid")" 2> /dev/null; }

if ! built && ! running; then
  rm -rf "$DIR/src" && mkdir -p "$DIR/src" && tar -xzf "$SDIST" -C "$DIR/src" --strip-components=1
  say "building mamba_ssm's selective_scan_cuda for sm_90 in the background (MAX_JOBS=$MAX_JOBS)"
  # -w: setsid waits for the build, so that the recorded pid lives exactly as long as the build
  setsid -w "$PY" bench/bench_anchor.py build "$DIR/src" "$DIR/build" > "$DIR/build.log" 2>&1 < /dev/null &
  echo $! > "$DIR/build.pid"
fi
start=$(date +%s)
while running && ! built; do
  if [ $(( $(date +%s) - start )) -ge "$WAIT" ]; then
    say "the build is still running after ${WAIT} s (objects: $(ls "$DIR"/build/*.o 2>/dev/null | wc -l));" \
        "call this script again to go on"
    tail -n 5 "$DIR/build.log" >> "$LOG"
    exit 3
  fi
  sleep 10
  echo "  build: $(( $(date +%s) - start )) s, $(ls "$DIR"/build/*.o 2>/dev/null | wc -l) objects"
done
sleep 2  # the .so appears before the build process has exited
if ! built; then
  say "build FAILED:"; tail -n 40 "$DIR/build.log" | tee -a "$LOG"; exit 1
fi
say "built: $(ls "$DIR"/build/selective_scan_cuda*.so)"
grep -E "registers|spill" "$DIR/build.log" | head -n 20 >> "$LOG"

before=0
[ -f bench/results/anchor.csv ] && before=$(wc -l < bench/results/anchor.csv)
timeout -k 5 120 "$PY" bench/bench_anchor.py bench "$DIR/build" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ -f bench/results/anchor.csv ] && [ "$(wc -l < bench/results/anchor.csv)" -gt "$before" ]; then
  { head -n 1 bench/results/anchor.csv; tail -n +"$(( before > 0 ? before + 1 : 2 ))" bench/results/anchor.csv; } \
    > "$OUT/anchor.csv"
fi
say "==== gpu_anchor: bench rc=$rc"
exit "$rc"
