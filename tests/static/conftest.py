"""Shared fixtures of the static (no-GPU) kernel checks: compilations run once per session, in
parallel worker processes, each with a fresh Triton cache (a clean clone has none)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# bench/ on sys.path, as bench's scripts have it: the static tooling is the package ``static`` there.
sys.path.insert(0, str(REPO / "bench"))
WORKERS = int(os.environ.get("COMPRESSM_STATIC_WORKERS", "2"))
TIMEOUT_S = 900


def _triton_rows(arch: int, out_dir: Path) -> dict:
    """Run ``bench.static.triton_aot`` at the CI level for ``arch`` in WORKERS shards."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "bench"), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    procs = []
    for k in range(WORKERS):
        out = out_dir / f"sm{arch}_{k}.jsonl"
        cmd = [sys.executable, "-m", "static.triton_aot", "--arch", str(arch), "--level", "ci",
               "--shard", f"{k}/{WORKERS}", "--out", str(out)]
        env_k = dict(env, TRITON_CACHE_DIR=str(out_dir / f"cache_{arch}_{k}"))
        procs.append((out, subprocess.Popen(cmd, cwd=REPO, env=env_k, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)))
    rows, kernels, chosen = [], set(), 0
    for out, proc in procs:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, f"triton_aot sm_{arch} failed:\n{log[-6000:]}"
        with open(out) as f:
            head = json.loads(f.readline())
            kernels.update(head["discovered_kernels"])
            chosen = head["chosen"]
            rows += [json.loads(line) for line in f]
    return dict(rows=rows, kernels=sorted(kernels), chosen=chosen)


@pytest.fixture(scope="session")
def triton_resources(tmp_path_factory):
    """{arch: {rows, kernels, chosen}} for sm_90 and sm_80 (triton_cases.LEVELS["ci"])."""
    pytest.importorskip("triton")
    out_dir = tmp_path_factory.mktemp("triton_aot")
    return {arch: _triton_rows(arch, out_dir) for arch in (90, 80)}
