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

from ..models.registry import find_mixers
from ..compat import saved_key
from .surgery import apply_cuts

_PEFT_PREFIX = "base_model.model."  # where peft's PeftModel puts the wrapped model's modules

__all__ = [
    "record_state_sizes",
    "recorded_state_sizes",
    "resize_to_",
    "from_pretrained",
    "load_safetensors_dir",
    "state_sizes_in_state_dict",
    "resize_for_state_dict_",
    "resize_to_checkpoint_",
    "resize_on_load",
]


def record_state_sizes(model: nn.Module, adapters: list) -> dict:
    """Write the current state sizes of every SSM layer of ``model`` into ``model.config`` (when the
    model has one); ``adapters`` is used when the model itself cannot be searched (a bare module).

    Balanced-truncated Mamba2 layers also record the size of the B and C their in_proj computes
    (``balanced``: {layer name: N}).  The config's own state-size field (``state_size``,
    ``mamba_d_state``, ``ssm_state_size``, mamba_ssm's ``ssm_cfg["d_state"]``: the family adapter's
    ``config_state_key``) becomes the largest size any layer is built with, so that a uniform cut is
    a plain checkpoint of the family.  ``loader: "compressm"`` marks checkpoints that only
    ``from_pretrained`` here can build (per-layer sizes, balanced maps, normalise-then-select).
    """
    try:
        adapters = find_mixers(model)
    except TypeError:
        pass
    # a peft-wrapped model records its base model's names, which merge_and_unload() keeps
    strip = len(_PEFT_PREFIX) if hasattr(model, "get_base_model") else 0
    sizes = {a.name[strip:] if a.name.startswith(_PEFT_PREFIX) else a.name: a.state_size for a in adapters}
    balanced = {a.name[strip:] if a.name.startswith(_PEFT_PREFIX) else a.name: a.full_state_size
                for a in adapters if a.balanced}
    config = getattr(model, "config", None)
    if config is None:
        model._compressm_state_sizes = sizes
        return sizes
    config.compressm = {"state_sizes": sizes}
    if balanced:
        config.compressm["balanced"] = balanced
        from ..models.balanced_mamba2 import mark_config_

        mark_config_(config)  # plain transformers must refuse it (it would ignore the balancing maps)
    if balanced or len(set(sizes.values())) > 1 or any(a.needs_compressm_loader and a.state_size < a.full_state_size
                                                       for a in adapters):
        config.compressm["loader"] = "compressm"
    largest = max(a.full_state_size for a in adapters)
    keys = {a.config_state_key for a in adapters if a.config_state_key}
    for key in keys:
        if hasattr(config, key):  # transformers
            setattr(config, key, largest)
    if not keys and isinstance(getattr(config, "ssm_cfg", None), dict):  # mamba_ssm's MambaConfig
        config.ssm_cfg["d_state"] = largest
    return sizes


def recorded_state_sizes(config) -> tuple:
    """(state sizes, balanced full sizes) recorded in a config: ({name: N}, {name: N_full}); (None, {})."""
    record = getattr(config, "compressm", None)
    if not isinstance(record, dict) or "state_sizes" not in record:
        return None, {}
    sizes = {str(k): int(v) for k, v in record["state_sizes"].items()}
    balanced = {str(k): int(v) for k, v in record.get("balanced", {}).items()}
    return sizes, balanced


def resize_to_(model: nn.Module, sizes: dict, balanced: dict | None = None) -> None:
    """Bring each named mixer to its recorded size, with placeholder weights (before loading).

    sizes: {layer name: N}; balanced: {layer name: N_full} for balanced-truncated Mamba2 layers,
    which get (zero) maps of shape (ngroups, N, N_full).
    """
    adapters = {a.name: a for a in find_mixers(model)}
    sizes = {_local_name(n, adapters): r for n, r in sizes.items()}
    balanced = {_local_name(n, adapters): r for n, r in (balanced or {}).items()}
    unknown = sorted((set(sizes) | set(balanced)) - set(adapters))
    if unknown:
        raise ValueError(f"state sizes name layers the model does not have: {unknown}")

    for name in sorted(set(sizes) | set(balanced)):  # check every layer before changing any
        a = adapters[name]
        for r in {sizes.get(name, a.state_size), balanced.get(name, a.state_size)}:
            if not (isinstance(r, int) and 1 <= r <= a.state_size):
                raise ValueError(f"{a.name}: recorded state size {r} is not in [1, {a.state_size}]")

    def first_states(a, r):
        return a.plan_select(torch.arange(r).expand(a.ngroups, r).clone())

    # First every layer's B/C to its built size, then the balanced layers' maps on top.
    apply_cuts([first_states(adapters[n], balanced.get(n, r)) for n, r in sizes.items()
                if balanced.get(n, r) < adapters[n].state_size])
    maps = []
    for name, full in balanced.items():
        a, r = adapters[name], sizes[name]
        zeros = torch.zeros(a.ngroups, r, full, dtype=torch.float64)
        maps.append(a.plan_maps(zeros, zeros.clone()))
    apply_cuts(maps)
    record_state_sizes(model, list(adapters.values()))


def _local_name(name: str, adapters: dict) -> str:
    """``name`` as the model names it: a layer recorded under a peft wrapper (``base_model.model.…``)
    is the same layer of the unwrapped model, and the other way round."""
    if name in adapters:
        return name
    if name.startswith(_PEFT_PREFIX) and name[len(_PEFT_PREFIX):] in adapters:
        return name[len(_PEFT_PREFIX):]
    if _PEFT_PREFIX + name in adapters:
        return _PEFT_PREFIX + name
    return name


def state_sizes_in_state_dict(model: nn.Module, state_dict: dict, prefix: str = "") -> tuple:
    """(sizes, balanced) that ``state_dict``'s tensor shapes imply for ``model``'s mixers.

    Mamba1: ``A_log`` is (channels, N).  Mamba2: a balanced layer stores ``B_map`` (G, r, N_full);
    otherwise conv1d runs over [x (I) | B (G·N) | C (G·N)] channels.  Layers whose tensors are not in
    ``state_dict`` are left out.
    """
    sizes, balanced = {}, {}
    for a in find_mixers(model):
        key = f"{prefix}{a.name}." if a.name else prefix
        if a.kind == "mamba1":
            A_log = state_dict.get(key + "A_log")
            if A_log is not None and A_log.dim() >= 2:
                sizes[a.name] = int(A_log.shape[-1])
            continue
        B_map = state_dict.get(key + "B_map")
        if B_map is not None and B_map.dim() == 3:
            sizes[a.name], balanced[a.name] = int(B_map.shape[1]), int(B_map.shape[2])
            continue
        conv = state_dict.get(key + "conv1d.weight")
        if conv is None:
            continue
        I, G = int(getattr(a.module, a._ssm_dim)), a.ngroups
        rows = int(conv.shape[0]) - I
        if rows <= 0 or rows % (2 * G):
            raise ValueError(f"{a.name}: conv1d.weight has {int(conv.shape[0])} channels, not {I} + 2·{G}·N")
        sizes[a.name] = rows // (2 * G)
    return sizes, balanced


def _current_sizes(adapters) -> tuple:
    sizes = {a.name: a.state_size for a in adapters}
    balanced = {a.name: a.full_state_size for a in adapters if getattr(a, "balanced", False)}
    return sizes, balanced


def resize_for_state_dict_(model: nn.Module, state_dict: dict, prefix: str = "") -> bool:
    """Cut ``model``'s mixers down to the state sizes ``state_dict`` holds (before loading it); True if changed.

    Nothing happens when the sizes already agree; a state dict with *larger* layers than the model is
    left for ``load_state_dict`` to report (a cut cannot be undone by loading).
    """
    sizes, balanced = state_sizes_in_state_dict(model, state_dict, prefix)
    adapters = find_mixers(model)
    now, now_balanced = _current_sizes(adapters)
    if all(now[n] == r for n, r in sizes.items()) and all(now_balanced.get(n) == f for n, f in balanced.items()):
        return False
    if any(r > now[n] for n, r in sizes.items()) or any(f > now[n] for n, f in balanced.items()):
        return False
    resize_to_(model, sizes, balanced)
    return True


def resize_to_checkpoint_(model: nn.Module, path: str) -> dict:
    """Bring ``model`` to the per-layer state sizes recorded in the checkpoint ``path`` (its config.json's
    ``compressm.state_sizes``), before its weights and optimizer state are loaded.

    The one call to make before ``trainer.train(resume_from_checkpoint=path)`` when the model was
    built at full size and ``CompreSSMCallback`` did not see the Trainer being built (it installs
    ``resize_on_load`` then, which does this by itself).  Returns the sizes ({} when the checkpoint
    records none).  Raises ValueError naming the layer if a recorded size exceeds the model's.
    """
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path}: no config.json; is it a checkpoint directory?")
    with open(config_file) as f:
        record = json.load(f).get("compressm")
    sizes, balanced = recorded_state_sizes(type("Recorded", (), {"compressm": record})())
    if not sizes:
        return {}
    adapters = find_mixers(model)
    now, now_balanced = _current_sizes(adapters)
    if sizes == now and balanced == now_balanced:
        return sizes
    resize_to_(model, sizes, balanced)
    return sizes


def resize_on_load(model: nn.Module):
    """Make ``model.load_state_dict`` cut the mixers to the incoming state dict's sizes first.

    What lets ``Trainer.train(resume_from_checkpoint=...)`` load a checkpoint saved after a cut into a
    model built at full size: the Trainer loads the weights with ``load_state_dict`` before it
    builds the optimizer, so weights and optimizer state then fit.  Returns the hook handle.
    """
    def hook(module, state_dict, prefix, *args):
        resize_for_state_dict_(module, state_dict, prefix)

    return model.register_load_state_dict_pre_hook(hook)


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
    """Load a Hugging Face checkpoint of any supported family, whatever its per-layer state sizes.

    Args:
        path: a local checkpoint directory (config.json + safetensors).
        model_class: the transformers class to build (default: ``AutoModelForCausalLM``).
        torch_dtype: optional dtype to cast the model to.

    Uniform plain checkpoints go through transformers' own ``from_pretrained``.  The others (per-layer
    sizes, balanced maps, normalise-then-select) too, with ``ignore_mismatched_sizes``: transformers
    loads every tensor the config describes (with its own checkpoint conversions, e.g. fused MoE
    experts); then the SSM layers are cut to their recorded sizes and their tensors loaded, strictly,
    from the checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
    from transformers import logging as hf_logging

    from ..models.balanced_mamba2 import BALANCED_MODEL_TYPE, unmark_config_dict

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a checkpoint directory")
    model_class = model_class or AutoModelForCausalLM
    raw = PretrainedConfig.get_config_dict(path)[0]
    if raw.get("model_type") == BALANCED_MODEL_TYPE:  # see balanced_mamba2: a config only we can read
        plain = unmark_config_dict(raw)
        config = AutoConfig.for_model(plain.pop("model_type"), **plain)
    else:
        config = AutoConfig.from_pretrained(path)
    sizes, balanced = recorded_state_sizes(config)
    kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    plain = not isinstance(getattr(config, "compressm", None), dict) or config.compressm.get("loader") != "compressm"
    if plain and not balanced and (not sizes or len(set(sizes.values())) == 1):
        return model_class.from_pretrained(path, **kwargs)

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the SSM tensors it reports as mismatched are loaded below
    try:
        model = model_class.from_pretrained(path, config=config, ignore_mismatched_sizes=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    resize_to_(model, sizes, balanced)
    state = load_safetensors_dir(path)
    for a in find_mixers(model):
        wanted = {k: saved_key(model, f"{a.name}.{k}") for k in a.module.state_dict()}
        missing = sorted(v for v in wanted.values() if v not in state)
        if missing:
            raise ValueError(f"{path}: layer {a.name}: the checkpoint lacks {missing[:5]}")
        a.module.load_state_dict({k: state[v] for k, v in wanted.items()}, strict=True)
    return model.eval()
