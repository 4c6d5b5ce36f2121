"""transformers ``mamba``: family specifics (the common checks are in test_families.py)."""

import pytest
import torch
from family_models import recurrent_state_shapes, tiny

pytest.importorskip("transformers")

import compressm_mamba as cm  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402


def test_uniform_cut_is_a_plain_mamba_checkpoint_and_the_cache_follows():
    model = tiny("mamba")
    (a, _) = find_mixers(model)
    assert (a.family, a.kind, a.config_state_key) == ("mamba", "mamba1", "state_size")
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    report = cm.compress_(model, cm.CompressConfig(mode="rank", rank=3, estimator="mean_lti"), [x])
    assert model.config.state_size == 3 and "loader" not in model.config.compressm
    assert [d.kernel_state_after for d in report.layers] == [3, 3]  # torch scan on a CPU: exactly r
    assert "kernel N" in str(report)
    assert set(recurrent_state_shapes(model, x[:, :5]).values()) == {(2, 64, 3)}
