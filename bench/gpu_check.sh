#!/usr/bin/env bash
# The GPU checklist of shared/GPU.md as one run of at most 6 minutes (GPU_CHECK_BUDGET_S, default 345 s).
#
#   OUT=/path bash bench/gpu_check.sh        # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh                  # without a CUDA device: the dry run (CI runs it as a test)
#
# Steps, in order (each under its own timeout, cut to what is left of the budget; none stops the others):
#   preflight      versions, GPU, tools; names everything missing
#   build          pure-Python editable install, then the CUDA extension for sm_90 only, in the background
#   test:<file>    the kernel-vs-reference test files (tests/ops), one pytest each, no -x;
#                  Triton/torch files while the extension builds, the CUDA ones after it
#   realshape      bench/gpu_realshape_check.py: (8, 3072, 2048) fwd+bwd, fp32/fp16/bf16 vs float64
#   memcheck       compute-sanitizer --tool memcheck on the CUDA kernel tests (small shapes)
#   bench:scan     (8, 3072, 2048) bf16, N in {12, 16, 128}, backends torch, triton, cuda
#   bench:gramians Gramian collection per estimator, relative to one forward scan
#   bench:train    2-layer d_model-768 Mamba: N=128, cut to 12, built at 16; decode tokens/s; with
#                  transformers' own path beside ours
#   tests:rest     the rest of the suite, only if the budget allows (tests:rest gets what is left)
#
# $OUT receives, as soon as each step ends (at most 8 files; here 3):
#   gpu_check.log  every step's header, status, seconds and the tail of its output
#   steps.tsv      one line per step: name, status ("ok", "FAIL rc=N", "TIMEOUT", "skipped: <why>"), seconds
#   results.tar    every step's full log, preflight.txt and the CSV rows (appended step by step)
# Rows are also appended to bench/results/*.csv in the tree (commit them after a real run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-345}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)  # per-step logs and CSVs before they are appended to results.tar
LOG="$OUT/gpu_check.log"
STEPS="$OUT/steps.tsv"
TAR="$OUT/results.tar"
: > "$LOG"
printf 'step\tstatus\tseconds\n' > "$STEPS"
rm -f "$TAR"
START=$(date +%s)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export COMPRESSM_GPU_CHECK=1  # tests/test_gpu_check.py skips its dry run of this script inside this script
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16}
# -P: never put the repository root on sys.path (its kernels/ folder would pass for the hub package).
PYTEST=("$PY" -P -m pytest -q -p no:cacheprovider -o addopts="-ra --import-mode=importlib")

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  HAVE_CUDA=1
else
  HAVE_CUDA=0
fi

pack() {  # pack FILE...: append to results.tar (names relative to $WORK)
  (cd "$WORK" && tar -rf "$TAR" "$@")
}

record() {  # record NAME STATUS SECONDS LOGFILE
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$STEPS"
  {
    printf '==== %s: %s (%s s)\n' "$1" "$2" "$3"
    [ -n "${4:-}" ] && [ -f "$WORK/$4" ] && tail -n 25 "$WORK/$4"
  } >> "$LOG"
  [ -n "${4:-}" ] && [ -f "$WORK/$4" ] && pack "$4"
  echo "$1: $2 ($3 s)"
}

skip() {  # skip NAME WHY
  record "$1" "skipped: $2" 0
}

# Each phase ends by a time (seconds after the start) so that a slow phase cannot eat the next one's:
# the Triton/torch test files by TESTS_END (the build runs meanwhile), the CUDA test files within
# CUDA_TESTS_S after the build (not after CUDA_TESTS_END), real shapes and memcheck by CHECKS_END,
# benchmarks by BUDGET; the rest of the suite only gets what is left before BUDGET.
TESTS_END=${GPU_CHECK_TESTS_END_S:-140}
CUDA_TESTS_S=75
CUDA_TESTS_END=225
CHECKS_END=${GPU_CHECK_CHECKS_END_S:-270}
PHASE_END=$BUDGET
left() { local end=$(( PHASE_END < BUDGET ? PHASE_END : BUDGET )); echo $(( end - ($(date +%s) - START) )); }

# run NAME MAX_SECONDS NEEDS_CUDA(0/1) COMMAND...: one step, its output in $WORK/<name>.log
run() {
  local name=$1 max=$2 cuda=$3; shift 3
  local file="${name//[^A-Za-z0-9_.-]/_}.log"
  if [ "$cuda" = 1 ] && [ "$HAVE_CUDA" = 0 ]; then skip "$name" "no CUDA device"; return; fi
  local t=$(( $(left) < max ? $(left) : max ))
  if [ "$t" -lt 10 ]; then skip "$name" "out of time (phase ends ${PHASE_END} s, budget ${BUDGET} s)"; return; fi
  local s=$(date +%s) rc status
  timeout -k 5 "$t" "$@" > "$WORK/$file" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT after ${t} s" ;;
    *) status="FAIL rc=$rc" ;;
  esac
  record "$name" "$status" $(( $(date +%s) - s )) "$file"
}

# ---- preflight ------------------------------------------------------------------------------
preflight() {
  echo "date: $(date -u +%FT%TZ)  git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "MISSING: nvidia-smi"
  "$PY" - <<'PY'
import importlib, importlib.util, platform
print("python", platform.python_version())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
    if torch.cuda.is_available():
        print("capability", torch.cuda.get_device_capability(0))
except Exception as err:
    print("MISSING (required): torch:", err)
required = ["triton", "transformers", "numpy", "safetensors", "pytest"]
optional = {"accelerate": "Trainer tests", "scipy": "Lyapunov cross-checks", "datasets": "Trainer tests",
            "sklearn": "digits demo", "matplotlib": "plots", "mamba_ssm": "the anchor (bench/gpu_anchor.sh)",
            "causal_conv1d": "transformers' fused conv"}
for name in required + list(optional):
    if importlib.util.find_spec(name) is None:
        print(f"MISSING ({'required' if name in required else 'optional: ' + optional[name]}): {name}")
        continue
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:
        print(f"BROKEN: {name}: {type(err).__name__}: {err}")
try:
    from compressm_mamba import compat
    low, high = compat.TRANSFORMERS_TESTED
    print(f"transformers tested range {low} .. {high}; installed inside it: {compat.transformers_tested()}")
    print("transformers' Mamba kernels:", compat.hf_bound_kernels("mamba"))
except Exception as err:
    print("compressm_mamba.compat:", type(err).__name__, err)
PY
  for tool in nvcc ninja compute-sanitizer ncu; do
    if command -v "$tool" > /dev/null; then echo "$tool: $("$tool" --version 2>&1 | tail -n 1)"; else echo "MISSING: $tool"; fi
  done
  git status --short 2>/dev/null | head -n 20
}
s=$(date +%s)
preflight > "$WORK/preflight.txt" 2>&1
record preflight "$(grep -q '^MISSING (required)' "$WORK/preflight.txt" && echo 'ok, required missing' || echo ok)" \
  $(( $(date +%s) - s )) preflight.txt

# ---- build --------------------------------------------------------------------------------
# The package first (pure Python, seconds), so that the Triton tests run while the extension builds
# in place (compressm_mamba/_C*.so, which the editable install then finds).
BUILD_PID=""
if [ "$HAVE_CUDA" = 1 ]; then
  run install 60 1 env COMPRESSM_MAMBA_SKIP_CUDA_BUILD=1 "$PY" -m pip install --no-deps --no-build-isolation -e .
  if ! "$PY" -P -c "import compressm_mamba.kernels" 2> /dev/null; then
    # No editable install (e.g. a read-only site-packages): the package from the tree, as in a worktree.
    [ -e compressm_mamba/kernels ] || ln -s ../kernels compressm_mamba/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "install: using PYTHONPATH=$PWD instead" >> "$LOG"
  fi
  BUILD_START=$(date +%s)
  timeout -k 5 170 env COMPRESSM_MAMBA_FORCE_CUDA_BUILD=1 "$PY" setup.py build_ext --inplace \
    > "$WORK/build.log" 2>&1 &
  BUILD_PID=$!
else
  skip install "no CUDA device"
fi

# ---- kernel-vs-reference tests ----------------------------------------------------------------
# Every test file of tests/ops (tests/reference is CPU math, CI's); compile-only checks (test_cuda_compile: nvcc without a
# GPU) are CI's.  Files whose name says cuda need the extension: they run after the build.
mapfile -t OPS_FILES < <(ls tests/ops/test_*.py 2>/dev/null | grep -v 'test_cuda_compile')
EARLY=() LATE=()
for f in "${OPS_FILES[@]}"; do
  case $(basename "$f") in *cuda*) LATE+=("$f") ;; *) EARLY+=("$f") ;; esac
done
if [ "$HAVE_CUDA" = 0 ]; then
  # Dry run: prove the selection collects (no kernel runs on CPU in the time a dry run has).
  run collect 120 0 "${PYTEST[@]}" --collect-only "${EARLY[@]}" "${LATE[@]}"
fi
PHASE_END=$TESTS_END
for f in "${EARLY[@]}"; do run "test:$f" 45 1 "${PYTEST[@]}" "$f"; done

if [ -n "$BUILD_PID" ]; then
  wait "$BUILD_PID"; rc=$?
  if [ $rc = 0 ] && "$PY" -c "import compressm_mamba._C" >> "$WORK/build.log" 2>&1; then status=ok
  elif [ $rc = 124 ] || [ $rc = 137 ]; then status="TIMEOUT"
  else status="FAIL rc=$rc"; fi
  record build "$status" $(( $(date +%s) - BUILD_START )) build.log
else
  skip build "no CUDA device"
fi
now=$(( $(date +%s) - START ))
PHASE_END=$(( now + CUDA_TESTS_S < CUDA_TESTS_END ? now + CUDA_TESTS_S : CUDA_TESTS_END ))
for f in "${LATE[@]}"; do run "test:$f" "$CUDA_TESTS_S" 1 "${PYTEST[@]}" "$f"; done
PHASE_END=$CHECKS_END

# ---- real shapes, fp32 / fp16 / bf16 vs float64 ---------------------------------------------------
if [ "$HAVE_CUDA" = 1 ]; then
  run realshape 50 1 "$PY" bench/gpu_realshape_check.py --csv "$WORK/realshape.csv"
else
  run realshape-tiny 120 0 "$PY" bench/gpu_realshape_check.py --tiny --csv "$WORK/realshape.csv"
fi
[ -f "$WORK/realshape.csv" ] && pack realshape.csv

# ---- memcheck: the CUDA kernel tests, small shapes, no caching allocator ---------------------------
CUDA_TESTS=$(ls tests/ops/test_cuda_kernels.py 2>/dev/null)
if [ "$HAVE_CUDA" = 1 ] && ! command -v compute-sanitizer > /dev/null; then
  skip memcheck "compute-sanitizer not on PATH"
elif [ -z "$CUDA_TESTS" ]; then
  skip memcheck "tests/ops/test_cuda_kernels.py not found"
else
  run memcheck 45 1 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "${PYTEST[@]}" "$CUDA_TESTS" -k "${MEMCHECK_K:-not torch_compile and not opcheck and not half_precision}"
fi

# ---- benchmarks: every backend, the issue's shapes ------------------------------------------------
# Each benchmark appends rows to bench/results/<csv>; the rows this run added go to results.tar as
# bench_<csv> (header + new rows) right after the step.
bench() {  # bench NAME MAX_SECONDS CSV COMMAND...
  local name=$1 max=$2 csv=$3; shift 3
  local before=0
  [ -f "bench/results/$csv" ] && before=$(wc -l < "bench/results/$csv")
  run "$name" "$max" 1 "$@"
  if [ -f "bench/results/$csv" ] && [ "$(wc -l < "bench/results/$csv")" -gt "$before" ]; then
    { head -n 1 "bench/results/$csv"; tail -n +"$(( before > 0 ? before + 1 : 2 ))" "bench/results/$csv"; } \
      > "$WORK/bench_$csv"
    pack "bench_$csv"
  fi
}
PHASE_END=$BUDGET
bench bench:scan 35 selective_scan.csv "$PY" bench/bench_selective_scan.py --preset compass --reps 3 \
  --backends torch,triton,cuda
bench bench:gramians 25 gramians.csv "$PY" bench/bench_gramians.py --preset compass --backends torch,triton,cuda \
  --relative-to-scan
bench bench:train 45 train_step.csv "$PY" bench/bench_train_step.py --preset compass \
  --backends cuda,triton,torch,transformers --in-process --no-collector
bench bench:decode 25 decode.csv "$PY" bench/bench_decode.py --preset gpu

# ---- the rest of the suite, if time is left ---------------------------------------------------------
run tests:rest 90 1 "${PYTEST[@]}" tests --ignore=tests/ops --ignore=tests/reference --ignore=tests/static

total=$(( $(date +%s) - START ))
printf 'total\t%s\t%s\n' "$(grep -c -E $'\t(FAIL|TIMEOUT)' "$STEPS") failed" "$total" >> "$STEPS"
echo "==== total: ${total} s; failed steps: $(grep -c -E $'\t(FAIL|TIMEOUT)' "$STEPS")" | tee -a "$LOG"
rm -rf "$WORK"
