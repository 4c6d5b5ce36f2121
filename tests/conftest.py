import os
import sys

# Tests never download anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Triton kernels run in Triton's interpreter where there is no GPU.  It must be switched on before
# any @triton.jit function is defined, i.e. before a test imports compressm_mamba.kernels.*.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

# Make tests/helpers.py importable as `helpers` under --import-mode=importlib (which does not put
# the tests folder on sys.path); the repository root stays off sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skips come from marks: requires_cuda / requires_mamba_ssm tests skip where that is missing."""
    import torch

    from compressm_mamba import _optional

    reasons = {}
    if _optional.triton() is None:
        reasons["requires_triton"] = "triton is not importable here"
    if not torch.cuda.is_available():
        reasons["requires_cuda"] = "needs a CUDA device"
    if _optional.mamba_ssm() is None:
        reasons["requires_mamba_ssm"] = "mamba_ssm is not importable here"
    for item in items:
        for mark, reason in reasons.items():
            if mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def csrc_build(tmp_path_factory):
    """csrc/ compiled once per session for the compile and resource checks: ({source:
    CompletedProcess}, object folder).  See tests/csrc_build.py."""
    import csrc_build as cb

    if not cb.HAVE_NVCC:
        pytest.skip("nvcc not found")
    return cb.build(tmp_path_factory.mktemp("csrc_objects"))

