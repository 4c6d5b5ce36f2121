"""Compile-check csrc/ with nvcc against torch's headers, on machines that cannot build the extension.

A CUDA extension cannot be built or linked against a CPU build of torch (docs/ENV.md, pitfall 5),
but nvcc can compile every .cu file to an object against torch's headers once the one generated
header that CPU builds lack, ``c10/cuda/impl/cuda_cmake_macros.h``, exists (an empty stub is enough
for compiling).  That catches every C++ error, every template-instantiation error and every ptxas
error (register or shared-memory overflow) of the kernels for the real target architectures.

Flags come from setup.py (its literals are read with ``ast``; the file is not run) plus the flags
torch's extension builder adds, so this compiles what ``pip install`` compiles on a GPU machine.
One difference, for time: ``-DCOMPRESSM_MAMBA_FAST_COMPILE_CHECK`` makes the headers instantiate
fewer kernels: the scan for N = 4, 12, 16, 128 and 256 (every thread layout: 2 lanes x 2 states with
the decay factors kept in registers, 2 x 6, 2 x 8, 16 x 8, 32 x 8 with the 4-step backward tile)
instead of 11 sizes, the Gramians for 64 x 64 tiles only instead of 5 tile shapes
(csrc/selective_scan/selective_scan.h, csrc/gramians/gramians.h).  Every .cu file is still compiled,
for every architecture, with every switch (z / no z, ltv / frozen, general / constant rows);
static_asserts check the shared memory of every size that is not compiled.  This check costs ~2 min
of CPU in all (user + sys on the 2-core machine: 1 min 53 s + 11 s).  bindings.cpp is compiled with
the C++ compiler as in the build, and finally all objects are linked into one shared library to
prove that every kernel entry point bindings.cpp calls is defined.  Skipped where nvcc is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from csrc_build import CSRC, CU_FILES, HAVE_NVCC

needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not found")


@pytest.fixture
def build(csrc_build):
    """The session's one build of csrc/ (tests/conftest.py, tests/csrc_build.py)."""
    return csrc_build


def _report(proc: subprocess.CompletedProcess) -> str:
    return f"$ {' '.join(proc.args)}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


def test_every_op_family_has_its_sources():
    """Both families, forward and backward, one .cu per dtype: what setup.py will compile."""
    expected = {f"csrc/selective_scan/selective_scan_{d}_{t}.cu" for d in ("fwd", "bwd") for t in ("fp32", "fp16", "bf16")}
    expected |= {f"csrc/gramians/gramians_{t}.cu" for t in ("fp32", "fp16", "bf16")}
    assert expected <= set(CU_FILES), sorted(expected - set(CU_FILES))
    assert (CSRC / "bindings.cpp").exists()


def test_checkpoint_chunk_agrees_with_the_python_side():
    """The fake forward (compressm_mamba/ops/_cuda.py) predicts the checkpoints' shape from kScanChunk."""
    from compressm_mamba.ops import _cuda

    header = (CSRC / "selective_scan" / "selective_scan.h").read_text()
    match = re.search(r"constexpr int kScanChunk = (\d+);", header)
    assert match, "kScanChunk not found in selective_scan.h"
    assert int(match.group(1)) == _cuda.CHECKPOINT_CHUNK


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES + ["csrc/bindings.cpp"])
def test_source_compiles(build, source):
    results, _ = build
    proc = results[source]
    assert proc.returncode == 0, _report(proc)


@needs_nvcc
def test_objects_link_into_one_library(build, tmp_path):
    """Every kernel entry point bindings.cpp calls is defined by some .cu object (nothing ours undefined)."""
    results, out_dir = build
    if any(proc.returncode != 0 for proc in results.values()):
        pytest.skip("a source failed to compile (reported by test_source_compiles)")
    lib = tmp_path / "_C.so"
    cxx = os.environ.get("CXX", "c++")
    objects = sorted(str(p) for p in out_dir.glob("*.o"))
    proc = subprocess.run([cxx, "-shared", "-o", str(lib), *objects], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, _report(proc)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    undefined = subprocess.run([nm, "-C", "--undefined-only", str(lib)], capture_output=True, text=True,
                               timeout=60).stdout
    ours = [line for line in undefined.splitlines()
            if re.search(r"selective_scan_(fwd|bwd)_cuda|gramian_sums_cuda|compressm_mamba::", line)]
    assert not ours, "undefined symbols of our own:\n" + "\n".join(ours)

