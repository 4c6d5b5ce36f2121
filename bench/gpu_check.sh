#!/usr/bin/env bash
# The GPU checklist of shared/GPU.md, in order, as one script.  Run from the repository root on a
# machine with a CUDA GPU; results land in bench/results/ (commit them) and logs in $OUT (or ./gpu_logs).
set -uo pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

# 1. Build (the extension builds only if csrc/ has sources) and run the whole suite for real.
python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; echo "build rc=$?"
python3 -c "import compressm_mamba; print('package ok')"
python3 -c "import compressm_mamba._C" 2>/dev/null && echo "extension loaded" || echo "no compiled extension"
python3 -m pytest -x -q tests > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"; tail -3 "$OUT/pytest.log"

# 2. Memory checks of the kernel tests on small shapes.
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck python3 -m pytest -x -q tests/ops -k "not bf16" > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?"; tail -3 "$OUT/memcheck.log"
fi

# 3. Benchmarks at real shapes; they append rows to bench/results/*.csv.
python3 bench/bench_selective_scan.py --preset gpu > "$OUT/bench_selective_scan.log" 2>&1; echo "scan bench rc=$?"
python3 bench/bench_gramians.py --preset gpu > "$OUT/bench_gramians.log" 2>&1; echo "gramian bench rc=$?"
cp bench/results/*.csv "$OUT/" 2>/dev/null
