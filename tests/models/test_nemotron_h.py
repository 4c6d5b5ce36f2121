"""transformers ``nemotron_h``: per-layer state sizes reach the hybrid decode cache; other layers untouched."""

import pytest
import torch
from family_models import recurrent_state_shapes, tiny

pytest.importorskip("transformers")

import compressm_mamba as cm  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402


def test_per_layer_sizes_in_the_hybrid_cache():
    model = tiny("nemotron_h", groups=2)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    first, second = find_mixers(model)
    assert first.family == "nemotron_h" and first.kind == "mamba2" and first.ngroups == 2
    H, P = first.channels, first.module.head_dim
    cm.compress_(model, cm.CompressConfig(mode="rank", rank=5, estimator="mean_lti", layers=first.name), [x])
    cm.compress_(model, cm.CompressConfig(mode="rank", rank=3, estimator="mean_lti", layers=second.name), [x])
    assert recurrent_state_shapes(model, x[:, :5]) == {first.name: (2, H, P, 5), second.name: (2, H, P, 3)}
    assert model.config.compressm == {"state_sizes": {first.name: 5, second.name: 3}, "loader": "compressm"}
