"""scripts/run_transformers_tests.py: the plugin swaps the drop-in into models a test module builds,
counts our three paths and transformers' ops, and fails a drop-in run in which our path never ran.

transformers' own tests are not shipped, so each case lays out a tiny stand-in checkout
(``tests/models/mamba/test_modeling_mamba.py``, written here) and runs the script on it in a
subprocess, as a developer runs it on a real checkout (docs/UPSTREAM_TESTS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "run_transformers_tests.py"

# A model test in the shape of transformers' own: builds tiny models from config, runs a forward
# without a cache and a cached generate, and checks the mixer class it sees.
MODEL_TESTS = '''
import inspect
import os

import torch
from transformers import MambaConfig, MambaForCausalLM


def tiny():
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=32, hidden_size=16, state_size=4, num_hidden_layers=2)
    return MambaForCausalLM(config).eval()


def test_mixer_class():
    assert type(tiny().backbone.layers[0].mixer).__name__ == os.environ["EXPECTED_MIXER"]


def test_config_keeps_its_signature_and_gets_the_use_cache_default():
    # testers read the config's keyword arguments from the signature of __init__
    assert "hidden_size" in inspect.signature(MambaConfig.__init__).parameters
    assert MambaConfig(hidden_size=16).use_cache is (os.environ["EXPECTED_USE_CACHE"] == "True")


def test_forward_without_cache():
    ids = torch.randint(0, 32, (2, 5))
    assert tiny()(ids, use_cache=False).logits.shape == (2, 5, 32)


def test_generate_with_cache():
    ids = torch.randint(0, 32, (2, 5))
    out = tiny().generate(ids, max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
    assert out.shape == (2, 8)
'''


def run(tmp_path: Path, tests: str, *args: str, expected_mixer="CompreSSMMambaMixer",
        expected_use_cache=True):
    """Lay out a checkout holding ``tests`` as its Mamba test module and run the script on it.

    Returns (exit status, the script's JSON summary or None, its output)."""
    checkout = tmp_path / "checkout"
    module = checkout / "tests" / "models" / "mamba" / "test_modeling_mamba.py"
    module.parent.mkdir(parents=True)
    module.write_text(textwrap.dedent(tests), encoding="utf-8")
    report = tmp_path / "report.json"
    path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, EXPECTED_MIXER=expected_mixer, EXPECTED_USE_CACHE=str(expected_use_cache),
               PYTHONPATH=os.pathsep.join(path))
    command = [sys.executable, str(SCRIPT), str(checkout), "--json", str(report), *args, "--", "-q"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    summary = json.loads(report.read_text()) if report.exists() else None
    return proc.returncode, summary, proc.stdout + proc.stderr


@pytest.mark.slow
def test_drop_in_run_swaps_every_model_and_runs_all_three_paths(tmp_path):
    code, s, out = run(tmp_path, MODEL_TESTS)
    assert code == 0, out
    assert s["pytest_exit_status"] == 0 and s["problems"] == []
    assert s["models_swapped"] == 3  # one per tiny() call, each seen by the test as our mixer class
    calls = s["op_calls"]
    assert calls["scan_no_cache"] == 2  # the forward without a cache, one call per layer
    assert calls["scan_prefill"] == 2  # generate's prefill, one per layer
    assert calls["state_update"] == 2 * 2  # 2 decoded tokens after the prefill's 1, per layer
    assert not any(calls.get(op) for op in ("mamba_selective_scan", "mamba_selective_state_update",
                                             "mamba_inner_fn"))


@pytest.mark.slow
def test_vanilla_run_counts_transformers_ops_and_none_of_ours(tmp_path):
    """Also with the configs' use_cache default forced off (use_cache=True passed to generate still wins)."""
    code, s, out = run(tmp_path, MODEL_TESTS, "--mode", "vanilla", "--use-cache", "off",
                       expected_mixer="MambaMixer", expected_use_cache=False)
    assert code == 0, out
    assert s["models_swapped"] == 0
    assert s["op_calls"].get("mamba_selective_scan", 0) > 0
    assert s["op_calls"].get("mamba_selective_state_update", 0) > 0
    assert not any(s["op_calls"].get(k) for k in ("scan_no_cache", "scan_prefill", "state_update"))


@pytest.mark.slow
def test_drop_in_run_that_never_reaches_our_path_fails(tmp_path):
    """A test module that passes without building a Mamba model (or without decoding) cannot pass the run."""
    code, s, out = run(tmp_path, "def test_nothing_built():\n    assert True\n")
    assert code == 4, out
    assert s["pytest_exit_status"] == 4
    assert "our state_update path never ran" in s["problems"]
    assert "no model with a transformers MambaMixer was built" in s["problems"]


def test_the_script_refuses_a_folder_that_is_not_a_checkout(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "test_modeling_mamba.py not found" in proc.stderr
