"""Every use of transformers' internals, in one place.

transformers changes its private interfaces between minor releases (cache accessors, mixer
attributes, the flags that say whether mamba_ssm's kernels are bound). The rest of the package
calls the functions here, never those internals directly, so a new transformers release is one
file to read. The tested range is declared in pyproject.toml and exercised in CI at both ends.

Sections: versions; caches (prefill/decode state of Mamba/Mamba2 mixers); mixer attributes and
kernel-availability flags.
"""

from __future__ import annotations

# Lower and upper transformers versions the test suite runs against (CI runs both).
TRANSFORMERS_TESTED = ("5.17.0", "5.23.0")

# --- versions ---------------------------------------------------------------------------------

# --- caches -----------------------------------------------------------------------------------
# transformers 5.x keeps a Mamba/Mamba2 layer's decode state in a DynamicCache whose layer is a
# LinearAttentionLayer: ``conv_states[i]`` (batch, channels, conv_kernel) and ``recurrent_states[i]``
# (the SSM state), valid once ``has_previous_state[i]`` is set by the first ``update_conv_state``.
# 5.23 reads them through ``Cache.get_conv_state`` / ``get_recurrent_state`` / ``is_recording_past``;
# 5.17 has none of the three and is read through ``has_previous_state`` and the layer's attributes.
# The functions below pick the API by what the cache object has, not by the version string, so a
# cache of either release (or a subclass) works.  Writes (``update_conv_state``,
# ``update_recurrent_state``) have the same signature in both.


def cache_states(cache, layer_idx: int, state_idx: int = 0):
    """(conv_state, recurrent_state) of layer ``layer_idx`` once it holds a previous state, else (None, None).

    The tensors are the cache's own (updating them in place updates the cache).  conv_state:
    (batch, channels, conv_kernel); recurrent_state: (batch, ...) the SSM state as last stored.
    """
    if hasattr(cache, "get_conv_state"):  # 5.23
        return (cache.get_conv_state(layer_idx, state_idx=state_idx),
                cache.get_recurrent_state(layer_idx, state_idx=state_idx))
    if not cache.has_previous_state(layer_idx, state_idx):  # 5.17
        return None, None
    layer = cache.layers[layer_idx]
    return layer.conv_states[state_idx], layer.recurrent_states[state_idx]


def cache_is_recording_past(cache, layer_idx: int) -> bool:
    """Whether the layer keeps its full conv history (assisted decoding; a later ``crop`` rolls it back).

    While it records, a one-token forward must go through ``update_conv_state`` (which appends)
    instead of the in-place one-token conv step.
    """
    if hasattr(cache, "is_recording_past"):  # 5.23
        return bool(cache.is_recording_past(layer_idx))
    if layer_idx >= len(cache.layers):  # 5.17: layers are made on first use
        return False
    return bool(getattr(cache.layers[layer_idx], "record_past", False))


def cache_update_conv_state(cache, conv_input, layer_idx: int, conv_kernel_size: int, state_idx: int = 0):
    """Store a multi-token conv input (batch, channels, L); returns the conv's full input.

    The return value is the input left-padded with zeros to ``conv_kernel_size`` on a first call
    (prefill), or the cached window concatenated with it afterwards, so a causal conv over it and
    keeping the last L outputs gives this chunk's conv output with the right left context.
    """
    return cache.update_conv_state(conv_input, layer_idx, state_idx=state_idx, conv_kernel_size=conv_kernel_size)


def cache_update_recurrent_state(cache, state, layer_idx: int, state_idx: int = 0):
    """Store the SSM state after a prefill (copied into the cache's tensor, allocated on first use)."""
    return cache.update_recurrent_state(state, layer_idx, state_idx=state_idx)


# --- mixer attributes and kernel-availability flags -------------------------------------------
