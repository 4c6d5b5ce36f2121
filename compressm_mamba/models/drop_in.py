"""The drop-in mixer: ``replace_mixers_(model)`` swaps Mamba1 mixers for ones that run our scan.

``CompreSSMMambaMixer`` IS a transformers ``MambaMixer`` (and ``CompreSSMMamba`` a mamba_ssm
``Mamba``): a subclass swapped in place, with the same parameter objects and state_dict keys, so
checkpoints and optimizers keep working.  Its full-sequence forward calls ``ops.selective_scan`` with
the best backend for its device — the ``torch`` time-major scan on a CPU, the Triton kernels on a
GPU — for whatever state size the layer has *now*: after a cut the next forward runs the kernel
specialised for the new N, with no restart and no re-wrapping.

When a ``GramianCollector`` is active it hands the mixer a sink, and the forward feeds the dt, B, C
it has just computed into the Gramian statistics (no second pass through in_proj, conv and x_proj).

Every path runs our ops, with or without a cache (``use_cache=True`` is transformers' default for
inference and ``generate``): the prefill is ``ops.selective_scan`` with ``return_last_state``, which
fills the cache (the scan's last state, and the last conv_kernel conv inputs); each generated token
is a conv step on the cached window plus ``ops.selective_state_update`` — on a GPU the Triton decode
kernel (one fused launch per layer and token), on a CPU its torch backend.  transformers' cache
objects are read and written only through ``compressm_mamba.compat`` (5.17 and 5.23 differ).
There is no CUDA C++ state-update kernel: with ``backend="cuda"`` the scan runs the CUDA kernel and
the decode step the Triton one (``decode_backend`` chooses it explicitly).

Mamba2 is left to transformers' SSD chunked scan (and mamba_ssm's SSD kernels where transformers
finds them): the SSD algorithm, built for a scalar A per head, is the right scan for Mamba2; our
scan kernels are for Mamba1's per-channel diagonal A.  Mamba2 Gramians are collected by hooks.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _optional, compat
from ..ops.selective_scan import BACKENDS, selective_scan
from ..ops.selective_state_update import selective_state_update

__all__ = ["mixer_class", "mamba_ssm_mixer_class", "replace_mixers_"]


def _masked(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padding positions of (batch, L, features), as the HF mixers do."""
    return x if attention_mask is None else x * attention_mask[:, :, None].to(x.dtype)


class _DropInScan:
    """The forward shared by both drop-in classes (mixed into a subclass of each parent).

    Attributes set by ``replace_mixers_``: ``scan_backend`` (default ``"auto"``), ``decode_backend``
    (None: follow ``scan_backend``), ``gramian_sink`` (None, or a callable taking (delta, A, B, C,
    mask) during collection); ``last_state_size`` is the N the latest forward ran with.
    ``_dt_rank`` names the parent's dt-rank attribute.

    Three paths, all on our ops:
      - no cache: ``ops.selective_scan`` over the sequence (training, and inference without a cache);
      - prefill (a cache without a previous state): the same scan with ``return_last_state``; the
        cache receives the scan's last state and the last conv_kernel conv inputs;
      - decode (a cache with a previous state): per token, the depthwise conv as an in-place step
        on the cached window and ``ops.selective_state_update`` (the Triton kernel on a GPU).
        Several tokens after a previous state (assisted decoding, chunked prompts) are stepped
        token by token, which continues the cached state exactly.
    """

    _dt_rank = compat.HF_MAMBA1_ATTRS["dt_rank"]

    def _projections(self, hidden_states, attention_mask):
        """x (before the conv) and z: (batch, d_inner, L), from in_proj of the masked input."""
        return self.in_proj(_masked(hidden_states, attention_mask)).transpose(1, 2).chunk(2, dim=1)

    def _conv(self, conv_input, L: int):
        """The causal depthwise conv + activation over (batch, d_inner, L_in >= L); the last L outputs."""
        return self.act(self.conv1d(conv_input)[..., : conv_input.shape[-1]])[..., -L:]

    def _ssm_inputs(self, x, attention_mask):
        """From the conv output x (batch, d_inner, L): u, delta (before bias/softplus) and B, C (batch, N, L)."""
        R, N = int(getattr(self, self._dt_rank)), self.A_log.shape[1]
        x = _masked(x.transpose(1, 2), attention_mask)  # (batch, L, d_inner)
        dt_low, B, C = self.x_proj(x).split([R, N, N], dim=-1)
        delta = (dt_low @ self.dt_proj.weight.t()).transpose(1, 2)  # bias and softplus happen in the scan
        return x.transpose(1, 2), delta, B.transpose(1, 2), C.transpose(1, 2)

    def _A(self):
        return -torch.exp(self.A_log.float())

    def _scan_inputs(self, hidden_states, attention_mask):
        """u, z, delta (before bias/softplus): (batch, d_inner, L); A (d_inner, N); B, C (batch, N, L)."""
        x, z = self._projections(hidden_states, attention_mask)
        u, delta, B, C = self._ssm_inputs(self._conv(x, hidden_states.shape[1]), attention_mask)
        return u, z, delta, self._A(), B, C

    def _feed_sink(self, delta, A, B, C, attention_mask):
        with torch.no_grad():
            dt = F.softplus(delta.float() + self.dt_proj.bias.float()[:, None])
            self.gramian_sink(dt, A, B[:, None].float(), C[:, None].float(), attention_mask)

    def _maybe_feed(self, delta, A, B, C, attention_mask, cached: bool):
        """Hand (delta, A, B, C) to an attached Gramian sink.  As with the collector's hooks, a
        single-token forward with a cache is a generation step, not calibration data."""
        if self.gramian_sink is not None and not (cached and delta.shape[-1] <= 1):
            self._feed_sink(delta, A, B, C, attention_mask)

    def _scan(self, u, z, delta, A, B, C, attention_mask, return_last_state=False):
        """``ops.selective_scan`` of this layer (feeding the Gramian sink first when one is attached)."""
        self._maybe_feed(delta, A, B, C, attention_mask, cached=return_last_state)
        self.last_state_size = A.shape[1]
        return selective_scan(u, delta, A, B, C, self.D.float(), z, self.dt_proj.bias.float(), True,
                              return_last_state=return_last_state, backend=self.scan_backend)

    def _scan_forward(self, hidden_states, attention_mask=None):
        y = self._scan(*self._scan_inputs(hidden_states, attention_mask), attention_mask)
        return self.out_proj(y.transpose(1, 2).to(hidden_states.dtype))

    def _step_backend(self) -> str:
        """The decode step's backend.  There is no CUDA C++ state-update kernel, so ``cuda`` means
        ``auto`` here (Triton on a GPU; replace_mixers_ warns when it sets that up), and a step that
        needs gradients runs ``torch`` (the Triton step has no backward)."""
        backend = self.decode_backend or self.scan_backend
        if backend == "cuda":
            backend = "auto"
        if backend in ("auto", "triton") and torch.is_grad_enabled() and self.A_log.requires_grad:
            backend = "torch"
        return backend

    def _conv_step(self, x, conv_state):
        """One token through the causal conv: shift x (batch, d_inner) into the cached window
        (batch, d_inner, K) in place and return act(window . weight + bias) (batch, d_inner)."""
        conv_state[..., :-1] = conv_state[..., 1:].clone()
        conv_state[..., -1] = x.to(conv_state.dtype)
        out = torch.einsum("bdk,dk->bd", conv_state.to(self.conv1d.weight.dtype), self.conv1d.weight[:, 0])
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias
        return self.act(out).to(x.dtype)

    def _state_steps(self, u, z, delta, A, B, C, ssm_state):
        """``ops.selective_state_update`` for each of the L tokens of (batch, d_inner | N, L) inputs."""
        backend, D, bias = self._step_backend(), self.D.float(), self.dt_proj.bias.float()
        self.last_state_size = A.shape[1]
        ys = [selective_state_update(ssm_state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t],
                                     bias, True, backend=backend) for t in range(u.shape[-1])]
        return torch.stack(ys, dim=-1)

    def _decode(self, x, z, conv_state, ssm_state):
        """Tokens x, z (batch, d_inner, L) after a cached prefix: conv steps on conv_state, then state steps."""
        conv = torch.stack([self._conv_step(x[..., t], conv_state) for t in range(x.shape[-1])], dim=-1)
        u, delta, B, C = self._ssm_inputs(conv, None)
        A = self._A()
        self._maybe_feed(delta, A, B, C, None, cached=True)
        return self._state_steps(u, z, delta, A, B, C, ssm_state)

    def _hf_cached_forward(self, hidden_states, cache, attention_mask):
        """transformers' cache protocol (through compat): prefill by scan, decode by state update."""
        L = hidden_states.shape[1]
        conv_state, ssm_state = compat.cache_states(cache, self.layer_idx)
        x, z = self._projections(hidden_states, attention_mask)
        if conv_state is not None and ssm_state is not None and L == 1 and not compat.cache_is_recording_past(
                cache, self.layer_idx):
            y = self._decode(x, z, conv_state, ssm_state)
        else:
            # update_conv_state stores the window and returns the conv's full input (padded, or
            # appended to the cached window when there is a previous state)
            conv = self._conv(compat.cache_update_conv_state(cache, x, self.layer_idx, self.conv_kernel_size), L)
            u, delta, B, C = self._ssm_inputs(conv, attention_mask)
            if ssm_state is not None:
                self._maybe_feed(delta, self._A(), B, C, attention_mask, cached=True)
                y = self._state_steps(u, z, delta, self._A(), B, C, ssm_state)
            else:
                y, last_state = self._scan(u, z, delta, self._A(), B, C, attention_mask, return_last_state=True)
                compat.cache_update_recurrent_state(cache, last_state, self.layer_idx)
        return self.out_proj(y.transpose(1, 2).to(hidden_states.dtype))


@functools.lru_cache(maxsize=None)
def mixer_class():
    """``CompreSSMMambaMixer``; defined on first use because it subclasses transformers' MambaMixer."""
    parent = compat.hf_mixer_classes()["MambaMixer"]

    class CompreSSMMambaMixer(_DropInScan, parent):
        """transformers ``MambaMixer`` whose full-sequence forward runs ``ops.selective_scan``."""

        def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
            if cache_params is None:
                return self._scan_forward(hidden_states, attention_mask)
            return self._hf_cached_forward(hidden_states, cache_params, attention_mask)

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
            batch, L, _ = hidden_states.shape
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            x, z = self._projections(hidden_states, None)
            if inference_params.seqlen_offset > 0:
                y = self._decode(x, z, conv_state, ssm_state)
            else:  # prefill: mamba_ssm's cache keeps the last d_conv conv inputs, zero-padded on the left
                conv_state.copy_(F.pad(x, (self.d_conv - L, 0)))
                u, delta, B, C = self._ssm_inputs(self._conv(x, L), None)
                y, last_state = self._scan(u, z, delta, self._A(), B, C, None, return_last_state=True)
                ssm_state.copy_(last_state)
            return self.out_proj(y.transpose(1, 2).to(hidden_states.dtype))

    return CompreSSMMamba


def replace_mixers_(model: nn.Module, backend: str = "auto", decode_backend: str | None = None) -> list:
    """Swap every transformers ``MambaMixer`` and mamba_ssm ``Mamba`` in ``model`` for the drop-in mixer.

    In place: the parameters (and their names) are untouched, so optimizers and checkpoints keep
    working.  ``backend`` is the scan's (training, prefill); ``decode_backend`` the one-token
    step's (None: the same, except that ``cuda``, which has no state-update kernel, decodes with
    ``auto`` — Triton on a GPU — and says so in a warning).  Already-swapped mixers get the new
    backends.  Returns the names of the swapped modules; raises TypeError when the model holds no
    Mamba1 mixer.
    """
    for name, value in (("backend", backend), ("decode_backend", decode_backend)):
        if value is not None and value not in BACKENDS:
            raise ValueError(f"{name} must be one of {BACKENDS}, got {value!r}")
    if decode_backend == "cuda":
        raise ValueError("decode_backend='cuda': there is no CUDA state-update kernel; use 'triton' or 'auto'")
    if backend == "cuda" and decode_backend is None:
        warnings.warn("replace_mixers_(backend='cuda'): the CUDA extension has no one-token state-update kernel; "
                      "cached decoding steps run decode_backend='auto' (Triton on a GPU). Pass decode_backend "
                      "explicitly to choose.", stacklevel=2)
    swaps = {}
    if "MambaMixer" in compat.hf_mixer_classes():
        ours = mixer_class()
        swaps.update({compat.hf_mixer_classes()["MambaMixer"]: ours, ours: ours})
    if mamba_ssm_mixer_class() is not None:
        ours = mamba_ssm_mixer_class()
        swaps.update({_optional.mamba_ssm_class("mamba_ssm.modules.mamba_simple", "Mamba"): ours, ours: ours})
    names = []
    for name, module in model.named_modules():
        target = swaps.get(type(module))
        if target is not None:
            module.__class__ = target
            module.scan_backend = backend
            module.decode_backend = decode_backend
            if not hasattr(module, "gramian_sink"):
                module.gramian_sink = None
            module.last_state_size = None
            names.append(name)
    if not names:
        raise TypeError(f"{type(model).__name__} holds no transformers MambaMixer or mamba_ssm Mamba to replace")
    return names
