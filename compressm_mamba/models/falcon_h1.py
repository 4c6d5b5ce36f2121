"""transformers ``falcon_h1`` (``FalconH1Mixer``): the Mamba2 half of Falcon-H1's parallel hybrid layers.

Mamba2 layout (``layouts.Mamba2Layout``) with µP multipliers: the mixer scales its input by
``ssm_in_multiplier`` and in_proj's output row-wise by the ``mup_vector`` buffer (one multiplier per
block z | x | B | C | dt), and keeps ``groups_time_state_size = G·N``.  A cut slices ``mup_vector``
with in_proj's rows (it stays a non-persistent buffer; transformers rebuilds it from the config at
load) and updates ``groups_time_state_size``.  The attention half of each layer is not touched.
"""

from __future__ import annotations

from .base import CutPlan
from .. import compat
from .layouts import Mamba2Layout, is_module_of

FAMILY = "falcon_h1"
MIXERS = (compat.hf_class_path("falcon_h1", "FalconH1Mixer"),)


class FalconH1Adapter(Mamba2Layout):
    family = FAMILY
    config_state_key = "mamba_d_state"
    _group_state_attrs = ("groups_time_state_size",)

    def _project(self, hidden_states):
        m = self.module
        return m.in_proj(hidden_states * m.ssm_in_multiplier) * m.mup_vector

    def plan_select(self, keep) -> CutPlan:
        plan = super().plan_select(keep)
        in_rows, _ = self._in_rows(self._check_keep(keep))
        mup = self.module.mup_vector
        plan.buffers.append((self.module, "mup_vector", mup.index_select(-1, in_rows.to(mup.device)).clone(), False))
        return plan


def adapter_for(name, module):
    return FalconH1Adapter(name, module) if is_module_of(module, *MIXERS[0].rsplit(".", 1)) else None
