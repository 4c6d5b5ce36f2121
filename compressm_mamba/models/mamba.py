"""transformers ``mamba`` (``MambaMixer``) and our drop-in ``CompreSSMMambaMixer``: the Mamba1 layout.

States group as one group of N shared by every channel; a cut keeps ``A_log[:, idx]`` and x_proj's
B/C rows (``layouts.Mamba1Layout``).  A uniform cut is a plain checkpoint with ``state_size = r``.
"""

from __future__ import annotations

from .. import compat
from .layouts import Mamba1Layout, is_module_of

FAMILY = "mamba"
MIXERS = (compat.hf_class_path("mamba", "MambaMixer"),
          "compressm_mamba.models.drop_in.CompreSSMMambaMixer")


class MambaAdapter(Mamba1Layout):
    family = FAMILY
    config_state_key = "state_size"

    def runtime(self) -> str:
        backend = getattr(self.module, "scan_backend", None)
        if backend is None:  # transformers' own mixer
            return super().runtime()
        from ..ops.selective_scan import resolve_backend

        return resolve_backend(backend, self._device(), self.state_size)


def adapter_for(name, module):
    if any(is_module_of(module, *path.rsplit(".", 1)) for path in MIXERS):
        return MambaAdapter(name, module)
    return None
