"""mamba_ssm's ``Mamba`` (Mamba1 layout; also our drop-in ``CompreSSMMamba``) and ``Mamba2``.

The same layouts as transformers' under mamba_ssm's attribute names (``d_state``, ``dt_rank``,
``ngroups``, ``nheads``, ``d_ssm``, ``dt_limit``); Mamba2's in_proj may carry an MLP prefix
(``d_mlp``), which the layout skips.  Selection only: mamba_ssm's Mamba2 forward runs its fused
kernels, which know nothing of balancing maps.  The model's size lives in
``config.ssm_cfg["d_state"]`` (``cut.state_sizes`` writes it).
"""

from __future__ import annotations

from .layouts import Mamba1Layout, Mamba2Layout, is_module_of

FAMILY = "mamba_ssm"
MIXERS = ("mamba_ssm.modules.mamba_simple.Mamba", "compressm_mamba.models.drop_in.CompreSSMMamba",
          "mamba_ssm.modules.mamba2.Mamba2")


class MambaSsmMambaAdapter(Mamba1Layout):
    family = FAMILY
    _state, _dt_rank = "d_state", "dt_rank"

    def runtime(self) -> str:
        backend = getattr(self.module, "scan_backend", None)
        if backend is None:
            return "mamba_ssm_scan" if self._device().type == "cuda" else "torch"
        from ..ops.selective_scan import resolve_backend

        return resolve_backend(backend, self._device(), self.state_size)


class MambaSsmMamba2Adapter(Mamba2Layout):
    family = FAMILY
    _state, _groups, _heads, _ssm_dim, _dt_limit = "d_state", "ngroups", "nheads", "d_ssm", "dt_limit"
    _extra_attrs = ()

    def runtime(self) -> str:
        return "mamba_ssm_ssd" if self._device().type == "cuda" else "torch"



def adapter_for(name, module):
    if any(is_module_of(module, *path.rsplit(".", 1)) for path in MIXERS[:2]):
        return MambaSsmMambaAdapter(name, module)
    if is_module_of(module, *MIXERS[2].rsplit(".", 1)):
        return MambaSsmMamba2Adapter(name, module)
    return None
