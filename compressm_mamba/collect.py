"""Gramian collection during forward passes, whatever path the mixers take.

A forward pre-hook on each mixer sees its input (and padding mask), recomputes the selective
system (delta, A, B, C) under no_grad (``MixerAdapter.ssm_inputs``) and adds the batch's token
sums to a running ``GramianStatistics``.  Our drop-in ``CompreSSMMambaMixer`` instead offers a
``gramian_sink``: its forward hands over the delta, B, C it computed anyway (no recompute).
Memory is O(layers · channels · N²) whatever the number of batches.  Single-token decoding steps
(generation with a cache) are not collected.
"""

from __future__ import annotations

import torch

from .ops.gramians import gramian_sums
from .reference.gramians import GramianStatistics, gramians_from_statistics

__all__ = ["GramianCollector"]


class GramianCollector:
    """Accumulate Gramian statistics for a list of mixer adapters.

    Use as a context manager or with ``start()`` / ``stop()``; hooks are removed on stop.  Sums are
    kept in float64; each batch is computed in float32 (float64 for float64 models).

    Args:
        adapters: from ``mixers.find_mixers(model)``.
        estimator: ``"mean_lti"`` | ``"frozen"`` | ``"ltv"``.
    """

    def __init__(self, adapters: list, estimator: str = "ltv", backend: str = "auto"):
        self.adapters = adapters
        self.estimator = estimator
        self.backend = backend
        self.stats: dict = {}  # layer name -> GramianStatistics
        self.batches = 0
        self._handles = []

    def start(self) -> "GramianCollector":
        if self._handles:
            return self
        for adapter in self.adapters:
            if hasattr(adapter.module, "gramian_sink"):
                adapter.module.gramian_sink = self._make_sink(adapter)
                self._handles.append(_SinkHandle(adapter.module))
            else:
                self._handles.append(
                    adapter.module.register_forward_pre_hook(self._make_hook(adapter), with_kwargs=True)
                )
        return self

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        self.stats = {}
        self.batches = 0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _make_hook(self, adapter):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is None or hidden.dim() != 3 or (hidden.shape[1] <= 1 and _is_decoding(kwargs)):
                return None
            self.add(adapter, hidden, kwargs.get("attention_mask"))
            return None

        return hook

    def _make_sink(self, adapter):
        def sink(delta, A, B, C, attention_mask):
            self.add_system(adapter, delta, A, B, C, attention_mask)

        return sink

    @torch.no_grad()
    def add(self, adapter, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Add one batch of ``adapter``'s mixer input (batch, L, hidden) to its statistics."""
        delta, A, B, C = adapter.ssm_inputs(hidden_states, attention_mask)
        self.add_system(adapter, delta, A, B, C, attention_mask)

    @torch.no_grad()
    def add_system(self, adapter, delta, A, B, C, attention_mask=None) -> None:
        """Add one batch of a layer's selective system: delta (batch, channels, L) after bias and
        softplus, A (channels, N), B, C (batch, ngroups, N, L)."""
        mask = None if attention_mask is None else attention_mask.bool()
        sums = gramian_sums(delta, A, B, C, estimator=self.estimator, mask=mask, backend=self.backend)
        batch_stats = GramianStatistics(sums.estimator, sums.count, {k: v.double() for k, v in sums.sums.items()})
        previous = self.stats.get(adapter.name)
        self.stats[adapter.name] = batch_stats if previous is None else previous + batch_stats
        if adapter is self.adapters[0]:
            self.batches += 1

    def gramians(self) -> dict:
        """{layer name: (P, Q)}, each (channels, N, N) float64.  Raises if a layer saw no tokens."""
        missing = [a.name for a in self.adapters if a.name not in self.stats]
        if missing:
            raise ValueError(
                f"no calibration tokens reached {', '.join(missing)}: the calibration data was empty "
                "or did not run through the model"
            )
        return {name: gramians_from_statistics(s) for name, s in self.stats.items()}


class _SinkHandle:
    """Removes a collector's sink from a drop-in mixer (the counterpart of a hook handle)."""

    def __init__(self, module):
        self.module = module

    def remove(self):
        self.module.gramian_sink = None


def _is_decoding(kwargs) -> bool:
    """A single-token forward with a cache is a generation step, not calibration data."""
    return kwargs.get("cache_params") is not None or kwargs.get("inference_params") is not None
