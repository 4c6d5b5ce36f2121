"""Every use of transformers' internals, in one place.

transformers changes its private interfaces between minor releases (cache accessors, mixer
attributes, the flags that say whether mamba_ssm's kernels are bound). The rest of the package
calls the functions here, never those internals directly, so a new transformers release is one
file to read. The tested range is declared in pyproject.toml and exercised in CI at both ends.

Sections: versions; caches (prefill/decode state of Mamba/Mamba2 mixers); mixer attributes and
kernel-availability flags.

Nothing here imports transformers at module import: every function imports on first call.
"""

from __future__ import annotations

import functools
import importlib
import re
import warnings

# Lower and upper transformers versions the test suite runs against (CI runs both).
TRANSFORMERS_TESTED = ("5.17.0", "5.23.0")

# --- versions ---------------------------------------------------------------------------------

# torch is tested, not required (pyproject keeps it out of pip's resolution: an unpinned torch pulls
# ~3.5 GB of CUDA wheels).  CI: the CPU build 2.13.0 in both venvs.  The GPU stack (torch 2.11 with
# triton 3.6, shared/GPU.md) is tested only when bench/gpu_check.sh runs on a GPU machine.
TORCH_TESTED = {"cpu": "2.13.0", "cuda": "2.11.0"}


def _release(version: str) -> tuple:
    """(major, minor, micro) of a version string; pre-release and local tags ignored."""
    numbers = [int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))


@functools.lru_cache(maxsize=None)
def transformers_version() -> str | None:
    """The installed transformers version, or None without transformers."""
    try:
        return importlib.import_module("transformers").__version__
    except Exception:
        return None


def transformers_tested(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) lies inside ``TRANSFORMERS_TESTED``."""
    version = transformers_version() if version is None else version
    if version is None:
        return False
    low, high = TRANSFORMERS_TESTED
    return _release(low) <= _release(version) <= _release(high)


@functools.lru_cache(maxsize=None)
def warn_if_untested() -> bool:
    """Warn once when the installed transformers is outside the tested range; returns whether it is inside."""
    version = transformers_version()
    if version is None or transformers_tested(version):
        return version is not None
    low, high = TRANSFORMERS_TESTED
    warnings.warn(
        f"compressm_mamba is tested with transformers {low} .. {high}; this is {version}. "
        "Its internals that compressm_mamba uses are in compressm_mamba/compat.py: check them first if "
        "something breaks.",
        stacklevel=2,
    )
    return False


# --- caches -----------------------------------------------------------------------------------
# transformers 5.x keeps a Mamba/Mamba2 layer's decode state in a DynamicCache whose layer is a
# LinearAttentionLayer: ``conv_states[i]`` (batch, channels, conv_kernel) and ``recurrent_states[i]``
# (the SSM state), valid once ``has_previous_state[i]`` is set by the first ``update_conv_state``.
# 5.23 reads them through ``Cache.get_conv_state`` / ``get_recurrent_state`` / ``is_recording_past``;
# 5.17 has none of the three and is read through ``has_previous_state`` and the layer's attributes.
# The functions below pick the API by what the cache object has, not by the version string, so a
# cache of either release (or a subclass) works.  Writes (``update_conv_state``,
# ``update_recurrent_state``) have the same signature in both.


def cache_states(cache, layer_idx: int, state_idx: int = 0):
    """(conv_state, recurrent_state) of layer ``layer_idx`` once it holds a previous state, else (None, None).

    The tensors are the cache's own (updating them in place updates the cache).  conv_state:
    (batch, channels, conv_kernel); recurrent_state: (batch, ...) the SSM state as last stored.
    """
    if hasattr(cache, "get_conv_state"):  # 5.23
        return (cache.get_conv_state(layer_idx, state_idx=state_idx),
                cache.get_recurrent_state(layer_idx, state_idx=state_idx))
    if not cache.has_previous_state(layer_idx, state_idx):  # 5.17
        return None, None
    layer = cache.layers[layer_idx]
    return layer.conv_states[state_idx], layer.recurrent_states[state_idx]


def cache_is_recording_past(cache, layer_idx: int) -> bool:
    """Whether the layer keeps its full conv history (assisted decoding; a later ``crop`` rolls it back).

    While it records, a one-token forward must go through ``update_conv_state`` (which appends)
    instead of the in-place one-token conv step.
    """
    if hasattr(cache, "is_recording_past"):  # 5.23
        return bool(cache.is_recording_past(layer_idx))
    if layer_idx >= len(cache.layers):  # 5.17: layers are made on first use
        return False
    return bool(getattr(cache.layers[layer_idx], "record_past", False))


def cache_update_conv_state(cache, conv_input, layer_idx: int, conv_kernel_size: int, state_idx: int = 0):
    """Store a multi-token conv input (batch, channels, L); returns the conv's full input.

    The return value is the input left-padded with zeros to ``conv_kernel_size`` on a first call
    (prefill), or the cached window concatenated with it afterwards, so a causal conv over it and
    keeping the last L outputs gives this chunk's conv output with the right left context.
    """
    return cache.update_conv_state(conv_input, layer_idx, state_idx=state_idx, conv_kernel_size=conv_kernel_size)


def cache_update_recurrent_state(cache, state, layer_idx: int, state_idx: int = 0):
    """Store the SSM state after a prefill (copied into the cache's tensor, allocated on first use)."""
    return cache.update_recurrent_state(state, layer_idx, state_idx=state_idx)


# --- mixer attributes and kernel-availability flags -------------------------------------------

# Where transformers defines each mixer class we subclass or cut.
HF_MIXER_MODULES = {
    "MambaMixer": "transformers.models.mamba.modeling_mamba",
    "Mamba2Mixer": "transformers.models.mamba2.modeling_mamba2",
}

# Attribute names on transformers' mixers that the adapters and drop-in mixers read or rewrite.
HF_MAMBA1_ATTRS = {"state": "ssm_state_size", "dt_rank": "time_step_rank"}
HF_MAMBA2_ATTRS = {
    "state": "ssm_state_size",
    "groups": "n_groups",
    "heads": "num_heads",
    "ssm_dim": "intermediate_size",
    "dt_limit": "time_step_limit",
    "conv_dim": "conv_dim",  # kept equal to the conv channel count after a cut
}

# The functions of transformers' Mamba2 modelling module that the balanced mixer calls; each is
# either mamba_ssm's / causal_conv1d's kernel or transformers' torch fallback, chosen at import.
HF_MAMBA2_FUNCTIONS = (
    "apply_mask_to_padding_states",
    "causal_conv1d_update",
    "causal_conv1d_fn",
    "mamba2_selective_state_update",
    "mamba2_chunk_scan",
)


@functools.lru_cache(maxsize=None)
def hf_mixer_classes() -> dict:
    """transformers' Mamba mixer classes by name ({} without transformers)."""
    found = {}
    for cls_name, module_name in HF_MIXER_MODULES.items():
        try:
            found[cls_name] = getattr(importlib.import_module(module_name), cls_name)
        except Exception:
            pass
    if found:
        warn_if_untested()
    return found


@functools.lru_cache(maxsize=None)
def hf_modeling_module(family: str):
    """``transformers.models.<family>.modeling_<family>`` (e.g. ``"mamba2"``), checked to hold what we call.

    Raises ImportError naming the missing names when this transformers lacks them.
    """
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if family == "mamba2":
        missing = [name for name in HF_MAMBA2_FUNCTIONS if not hasattr(module, name)]
        if missing:
            raise ImportError(f"transformers {transformers_version()} modeling_mamba2 lacks {missing}; "
                              f"compressm_mamba is tested with {TRANSFORMERS_TESTED}")
    warn_if_untested()
    return module


def bound_kernel(function) -> str:
    """What a transformers kernel wrapper runs: ``"torch"`` (its own fallback) or the module of the
    bound kernel (e.g. ``"mamba_ssm.ops.triton.ssd_combined"``).

    transformers (5.x) chooses at a modelling module's first import, in a closure
    (``use_kernel_func_from_hub_with_fallback``): the original package's function if it imports,
    else the torch function.  ``"unknown"`` when ``function`` is not such a wrapper.
    """
    code, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None) or ()
    if code is None or "implementation" not in code.co_freevars:
        return "unknown"
    implementation = cells[code.co_freevars.index("implementation")].cell_contents
    if implementation is getattr(function, "__wrapped__", None):
        return "torch"
    return getattr(implementation, "__module__", None) or "unknown"


def hf_bound_kernels(family: str) -> dict:
    """{function name: what it runs (see ``bound_kernel``)} for the kernel wrappers of a transformers
    modelling module (``family`` as in ``hf_modeling_module``, e.g. ``"bamba"``).

    On a machine without CUDA every entry must be ``"torch"``: anything else means mamba_ssm (or
    causal_conv1d) looked importable when transformers imported the module, and its forward will
    crash on CPU tensors.
    """
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    found = {}
    for name, value in vars(module).items():
        if callable(value) and "implementation" in getattr(getattr(value, "__code__", None), "co_freevars", ()):
            found[name] = bound_kernel(value)
    return found


def hub_kernels_available() -> bool:
    """Whether transformers finds Hugging Face's ``kernels`` package (the hub kernels)."""
    from transformers.utils.import_utils import is_kernels_available

    return bool(is_kernels_available())

# --- checkpoint key names (the families work) ---------------------------------------------------


def saved_key(model, key: str) -> str:
    """The name ``model.save_pretrained`` writes the tensor ``key`` (a ``state_dict`` name) under.

    Some families rename on save (Nemotron-H writes ``model.*`` as ``backbone.*``); transformers
    keeps those renamings in ``core_model_loading`` (5.x).  Older releases renamed nothing.
    """
    try:
        import torch
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return key
    (saved,) = revert_weight_conversion(model, {key: torch.zeros(1)}).keys()
    return saved


def hf_class_path(family: str, cls_name: str) -> str:
    """The dotted name of transformers' class ``cls_name`` in the ``family`` modelling module
    (``transformers.models.<family>.modeling_<family>``), as ``models/<family>.py`` matches mixers."""
    return f"transformers.models.{family}.modeling_{family}.{cls_name}"
