"""mamba_ssm's Mamba module and MambaLMHeadModel, where mamba_ssm imports (on CPU: through its
reference scan, patched in for the CUDA one it would call)."""

import copy

import pytest
import torch
from helpers import assert_close

import compressm_mamba as cm
from compressm_mamba import _optional
from compressm_mamba.models.registry import find_mixers
from compressm_mamba.cut.surgery import apply_cuts

pytestmark = pytest.mark.requires_mamba_ssm


@pytest.fixture
def mamba_ssm(monkeypatch):
    # Through _optional: on CPU mamba_ssm imports only under a temporary stand-in for its CUDA module.
    simple = _optional.mamba_ssm_module("mamba_ssm.modules.mamba_simple")
    selective_scan_ref = _optional.mamba_ssm_selective_scan_ref()

    if not torch.cuda.is_available():
        # Without CUDA, selective_scan_fn has no kernel behind it; its own reference stands in.
        monkeypatch.setattr(simple, "selective_scan_fn", selective_scan_ref)
    return simple


def lm_head_model(seed=0):
    MambaConfig = _optional.mamba_ssm_class("mamba_ssm.models.config_mamba", "MambaConfig")
    MambaLMHeadModel = _optional.mamba_ssm_class("mamba_ssm.models.mixer_seq_simple", "MambaLMHeadModel")

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


def mamba2_module(seed=0, d_ssm=None):
    Mamba2 = _optional.mamba_ssm_class("mamba_ssm.modules.mamba2", "Mamba2")

    torch.manual_seed(seed)
    return Mamba2(d_model=32, d_state=16, headdim=8, ngroups=2, d_ssm=d_ssm, use_mem_eff_path=False).eval()


def mamba2_ssm_output(module, hidden):
    """The SSM part of mamba_ssm's Mamba2 (before its gated norm), from our adapter and reference scan:
    the forward itself needs mamba_ssm's Triton kernels on a GPU."""
    from compressm_mamba.reference import selective_scan_mamba2

    (adapter,) = find_mixers(torch.nn.ModuleDict({"mixer": module}))
    delta, A, B, C = adapter.ssm_inputs(hidden)
    prefix, I, conv_dim = adapter._layout()
    batch, L, _ = hidden.shape
    xBC = module.in_proj(hidden)[..., prefix + I : prefix + I + conv_dim]
    x = module.act(module.conv1d(xBC.transpose(1, 2))[..., :L]).transpose(1, 2)[..., :I]
    return selective_scan_mamba2(
        x.reshape(batch, L, module.nheads, module.headdim).double(), delta.transpose(1, 2).double(),
        A[:, 0].double(), B.permute(0, 3, 1, 2).double(), C.permute(0, 3, 1, 2).double(), module.D.double(),
    )


@pytest.mark.parametrize("d_ssm", [None, 32])  # 32 < d_inner = 64: an MLP prefix in in_proj
def test_mamba2_module_cut_equals_zeroing(mamba_ssm, d_ssm):
    module = mamba2_module(d_ssm=d_ssm)
    hidden = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(2))
    keep = torch.tensor([[0, 3, 7, 12], [2, 5, 6, 15]])
    zeroed = copy.deepcopy(module)
    (adapter,) = find_mixers(torch.nn.ModuleDict({"mixer": zeroed}))
    prefix, I, _ = adapter._layout()
    with torch.no_grad():
        for g in range(2):
            dropped = torch.tensor([i for i in range(16) if i not in keep[g]])
            for block in (I, I + 2 * 16):  # B block, C block inside the conv channels
                rows = block + g * 16 + dropped
                zeroed.conv1d.weight[rows] = 0
                zeroed.conv1d.bias[rows] = 0
                zeroed.in_proj.weight[prefix + I + rows] = 0
    (adapter,) = find_mixers(torch.nn.ModuleDict({"mixer": module}))
    apply_cuts([adapter.plan_select(keep)])
    assert module.d_state == 4 and module.in_proj.out_features == module.in_proj.weight.shape[0]
    with torch.no_grad():
        assert_close(mamba2_ssm_output(module, hidden), mamba2_ssm_output(zeroed, hidden), rtol=1e-10, atol=1e-12,
                     name="cut vs zeroed")


@pytest.mark.requires_cuda
def test_mamba2_module_forward_after_cut_on_gpu(mamba_ssm):
    module = mamba2_module().cuda()
    hidden = torch.randn(2, 64, 32, device="cuda")
    report = cm.compress_(module, cm.CompressConfig(mode="rank", rank=4), [hidden])
    assert report.layers[0].state_after == 4
    with torch.no_grad():
        assert torch.isfinite(module(hidden)).all()


def test_mamba2_module_refuses_balanced(mamba_ssm):
    module = mamba2_module()
    hidden = torch.randn(2, 10, 32)
    (adapter,) = find_mixers(torch.nn.ModuleDict({"mixer": module}))
    from compressm_mamba.cut.collect import GramianCollector
    from compressm_mamba.cut.compress import decide_cuts

    collector = GramianCollector([adapter])
    collector.add(adapter, hidden)
    with pytest.raises(ValueError, match="Hugging Face Mamba2 mixers only"):
        decide_cuts([adapter], collector.gramians(), cm.CompressConfig(mode="rank", rank=4, reduction="balanced"))


def test_drop_in_mixer_for_mamba_ssm_equals_its_forward(mamba_ssm):
    from compressm_mamba import replace_mixers_
    from compressm_mamba.models.drop_in import mamba_ssm_mixer_class

    model = lm_head_model()
    ours = copy.deepcopy(model)
    assert replace_mixers_(ours, backend="torch") == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    assert type(ours.backbone.layers[0].mixer) is mamba_ssm_mixer_class()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    losses = []
    for m in (model, ours):
        logits = m(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
        loss.backward()
        losses.append((logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert_close(losses[1][0], losses[0][0], rtol=1e-4, atol=1e-5, name="logits")
    for name, grad in losses[0][1].items():
        assert_close(losses[1][1][name], grad, rtol=1e-3, atol=1e-5, name=f"grad {name}")
    # and compression recognises the swapped modules
    report = cm.compress_(ours, cm.CompressConfig(mode="rank", rank=4), [ids])
    assert [d.state_after for d in report.layers] == [4, 4]
    with torch.no_grad():
        ours(ids)
    assert ours.backbone.layers[0].mixer.last_state_size == 4
