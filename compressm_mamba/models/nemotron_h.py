"""transformers ``nemotron_h`` (``NemotronHMamba2Mixer``): the Mamba2 layers of NVIDIA's Nemotron-H (Mamba2/attention/MLP(MoE) hybrid).

Mamba2 layout under transformers' Mamba2 attribute names (``layouts.Mamba2Layout``): G groups share
B and C; a cut keeps r states in every group (in_proj's and conv1d's B/C rows per group).  A
uniform cut is a plain checkpoint with ``ssm_state_size = r``; the decode cache's recurrent state is
allocated from the states the layer returns, so it follows per-layer sizes.  The other layers
(attention, MLP, MoE) are not touched.
"""

from __future__ import annotations

from .. import compat
from .layouts import Mamba2Layout, is_module_of

FAMILY = "nemotron_h"
MIXERS = (compat.hf_class_path("nemotron_h", "NemotronHMamba2Mixer"),)


class NemotronHAdapter(Mamba2Layout):
    family = FAMILY
    config_state_key = "ssm_state_size"


def adapter_for(name, module):
    return NemotronHAdapter(name, module) if is_module_of(module, *MIXERS[0].rsplit(".", 1)) else None
