"""compressm_mamba._optional: importing mamba_ssm's pure-PyTorch references leaves other libraries alone.

On a CPU machine mamba_ssm imports only with a stand-in for its missing CUDA module.  A stand-in left
in sys.modules made transformers bind mamba_ssm's kernels in every hybrid model imported afterwards
(Bamba, Jamba, Zamba2, NemotronH, FalconH1, GraniteMoeHybrid): their forward then crashed on CPU.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every compressm_mamba entry point that imports mamba_ssm, each followed by a check that nothing of
# mamba_ssm (nor the stand-in) is left in sys.modules; then tiny Bamba and Jamba models, imported
# only now, must have bound transformers' torch path and run forward on CPU.
SCRIPT = """
import sys
import torch
import compressm_mamba as cm
from compressm_mamba import _optional, compat
from compressm_mamba.models import drop_in, registry
from transformers import MambaConfig, MambaForCausalLM

def hf_mamba():
    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=1, vocab_size=50)).eval()

ids = torch.randint(0, 50, (1, 10))
steps = {
    "_optional.mamba_ssm": _optional.mamba_ssm,
    "_optional.mamba_ssm_selective_scan_ref": _optional.mamba_ssm_selective_scan_ref,
    "_optional.mamba_ssm_class": lambda: _optional.mamba_ssm_class("mamba_ssm.modules.mamba2", "Mamba2"),
    "_optional.mamba_ssm_module": lambda: _optional.mamba_ssm_module("mamba_ssm.models.mixer_seq_simple"),
    "registry.supported_types": registry.supported_types,
    "drop_in.mamba_ssm_mixer_class": drop_in.mamba_ssm_mixer_class,
    "drop_in.replace_mixers_": lambda: drop_in.replace_mixers_(hf_mamba()),
    "compress_": lambda: cm.compress_(hf_mamba(), cm.CompressConfig(mode="rank", rank=4), [ids]),
}
def mamba_ssm_modules():
    return {k for k in sys.modules if k == "selective_scan_cuda" or k.split(".")[0] == "mamba_ssm"}

# transformers' own failed `import mamba_ssm` (at its first Mamba import) may leave subpackages behind.
before = mamba_ssm_modules()
for step, call in steps.items():
    assert call() is not None, step
    left = sorted(mamba_ssm_modules() - before)
    assert not left, f"{step} left {left[:4]} in sys.modules"
assert "mamba_ssm.modules.mamba2.Mamba2" in registry.supported_types(), registry.supported_types()

from transformers import BambaConfig, BambaForCausalLM, JambaConfig, JambaForCausalLM

bamba = BambaForCausalLM(BambaConfig(
    hidden_size=32, num_hidden_layers=2, vocab_size=50, intermediate_size=32, num_attention_heads=4,
    num_key_value_heads=2, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
    mamba_chunk_size=8, attn_layer_indices=[1], mamba_expand=2)).eval()
jamba = JambaForCausalLM(JambaConfig(
    hidden_size=32, num_hidden_layers=2, vocab_size=50, intermediate_size=32, num_attention_heads=4,
    num_key_value_heads=2, mamba_d_state=8, mamba_expand=2, attn_layer_period=2, attn_layer_offset=1,
    expert_layer_period=2, expert_layer_offset=1, num_experts=2, use_mamba_kernels=False)).eval()
for family in ("bamba", "jamba"):
    bound = compat.hf_bound_kernels(family)
    assert bound and set(bound.values()) == {"torch"}, (family, bound)
with torch.no_grad():
    for model in (bamba, jamba):
        logits = model(ids).logits
        assert logits.shape == (1, 10, 50) and torch.isfinite(logits).all()
print("OK")
"""


@pytest.mark.requires_mamba_ssm
@pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-in exists only on machines without CUDA")
@pytest.mark.slow  # a fresh interpreter importing transformers and mamba_ssm
def test_mamba_ssm_entry_points_leave_hybrid_models_working():
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-4000:]


def test_stand_in_never_shadows_a_real_module(monkeypatch):
    """A module already registered under the extension's name (e.g. the real one) is left untouched."""
    from compressm_mamba import _optional

    if _optional._mamba_ssm_mode() != "stub":
        pytest.skip("mamba_ssm is not installed without its CUDA extension here")
    sentinel = type(sys)("selective_scan_cuda")
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", sentinel)
    # transformers' own failed `import mamba_ssm` (at its first Mamba import) may have left subpackages
    before = {k for k in sys.modules if k.split(".")[0] == "mamba_ssm"}
    _optional._import_with_stand_in("mamba_ssm.ops.selective_scan_interface")
    assert sys.modules["selective_scan_cuda"] is sentinel
    assert {k for k in sys.modules if k.split(".")[0] == "mamba_ssm"} == before
