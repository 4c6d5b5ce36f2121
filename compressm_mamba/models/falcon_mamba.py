"""transformers ``falcon_mamba`` (``FalconMambaMixer``): Mamba1 with B, C (and dt) RMS-normalised
over the state axis by weightless norms.

Cut exactly by normalise-then-select (``layouts.NormalisedBCLayout``): x_proj keeps its 2N B/C rows,
the norms see all N values and hand the scan the r kept ones; A_log, the scan and the decode
cache shrink to r.  Because x_proj stays at N, no FalconMamba config describes a cut layer: a cut
checkpoint loads through ``compressm_mamba.from_pretrained`` (the ``keep`` buffers travel in it),
not through plain transformers.

On a GPU with mamba_ssm, transformers' training forward calls the fused ``mamba_inner_fn``, which
splits x_proj's output by A's state count — wrong once x_proj is wider than the scan.  A cut mixer
therefore becomes ``SelectedFalconMambaMixer``, whose forward takes the unfused path (the same
arithmetic transformers runs on a CPU).
"""

from __future__ import annotations

import functools

from .. import compat
from .layouts import NormalisedBCLayout, is_module_of

FAMILY = "falcon_mamba"
MIXERS = (compat.hf_class_path("falcon_mamba", "FalconMambaMixer"),)


@functools.lru_cache(maxsize=None)
def selected_mixer_class(parent: type) -> type:
    class SelectedFalconMambaMixer(parent):
        """A FalconMamba mixer cut by normalise-then-select: never the fused training kernel."""

        def forward(self, *args, **kwargs):
            training, self.training = self.training, False  # the flag only picks the fused kernel here
            try:
                return super().forward(*args, **kwargs)
            finally:
                self.training = training

    return SelectedFalconMambaMixer


class FalconMambaAdapter(NormalisedBCLayout):
    family = FAMILY
    config_state_key = "state_size"

    def plan_select(self, keep):
        plan = super().plan_select(keep)
        cls = type(self.module)
        parent = cls.__mro__[1] if cls.__name__ == "SelectedFalconMambaMixer" else cls
        plan.attrs.append((self.module, "__class__", selected_mixer_class(parent)))
        return plan


def adapter_for(name, module):
    cls = type(module)
    if is_module_of(module, *MIXERS[0].rsplit(".", 1)) or (
            cls.__name__ == "SelectedFalconMambaMixer" and cls.__module__ == __name__):
        return FalconMambaAdapter(name, module)
    return None
