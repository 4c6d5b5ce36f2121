#!/usr/bin/env bash
# Create .venv with everything compressm_mamba needs, once.  Called by every Makefile target.
#
# CPU machines get the pinned CPU recipe of docs/ENV.md (torch 2.13.0+cpu: an unpinned torch
# pulls ~3.5 GB of CUDA wheels).  Where the system Python already has a CUDA build of torch
# (a GPU machine), the venv sees the system packages and that torch is left alone.
set -euo pipefail

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.compressm-ready"
# The stamp records what the venv was built from; editing the recipe re-runs it on the next make.
recipe=$(cat scripts/setup_venv.sh setup.py pyproject.toml | sha256sum | cut -d' ' -f1)

if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$recipe" ]; then
  exit 0
fi

cuda_torch=$("$PY" -c 'import torch; print(torch.__version__ if torch.version.cuda else "")' 2>/dev/null || true)

if [ -x "$VENV/bin/python" ]; then
  echo "setup: updating $VENV (the recipe changed)"
  cuda_torch=$("$VENV/bin/python" -c 'import torch; print(torch.__version__ if torch.version.cuda else "")' 2>/dev/null || true)
elif [ -n "$cuda_torch" ]; then
  echo "setup: system torch $cuda_torch has CUDA; creating $VENV on top of it (torch left alone)"
  "$PY" -m venv --system-site-packages "$VENV"
else
  echo "setup: creating $VENV with CPU torch 2.13.0 (pinned recipe, docs/ENV.md)"
  "$PY" -m venv "$VENV"
fi
if [ -n "$cuda_torch" ]; then
  printf 'torch==%s\n' "$cuda_torch" > "$VENV/constraints.txt"
else
  printf 'torch==2.13.0+cpu\ntriton==3.7.1\n' > "$VENV/constraints.txt"
fi
# An environment variable reaches pip's build-isolation environments; a -c flag does not.
export PIP_CONSTRAINT="$PWD/$VENV/constraints.txt"
VPY="$VENV/bin/python"

"$VPY" -m pip install -q --upgrade pip setuptools wheel
if [ -z "$cuda_torch" ]; then
  "$VPY" -m pip install -q torch==2.13.0 triton==3.7.1
fi
"$VPY" -m pip install -q numpy scipy "transformers==5.23.0" "datasets==5.2.0" accelerate ninja einops packaging \
  pytest safetensors tqdm matplotlib scikit-learn "peft==0.21.2"

# mamba-ssm / causal-conv1d are optional (used as an anchor in tests where importable).  Both are
# sdist-only; on CPU they build in seconds with the CUDA part skipped.  --no-deps: mamba-ssm's
# dependencies add ~0.6 GB needed only for Mamba3.
if [ -z "$cuda_torch" ]; then
  if ! CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
       MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
       "$VPY" -m pip install -q --no-build-isolation --no-deps causal-conv1d==1.7.0 mamba-ssm==2.3.2.post1; then
    echo "setup: WARNING: mamba-ssm/causal-conv1d did not build; tests that compare against mamba_ssm will skip" >&2
  fi
fi

"$VPY" -m pip install -q --no-deps --no-build-isolation -e .
echo "$recipe" > "$STAMP"
echo "setup: $VENV ready ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
