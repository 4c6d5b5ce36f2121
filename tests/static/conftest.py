"""Shared fixtures of the static (no-GPU) kernel checks: compilations run once per session, in
parallel worker processes (both archs at once), each with a fresh Triton cache (a clean clone has none)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# bench/ on sys.path, as bench's scripts have it: the static tooling is the package ``static`` there.
sys.path.insert(0, str(REPO / "bench"))
WORKERS = int(os.environ.get("COMPRESSM_STATIC_WORKERS", "2"))
TIMEOUT_S = 1200  # both archs together (run_levels)


@pytest.fixture(scope="session")
def triton_resources(tmp_path_factory):
    """{arch: {rows, kernels, chosen}} for sm_90 and sm_80 (triton_cases.LEVELS["ci"])."""
    pytest.importorskip("triton")
    from static.triton_aot import run_levels

    out_dir = tmp_path_factory.mktemp("triton_aot")
    return run_levels((90, 80), "ci", WORKERS, out_dir, TIMEOUT_S)
