"""transformers ``zamba``: per-head x_proj / A_log — each head keeps its own r states."""

import pytest
import torch
from family_models import recurrent_state_shapes, some_states, tiny

pytest.importorskip("transformers")

from compressm_mamba.cut.surgery import apply_cuts  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402


def test_each_head_keeps_its_own_states():
    model = tiny("zamba", groups=2)
    a = find_mixers(model)[0]
    m, R, N = a.module, a.module.time_step_rank, a.state_size
    assert (a.ngroups, a.channels) == (2, 64)
    x_proj, A_log = m.x_proj_weight.detach().clone(), m.A_log.detach().clone()
    keep = some_states(a, 3, seed=5)
    assert not torch.equal(keep[0], keep[1])
    apply_cuts([a.plan_select(keep)])
    assert m.x_proj_weight.shape == (2, R + 6, 32) and m.A_log.shape == (2, 32, 3)
    for h in range(2):
        assert torch.equal(m.x_proj_weight[h, R:R + 3], x_proj[h, R + keep[h]])
        assert torch.equal(m.x_proj_weight[h, R + 3:], x_proj[h, R + N + keep[h]])
        assert torch.equal(m.A_log[h], A_log[h][:, keep[h]])
    x = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    assert recurrent_state_shapes(model, x)[a.name] == (2, 2, 32, 3)
