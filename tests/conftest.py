import os
import sys

# Tests never download anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Make tests/helpers.py importable as `helpers` under --import-mode=importlib (which does not put
# the tests folder on sys.path); the repository root stays off sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skips come from marks: requires_cuda / requires_mamba_ssm tests skip where that is missing."""
    import torch

    from compressm_mamba import _optional

    reasons = {}
    if not torch.cuda.is_available():
        reasons["requires_cuda"] = "needs a CUDA device"
    if _optional.mamba_ssm() is None:
        reasons["requires_mamba_ssm"] = "mamba_ssm is not importable here"
    for item in items:
        for mark, reason in reasons.items():
            if mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
