"""The one place where optional dependencies are imported, each behind a function.

Nothing here runs at ``import compressm_mamba``: every import happens on first call, so the package
imports with torch alone and never initialises CUDA.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types


# mamba_ssm's compiled selective scan.  On a machine without it (any CPU machine) mamba_ssm only
# imports with an empty stand-in registered under this name.
_SCAN_EXTENSION = "selective_scan_cuda"
# Every mamba_ssm module imported through a stand-in, kept here and out of sys.modules (see below).
_stubbed_modules: dict = {}


def _is_mamba_ssm_name(name: str) -> bool:
    return name == "mamba_ssm" or name.startswith("mamba_ssm.")


@functools.lru_cache(maxsize=None)
def _mamba_ssm_mode():
    """How mamba_ssm imports here: "real" (its CUDA extension loads), "stub" (CPU: only with a
    stand-in for it), or None (not installed, or a CUDA machine where the extension is missing)."""
    try:
        import torch
    except Exception:
        return None
    if importlib.util.find_spec("mamba_ssm") is None:
        return None
    try:
        importlib.import_module(_SCAN_EXTENSION)
        return "real"
    except ImportError:
        return None if torch.cuda.is_available() else "stub"


def _import_with_stand_in(name: str):
    """Import mamba_ssm module ``name`` with a stand-in ``selective_scan_cuda``, leaving sys.modules
    without the stand-in and without any mamba_ssm module.

    Why: transformers binds mamba_ssm's kernels when a modelling module is first imported, if
    ``import mamba_ssm`` succeeds then (Bamba, Jamba, Zamba2, NemotronH, FalconH1, GraniteMoeHybrid,
    Mamba, Mamba2 all do).  A stand-in left in sys.modules would make every such model imported later
    in the process run mamba_ssm's CUDA/Triton code on CPU tensors and crash.  So the stand-in lives
    only for the duration of this import; the modules imported under it are kept in
    ``_stubbed_modules`` (and put back during later imports, so that a class keeps one identity).
    """
    before = set(sys.modules)
    if _SCAN_EXTENSION not in before:
        sys.modules[_SCAN_EXTENSION] = types.ModuleType(_SCAN_EXTENSION)
    for key, module in _stubbed_modules.items():
        sys.modules.setdefault(key, module)
    try:
        return importlib.import_module(name)
    finally:
        for key in [k for k in sys.modules if k not in before and (_is_mamba_ssm_name(k) or k == _SCAN_EXTENSION)]:
            module = sys.modules.pop(key)
            if key != _SCAN_EXTENSION:
                _stubbed_modules[key] = module


@functools.lru_cache(maxsize=None)
def mamba_ssm_module(name: str = "mamba_ssm"):
    """A mamba_ssm module (e.g. ``"mamba_ssm.modules.mamba_simple"``), or None when it cannot be imported.

    Where mamba_ssm's CUDA extension loads, this is a plain import.  On a CPU machine mamba_ssm's
    import needs the missing ``selective_scan_cuda``; its pure-PyTorch references
    (``selective_scan_ref``, ``ssd_minimal_discrete``) do not.  The module is then imported under a
    temporary stand-in (``_import_with_stand_in``): the references run, the CUDA entry points raise
    AttributeError, and nothing is left in sys.modules that would change how transformers (or any
    other library) behaves afterwards — ``import mamba_ssm`` elsewhere fails as it did before.
    """
    if not _is_mamba_ssm_name(name):
        raise ValueError(f"mamba_ssm_module: {name!r} is not a mamba_ssm module")
    mode = _mamba_ssm_mode()
    try:
        if mode == "real":
            return importlib.import_module(name)
        if mode == "stub":
            return _import_with_stand_in(name)
    except Exception:
        pass
    return None


def mamba_ssm():
    """The ``mamba_ssm`` package, or None (see ``mamba_ssm_module``)."""
    return mamba_ssm_module("mamba_ssm")


@functools.lru_cache(maxsize=None)
def mamba_ssm_selective_scan_ref():
    """mamba_ssm's reference selective scan, or None when mamba_ssm is not importable."""
    module = mamba_ssm_module("mamba_ssm.ops.selective_scan_interface")
    return None if module is None else getattr(module, "selective_scan_ref", None)


@functools.lru_cache(maxsize=None)
def transformers_available() -> bool:
    try:
        importlib.import_module("transformers")
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def mamba_ssm_class(module_name: str, cls_name: str):
    """A class from mamba_ssm (e.g. ``mamba_ssm.modules.mamba_simple``, ``Mamba``), or None."""
    module = mamba_ssm_module(module_name)
    return None if module is None else getattr(module, cls_name, None)


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
