# The README's commands.  Each target sets up .venv first when it is missing or out of date
# (scripts/setup_venv.sh: pinned CPU torch on CPU machines, an existing CUDA torch left alone).
VENV ?= .venv
PY := $(VENV)/bin/python
# The second CI environment: the lower bound of the tested transformers range, and nothing optional.
COMPAT_VENV ?= .venv-compat
# Tests and demos never download: no model hub, no dataset hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup setup-compat demo test test-main test-compat test-quick bench clean

setup:
	@VENV=$(VENV) bash scripts/setup_venv.sh

setup-compat:
	@VENV=$(COMPAT_VENV) bash scripts/setup_compat_venv.sh

# The main job: a small Mamba (N=128) learns CPython's standard library byte by byte and is
# compressed during training (mean_lti Gramians; attempts in the first 10 %, the setting the README's recorded output used).
DEMO_ARGS ?= --data stdlib --preset demo --out outputs/demo --overwrite --steps 400 --seq-len 512 --batch-size 4 --lr 1e-2 \
	--mode tolerance --tau 0.05 --estimator mean_lti --attempts 4 --warmup-fraction 0.1 --calibration-batches 4

demo: setup
	$(OFFLINE) $(VENV)/bin/compressm-mamba finetune $(DEMO_ARGS)

# Both CI jobs, one after the other; each prints its wall time.
test: test-main test-compat

# bin/pytest, not `python -m pytest`: -m would put the repository root on sys.path.
test-main: setup
	@start=$$(date +%s); $(OFFLINE) $(VENV)/bin/pytest -q; rc=$$?; \
	  echo "test-main: $$(( $$(date +%s) - start )) s"; exit $$rc

# The lower bound (transformers 5.17.0) in a bare environment (torch, transformers, numpy, safetensors,
# pytest): everything that needs datasets, scipy, scikit-learn, matplotlib, accelerate, triton or
# mamba_ssm must skip with a reason.  The whole suite is collected and run, except the nvcc compile
# checks of csrc/ (deselected, still collected): they depend only on torch's headers, the same torch
# 2.13.0 as test-main's, and take most of the suite's time.
test-compat: setup-compat
	@start=$$(date +%s); $(OFFLINE) $(COMPAT_VENV)/bin/pytest -q --deselect tests/ops/test_cuda_compile.py; rc=$$?; \
	  echo "test-compat: $$(( $$(date +%s) - start )) s"; exit $$rc

# A subset for a laptop: the float64 spec, the CPU ops and the user-facing application; leaves out
# the Triton-interpreter, CUDA, distributed and long training tests (and anything marked slow).
QUICK_TESTS ?= tests/reference tests/app tests/test_import.py tests/ops/test_bad_input.py
test-quick: setup
	$(OFFLINE) $(VENV)/bin/pytest -q -m "not slow and not requires_triton and not requires_cuda" $(QUICK_TESTS)

# CPU benchmarks (GPU: bench/gpu_check.sh); rows are appended to bench/results/*.csv.
bench: setup
	$(OFFLINE) $(PY) bench/bench_selective_scan.py
	$(OFFLINE) $(PY) bench/bench_gramians.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache
