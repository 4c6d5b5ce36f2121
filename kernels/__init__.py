"""Triton kernels of compressm_mamba, installed as ``compressm_mamba.kernels``.

Mechanism only: launchers and ``@triton.jit`` kernels.  Shape checks, dtype policy and backend
choice live in ``compressm_mamba.ops``.  Importing this package never imports triton; each kernel
module does that itself, so ``import compressm_mamba`` stays free of optional dependencies.
"""

import sys as _sys


def _imported_by_transformers() -> bool:
    frame = _sys._getframe(1)
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith("transformers."):
            return True
        frame = frame.f_back
    return False


if __name__ == "kernels":
    # This folder sits at the repository root.  With the root on sys.path (``python -m`` or ``-c`` run
    # there) it would pass for Hugging Face's kernel-hub package ``kernels``.  transformers probes that
    # name by importing it; to that probe we present ourselves as what it calls a namespace shadow
    # (no ``__file__``), which it counts as "not installed".  Anyone else gets an ImportError.
    if _imported_by_transformers():
        __file__ = None
    else:
        raise ImportError(
            "compressm_mamba's Triton kernels must be imported as `compressm_mamba.kernels`, not as a "
            "top-level `kernels` (that name belongs to Hugging Face's kernel-hub package). "
            "Run from outside the repository root or install the package with `pip install -e .`."
        )
