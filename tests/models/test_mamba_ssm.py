"""mamba_ssm's Mamba module and MambaLMHeadModel, where mamba_ssm imports (on CPU: through its
reference scan, patched in for the CUDA one it would call)."""

import copy

import pytest
import torch
from helpers import assert_close

import compressm_mamba as cm
from compressm_mamba import _optional
from compressm_mamba.mixers import find_mixers
from compressm_mamba.surgery import apply_cuts

pytestmark = pytest.mark.requires_mamba_ssm


@pytest.fixture
def mamba_ssm(monkeypatch):
    if _optional.mamba_ssm_mamba1_class() is None:
        pytest.skip("mamba_ssm is not importable here")
    import mamba_ssm.modules.mamba_simple as simple
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    if not torch.cuda.is_available():
        # Without CUDA, selective_scan_fn has no kernel behind it; its own reference stands in.
        monkeypatch.setattr(simple, "selective_scan_fn", selective_scan_ref)
    return simple


def lm_head_model(seed=0):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(seed)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={"layer": "Mamba1", "d_state": 16},
                         rms_norm=False, fused_add_norm=False)
    return MambaLMHeadModel(config).eval()


def test_lm_head_model_compresses(mamba_ssm):
    model = lm_head_model()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    report = cm.compress_(model, cm.CompressConfig(mode="rank", rank=4), [ids])
    assert [d.state_after for d in report.layers] == [4, 4]
    assert all(layer.mixer.d_state == 4 for layer in model.backbone.layers)
    assert model.config.ssm_cfg["d_state"] == 4
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_mamba_module_cut_equals_zeroing(mamba_ssm):
    torch.manual_seed(0)
    mixer = mamba_ssm.Mamba(d_model=16, d_state=12, use_fast_path=False).eval()
    hidden = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    zeroed = copy.deepcopy(mixer)
    keep = torch.tensor([[1, 4, 5, 10]])
    dropped = torch.tensor([i for i in range(12) if i not in keep[0]])
    with torch.no_grad():
        zeroed.x_proj.weight[mixer.dt_rank + dropped] = 0
        zeroed.x_proj.weight[mixer.dt_rank + 12 + dropped] = 0
    (adapter,) = find_mixers(torch.nn.ModuleDict({"mixer": mixer}))
    apply_cuts([adapter.plan_select(keep)])
    assert mixer.d_state == 4 and mixer.A_log.shape == (mixer.d_inner, 4)
    with torch.no_grad():
        assert_close(mixer(hidden), zeroed(hidden), rtol=1e-4, atol=1e-5, name="cut vs zeroed")


def test_standalone_mamba_module_one_shot(mamba_ssm):
    torch.manual_seed(0)
    mixer = mamba_ssm.Mamba(d_model=16, d_state=12, use_fast_path=False)
    hidden = torch.randn(2, 9, 16)
    report = cm.compress_(mixer, cm.CompressConfig(mode="tolerance", tau=0.2), [hidden])
    assert report.layers[0].state_after == mixer.d_state < 12
    assert mixer._compressm_state_sizes == {"": mixer.d_state}
