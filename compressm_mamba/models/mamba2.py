"""transformers ``mamba2`` (``Mamba2Mixer``) and our ``BalancedMamba2Mixer``: the Mamba2 layout.

Selection keeps r states per group (``layouts.Mamba2Layout``); a uniform cut is a plain checkpoint
with ``state_size = r``.  This family also supports ``reduction="balanced"``: a mixer cut by
balanced truncation (``balanced_mamba2.BalancedMamba2Mixer``) computes N-dimensional B, C
(``full_state_size``) and maps them onto its r scan states with fixed (G, r, N) maps; selecting its
states keeps rows of the maps, and a further balanced cut composes a new map with the old.
"""

from __future__ import annotations

import torch

from .base import CutPlan
from .. import compat
from .layouts import Mamba2Layout, is_module_of

FAMILY = "mamba2"
MIXERS = (compat.hf_class_path("mamba2", "Mamba2Mixer"),
          "compressm_mamba.models.balanced_mamba2.BalancedMamba2Mixer")


class Mamba2Adapter(Mamba2Layout):
    family = FAMILY
    config_state_key = "state_size"

    @property
    def full_state_size(self) -> int:
        return int(getattr(self.module, "full_state_size", self.state_size))

    @property
    def balanced(self) -> bool:
        return hasattr(self.module, "B_map")

    @property
    def needs_compressm_loader(self) -> bool:
        return self.balanced

    def maps(self):
        """The (G, r, N) float64 maps from B/C to the scan's states (identity for a plain mixer)."""
        if self.balanced:
            return self.module.B_map.double(), self.module.C_map.double()
        eye = torch.eye(self.full_state_size, dtype=torch.float64).expand(self.ngroups, -1, -1).clone()
        return eye, eye

    def _B_C_maps(self, B, C):
        if not self.balanced:
            return B, C
        m = self.module
        return torch.einsum("grn,bgnl->bgrl", m.B_map.float(), B), torch.einsum("grn,bgnl->bgrl", m.C_map.float(), C)

    def plan_select(self, keep):
        if not self.balanced:
            return super().plan_select(keep)
        keep = self._check_keep(keep)
        B_map, C_map = self.maps()
        kept = keep[:, :, None].expand(-1, -1, B_map.shape[-1])
        return self.plan_maps(torch.gather(B_map, 1, kept), torch.gather(C_map, 1, kept))

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


def adapter_for(name, module):
    if any(is_module_of(module, *path.rsplit(".", 1)) for path in MIXERS):
        return Mamba2Adapter(name, module)
    return None
