#!/usr/bin/env bash
# Create .venv-compat: the second CI environment, once.  Called by `make test-compat`.
#
# It is two proofs in one venv:
# - the lower bound: transformers at the bottom of the tested range (TRANSFORMERS_TESTED[0] in
#   compressm_mamba/compat.py, the GPU machine's version);
# - the bare environment: torch, transformers, numpy, safetensors and pytest ONLY (plus what
#   transformers itself requires).  No datasets, scipy, scikit-learn, matplotlib, accelerate, triton,
#   mamba_ssm: the tests that need them must skip with a reason, and the check at the end fails if
#   any of them slipped in.
# torch is the pinned CPU build of docs/ENV.md (an unpinned torch pulls ~3.5 GB of CUDA wheels).
set -euo pipefail

VENV=${VENV:-.venv-compat}
PY=${PYTHON:-python3}
STAMP="$VENV/.compressm-ready"
LOWER=$(sed -n 's/^TRANSFORMERS_TESTED = ("\([0-9.]*\)".*/\1/p' compressm_mamba/compat.py)
[ -n "$LOWER" ] || { echo "setup-compat: cannot read TRANSFORMERS_TESTED from compressm_mamba/compat.py" >&2; exit 1; }
recipe=$(printf '%s\n' "$LOWER" | cat - scripts/setup_compat_venv.sh setup.py | sha256sum | cut -d' ' -f1)

if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$recipe" ]; then
  exit 0
fi
rm -rf "$VENV"
echo "setup-compat: creating $VENV (transformers==$LOWER, CPU torch 2.13.0, no optional packages)"
"$PY" -m venv "$VENV"
printf 'torch==2.13.0+cpu\n' > "$VENV/constraints.txt"
# An environment variable reaches pip's build-isolation environments; a -c flag does not.
export PIP_CONSTRAINT="$PWD/$VENV/constraints.txt"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip setuptools wheel
"$VPY" -m pip install -q torch==2.13.0 "transformers==$LOWER" numpy safetensors pytest
"$VPY" -m pip install -q --no-deps --no-build-isolation -e .

present=$("$VPY" - <<'PY'
import importlib.util
absent = ["datasets", "scipy", "sklearn", "matplotlib", "accelerate", "triton", "mamba_ssm", "causal_conv1d"]
print(" ".join(m for m in absent if importlib.util.find_spec(m) is not None))
PY
)
if [ -n "$present" ]; then
  echo "setup-compat: $VENV must not hold: $present (pulled in by a dependency?)" >&2
  exit 1
fi
echo "$recipe" > "$STAMP"
echo "setup-compat: $VENV ready ($("$VPY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
