"""transformers ``zamba`` (``ZambaMambaMixer``): Mamba1 split into independent heads.

in_proj's output interleaves x and the gate channel by channel; x (d_inner channels) is split into
H heads of head_dim channels, each with its own x_proj ``x_proj_weight[h]`` (R + 2N, head_dim),
dt_proj and ``A_log[h]`` (head_dim, N).  So every head is a group with its own B and C: a cut keeps
r states per head (its own indices), slicing ``x_proj_weight[h]``'s B/C rows and ``A_log[h]``'s
columns.  A uniform cut is a plain checkpoint with ``mamba_d_state = r``.  The shared attention
blocks are not touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import CutPlan, ParamCut, mask_tokens
from .. import compat
from .layouts import Mamba1Layout, is_module_of

FAMILY = "zamba"
MIXERS = (compat.hf_class_path("zamba", "ZambaMambaMixer"),)


def _gather_per_head(index: torch.Tensor, dim: int):
    """Keep, in head h, the entries ``index[h]`` along ``dim`` of a (H, ...) tensor."""
    def take(t):
        shape = [1] * t.dim()
        shape[0], shape[dim] = index.shape
        idx = index.to(t.device).reshape(shape).expand(*[s if i != dim else index.shape[1]
                                                          for i, s in enumerate(t.shape)])
        return torch.gather(t, dim, idx).clone()

    return take


class ZambaAdapter(Mamba1Layout):
    family = FAMILY
    config_state_key = "mamba_d_state"

    @property
    def ngroups(self) -> int:
        return int(self.module.n_mamba_heads)

    @torch.no_grad()
    def ssm_inputs(self, hidden_states, attention_mask=None, with_x: bool = False):
        m = self.module
        batch, L, _ = hidden_states.shape
        H, P, R, N = self.ngroups, int(m.mamba_head_dim), int(m.time_step_rank), self.state_size
        proj = m.in_proj(mask_tokens(hidden_states, attention_mask)).transpose(1, 2)
        x = proj.view(batch, -1, 2, L)[:, :, 0]  # even channels: x, odd: the gate
        x = m.act(m.conv1d(x)[..., :L])  # (batch, d_inner, L)
        x = mask_tokens(x.transpose(1, 2), attention_mask).transpose(1, 2)
        x = x.reshape(batch, H, P, L)
        params = torch.einsum("hkp,bhpl->bhlk", m.x_proj_weight, x)  # (batch, H, L, R + 2N)
        dt_low, B, C = params.split([R, N, N], dim=-1)
        delta = torch.einsum("hpr,bhlr->bhpl", m.dt_proj_weight, dt_low) + m.dt_proj_bias[None, :, :, None]
        delta = F.softplus(delta).reshape(batch, H * P, L)
        A = -torch.exp(m.A_log.float()).reshape(H * P, N)
        out = delta.float(), A, B.transpose(2, 3).float(), C.transpose(2, 3).float()
        return (*out, x.reshape(batch, H * P, L).float()) if with_x else out  # x: (batch, d_inner, L)

    def plan_select(self, keep):
        keep = self._check_keep(keep)
        m = self.module
        R, N, r = int(m.time_step_rank), self.state_size, int(keep.shape[1])
        H = self.ngroups
        kept_rows = torch.cat([torch.arange(R).expand(H, R), R + keep, R + N + keep], dim=1)  # (H, R + 2r)
        plan = CutPlan(self.name, r)
        plan.params.append(ParamCut(m, "A_log", _gather_per_head(keep, 2)))
        plan.params.append(ParamCut(m, "x_proj_weight", _gather_per_head(kept_rows, 1)))
        plan.attrs.append((m, "ssm_state_size", r))
        return plan


def adapter_for(name, module):
    return ZambaAdapter(name, module) if is_module_of(module, *MIXERS[0].rsplit(".", 1)) else None
