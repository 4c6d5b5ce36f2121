"""csrc/ compiled for sm_90 with ``nvcc -Xptxas -v`` against torch's CPU headers: one row per kernel
instantiation (registers, stack, spills, static shared memory), checked against declared budgets.

The objects are the session's one csrc build (tests/csrc_build.py: ``-DCOMPRESSM_MAMBA_FAST_COMPILE_CHECK``,
the reduced instantiation list; every .cu and every switch still compiled), shared with
tests/ops/test_cuda_compile.py; its sm_90 rows are checked here;
``bench/static_report.py`` compiles every instantiation and writes the table.  Skipped where nvcc is
missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from static import cuda_ptxas
from static.toolchain import nvcc_path

needs_nvcc = pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found")

# Declared budgets, bytes per thread, by kernel template name; a kernel not listed gets the default.
SPILL_BYTES = {
    # Some Gramian tile shapes spill 4 + 4 bytes (ptxas, sm_90): accepted, far from any hot loop's cost.
    "gramian_sums_kernel": 16,
}
DEFAULT_SPILL_BYTES = 0
STACK_BYTES = {
    # sub_h[kSubTiles][kStates] is indexed by a runtime sub-tile, so it lives in local memory by design:
    # kSubTiles x kStates x 4 bytes = 512 at N = 256 (kBwdT = 4: 16 sub-tiles x 8 states), main fda6e39.
    "selective_scan_bwd_kernel": 512,
    "gramian_sums_kernel": 16,
}
DEFAULT_STACK_BYTES = 0
# Static shared memory of one block cannot exceed 48 KiB (more needs dynamic shared memory).
STATIC_SMEM_BYTES = 48 * 1024


@pytest.fixture(scope="module")
def cuda_rows(csrc_build, tmp_path_factory):
    """ptxas -v rows (sm_90) of the session's one csrc build (tests/csrc_build.py, shared with
    tests/ops/test_cuda_compile.py).  Where TORCH_CUDA_ARCH_LIST leaves sm_90 out, csrc is compiled
    here for sm_90 alone."""
    procs, out_dir = csrc_build
    results = [cuda_ptxas.CompileResult(cuda_ptxas.CompileJob(Path(src).parts[1], src, str(out_dir / src)),
                                        proc.returncode, proc.stdout + proc.stderr, 0.0)
               for src, proc in procs.items() if src.endswith(".cu")]
    rows = [r for r in cuda_ptxas.resource_rows(results) if r["error"] or r["arch"] == "sm_90"]
    if not any(r["arch"] == "sm_90" for r in rows):
        out = tmp_path_factory.mktemp("cuda_ptxas")
        results = cuda_ptxas.run_jobs(cuda_ptxas.project_sources(out, arch=90, fast=True), workers=2, timeout_s=900)
        rows = cuda_ptxas.resource_rows(results)
    return results, rows


@needs_nvcc
def test_every_source_compiles(cuda_rows):
    results, _ = cuda_rows
    failed = [f"{r.job.source}:\n{r.log[-3000:]}" for r in results if r.returncode != 0]
    assert not failed, "\n\n".join(failed)


@needs_nvcc
def test_every_family_has_forward_and_backward_rows(cuda_rows):
    _, rows = cuda_rows
    names = {cuda_ptxas.kernel_template(r["kernel"]) for r in rows if not r["error"]}
    assert {"selective_scan_fwd_kernel", "selective_scan_bwd_kernel", "gramian_sums_kernel"} <= names, names
    assert all(r["arch"] == "sm_90" for r in rows if not r["error"])


@needs_nvcc
def test_spills_and_stack_within_budget(cuda_rows):
    _, rows = cuda_rows
    over = []
    for r in rows:
        if r["error"]:
            continue
        name = cuda_ptxas.kernel_template(r["kernel"])
        spills = r["spill_stores"] + r["spill_loads"]
        if spills > SPILL_BYTES.get(name, DEFAULT_SPILL_BYTES):
            over.append(f"{r['kernel']}: {spills} B spilled > {SPILL_BYTES.get(name, DEFAULT_SPILL_BYTES)} B")
        if r["stack"] > STACK_BYTES.get(name, DEFAULT_STACK_BYTES):
            over.append(f"{r['kernel']}: {r['stack']} B stack > {STACK_BYTES.get(name, DEFAULT_STACK_BYTES)} B")
    assert not over, "\n".join(over)


@needs_nvcc
def test_static_shared_memory_within_48_kib(cuda_rows):
    _, rows = cuda_rows
    over = [f"{r['kernel']}: {r['smem']} B" for r in rows if not r["error"] and r["smem"] > STATIC_SMEM_BYTES]
    assert not over, "\n".join(over)
