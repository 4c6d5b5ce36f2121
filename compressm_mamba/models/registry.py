"""Which adapter serves which mixer: one module per family in this folder, found by name.

A family module (``mamba.py``, ``jamba.py``, …) defines ``FAMILY`` (transformers' model_type, or
``"mamba_ssm"``), ``MIXERS`` (the dotted class names it serves) and ``adapter_for(name, module)``
(an adapter, or None).  Matching is by exact class (module and name), so nothing is imported to
look for a family: a model's classes are already loaded.  Adding a family is adding one such file
and its test (tests/models/test_<family>.py).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re

import torch.nn as nn

__all__ = ["families", "find_mixers", "supported_types", "layer_filter"]


@functools.lru_cache(maxsize=None)
def families() -> dict:
    """{family name: its module}, for every family module in ``compressm_mamba.models``."""
    from .. import models

    found = {}
    for info in pkgutil.iter_modules(models.__path__):
        module = importlib.import_module(f"{models.__name__}.{info.name}")
        if hasattr(module, "FAMILY") and hasattr(module, "adapter_for"):
            found[module.FAMILY] = module
    return dict(sorted(found.items()))


def supported_types() -> list:
    """Dotted names of every mixer class some family serves."""
    return [path for module in families().values() for path in module.MIXERS]


def adapter_for(name: str, module: nn.Module):
    for family in families().values():
        adapter = family.adapter_for(name, module)
        if adapter is not None:
            return adapter
    return None


def layer_filter(layers) -> "callable":
    """A ``filter_fn(name, module) -> bool`` from ``layers``: None (every layer), a regex, a list of
    regexes (a layer is chosen when one of them ``re.search``-matches its name), or a callable."""
    if layers is None:
        return lambda name, module: True
    if callable(layers):
        return layers
    patterns = [layers] if isinstance(layers, str) else list(layers)
    compiled = [re.compile(p) for p in patterns]
    return lambda name, module: any(p.search(name) for p in compiled)


def find_mixers(model: nn.Module, layers=None) -> list:
    """Adapters for the supported SSM layers of ``model`` (all, or those ``layers`` chooses), in
    module order.

    layers: see ``layer_filter``; a pattern that matches no SSM layer is an error naming it.
    Raises TypeError, listing the supported types, when the model holds no supported mixer.
    """
    adapters = []
    for name, module in model.named_modules():
        adapter = adapter_for(name, module)
        if adapter is not None:
            adapters.append(adapter)
    if not adapters:
        raise TypeError(
            f"{type(model).__name__} holds no supported Mamba mixer. Supported mixers: " + ", ".join(supported_types())
        )
    if layers is None:
        return adapters
    chosen = [a for a in adapters if layer_filter(layers)(a.name, a.module)]
    if not callable(layers):
        patterns = [layers] if isinstance(layers, str) else list(layers)
        for p in patterns:
            if not any(re.search(p, a.name) for a in adapters):
                raise ValueError(f"layers={p!r} matches no SSM layer of {type(model).__name__}; its SSM layers are: "
                                 + ", ".join(a.name for a in adapters))
    if not chosen:
        raise ValueError(f"layers={layers!r} chooses none of the SSM layers of {type(model).__name__}: "
                         + ", ".join(a.name for a in adapters))
    return chosen
