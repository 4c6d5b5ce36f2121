"""transformers ``bamba`` (``BambaMixer``): the Mamba2 layers of IBM's Bamba (Mamba2/attention hybrid).

Mamba2 layout under transformers' Mamba2 attribute names (``layouts.Mamba2Layout``): G groups share
B and C; a cut keeps r states in every group (in_proj's and conv1d's B/C rows per group).  A
uniform cut is a plain checkpoint with ``mamba_d_state = r``; the decode cache's recurrent state is
allocated from the states the layer returns, so it follows per-layer sizes.  The other layers
(attention, MLP, MoE) are not touched.
"""

from __future__ import annotations

from .. import compat
from .layouts import Mamba2Layout, is_module_of

FAMILY = "bamba"
MIXERS = (compat.hf_class_path("bamba", "BambaMixer"),)


class BambaAdapter(Mamba2Layout):
    family = FAMILY
    config_state_key = "mamba_d_state"


def adapter_for(name, module):
    return BambaAdapter(name, module) if is_module_of(module, *MIXERS[0].rsplit(".", 1)) else None
