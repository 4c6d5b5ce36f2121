"""transformers ``jamba`` (``JambaMambaMixer`` in the Mamba layers of a Mamba/attention/MoE hybrid).

Mamba1 layout whose dt, B and C pass learned RMS norms (``dt_layernorm``, ``b_layernorm``,
``c_layernorm``; B/C's over the state axis): cut exactly by normalise-then-select
(``layouts.NormalisedBCLayout``) — x_proj and the norms' weights stay whole, the norms' outputs,
A_log, the scan and the decode cache shrink to r.  A cut checkpoint loads through
``compressm_mamba.from_pretrained``.  Attention and MoE layers are not touched.
"""

from __future__ import annotations

from .. import compat
from .layouts import NormalisedBCLayout, is_module_of

FAMILY = "jamba"
MIXERS = (compat.hf_class_path("jamba", "JambaMambaMixer"),)


class JambaAdapter(NormalisedBCLayout):
    family = FAMILY
    config_state_key = "mamba_d_state"


def adapter_for(name, module):
    return JambaAdapter(name, module) if is_module_of(module, *MIXERS[0].rsplit(".", 1)) else None
