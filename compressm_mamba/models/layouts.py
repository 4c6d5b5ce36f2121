"""The two SSM layer layouts every supported family is a variant of, and how to cut each.

``Mamba1Layout`` — a per-channel diagonal A (d_inner, N); B and C shared by all channels, rows of
x_proj's output [dt_low (R) | B (N) | C (N)].  Selection keeps ``A_log[:, idx]`` and x_proj's rows
[dt_low | B[idx] | C[idx]]; nothing else depends on N.  ``NormalisedBCLayout`` is its variant whose
B and C pass an RMS norm over the state axis before the scan (FalconMamba, Jamba): the norm must
still see all N values, so x_proj keeps its rows and the norm's output is selected.

``Mamba2Layout`` — a scalar A per head, B and C per group, produced by in_proj → conv1d → act.
in_proj rows are [prefix | z (I) | x (I) | B (G·N) | C (G·N) | dt (H)] (the prefix is mamba_ssm's
optional MLP part, empty in transformers); conv1d runs over [x | B | C].  Selection keeps, per group
g, the B and C rows g·N + idx_g of in_proj and the matching conv1d channels (weight and bias), so
every group keeps the same number of states and the group structure stays intact.

A family's adapter subclasses one of these and names its mixer's attributes (the defaults are
transformers' Mamba/Mamba2 names).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import compat
from .base import CutPlan, MixerAdapter, ParamCut, columns, linear_row_cuts, mask_tokens, refuse_wrapped, rows

__all__ = ["Mamba1Layout", "NormalisedBCLayout", "Mamba2Layout", "selecting_norm_class"]


def _mamba_ssm_on(device: torch.device) -> bool:
    """Whether transformers' mixers take mamba_ssm's CUDA kernels on ``device``."""
    return device.type == "cuda" and importlib.util.find_spec("mamba_ssm") is not None


class Mamba1Layout(MixerAdapter):
    """Mamba1 layout; attribute names: ``_state`` (N on the mixer), ``_dt_rank`` (R)."""

    kind = "mamba1"
    _state, _dt_rank = compat.HF_MAMBA1_ATTRS["state"], compat.HF_MAMBA1_ATTRS["dt_rank"]

    @property
    def state_size(self) -> int:
        return int(self.module.A_log.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.module.A_log.numel() // self.module.A_log.shape[-1])

    def runtime(self) -> str:
        return "mamba_ssm_scan" if _mamba_ssm_on(self._device()) else "torch"

    def _conv_x(self, hidden_states, attention_mask):
        """The scan's input x: (batch, L, d_inner), after in_proj → causal conv → act, padding zeroed."""
        m = self.module
        L = hidden_states.shape[1]
        xz = m.in_proj(mask_tokens(hidden_states, attention_mask))  # (batch, L, 2 * d_inner)
        x = xz.chunk(2, dim=-1)[0].transpose(1, 2)
        x = m.act(m.conv1d(x)[..., :L]).transpose(1, 2)  # the conv pads k-1 on both sides: keep the causal part
        return mask_tokens(x, attention_mask)

    def _dt_B_C(self, x):
        """dt_low (batch, L, R), B, C (batch, L, N) from the scan's input."""
        m = self.module
        R, N = int(getattr(m, self._dt_rank)), self.full_state_size
        return m.x_proj(x).split([R, N, N], dim=-1)

    def _delta(self, dt_low):
        m = self.module
        return F.softplus(F.linear(dt_low, m.dt_proj.weight) + m.dt_proj.bias).transpose(1, 2)

    @torch.no_grad()
    def ssm_inputs(self, hidden_states, attention_mask=None, with_x: bool = False):
        x = self._conv_x(hidden_states, attention_mask)
        dt_low, B, C = self._dt_B_C(x)
        delta = self._delta(dt_low)
        A = -torch.exp(self.module.A_log.float())
        out = delta.float(), A, B.transpose(1, 2)[:, None].float(), C.transpose(1, 2)[:, None].float()
        return (*out, x.transpose(1, 2).float()) if with_x else out  # x: (batch, d_inner, L)

    def plan_select(self, keep):
        idx = self._check_keep(keep)[0]
        m = self.module
        R, N = int(getattr(m, self._dt_rank)), self.state_size
        kept_rows = torch.cat([torch.arange(R), R + idx, R + N + idx])
        plan = CutPlan(self.name, int(idx.numel()))
        plan.params.append(ParamCut(m, "A_log", columns(idx)))
        params, attrs = linear_row_cuts(m.x_proj, kept_rows, f"{self.name}.x_proj")
        plan.params += params
        plan.attrs += [(m, self._state, int(idx.numel()))] + attrs
        return plan


@functools.lru_cache(maxsize=None)
def selecting_norm_class(norm_cls: type) -> type:
    """A subclass of ``norm_cls`` (an RMS norm over the state axis) that normalises all N values,
    then keeps the states in its ``keep`` buffer: (..., N) -> (..., r).  Its weight (if any) stays
    whole, so the state-dict keys are the family's own plus ``keep``."""

    class SelectingNorm(norm_cls):
        def forward(self, x):
            return super().forward(x).index_select(-1, self.keep)

    SelectingNorm.__name__ = SelectingNorm.__qualname__ = "Selecting" + norm_cls.__name__
    return SelectingNorm


class NormalisedBCLayout(Mamba1Layout):
    """Mamba1 whose B and C are RMS-normalised over the state axis (``b_layernorm``, ``c_layernorm``).

    Exact selection (issue 14, item 2): normalise, then select.  x_proj keeps all its rows, so the
    norm still sees all N values; the norms' outputs are cut to the kept states (a ``keep`` buffer
    on each norm), and A_log, the scan and the decode cache shrink to r.  The mixer's own
    ``ssm_state_size`` stays N: it is the width of x_proj's B and C (``full_state_size``).
    """

    needs_compressm_loader = True

    @property
    def full_state_size(self) -> int:
        return int(getattr(self.module, self._state))

    def _kept(self) -> torch.Tensor:
        keep = getattr(self.module.b_layernorm, "keep", None)
        return torch.arange(self.full_state_size) if keep is None else keep.detach().cpu()

    @torch.no_grad()
    def ssm_inputs(self, hidden_states, attention_mask=None, with_x: bool = False):
        m = self.module
        x = self._conv_x(hidden_states, attention_mask)
        dt_low, B, C = self._dt_B_C(x)
        delta = F.softplus(F.linear(m.dt_layernorm(dt_low), m.dt_proj.weight) + m.dt_proj.bias).transpose(1, 2)
        B, C = m.b_layernorm(B), m.c_layernorm(C)  # (batch, L, r): normalised over all N, then selected
        A = -torch.exp(m.A_log.float())
        out = delta.float(), A, B.transpose(1, 2)[:, None].float(), C.transpose(1, 2)[:, None].float()
        return (*out, x.transpose(1, 2).float()) if with_x else out

    def plan_select(self, keep):
        idx = self._check_keep(keep)[0]
        m = self.module
        kept = self._kept()[idx]  # indices among x_proj's N states
        plan = CutPlan(self.name, int(idx.numel()))
        plan.params.append(ParamCut(m, "A_log", columns(idx)))
        for norm in (m.b_layernorm, m.c_layernorm):
            base = type(norm).__mro__[1] if hasattr(norm, "keep") else type(norm)
            plan.attrs.append((norm, "__class__", selecting_norm_class(base)))
            plan.buffers.append((norm, "keep", kept.to(self._device()).clone()))
        return plan


class Mamba2Layout(MixerAdapter):
    """Mamba2 layout; attribute names on the mixer (transformers' by default): ``_state`` N,
    ``_groups`` G, ``_heads`` H, ``_ssm_dim`` I, ``_dt_limit``; ``_extra_attrs`` are kept equal to
    the conv channel count after a cut; ``_group_state_attrs`` to G·N."""

    kind = "mamba2"
    _state, _groups, _heads, _ssm_dim, _dt_limit = (compat.HF_MAMBA2_ATTRS[k] for k in
                                                    ("state", "groups", "heads", "ssm_dim", "dt_limit"))
    _extra_attrs = (compat.HF_MAMBA2_ATTRS["conv_dim"],)
    _group_state_attrs = ()

    @property
    def state_size(self) -> int:
        return int(getattr(self.module, self._state))

    @property
    def ngroups(self) -> int:
        return int(getattr(self.module, self._groups))

    @property
    def channels(self) -> int:
        return int(getattr(self.module, self._heads))

    def runtime(self) -> str:
        return "mamba_ssm_ssd" if _mamba_ssm_on(self._device()) else "torch"

    def _layout(self):
        """(prefix, I, conv_dim): rows of in_proj before z, SSM width, conv channels."""
        m = self.module
        I, G, N, H = int(getattr(m, self._ssm_dim)), self.ngroups, self.full_state_size, self.channels
        conv_dim = I + 2 * G * N
        prefix = m.in_proj.out_features - (I + conv_dim + H)
        return prefix, I, conv_dim

    def _project(self, hidden_states):
        """in_proj's output as the mixer's forward sees it (a family with input/output multipliers
        overrides this)."""
        return self.module.in_proj(hidden_states)

    def _B_C_maps(self, B, C):
        """Hook for layers whose scan runs on a map of B and C; (batch, G, N, L) each."""
        return B, C

    @torch.no_grad()
    def ssm_inputs(self, hidden_states, attention_mask=None, with_x: bool = False):
        m = self.module
        batch, L, _ = hidden_states.shape
        G, N, H = self.ngroups, self.full_state_size, self.channels
        prefix, I, conv_dim = self._layout()
        proj = self._project(mask_tokens(hidden_states, attention_mask))
        _, xBC, dt = proj.split([prefix + I, conv_dim, H], dim=-1)
        xBC = m.act(m.conv1d(xBC.transpose(1, 2))[..., :L]).transpose(1, 2)
        xBC = mask_tokens(xBC, attention_mask)
        x, B, C = xBC.split([I, G * N, G * N], dim=-1)
        B = B.reshape(batch, L, G, N).permute(0, 2, 3, 1).float()
        C = C.reshape(batch, L, G, N).permute(0, 2, 3, 1).float()
        B, C = self._B_C_maps(B, C)
        delta = F.softplus(dt.float() + m.dt_bias.float())
        lo, hi = getattr(m, self._dt_limit)
        delta = delta.clamp(min=lo, max=hi).transpose(1, 2)  # (batch, H, L)
        A = (-torch.exp(m.A_log.float()))[:, None].expand(H, self.state_size)
        if with_x:  # the scan input per head: (batch, H, head_dim, L)
            return delta, A, B, C, x.reshape(batch, L, H, I // H).permute(0, 2, 3, 1).float()
        return delta, A, B, C

    def _in_rows(self, keep: torch.Tensor):
        """(in_proj rows, conv rows) that keep states ``keep`` (G, r) of every group."""
        G, N, H = self.ngroups, self.state_size, self.channels
        prefix, I, conv_dim = self._layout()
        kept = (torch.arange(G)[:, None] * N + keep).reshape(-1)  # offsets inside the B (or C) block
        conv_rows = torch.cat([torch.arange(I), I + kept, I + G * N + kept])
        xBC_start = prefix + I
        in_rows = torch.cat([torch.arange(xBC_start), xBC_start + conv_rows, xBC_start + conv_dim + torch.arange(H)])
        return in_rows, conv_rows

    def plan_select(self, keep):
        keep = self._check_keep(keep)
        m = self.module
        G, r = self.ngroups, int(keep.shape[1])
        in_rows, conv_rows = self._in_rows(keep)
        refuse_wrapped(m.conv1d, f"{self.name}.conv1d")
        plan = CutPlan(self.name, r)
        params, attrs = linear_row_cuts(m.in_proj, in_rows, f"{self.name}.in_proj")
        plan.params += params
        plan.attrs += attrs
        plan.params.append(ParamCut(m.conv1d, "weight", rows(conv_rows)))
        if m.conv1d.bias is not None:
            plan.params.append(ParamCut(m.conv1d, "bias", rows(conv_rows)))
        new_conv_dim = int(conv_rows.numel())
        plan.attrs += [(m, self._state, r)] + [(m, attr, new_conv_dim) for attr in self._extra_attrs]
        plan.attrs += [(m, attr, G * r) for attr in self._group_state_attrs]
        plan.attrs += [
            (m.conv1d, "in_channels", new_conv_dim),
            (m.conv1d, "out_channels", new_conv_dim),
            (m.conv1d, "groups", new_conv_dim),
        ]
        return plan


def is_module_of(module: nn.Module, module_name: str, cls_name: str) -> bool:
    """Whether ``module`` is exactly ``module_name.cls_name`` (no import happens)."""
    cls = type(module)
    return cls.__name__ == cls_name and cls.__module__ == module_name
