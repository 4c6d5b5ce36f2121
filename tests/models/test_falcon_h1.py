"""transformers ``falcon_h1``: µP multipliers (ssm_in_multiplier, mup_vector) follow the cut."""

import copy

import pytest
import torch
from family_models import config_kwargs, some_states, zero_dropped_
from helpers import assert_close

transformers = pytest.importorskip("transformers")

from compressm_mamba.cut.collect import GramianCollector  # noqa: E402
from compressm_mamba.cut.surgery import apply_cuts  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402


def test_multipliers_follow_the_cut():
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("falcon_h1", **config_kwargs("falcon_h1"), ssm_in_multiplier=0.7,
                                                ssm_multipliers=[1.5, 0.5, 2.0, 0.25, 3.0])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    a = find_mixers(model)[0]
    # the adapter's recomputed B/C are the forward's: Gramians from a hook equal those of the multipliers applied
    delta, A, B, C = a.ssm_inputs(torch.randn(2, 12, 32))
    assert B.shape == (2, 2, 8, 12) and torch.isfinite(B).all()
    reference = copy.deepcopy(model)
    keep = some_states(a, 3, seed=1)
    mup = a.module.mup_vector.clone()
    in_rows, _ = a._in_rows(keep)
    apply_cuts([a.plan_select(keep)])
    assert torch.equal(a.module.mup_vector, mup[..., in_rows]) and "mup_vector" in a.module._non_persistent_buffers_set
    assert a.module.groups_time_state_size == 2 * 3
    zero_dropped_(find_mixers(reference)[0], keep)
    with torch.no_grad():
        assert_close(model(x).logits, reference(x).logits, rtol=1e-4, atol=1e-5, name="falcon_h1 cut vs zeroed")
    collector = GramianCollector([a], "mean_lti")
    with collector, torch.no_grad():
        model(x)
    assert collector.gramians()[a.name][0].shape == (4, 3, 3)
