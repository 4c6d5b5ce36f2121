"""compressm_mamba: in-training compression of Mamba state-space models (CompreSSM).

Hankel singular values of each selective-scan layer rank its state directions; the weak ones are
cut early in training and the rest of training runs on the smaller model.

Importing this package needs only torch: no GPU, no Triton, no compiled extension, no mamba_ssm,
and it never initialises CUDA.

- ``compressm_mamba.reference`` — the float64-capable specification (shared/METHOD.md): selective
  scans, Gramian estimators, Hankel singular values, state importance, rank choice and selection.
"""

from . import reference

__version__ = "0.1.0"

__all__ = ["reference", "__version__"]
