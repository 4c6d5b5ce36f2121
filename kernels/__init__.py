"""Triton kernels of compressm_mamba, installed as ``compressm_mamba.kernels``.

Mechanism only: launchers and ``@triton.jit`` kernels.  Shape checks, dtype policy and backend
choice live in ``compressm_mamba.ops``.  Importing this package never imports triton; each kernel
module does that itself, so ``import compressm_mamba`` stays free of optional dependencies.
"""

if __name__ == "kernels":
    # This folder sits at the repository root; with the root on sys.path it would shadow Hugging
    # Face's kernel-hub package ``kernels``, which transformers probes for.  Refuse loudly.
    raise ImportError(
        "compressm_mamba's Triton kernels must be imported as `compressm_mamba.kernels`, not as a "
        "top-level `kernels` (that name belongs to Hugging Face's kernel-hub package). "
        "Run from outside the repository root or install the package with `pip install -e .`."
    )
