"""The adapter interface: what compressm_mamba needs to know about one SSM layer, whatever its family.

An adapter wraps one mixer module and answers three questions:

- what its selective system is on a given input — ``ssm_inputs`` recomputes (delta, A, B, C) from
  the mixer's input under no_grad, whatever forward path (CUDA kernels or torch) the mixer takes;
- how its state indices group — ``ngroups`` groups of ``channels // ngroups`` channels share B/C,
  and a cut keeps the same number of states in every group;
- how to cut it — ``plan_select`` lists the parameter slices and attribute updates that keep a set
  of state indices (METHOD.md §5), without touching the module (``cut.surgery`` applies them).

The two layer layouts every family is a variant of (Mamba1's per-channel A with x_proj, Mamba2's
scalar-per-head A with in_proj → conv1d) live in ``layouts``; each family's file says which one its
mixer is and what differs; ``registry`` finds them in a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

__all__ = [
    "MixerAdapter",
    "ParamCut",
    "CutPlan",
    "KERNEL_RUNTIMES",
    "kernel_state_size",
    "mask_tokens",
    "rows",
    "columns",
    "linear_row_cuts",
    "refuse_wrapped",
]


@dataclass
class ParamCut:
    """Replace ``getattr(module, attr)`` by a new Parameter holding ``index(old)``.

    ``index`` maps any tensor shaped like the old parameter (its data, or an optimizer moment) to
    the kept slice.
    """

    module: nn.Module
    attr: str
    index: Callable[[torch.Tensor], torch.Tensor]

    @property
    def old(self) -> nn.Parameter:
        return getattr(self.module, self.attr)


@dataclass
class CutPlan:
    """Everything one layer's cut changes: parameter slices and plain attribute updates.

    buffers: (module, buffer name, new tensor) registered persistent, or
    (module, buffer name, new tensor, persistent) to choose.
    """

    name: str
    new_state_size: int
    params: list = field(default_factory=list)  # [ParamCut]
    attrs: list = field(default_factory=list)  # [(module, attr, new value)]
    buffers: list = field(default_factory=list)


def mask_tokens(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padding positions of a (batch, L, features) tensor, as the HF mixers do."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] != x.shape[1]:
        return x
    return x * attention_mask[:, :, None].to(x.dtype)


def rows(index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.index_select(0, index.to(t.device)).clone()


def columns(index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.index_select(-1, index.to(t.device)).clone()


def _lora_variant_ok(layer) -> bool:
    variants = getattr(layer, "lora_variant", None) or {}
    return all(v is None or "Dora" in type(v).__name__ for v in variants.values())


def linear_row_cuts(linear: nn.Module, index: torch.Tensor, where: str) -> tuple:
    """(ParamCuts, attribute updates) that keep output rows ``index`` of ``linear``.

    ``linear`` is an ``nn.Linear`` or a peft LoRA layer wrapping one (``base_layer``): then each
    adapter's ``lora_B`` (out_features, r) loses the same rows (and its bias, and DoRA's per-row
    magnitude), so that W + scale·B·A keeps exactly the kept rows and a merged model equals the
    unmerged one.  Other peft tuners are refused, naming ``where``.
    """
    n = int(index.numel())
    params, attrs = [], []
    target = linear
    if hasattr(linear, "base_layer"):
        if not hasattr(linear, "lora_B") or not _lora_variant_ok(linear):
            raise ValueError(f"{where}: {type(linear).__name__} wraps this projection; only peft LoRA (and DoRA) "
                             "adapters can be cut with it")
        for B in linear.lora_B.values():
            params.append(ParamCut(B, "weight", rows(index)))
            if B.bias is not None:
                params.append(ParamCut(B, "bias", rows(index)))
            attrs.append((B, "out_features", n))
        for magnitude in getattr(linear, "lora_magnitude_vector", {}).values():
            params.append(ParamCut(magnitude, "weight", rows(index)))
        attrs.append((linear, "out_features", n))
        while hasattr(target, "base_layer"):
            target = target.base_layer
    params.append(ParamCut(target, "weight", rows(index)))
    if target.bias is not None:
        params.append(ParamCut(target, "bias", rows(index)))
    attrs.append((target, "out_features", n))
    return params, attrs


def refuse_wrapped(module: nn.Module, where: str) -> None:
    """A projection whose state rows a cut must slice but which an adapter (peft) wraps in a way we
    do not cut: say so instead of cutting the wrapper's inside only."""
    if hasattr(module, "base_layer"):
        raise ValueError(f"{where}: {type(module).__name__} (a peft adapter) wraps it; adapters on this module "
                         "cannot be cut — target in_proj / x_proj / out_proj instead")


# What each scan implementation computes for a layer of N states (issue 14, item 4): a cut below
# that size saves nothing in the scan and throws states away.
_CUDA_EXT_SIZES = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)  # csrc/selective_scan: compiled N's


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


KERNEL_RUNTIMES = {
    "torch": lambda n: n,  # plain PyTorch scans (CPU): cost ∝ N
    "mamba_ssm_scan": lambda n: n,  # mamba_ssm's Mamba1 CUDA scan loops over the N states
    "triton": lambda n: n,  # our Triton scan: a runtime loop over the N states (no padding)
    "cuda": lambda n: next((s for s in _CUDA_EXT_SIZES if s >= n), n),  # our CUDA scan's instantiations
    "mamba_ssm_ssd": lambda n: max(_next_pow2(n), 16),  # mamba_ssm's Mamba2 SSD kernels
}


def next_power_of_two(n: int) -> int:
    return _next_pow2(n)


def kernel_state_size(n: int, runtime: str) -> int:
    """The state count the ``runtime`` scan computes for a layer holding ``n`` states."""
    if runtime not in KERNEL_RUNTIMES:
        raise ValueError(f"runtime must be one of {tuple(KERNEL_RUNTIMES)}, got {runtime!r}")
    return int(KERNEL_RUNTIMES[runtime](int(n)))


class MixerAdapter:
    """One SSM layer of a model; see the module docstring.

    Class attributes a family sets: ``family`` (transformers' model_type, or ``"mamba_ssm"``),
    ``kind`` (``"mamba1"`` | ``"mamba2"``: the layout), ``config_state_key`` (the model config's
    field that sizes the layer's state when the model is built, None if none).
    """

    family: str = ""
    kind: str = ""
    config_state_key: str | None = None
    # True when a checkpoint of a cut layer cannot be built by the family's own code from its config
    # (e.g. FalconMamba's normalise-then-select keeps x_proj at N and the scan at r)
    needs_compressm_loader: bool = False

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module

    @property
    def state_size(self) -> int:
        """N, the states the scan (and the decode cache) holds now."""
        raise NotImplementedError

    @property
    def full_state_size(self) -> int:
        """The size of the B and C the layer's projections compute (= state_size unless they stay whole)."""
        return self.state_size

    @property
    def balanced(self) -> bool:
        return False

    @property
    def ngroups(self) -> int:
        return 1

    @property
    def channels(self) -> int:
        """Channels (Mamba1) or heads (Mamba2) that carry one N×N Gramian pair each."""
        raise NotImplementedError

    @torch.no_grad()
    def ssm_inputs(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   with_x: bool = False):
        """(delta, A, B, C) of this mixer on ``hidden_states`` (batch, L, hidden); with ``with_x`` also
        the scan input x: (batch, channels, L) for Mamba1 layouts, (batch, heads, head_dim, L) for Mamba2.

        delta: (batch, channels, L), bias and softplus applied; A: (channels, N);
        B, C: (batch, ngroups, N, L).
        """
        raise NotImplementedError

    def plan_select(self, keep: torch.Tensor) -> CutPlan:
        """Plan to keep states ``keep`` ((ngroups, r) int64, sorted per group) of this mixer."""
        raise NotImplementedError

    def _no_balanced(self) -> str:
        return (f"{self.name}: reduction='balanced' is implemented for Hugging Face Mamba2 mixers only (the mamba2 "
                f"family), not for {self.family} ({type(self.module).__name__}); use reduction='select'")

    def maps(self):
        """Balanced reduction: the (G, r, N) float64 maps from B/C to the scan's states."""
        raise ValueError(self._no_balanced())

    def plan_maps(self, B_map: torch.Tensor, C_map: torch.Tensor) -> CutPlan:
        """Balanced reduction: plan to run the scan on ``B_map @ B``, ``C_map @ C``."""
        raise ValueError(self._no_balanced())

    def runtime(self) -> str:
        """The scan implementation this layer's forward runs on where its parameters are now
        (a key of ``KERNEL_RUNTIMES``)."""
        return "torch"

    def kernel_state_size(self, n: int | None = None) -> int:
        """The state count this layer's scan computes when it keeps ``n`` (default: now) states."""
        return kernel_state_size(self.state_size if n is None else n, self.runtime())

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    def _check_keep(self, keep: torch.Tensor) -> torch.Tensor:
        N, G = self.state_size, self.ngroups
        if keep.dim() != 2 or keep.shape[0] != G or keep.shape[1] < 1:
            raise ValueError(f"{self.name}: kept indices must be (ngroups={G}, r>=1), got {tuple(keep.shape)}")
        if int(keep.min()) < 0 or int(keep.max()) >= N:
            raise ValueError(f"{self.name}: kept indices out of range [0, {N})")
        for g in range(G):
            if torch.unique(keep[g]).numel() != keep.shape[1]:
                raise ValueError(f"{self.name}: kept indices of group {g} repeat a state")
        return keep.to(torch.long).cpu()
