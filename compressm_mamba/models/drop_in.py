"""The drop-in mixer: ``replace_mixers_(model)`` swaps Mamba1 mixers for ones that run our scan.

``CompreSSMMambaMixer`` IS a transformers ``MambaMixer`` (and ``CompreSSMMamba`` a mamba_ssm
``Mamba``): a subclass swapped in place, with the same parameter objects and state_dict keys, so
checkpoints and optimizers keep working.  Its full-sequence forward calls ``ops.selective_scan`` with
the best backend for its device — the ``torch`` time-major scan on a CPU, the Triton kernels on a
GPU — for whatever state size the layer has *now*: after a cut the next forward runs the kernel
specialised for the new N, with no restart and no re-wrapping.

When a ``GramianCollector`` is active it hands the mixer a sink, and the forward feeds the dt, B, C
it has just computed into the Gramian statistics (no second pass through in_proj, conv and x_proj).
Generation with a cache (prefill and one-token steps) goes through the parent class's code.

Mamba2 is left to transformers' SSD chunked scan (and mamba_ssm's SSD kernels where transformers
finds them): the SSD algorithm, built for a scalar A per head, is the right scan for Mamba2; our
scan kernels are for Mamba1's per-channel diagonal A.  Mamba2 Gramians are collected by hooks.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _optional
from ..ops.selective_scan import BACKENDS, selective_scan

__all__ = ["mixer_class", "mamba_ssm_mixer_class", "replace_mixers_"]


def _masked(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padding positions of (batch, L, features), as the HF mixers do."""
    return x if attention_mask is None else x * attention_mask[:, :, None].to(x.dtype)


class _DropInScan:
    """The forward shared by both drop-in classes (mixed into a subclass of each parent).

    Attributes set by ``replace_mixers_``: ``scan_backend`` (default ``"auto"``), ``gramian_sink``
    (None, or a callable taking (delta, A, B, C, mask) during collection); ``last_state_size`` is
    the N the latest forward's scan ran with.  ``_dt_rank`` names the parent's dt-rank attribute.
    """

    _dt_rank = "time_step_rank"

    def _scan_inputs(self, hidden_states, attention_mask):
        """u, z, delta (before bias/softplus): (batch, d_inner, L); A (d_inner, N); B, C (batch, N, L)."""
        L = hidden_states.shape[1]
        R, N = int(getattr(self, self._dt_rank)), self.A_log.shape[1]
        x, z = self.in_proj(_masked(hidden_states, attention_mask)).transpose(1, 2).chunk(2, dim=1)
        x = self.act(self.conv1d(x)[..., :L])  # the conv pads both sides: keep the causal part
        x = _masked(x.transpose(1, 2), attention_mask)  # (batch, L, d_inner)
        dt_low, B, C = self.x_proj(x).split([R, N, N], dim=-1)
        delta = (dt_low @ self.dt_proj.weight.t()).transpose(1, 2)  # bias and softplus happen in the scan
        return x.transpose(1, 2), z, delta, -torch.exp(self.A_log.float()), B.transpose(1, 2), C.transpose(1, 2)

    def _feed_sink(self, delta, A, B, C, attention_mask):
        with torch.no_grad():
            dt = F.softplus(delta.float() + self.dt_proj.bias.float()[:, None])
            self.gramian_sink(dt, A, B[:, None].float(), C[:, None].float(), attention_mask)

    def _scan_forward(self, hidden_states, attention_mask=None):
        u, z, delta, A, B, C = self._scan_inputs(hidden_states, attention_mask)
        if self.gramian_sink is not None:
            self._feed_sink(delta, A, B, C, attention_mask)
        y = selective_scan(u, delta, A, B, C, self.D.float(), z, self.dt_proj.bias.float(), True,
                           backend=self.scan_backend)
        self.last_state_size = A.shape[1]
        return self.out_proj(y.transpose(1, 2).to(hidden_states.dtype))

    def _collect_prefill(self, hidden_states, attention_mask=None):
        """A prefill seen during collection (e.g. an eval-mode calibration pass with a cache)."""
        if self.gramian_sink is not None and hidden_states.shape[1] > 1:
            with torch.no_grad():
                _, _, delta, A, B, C = self._scan_inputs(hidden_states, attention_mask)
            self._feed_sink(delta, A, B, C, attention_mask)


@functools.lru_cache(maxsize=None)
def mixer_class():
    """``CompreSSMMambaMixer``; defined on first use because it subclasses transformers' MambaMixer."""
    parent = _optional.hf_mixer_classes()["MambaMixer"]

    class CompreSSMMambaMixer(_DropInScan, parent):
        """transformers ``MambaMixer`` whose full-sequence forward runs ``ops.selective_scan``."""

        def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
            if cache_params is None:
                return self._scan_forward(hidden_states, attention_mask)
            self._collect_prefill(hidden_states, attention_mask)
            return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)

    return CompreSSMMambaMixer


@functools.lru_cache(maxsize=None)
def mamba_ssm_mixer_class():
    """``CompreSSMMamba`` (a mamba_ssm ``Mamba`` subclass), or None without mamba_ssm."""
    parent = _optional.mamba_ssm_class("mamba_ssm.modules.mamba_simple", "Mamba")
    if parent is None:
        return None

    class CompreSSMMamba(_DropInScan, parent):
        """mamba_ssm ``Mamba`` whose full-sequence forward runs ``ops.selective_scan`` (any device)."""

        _dt_rank = "dt_rank"

        def forward(self, hidden_states, inference_params=None, **kwargs):
            if inference_params is None:
                return self._scan_forward(hidden_states)
            self._collect_prefill(hidden_states)
            return super().forward(hidden_states, inference_params=inference_params, **kwargs)

    return CompreSSMMamba


def replace_mixers_(model: nn.Module, backend: str = "auto") -> list:
    """Swap every transformers ``MambaMixer`` and mamba_ssm ``Mamba`` in ``model`` for the drop-in mixer.

    In place: the parameters (and their names) are untouched, so optimizers and checkpoints keep
    working.  Already-swapped mixers get the new ``backend``.  Returns the names of the swapped
    modules; raises TypeError when the model holds no Mamba1 mixer.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    swaps = {}
    if "MambaMixer" in _optional.hf_mixer_classes():
        ours = mixer_class()
        swaps.update({_optional.hf_mixer_classes()["MambaMixer"]: ours, ours: ours})
    if mamba_ssm_mixer_class() is not None:
        ours = mamba_ssm_mixer_class()
        swaps.update({_optional.mamba_ssm_class("mamba_ssm.modules.mamba_simple", "Mamba"): ours, ours: ours})
    names = []
    for name, module in model.named_modules():
        target = swaps.get(type(module))
        if target is not None:
            module.__class__ = target
            module.scan_backend = backend
            if not hasattr(module, "gramian_sink"):
                module.gramian_sink = None
            module.last_state_size = None
            names.append(name)
    if not names:
        raise TypeError(f"{type(model).__name__} holds no transformers MambaMixer or mamba_ssm Mamba to replace")
    return names
