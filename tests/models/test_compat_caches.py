"""compat's cache section on the installed transformers (CI runs it on 5.17 and 5.23): the same
answers from a real Mamba / Mamba2 cache whichever accessors the release has."""

import pytest
import torch
from helpers import random_ids, tiny_mamba, tiny_mamba2

from compressm_mamba import compat

pytest.importorskip("transformers")


@pytest.mark.parametrize("build, channels, state_shape", [
    (tiny_mamba, 64, (2, 64, 16)),
    (tiny_mamba2, 64 + 2 * 2 * 16, (2, 8, 8, 16)),  # conv over x, B, C; state (batch, heads, head_dim, N)
])
def test_cache_states_before_and_after_a_prefill(build, channels, state_shape):
    from transformers import DynamicCache

    model = build()
    cache = DynamicCache(config=model.config)
    assert compat.cache_states(cache, 0) == (None, None)  # nothing stored yet (5.17: no layer object either)
    assert compat.cache_is_recording_past(cache, 0) is False
    with torch.no_grad():
        out = model(random_ids(2, 6), cache_params=cache, use_cache=True)
    assert out.cache_params is cache
    conv, rec = compat.cache_states(cache, 1)
    assert conv.shape == (2, channels, model.config.conv_kernel) and rec.shape == state_shape
    layer = cache.layers[1]
    assert conv is layer.conv_states[0] and rec is layer.recurrent_states[0]  # the cache's own tensors
    cache.activate_past_recording()
    assert compat.cache_is_recording_past(cache, 1) is True


def test_update_functions_write_the_cache():
    from transformers import DynamicCache

    model = tiny_mamba()
    cache = DynamicCache(config=model.config)
    x = torch.randn(2, 64, 3)
    full = compat.cache_update_conv_state(cache, x, 0, conv_kernel_size=4)
    assert full.shape == (2, 64, 4) and torch.equal(full[..., 1:], x) and not full[..., 0].any()  # left-padded
    state = torch.randn(2, 64, 16)
    compat.cache_update_recurrent_state(cache, state, 0)
    conv, rec = compat.cache_states(cache, 0)
    assert torch.equal(conv, full) and torch.equal(rec, state) and rec is not state
    more = compat.cache_update_conv_state(cache, x[..., :1], 0, conv_kernel_size=4)
    assert torch.equal(more, torch.cat([full, x[..., :1]], -1))  # a continuation sees the cached window
