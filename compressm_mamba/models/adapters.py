"""What compressm_mamba knows about each supported mixer type.

An adapter wraps one mixer module and answers three questions:

- what its selective system is on a given input — ``ssm_inputs`` recomputes (delta, A, B, C) from
  the mixer's input under no_grad, whatever forward path (CUDA kernels or torch) the mixer takes;
- how its state indices group — ``ngroups`` groups of ``channels // ngroups`` channels share B/C;
- how to cut it — ``plan_select`` lists the parameter slices and attribute updates that keep a set
  of state indices (METHOD.md §5), without touching the module (``surgery`` applies them).

Supported: Hugging Face ``MambaMixer`` and ``Mamba2Mixer``, mamba_ssm's ``Mamba`` and ``Mamba2``.
FalconMamba is not: its mixer RMS-normalises B and C across the state axis, so dropping states
changes every kept state's input — no selection is exact there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _optional, compat

__all__ = [
    "MixerAdapter",
    "Mamba1Adapter",
    "Mamba2Adapter",
    "MambaSsmMamba2Adapter",
    "ParamCut",
    "CutPlan",
    "find_mixers",
    "supported_types",
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
    """Everything one layer's cut changes: parameter slices and plain attribute updates."""

    name: str
    new_state_size: int
    params: list = field(default_factory=list)  # [ParamCut]
    attrs: list = field(default_factory=list)  # [(module, attr, new value)]
    buffers: list = field(default_factory=list)  # [(module, buffer name, new tensor)], registered persistent


def _mask_tokens(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padding positions of a (batch, L, features) tensor, as the HF mixers do."""
    if attention_mask is None:
        return x
    return x * attention_mask[:, :, None].to(x.dtype)


def _rows(index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.index_select(0, index.to(t.device)).clone()


def _columns(index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.index_select(-1, index.to(t.device)).clone()


class MixerAdapter:
    """Base class; see the module docstring."""

    kind: str = ""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module

    @property
    def state_size(self) -> int:
        raise NotImplementedError

    @property
    def ngroups(self) -> int:
        return 1

    @property
    def channels(self) -> int:
        """Channels (Mamba1) or heads (Mamba2) that carry one N×N Gramian pair each."""
        raise NotImplementedError

    @torch.no_grad()
    def ssm_inputs(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(delta, A, B, C) of this mixer on ``hidden_states`` (batch, L, hidden).

        delta: (batch, channels, L), bias and softplus applied; A: (channels, N);
        B, C: (batch, ngroups, N, L).
        """
        raise NotImplementedError

    def plan_select(self, keep: torch.Tensor) -> CutPlan:
        """Plan to keep states ``keep`` ((ngroups, r) int64, sorted per group) of this mixer."""
        raise NotImplementedError

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


class Mamba1Adapter(MixerAdapter):
    """HF ``MambaMixer`` and mamba_ssm ``Mamba``: per-channel diagonal A, B and C shared by all channels.

    Selection keeps ``A_log[:, idx]`` and x_proj's rows [dt_low | B[idx] | C[idx]]; nothing else
    depends on N.
    """

    kind = "mamba1"

    def __init__(self, name: str, module: nn.Module, state_attr: str, dt_rank_attr: str):
        super().__init__(name, module)
        self._state_attr = state_attr
        self._dt_rank_attr = dt_rank_attr

    @property
    def state_size(self) -> int:
        return int(self.module.A_log.shape[1])

    @property
    def channels(self) -> int:
        return int(self.module.A_log.shape[0])

    @torch.no_grad()
    def ssm_inputs(self, hidden_states, attention_mask=None):
        m = self.module
        L = hidden_states.shape[1]
        R, N = int(getattr(m, self._dt_rank_attr)), self.state_size
        xz = m.in_proj(_mask_tokens(hidden_states, attention_mask))  # (batch, L, 2 * d_inner)
        x = xz.chunk(2, dim=-1)[0].transpose(1, 2)
        x = m.act(m.conv1d(x)[..., :L]).transpose(1, 2)  # the conv pads k-1 on both sides: keep the causal part
        x = _mask_tokens(x, attention_mask)
        dt_low, B, C = m.x_proj(x).split([R, N, N], dim=-1)
        delta = F.softplus(F.linear(dt_low, m.dt_proj.weight) + m.dt_proj.bias).transpose(1, 2)
        A = -torch.exp(m.A_log.float())
        return delta.float(), A, B.transpose(1, 2)[:, None].float(), C.transpose(1, 2)[:, None].float()

    def plan_select(self, keep):
        idx = self._check_keep(keep)[0]
        m = self.module
        R, N = int(getattr(m, self._dt_rank_attr)), self.state_size
        rows = torch.cat([torch.arange(R), R + idx, R + N + idx])
        plan = CutPlan(self.name, int(idx.numel()))
        plan.params.append(ParamCut(m, "A_log", _columns(idx)))
        plan.params.append(ParamCut(m.x_proj, "weight", _rows(rows)))
        plan.attrs += [(m, self._state_attr, int(idx.numel())), (m.x_proj, "out_features", int(rows.numel()))]
        return plan


class Mamba2Adapter(MixerAdapter):
    """HF ``Mamba2Mixer``: a scalar A per head, B and C per group, both produced by in_proj → conv1d → SiLU.

    in_proj rows are [prefix | z (I) | x (I) | B (G·N) | C (G·N) | dt (H)] (the prefix is mamba_ssm's
    optional MLP part, empty for HF); conv1d runs over [x | B | C].  Selection keeps, per group g, the
    B and C rows g·N + idx_g of in_proj and the matching conv1d channels (weight and bias).

    A mixer already cut by balanced truncation (``BalancedMamba2Mixer``) computes N-dimensional B, C
    (``full_state_size``) and maps them onto its r scan states with fixed (G, r, N) maps; selecting
    its states keeps rows of the maps, and a further balanced cut composes a new map with the old.
    """

    kind = "mamba2"
    # attribute names on the mixer: HF's here (from compat), mamba_ssm's in the subclass below
    _state, _groups, _heads, _ssm_dim, _dt_limit = (compat.HF_MAMBA2_ATTRS[k] for k in
                                                    ("state", "groups", "heads", "ssm_dim", "dt_limit"))
    _extra_attrs = (compat.HF_MAMBA2_ATTRS["conv_dim"],)  # kept equal to the conv channel count after a cut

    @property
    def state_size(self) -> int:
        return int(getattr(self.module, self._state))

    @property
    def full_state_size(self) -> int:
        """Size of the B and C that in_proj and conv1d produce (= state_size unless balanced)."""
        return int(getattr(self.module, "full_state_size", self.state_size))

    @property
    def balanced(self) -> bool:
        return hasattr(self.module, "B_map")

    @property
    def ngroups(self) -> int:
        return int(getattr(self.module, self._groups))

    @property
    def channels(self) -> int:
        return int(getattr(self.module, self._heads))

    def _layout(self):
        """(prefix, I, conv_dim): rows of in_proj before z, SSM width, conv channels."""
        m = self.module
        I, G, N, H = int(getattr(m, self._ssm_dim)), self.ngroups, self.full_state_size, self.channels
        conv_dim = I + 2 * G * N
        prefix = m.in_proj.out_features - (I + conv_dim + H)
        return prefix, I, conv_dim

    def maps(self):
        """The (G, r, N) float64 maps from B/C to the scan's states (identity for a plain mixer)."""
        if self.balanced:
            return self.module.B_map.double(), self.module.C_map.double()
        eye = torch.eye(self.full_state_size, dtype=torch.float64).expand(self.ngroups, -1, -1).clone()
        return eye, eye

    @torch.no_grad()
    def ssm_inputs(self, hidden_states, attention_mask=None):
        m = self.module
        batch, L, _ = hidden_states.shape
        G, N, H = self.ngroups, self.full_state_size, self.channels
        prefix, I, conv_dim = self._layout()
        proj = m.in_proj(_mask_tokens(hidden_states, attention_mask))
        _, xBC, dt = proj.split([prefix + I, conv_dim, H], dim=-1)
        xBC = m.act(m.conv1d(xBC.transpose(1, 2))[..., :L]).transpose(1, 2)
        xBC = _mask_tokens(xBC, attention_mask)
        _, B, C = xBC.split([I, G * N, G * N], dim=-1)
        B = B.reshape(batch, L, G, N).permute(0, 2, 3, 1).float()
        C = C.reshape(batch, L, G, N).permute(0, 2, 3, 1).float()
        if self.balanced:
            B = torch.einsum("grn,bgnl->bgrl", m.B_map.float(), B)
            C = torch.einsum("grn,bgnl->bgrl", m.C_map.float(), C)
        delta = F.softplus(dt.float() + m.dt_bias.float())
        lo, hi = getattr(m, self._dt_limit)
        delta = delta.clamp(min=lo, max=hi).transpose(1, 2)  # (batch, H, L)
        A = (-torch.exp(m.A_log.float()))[:, None].expand(H, self.state_size)
        return delta, A, B, C

    def plan_select(self, keep):
        keep = self._check_keep(keep)
        if self.balanced:
            B_map, C_map = self.maps()
            rows = keep[:, :, None].expand(-1, -1, B_map.shape[-1])
            return self.plan_maps(torch.gather(B_map, 1, rows), torch.gather(C_map, 1, rows))
        m = self.module
        G, N, H = self.ngroups, self.state_size, self.channels
        prefix, I, conv_dim = self._layout()
        r = int(keep.shape[1])
        kept = (torch.arange(G)[:, None] * N + keep).reshape(-1)  # offsets inside the B (or C) block
        conv_rows = torch.cat([torch.arange(I), I + kept, I + G * N + kept])
        xBC_start = prefix + I
        in_rows = torch.cat([torch.arange(xBC_start), xBC_start + conv_rows,
                             xBC_start + conv_dim + torch.arange(H)])
        plan = CutPlan(self.name, r)
        plan.params.append(ParamCut(m.in_proj, "weight", _rows(in_rows)))
        if m.in_proj.bias is not None:
            plan.params.append(ParamCut(m.in_proj, "bias", _rows(in_rows)))
        plan.params.append(ParamCut(m.conv1d, "weight", _rows(conv_rows)))
        if m.conv1d.bias is not None:
            plan.params.append(ParamCut(m.conv1d, "bias", _rows(conv_rows)))
        new_conv_dim = int(conv_rows.numel())
        plan.attrs += [(m, self._state, r)] + [(m, attr, new_conv_dim) for attr in self._extra_attrs]
        plan.attrs += [
            (m.in_proj, "out_features", int(in_rows.numel())),
            (m.conv1d, "in_channels", new_conv_dim),
            (m.conv1d, "out_channels", new_conv_dim),
            (m.conv1d, "groups", new_conv_dim),
        ]
        return plan

    def plan_maps(self, B_map: torch.Tensor, C_map: torch.Tensor) -> CutPlan:
        """Plan to run the scan on ``B_map @ B``, ``C_map @ C`` (each (G, r, full N)), balancing the mixer."""
        from .balanced_mamba2 import mixer_class

        G, N = self.ngroups, self.full_state_size
        if B_map.dim() != 3 or B_map.shape[0] != G or B_map.shape[2] != N or C_map.shape != B_map.shape:
            raise ValueError(f"{self.name}: maps must be (ngroups={G}, r, N={N}), got "
                             f"{tuple(B_map.shape)} and {tuple(C_map.shape)}")
        m = self.module
        r = int(B_map.shape[1])
        dtype = m.A_log.dtype
        plan = CutPlan(self.name, r)
        plan.buffers += [(m, "B_map", B_map.to(dtype).clone()), (m, "C_map", C_map.to(dtype).clone())]
        plan.attrs += [(m, "__class__", mixer_class()), (m, self._state, r)]
        return plan


class MambaSsmMamba2Adapter(Mamba2Adapter):
    """mamba_ssm's ``Mamba2``: the same layout under other names; selection only (its forward runs
    mamba_ssm's fused kernels, which know nothing of balancing maps)."""

    kind = "mamba2"
    _state, _groups, _heads, _ssm_dim, _dt_limit = "d_state", "ngroups", "nheads", "d_ssm", "dt_limit"
    _extra_attrs = ()

    @property
    def balanced(self) -> bool:
        return False

    def plan_maps(self, B_map, C_map):
        raise ValueError(f"{self.name}: reduction='balanced' is implemented for Hugging Face Mamba2 mixers only; "
                         "use reduction='select' for mamba_ssm's Mamba2")


def _adapter_factories():
    """(class, factory) pairs for the mixer types importable here."""
    pairs = []
    hf = compat.hf_mixer_classes()
    if "MambaMixer" in hf:
        from .drop_in import mixer_class as drop_in_class

        names = compat.HF_MAMBA1_ATTRS
        hf_mamba1 = lambda n, m: Mamba1Adapter(n, m, names["state"], names["dt_rank"])  # noqa: E731
        pairs.append((hf["MambaMixer"], hf_mamba1))
        pairs.append((drop_in_class(), hf_mamba1))
    if "Mamba2Mixer" in hf:
        pairs.append((hf["Mamba2Mixer"], Mamba2Adapter))
    if "Mamba2Mixer" in hf:
        from .balanced_mamba2 import mixer_class

        pairs.append((mixer_class(), Mamba2Adapter))
    mamba_cls = _optional.mamba_ssm_class("mamba_ssm.modules.mamba_simple", "Mamba")
    if mamba_cls is not None:
        from .drop_in import mamba_ssm_mixer_class

        ssm_mamba1 = lambda n, m: Mamba1Adapter(n, m, "d_state", "dt_rank")  # noqa: E731
        pairs.append((mamba_cls, ssm_mamba1))
        pairs.append((mamba_ssm_mixer_class(), ssm_mamba1))
    mamba2_cls = _optional.mamba_ssm_class("mamba_ssm.modules.mamba2", "Mamba2")
    if mamba2_cls is not None:
        pairs.append((mamba2_cls, MambaSsmMamba2Adapter))
    return pairs


def supported_types() -> list:
    return [cls.__module__ + "." + cls.__name__ for cls, _ in _adapter_factories()]


def find_mixers(model: nn.Module) -> list:
    """Adapters for every supported mixer in ``model``, in module order.

    Raises TypeError, listing the supported types, when there is none (or an unsupported Mamba-like
    mixer such as FalconMamba's is found).
    """
    factories = _adapter_factories()
    adapters = []
    for name, module in model.named_modules():
        for cls, make in factories:
            if type(module) is cls:
                adapters.append(make(name, module))
                break
        else:
            if type(module).__name__ == "FalconMambaMixer":
                raise TypeError(
                    f"{name}: FalconMambaMixer is not supported: it RMS-normalises B and C across the state "
                    "axis, so no state selection is exact. Supported mixers: " + ", ".join(supported_types())
                )
    if not adapters:
        raise TypeError(
            f"{type(model).__name__} holds no supported Mamba mixer. Supported mixers: "
            + (", ".join(supported_types()) or "none importable here (install transformers or mamba_ssm)")
        )
    return adapters
