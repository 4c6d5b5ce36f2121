"""The one nvcc build of csrc/ that CI's compile checks share (tests/conftest.py's ``csrc_build``
session fixture): tests/ops/test_cuda_compile.py checks that every source compiles and links,
tests/static/test_cuda_resources.py reads the sm_90 ptxas -v lines of the same objects.

What is compiled is what ``pip install`` compiles on a GPU machine: setup.py's flags (its literals
read with ``ast``; the file is not run) plus torch's extension builder's, for TORCH_CUDA_ARCH_LIST
(default setup.py's), against torch's CPU headers with an empty stub of the one generated header CPU
builds lack (``c10/cuda/impl/cuda_cmake_macros.h``), with ``-DCOMPRESSM_MAMBA_FAST_COMPILE_CHECK``
(see tests/ops/test_cuda_compile.py).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
NVCC = shutil.which("nvcc") or (
    str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc") if os.environ.get("CUDA_HOME") else None
)
HAVE_NVCC = NVCC is not None and os.path.exists(NVCC)
CU_FILES = sorted(str(p.relative_to(REPO)) for p in CSRC.rglob("*.cu"))
WORKERS = 2
TIMEOUT_S = 600


def setup_literals() -> dict:
    """DEFAULT_CUDA_ARCH_LIST, CXX_FLAGS and NVCC_FLAGS as written in setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text())
    wanted = {"DEFAULT_CUDA_ARCH_LIST", "CXX_FLAGS", "NVCC_FLAGS"}
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in wanted:
                found[node.targets[0].id] = ast.literal_eval(node.value)
    missing = wanted - found.keys()
    assert not missing, f"setup.py no longer defines {sorted(missing)} as literals"
    return found


def arch_flags(arch_list: str) -> list[str]:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0", "9.0+PTX") -> nvcc -gencode flags, as torch's builder makes them."""
    flags = []
    for arch in re.split(r"[;\s]+", arch_list.strip()):
        if not arch:
            continue
        num = arch.replace("+PTX", "").replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if arch.endswith("+PTX"):
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


def cuda_include_dir() -> str:
    """The toolkit's include folder (for cuda_runtime_api.h in bindings.cpp), as nvcc itself uses it."""
    out = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, timeout=60)
    match = re.search(r'INCLUDES="-I([^"]+)"', out.stdout + out.stderr)
    assert match, f"cannot find the CUDA include folder in `nvcc --dryrun`:\n{out.stderr}"
    return match.group(1).strip()


def build(out_dir: Path):
    """Compile every csrc/*.cu with nvcc (``-Xptxas -v``: resource usage per kernel and arch in its
    stdout) and bindings.cpp with the C++ compiler, 2 jobs at a time, into ``out_dir``.

    Returns ({source: CompletedProcess}, out_dir).
    """
    from torch.utils import cpp_extension

    literals = setup_literals()
    stub = out_dir / "stub"
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [f"-I{stub}", f"-I{CSRC}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    defines = ["-DCOMPRESSM_MAMBA_FAST_COMPILE_CHECK", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(_cxx11_abi())}"]
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", literals["DEFAULT_CUDA_ARCH_LIST"])

    jobs = {}
    for source in CU_FILES:
        obj = out_dir / (source.replace("/", "_") + ".o")
        jobs[source] = [NVCC, "-c", str(REPO / source), "-o", str(obj), *cpp_extension.COMMON_NVCC_FLAGS,
                        "--compiler-options", "-fPIC", *literals["NVCC_FLAGS"], *arch_flags(arch_list),
                        "-Xptxas", "-v", *includes, *defines]
    cxx = os.environ.get("CXX", "c++")
    jobs["csrc/bindings.cpp"] = [cxx, "-c", str(CSRC / "bindings.cpp"), "-o", str(out_dir / "bindings.o"), "-fPIC",
                                 *literals["CXX_FLAGS"], *includes, f"-I{cuda_include_dir()}",
                                 f"-I{sysconfig.get_paths()['include']}", *defines]

    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(cmd, -1, "", f"timed out after {TIMEOUT_S} s: {e}")

    # Longest first (backward kernels), so that the two workers finish together.
    order = sorted(jobs, key=lambda s: ("bwd" not in s, "bindings" not in s, s))
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = dict(zip(order, pool.map(run, (jobs[s] for s in order))))
    return results, out_dir


def _cxx11_abi() -> bool:
    import torch

    return bool(torch._C._GLIBCXX_USE_CXX11_ABI)
