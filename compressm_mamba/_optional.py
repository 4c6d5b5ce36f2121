"""The one place where optional dependencies are imported, each behind a function.

Nothing here runs at ``import compressm_mamba``: every import happens on first call, so the package
imports with torch alone and never initialises CUDA.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types


@functools.lru_cache(maxsize=None)
def mamba_ssm():
    """Return the ``mamba_ssm`` package, or None when it cannot be imported.

    On a machine without CUDA, mamba_ssm's compiled ``selective_scan_cuda`` is missing and its
    import fails; its pure-PyTorch references (``selective_scan_ref``, ``ssd_minimal_discrete``) do
    not need it.  We then register an empty stand-in module for it so that those references import;
    the CUDA entry points stay unusable (calling them raises AttributeError).

    transformers' Mamba modelling modules decide at their first import whether to bind mamba_ssm's
    CUDA kernels; they are imported first (when transformers is installed) so that the stand-in
    cannot make them pick kernels that do not exist on this machine.
    """
    for hf_module in ("transformers.models.mamba.modeling_mamba", "transformers.models.mamba2.modeling_mamba2"):
        try:
            importlib.import_module(hf_module)
        except Exception:  # transformers absent or too old: nothing to protect
            pass
    try:
        import torch

        if not torch.cuda.is_available() and "selective_scan_cuda" not in sys.modules:
            try:
                importlib.import_module("selective_scan_cuda")
            except ImportError:
                sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
        return importlib.import_module("mamba_ssm")
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def mamba_ssm_selective_scan_ref():
    """mamba_ssm's reference selective scan, or None when mamba_ssm is not importable."""
    if mamba_ssm() is None:
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    except Exception:
        return None
    return selective_scan_ref


@functools.lru_cache(maxsize=None)
def transformers_available() -> bool:
    try:
        importlib.import_module("transformers")
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def hf_mixer_classes() -> dict:
    """Hugging Face's Mamba mixer classes by name ({} without transformers)."""
    found = {}
    for module_name, cls_name in (
        ("transformers.models.mamba.modeling_mamba", "MambaMixer"),
        ("transformers.models.mamba2.modeling_mamba2", "Mamba2Mixer"),
    ):
        try:
            found[cls_name] = getattr(importlib.import_module(module_name), cls_name)
        except Exception:
            pass
    return found


@functools.lru_cache(maxsize=None)
def mamba_ssm_class(module_name: str, cls_name: str):
    """A class from mamba_ssm (e.g. ``mamba_ssm.modules.mamba_simple``, ``Mamba``), or None."""
    if mamba_ssm() is None:
        return None
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def triton():
    """The ``triton`` package, or None.  Without a GPU it only runs under TRITON_INTERPRET=1."""
    try:
        return importlib.import_module("triton")
    except Exception:
        return None


def triton_usable(device) -> bool:
    """Whether Triton kernels can run on tensors on ``device``: a CUDA device, or the interpreter."""
    import os

    if triton() is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        return True
    return getattr(device, "type", str(device)) == "cuda"
