"""transformers ``jamba``: learned B/C norms stay whole; attention and MoE layers untouched."""

import pytest
import torch
from family_models import recurrent_state_shapes, tiny

pytest.importorskip("transformers")

import compressm_mamba as cm  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402


def test_jamba_cut_keeps_norm_weights_whole_and_per_layer_cache_sizes():
    model = tiny("jamba")
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    first, second = find_mixers(model)
    weights = {n: p for n, p in first.module.named_parameters() if "layernorm" in n}
    cm.compress_(model, cm.CompressConfig(mode="rank", rank=3, estimator="mean_lti", layers=first.name), [x])
    assert all(p is weights[n] for n, p in first.module.named_parameters() if "layernorm" in n)
    assert first.module.b_layernorm.weight.shape == (8,) and first.module.b_layernorm.keep.shape == (3,)
    assert [a.state_size for a in find_mixers(model)] == [3, 8]
    assert recurrent_state_shapes(model, x[:, :5]) == {first.name: (2, 64, 3), second.name: (2, 64, 8)}
    assert model.config.mamba_d_state == 8 and model.config.compressm["loader"] == "compressm"
