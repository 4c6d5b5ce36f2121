"""transformers ``falcon_mamba``: exact cut by normalise-then-select (issue 14, item 2)."""

import pytest
import torch
from family_models import recurrent_state_shapes, some_states, tiny

pytest.importorskip("transformers")

from compressm_mamba.cut.state_sizes import record_state_sizes  # noqa: E402
from compressm_mamba.cut.surgery import apply_cuts  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402


def test_normalise_then_select_keeps_x_proj_and_shrinks_the_scan_and_cache():
    model = tiny("falcon_mamba")
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    adapters = find_mixers(model)
    x_proj = [a.module.x_proj.weight for a in adapters]
    keep = {a.name: some_states(a, 3, seed=i) for i, a in enumerate(adapters)}
    B_full = adapters[0].module.x_proj(torch.randn(5, 64)).split([2, 8, 8], dim=-1)[1]
    apply_cuts([a.plan_select(keep[a.name]) for a in adapters])
    record_state_sizes(model, adapters)
    m = adapters[0].module
    assert all(a.module.x_proj.weight is w and w.shape == (18, 64) for a, w in zip(adapters, x_proj))
    assert m.A_log.shape == (64, 3) and m.ssm_state_size == 8 and type(m).__name__ == "SelectedFalconMambaMixer"
    # the norm sees all N values, then hands over the kept ones
    expected = (B_full * torch.rsqrt(B_full.pow(2).mean(-1, keepdim=True) + m.b_layernorm.eps))[:, keep[adapters[0].name][0]]
    torch.testing.assert_close(m.b_layernorm(B_full), expected)
    assert model.config.state_size == 8 and model.config.compressm["loader"] == "compressm"
    assert set(recurrent_state_shapes(model, x[:, :5]).values()) == {(2, 64, 3)}
    # a cut mixer never takes the fused training kernel: train and eval forwards agree
    with torch.no_grad():
        evaluated = model(x).logits
        trained = model.train()(x).logits
    torch.testing.assert_close(trained, evaluated)
    # cutting again composes with the first selection
    apply_cuts([adapters[0].plan_select(torch.tensor([[0, 2]]))])
    assert m.b_layernorm.keep.tolist() == keep[adapters[0].name][0][[0, 2]].tolist()
