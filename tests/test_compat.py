"""compressm_mamba.compat: the declared transformers range is the tested one, and transformers'
internals are reached through compat only."""

import os
import re

import pytest

from compressm_mamba import compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyproject_declares_the_tested_range():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    low, high = compat.TRANSFORMERS_TESTED
    declared = [req for extra in project["optional-dependencies"].values() for req in extra
                if req.startswith("transformers")]
    assert declared and set(declared) == {f"transformers>={low},<={high}"}, declared
    assert not [req for req in project["dependencies"] if req.startswith(("torch", "triton"))], \
        "torch stays out of pip's resolution (an unpinned torch pulls ~3.5 GB of CUDA wheels)"


def test_the_installed_transformers_is_inside_the_tested_range():
    pytest.importorskip("transformers")
    assert compat.transformers_tested(), (compat.transformers_version(), compat.TRANSFORMERS_TESTED)


def test_range_check():
    low, high = compat.TRANSFORMERS_TESTED
    assert compat.transformers_tested(low) and compat.transformers_tested(high)
    assert compat.transformers_tested(high + ".dev0")  # same release
    assert not compat.transformers_tested("5.16.9") and not compat.transformers_tested("5.24.0")
    assert not compat.transformers_tested("4.57.1")


def test_no_module_but_compat_touches_transformers_internals():
    """Only the public top level (``from transformers import X``) is used outside compat.py."""
    internal = re.compile(r"transformers\.(models|utils|integrations|cache_utils|generation|modeling_\w+)\b")
    offenders = []
    for root, _, files in os.walk(os.path.join(REPO, "compressm_mamba")):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".py") and not path.endswith(os.path.join("compressm_mamba", "compat.py")):
                with open(path) as f:
                    offenders += [f"{os.path.relpath(path, REPO)}:{i}" for i, line in enumerate(f, 1)
                                  if internal.search(line)]
    assert not offenders, offenders


def test_mixer_attribute_names_exist_on_transformers_mixers():
    pytest.importorskip("transformers")
    from transformers import Mamba2Config, MambaConfig

    classes = compat.hf_mixer_classes()
    mamba1 = classes["MambaMixer"](MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=1), layer_idx=0)
    mamba2 = classes["Mamba2Mixer"](Mamba2Config(hidden_size=16, state_size=4, num_hidden_layers=1, head_dim=8,
                                                 num_heads=4, n_groups=1, expand=2), layer_idx=0)
    for mixer, names in ((mamba1, compat.HF_MAMBA1_ATTRS), (mamba2, compat.HF_MAMBA2_ATTRS)):
        missing = [attr for attr in names.values() if not hasattr(mixer, attr)]
        assert not missing, (type(mixer).__name__, missing)
    assert getattr(mamba1, compat.HF_MAMBA1_ATTRS["state"]) == 4
    hf = compat.hf_modeling_module("mamba2")
    assert all(callable(getattr(hf, name)) for name in compat.HF_MAMBA2_FUNCTIONS)


def test_bound_kernel_flags():
    """What transformers' kernel wrappers run; on a machine without CUDA, transformers' torch path."""
    pytest.importorskip("transformers")
    import torch

    bound = compat.hf_bound_kernels("mamba")
    assert {"mamba_selective_scan", "causal_conv1d_fn"} <= set(bound), bound
    if not torch.cuda.is_available():
        assert set(bound.values()) == {"torch"}, bound
    assert compat.bound_kernel(len) == "unknown"


def test_an_untested_transformers_gets_one_warning(monkeypatch):
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.30.0")
    compat.warn_if_untested.cache_clear()
    try:
        low, high = compat.TRANSFORMERS_TESTED
        with pytest.warns(UserWarning, match=re.escape(f"tested with transformers {low} .. {high}; this is 5.30.0")):
            assert compat.warn_if_untested() is False
    finally:
        compat.warn_if_untested.cache_clear()
