"""compressm_mamba: in-training compression of Mamba state-space models (CompreSSM).

Hankel singular values of each selective-scan layer rank its state directions; the weak ones are
cut early in training and the rest of training runs on the smaller model.

Importing this package needs only torch: no GPU, no Triton, no compiled extension, no mamba_ssm,
and it never initialises CUDA.

- ``compressm_mamba.reference`` — the float64-capable specification (docs/METHOD.md): selective
  scans, Gramian estimators, Hankel singular values, state importance, rank choice and selection.
- ``CompressConfig``, ``compress_(model, config, calibration)`` — one-shot compression of Hugging Face
  Mamba / Mamba2 (and mamba_ssm Mamba) models; ``CompreSSMCallback`` — the same during training.
- ``from_pretrained(path)`` — loads checkpoints whose layers have different state sizes.
- ``replace_mixers_(model)`` — swaps HF ``MambaMixer``s for the drop-in mixer that runs our scan
  kernels (``compressm_mamba.ops``) and feeds Gramian collection without recomputation.
"""

from . import reference
from .cut.compress import CompressionReport, compress_
from .config import CompressConfig
from .cut.state_sizes import from_pretrained

__version__ = "0.1.0"

__all__ = [
    "reference",
    "CompressConfig",
    "CompressionReport",
    "CompreSSMCallback",
    "compress_",
    "replace_mixers_",
    "from_pretrained",
    "__version__",
]


def __getattr__(name):
    # These subclass transformers' classes: import transformers only when asked.
    if name == "CompreSSMCallback":
        from .training.callback import CompreSSMCallback

        return CompreSSMCallback
    if name == "replace_mixers_":
        from .models.drop_in import replace_mixers_

        return replace_mixers_
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
