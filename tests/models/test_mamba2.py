"""transformers ``mamba2``: grouped selection keeps every group's B/C rows in place."""

import pytest
import torch
from family_models import some_states, tiny

pytest.importorskip("transformers")

from compressm_mamba.cut.surgery import apply_cuts  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_cut_keeps_each_groups_rows(groups):
    model = tiny("mamba2", groups=groups)
    a = find_mixers(model)[0]
    m, N, I, H = a.module, a.state_size, a.module.intermediate_size, a.channels
    in_before, conv_before = m.in_proj.weight.detach().clone(), m.conv1d.weight.detach().clone()
    keep = some_states(a, 3, seed=groups)
    apply_cuts([a.plan_select(keep)])
    r = 3
    assert m.in_proj.weight.shape[0] == 2 * I + 2 * groups * r + H and m.conv_dim == I + 2 * groups * r
    for g in range(groups):
        for block in range(2):  # B, then C
            new = I + block * groups * r + g * r + torch.arange(r)
            old = I + block * groups * N + g * N + keep[g]
            assert torch.equal(m.conv1d.weight[new], conv_before[old])
            assert torch.equal(m.in_proj.weight[I + new], in_before[I + old])
    assert torch.equal(m.in_proj.weight[-H:], in_before[-H:])  # dt rows
