"""Build script for compressm_mamba.

The Python package always installs.  The CUDA extension ``compressm_mamba._C`` is built from
``csrc/`` only when torch has CUDA and nvcc exists; otherwise the build is skipped with a printed
reason.  ``COMPRESSM_MAMBA_SKIP_CUDA_BUILD=1`` never builds it, ``COMPRESSM_MAMBA_FORCE_CUDA_BUILD=1``
builds it even where the checks say no (and fails loudly if it cannot).

torch is imported lazily: a build without torch (e.g. pip's isolated build environment, which
must never resolve an unpinned torch) simply skips the extension.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# How csrc/ is compiled.  Plain literals: tests/ops/test_cuda_compile.py reads them with `ast` (without
# running this file) to compile-check csrc/ with the same flags on machines that cannot build it.
# C++20: the headers of torch >= 2.13 use C++20 features, and torch's own extension builder defaults to it.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"  # A100, H100 / H200; override with TORCH_CUDA_ARCH_LIST
CXX_FLAGS = ["-O3", "-std=c++20"]
# No --use_fast_math: the kernels' exp / log1p / expm1 paths keep full fp32 accuracy (house style 11).
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_sources():
    """All .cu / .cpp files under csrc/, as paths relative to setup.py."""
    found = glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
    found += glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
    return sorted(found)


def _why_not_build_cuda():
    """Return None when the CUDA extension should be built, else the reason it is skipped."""
    if _flag("COMPRESSM_MAMBA_SKIP_CUDA_BUILD"):
        return "COMPRESSM_MAMBA_SKIP_CUDA_BUILD is set"
    if not _cuda_sources():
        return "csrc/ holds no CUDA sources yet"
    try:
        import torch
    except ImportError:
        return "torch is not importable in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc not found on PATH and CUDA_HOME is unset"
    return None


def _ext_modules():
    reason = _why_not_build_cuda()
    if reason is not None and not _flag("COMPRESSM_MAMBA_FORCE_CUDA_BUILD"):
        print(f"compressm_mamba: skipping the CUDA extension: {reason}", file=sys.stderr)
        return [], {}
    if reason is not None:
        print(f"compressm_mamba: FORCE_CUDA_BUILD set, building despite: {reason}", file=sys.stderr)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    ext = CUDAExtension(
        name="compressm_mamba._C",
        sources=_cuda_sources(),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

setup(
    # Every subpackage of compressm_mamba/, plus kernels/ under its installed name.
    packages=find_packages(include=["compressm_mamba", "compressm_mamba.*"]) + ["compressm_mamba.kernels"],
    # Triton kernels live in the top-level kernels/ folder but are only ever installed as
    # compressm_mamba.kernels: a top-level `kernels` is Hugging Face's kernel-hub package.
    package_dir={"compressm_mamba": "compressm_mamba", "compressm_mamba.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
