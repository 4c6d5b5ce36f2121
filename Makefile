# The README's commands.  Each target sets up .venv first when it is missing or out of date
# (scripts/setup_venv.sh: pinned CPU torch on CPU machines, an existing CUDA torch left alone).
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests and demos never download: no model hub, no dataset hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup demo test bench clean

setup:
	@VENV=$(VENV) bash scripts/setup_venv.sh

# The main job: a small Mamba (N=128) learns CPython's standard library byte by byte and is
# compressed during training (mean_lti Gramians: the paper's surrogate, cheap at N=128 on a CPU).
DEMO_ARGS ?= --data stdlib --preset demo --out outputs/demo --steps 400 --seq-len 512 --batch-size 4 --lr 1e-2 \
	--mode tolerance --tau 0.05 --estimator mean_lti --attempts 4 --calibration-batches 4

demo: setup
	$(OFFLINE) $(VENV)/bin/compressm-mamba finetune $(DEMO_ARGS)

# bin/pytest, not `python -m pytest`: -m would put the repository root on sys.path.
test: setup
	$(OFFLINE) $(VENV)/bin/pytest -q

# CPU benchmarks (GPU: bench/gpu_check.sh); rows are appended to bench/results/*.csv.
bench: setup
	$(OFFLINE) $(PY) bench/bench_selective_scan.py
	$(OFFLINE) $(PY) bench/bench_gramians.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
