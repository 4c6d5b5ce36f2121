# The README's commands.  Each target sets up .venv first when it is missing or out of date
# (scripts/setup_venv.sh: pinned CPU torch on CPU machines, an existing CUDA torch left alone).
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests and demos never download: no model hub, no dataset hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup demo test clean

setup:
	@VENV=$(VENV) bash scripts/setup_venv.sh

demo: setup
	$(OFFLINE) $(PY) -m compressm_mamba.demo

# bin/pytest, not `python -m pytest`: -m would put the repository root on sys.path.
test: setup
	$(OFFLINE) $(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
