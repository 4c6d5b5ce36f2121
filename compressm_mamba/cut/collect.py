"""Gramian collection during forward passes, whatever path the mixers take.

A forward pre-hook on each mixer sees its input (and padding mask), recomputes the selective
system (delta, A, B, C) under no_grad (``MixerAdapter.ssm_inputs``) and adds the batch's token
sums to a running ``GramianStatistics``.  Our drop-in ``CompreSSMMambaMixer`` instead offers a
``gramian_sink``: its forward hands over the delta, B, C it computed anyway (no recompute).
Memory is O(layers · channels · N²) whatever the number of batches.  Single-token decoding steps
(generation with a cache) are not collected.  Padding never enters the Gramians: the mixer's
``attention_mask`` reaches the estimator as its token mask (padding tokens neither excite nor decay
the state, and are not counted), so a left-padded batch gives the Gramians of its unpadded sequences.

Under data parallelism, ``all_reduce()`` sums the statistics over the ranks before ranks are chosen
(METHOD.md §7); ``state_tensors()`` / ``load_state_tensors()`` carry a partial window through a
checkpoint.
"""

from __future__ import annotations

import torch

from ..ops.gramians import gramian_sums
from ..reference.ghost import ghost_sums
from ..reference.gramians import GramianStatistics, gramians_from_statistics

__all__ = ["GramianCollector"]


class GramianCollector:
    """Accumulate Gramian statistics for a list of mixer adapters.

    Use as a context manager or with ``start()`` / ``stop()``; hooks are removed on stop.  Sums are
    kept in float64; each batch is computed in float32 (float64 for float64 models).

    Args:
        adapters: from ``mixers.find_mixers(model)``.
        estimator: ``"mean_lti"`` | ``"frozen"`` | ``"ltv"``.
        ghost: also sum GHOST's state score (``reference.ghost``; importance="ghost"), which needs the
            layer's scan input: every mixer is then hooked and its system recomputed (no sink).
    """

    def __init__(self, adapters: list, estimator: str = "ltv", backend: str = "auto", ghost: bool = False):
        self.adapters = adapters
        self.estimator = estimator
        self.backend = backend
        self.ghost = ghost
        self.stats: dict = {}  # layer name -> GramianStatistics
        self.ghost_stats: dict = {}  # layer name -> (channels, N) float64 GHOST sums (ghost=True)
        self.batches = 0
        self._handles = []

    def start(self) -> "GramianCollector":
        if self._handles:
            return self
        for adapter in self.adapters:
            if hasattr(adapter.module, "gramian_sink") and not self.ghost:
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
        self.ghost_stats = {}
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
        _check_mixer_input(adapter, hidden_states, attention_mask)
        if self.ghost:
            delta, A, B, C, x = adapter.ssm_inputs(hidden_states, attention_mask, with_x=True)
            mask = None if attention_mask is None else attention_mask.bool()
            score = ghost_sums(delta, A, B, C, x, mask=mask).double()
            previous = self.ghost_stats.get(adapter.name)
            self.ghost_stats[adapter.name] = score if previous is None else previous + score
        else:
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

    def all_reduce(self) -> "GramianCollector":
        """Replace this rank's statistics by their sums over all ranks (a collective; no-op in one process)."""
        from ..training.distributed import all_reduce_statistics, is_distributed

        if self.ghost and is_distributed():
            raise NotImplementedError("importance='ghost' is not supported under data parallelism yet: its "
                                      "per-state sums are not all-reduced; use 'balanced' or 'diagonal'")
        self.stats = all_reduce_statistics(self.stats, self.adapters, self.estimator)
        return self

    def state_tensors(self, stats: dict | None = None) -> tuple:
        """(tensors, metadata) describing ``stats`` (default: this collector's), for a safetensors file."""
        stats = self.stats if stats is None else stats
        tensors, metadata = {}, {"estimator": self.estimator, "batches": str(self.batches)}
        for name, s in stats.items():
            metadata[f"count/{name}"] = str(int(s.count))
            for key, value in s.sums.items():
                tensors[f"stats/{name}/{key}"] = value.detach().to(torch.float64).cpu().contiguous()
        if stats is self.stats:
            for name, value in self.ghost_stats.items():
                tensors[f"ghost/{name}"] = value.detach().to(torch.float64).cpu().contiguous()
        return tensors, metadata

    def load_state_tensors(self, tensors: dict, metadata: dict) -> None:
        """Restore statistics written by ``state_tensors`` (shapes are checked against the layers)."""
        if metadata.get("estimator") != self.estimator:
            raise ValueError(f"saved statistics are {metadata.get('estimator')!r}, this collector is {self.estimator!r}")
        stats = {}
        for adapter in self.adapters:
            count = metadata.get(f"count/{adapter.name}")
            if count is None:
                continue
            prefix = f"stats/{adapter.name}/"
            sums = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            for key, value in sums.items():
                if value.shape[0] != adapter.channels or value.shape[1] != adapter.state_size:
                    raise ValueError(f"{adapter.name}: saved statistic {key!r} is {tuple(value.shape)}, the layer has "
                                     f"{adapter.channels} channels of N={adapter.state_size}")
            stats[adapter.name] = GramianStatistics(self.estimator, int(count), sums)
        self.stats = stats
        self.ghost_stats = {k[len("ghost/"):]: v for k, v in tensors.items() if k.startswith("ghost/")}
        self.batches = int(metadata.get("batches", 0))

    def gramians(self) -> dict:
        """{layer name: (P, Q)}, each (channels, N, N) float64.  Raises if a layer saw no tokens."""
        missing = [a.name for a in self.adapters if a.name not in self.stats]
        if missing:
            raise ValueError(
                f"no calibration tokens reached {', '.join(missing)}: the calibration data was empty "
                "or did not run through the model"
            )
        return {name: gramians_from_statistics(s) for name, s in self.stats.items()}

    def ghost_scores(self) -> dict:
        """{layer name: (channels, N) float64 GHOST sums}.  Raises if not collected or a layer saw no tokens."""
        if not self.ghost:
            raise ValueError("GHOST sums were not collected: build the collector with ghost=True")
        missing = [a.name for a in self.adapters if a.name not in self.ghost_stats]
        if missing:
            raise ValueError(f"no calibration tokens reached {', '.join(missing)} (GHOST sums)")
        return dict(self.ghost_stats)


def _check_mixer_input(adapter, hidden_states, attention_mask) -> None:
    """A clear error naming the layer for a mixer input the recomputation cannot use."""
    if not torch.is_tensor(hidden_states) or hidden_states.dim() != 3 or not hidden_states.is_floating_point():
        raise ValueError(f"{adapter.name}: mixer input must be a floating-point (batch, L, hidden) tensor, got "
                         f"{getattr(hidden_states, 'dtype', type(hidden_states).__name__)} "
                         f"{tuple(getattr(hidden_states, 'shape', ()))}")
    in_proj = getattr(adapter.module, "in_proj", None)
    width = getattr(in_proj, "in_features", None)
    if width is not None and hidden_states.shape[-1] != width:
        raise ValueError(f"{adapter.name}: mixer input has {hidden_states.shape[-1]} features, the layer takes {width}")
    if attention_mask is not None:
        if not torch.is_tensor(attention_mask) or tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
            raise ValueError(f"{adapter.name}: attention_mask must be (batch, L) = {tuple(hidden_states.shape[:2])}, "
                             f"got {tuple(getattr(attention_mask, 'shape', ()))}")
        if attention_mask.device != hidden_states.device:
            raise ValueError(f"{adapter.name}: attention_mask is on {attention_mask.device} but the mixer input is on "
                             f"{hidden_states.device}")


class _SinkHandle:
    """Removes a collector's sink from a drop-in mixer (the counterpart of a hook handle)."""

    def __init__(self, module):
        self.module = module

    def remove(self):
        self.module.gramian_sink = None


def _is_decoding(kwargs) -> bool:
    """A single-token forward with a cache is a generation step, not calibration data."""
    return kwargs.get("cache_params") is not None or kwargs.get("inference_params") is not None
