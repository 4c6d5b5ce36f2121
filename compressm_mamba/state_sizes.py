"""Per-layer state sizes: recorded in the model's config, and used to load cut checkpoints.

After a cut, ``config.compressm = {"state_sizes": {layer name: N}}``.  When every layer has the same
N, ``config.state_size = N`` too, and the checkpoint is a plain one that vanilla transformers loads.
With different N per layer, ``config.state_size`` is the largest, and ``from_pretrained`` here builds
the model at that size, cuts each layer down to its recorded N, then loads the weights.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from .mixers import find_mixers
from .surgery import apply_cuts

__all__ = ["record_state_sizes", "recorded_state_sizes", "resize_to_", "from_pretrained", "load_safetensors_dir"]


def record_state_sizes(model: nn.Module, adapters: list) -> dict:
    """Write the adapters' current state sizes into ``model.config`` (when the model has one)."""
    sizes = {a.name: a.state_size for a in adapters}
    config = getattr(model, "config", None)
    if config is None:
        model._compressm_state_sizes = sizes
        return sizes
    config.compressm = {"state_sizes": sizes}
    if hasattr(config, "state_size"):
        config.state_size = max(sizes.values())
    return sizes


def recorded_state_sizes(config) -> dict | None:
    record = getattr(config, "compressm", None)
    if not isinstance(record, dict) or "state_sizes" not in record:
        return None
    return {str(k): int(v) for k, v in record["state_sizes"].items()}


def resize_to_(model: nn.Module, sizes: dict) -> None:
    """Cut each named mixer to its first ``sizes[name]`` states per group (placeholders before loading)."""
    adapters = {a.name: a for a in find_mixers(model)}
    unknown = sorted(set(sizes) - set(adapters))
    if unknown:
        raise ValueError(f"state sizes name layers the model does not have: {unknown}")
    plans = []
    for name, r in sizes.items():
        a = adapters[name]
        if not 1 <= r <= a.state_size:
            raise ValueError(f"{name}: recorded state size {r} is not in [1, {a.state_size}]")
        if r < a.state_size:
            plans.append(a.plan_select(torch.arange(r).expand(a.ngroups, r).clone()))
    apply_cuts(plans)
    record_state_sizes(model, list(adapters.values()))


def load_safetensors_dir(path: str) -> dict:
    """All tensors of a (possibly sharded) safetensors checkpoint directory.  Never unpickles."""
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors (or index) found; only safetensors checkpoints load")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


def from_pretrained(path: str, *, model_class=None, torch_dtype=None):
    """Load a Hugging Face Mamba / Mamba2 checkpoint, whatever its per-layer state sizes.

    Args:
        path: a local checkpoint directory (config.json + safetensors).
        model_class: the transformers class to build (default: ``AutoModelForCausalLM``).
        torch_dtype: optional dtype to cast the model to.

    Uniform checkpoints go through transformers' own ``from_pretrained``; per-layer ones are built
    from the config, cut to the recorded sizes and loaded strictly (tied weights excepted).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a checkpoint directory")
    model_class = model_class or AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    sizes = recorded_state_sizes(config)
    if not sizes or len(set(sizes.values())) == 1:
        kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
        return model_class.from_pretrained(path, **kwargs)

    model = model_class.from_config(config)
    resize_to_(model, sizes)
    state = load_safetensors_dir(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: checkpoint holds tensors the model does not: {unexpected[:5]}")
    loaded_ptrs = {p.data_ptr() for n, p in model.named_parameters() if n in state}
    params = dict(model.named_parameters(remove_duplicate=False))
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise ValueError(f"{path}: checkpoint lacks {untied[:5]}")
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval()
