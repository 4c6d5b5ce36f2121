"""Compile CUDA sources with ``nvcc -Xptxas -v`` on a machine without a GPU; one row per kernel.

A CUDA extension cannot be built against a CPU build of torch, but nvcc compiles every .cu file
against torch's headers once the one generated header CPU builds lack,
``c10/cuda/impl/cuda_cmake_macros.h``, exists (an empty ``#pragma once`` stub; shared ENV.md,
pitfall 5).  ptxas then reports, per kernel instantiation: registers, stack frame, spill stores and
loads, static shared memory.  The objects keep the cubins for the SASS analysis.

Two source sets:

- ``project_sources()``: csrc/**/*.cu with setup.py's NVCC_FLAGS (read with ``ast``, not run) and
  the flags torch's extension builder adds, i.e. what ``pip install`` compiles on a GPU machine;
  ``fast=True`` adds ``-DCOMPRESSM_MAMBA_FAST_COMPILE_CHECK`` (fewer state sizes instantiated, as
  tests/ops/test_cuda_compile.py does) to keep CI affordable.
- ``mamba_ssm_sources(cache)``: the anchor, mamba_ssm 2.3.2.post1's selective scan from its sdist
  (downloaded once into ``cache``), compiled with mamba_ssm's own nvcc flags; only the one
  instantiation its dispatch picks at L = 2048 in bf16 with z and variable B/C (128 threads x 16
  items), written as a two-line explicit instantiation next to its sources.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .toolchain import demangle, nvcc_path, parse_ptxas_log, repo_root

MAMBA_SSM_VERSION = "2.3.2.post1"


@dataclass
class CompileJob:
    """One nvcc invocation: ``source`` compiled to ``obj`` with ``flags``; ``family`` labels rows."""

    family: str
    source: str
    obj: str
    flags: list = field(default_factory=list)


@dataclass
class CompileResult:
    job: CompileJob
    returncode: int
    log: str
    seconds: float


def setup_literals(repo: Path | None = None) -> dict:
    """DEFAULT_CUDA_ARCH_LIST, CXX_FLAGS and NVCC_FLAGS as written in setup.py."""
    tree = ast.parse(((repo or repo_root()) / "setup.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("DEFAULT_CUDA_ARCH_LIST", "CXX_FLAGS", "NVCC_FLAGS"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def torch_includes(stub_dir: Path) -> list[str]:
    """Include flags for torch's headers on a CPU build (plus the stub header) and Python's."""
    from torch.utils import cpp_extension

    header = stub_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    header.parent.mkdir(parents=True, exist_ok=True)
    header.write_text("#pragma once\n")
    return [f"-I{stub_dir}"] + [f"-I{p}" for p in cpp_extension.include_paths()] + [
        f"-I{sysconfig.get_paths()['include']}"]


def _abi_define() -> str:
    import torch

    return f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


def project_sources(out_dir: Path, arch: int = 90, fast: bool = False, repo: Path | None = None) -> list[CompileJob]:
    """nvcc jobs for every csrc/**/*.cu of the project, for one arch, with ptxas -v."""
    from torch.utils import cpp_extension

    repo = repo or repo_root()
    flags = setup_literals(repo)["NVCC_FLAGS"]
    common = [*cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", *flags,
              "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
              *torch_includes(out_dir / "stub"), f"-I{repo / 'csrc'}",
              "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", _abi_define()]
    if fast:
        common.append("-DCOMPRESSM_MAMBA_FAST_COMPILE_CHECK")
    jobs = []
    for src in sorted((repo / "csrc").rglob("*.cu")):
        rel = src.relative_to(repo)
        obj = out_dir / (str(rel).replace("/", "_") + f".sm{arch}.o")
        jobs.append(CompileJob(rel.parts[1] if len(rel.parts) > 2 else "csrc", str(rel), str(obj),
                               ["-c", str(src), "-o", str(obj), *common]))
    return jobs


def fetch_mamba_ssm(cache: Path) -> Path:
    """mamba_ssm's sdist unpacked under ``cache`` (downloaded with pip on first use); its root."""
    root = cache / f"mamba_ssm-{MAMBA_SSM_VERSION}"
    if (root / "csrc" / "selective_scan").exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"mamba_ssm-{MAMBA_SSM_VERSION}.tar.gz"
    if not tarball.exists():
        # pip prepares the sdist's metadata by running its setup.py: without these flags it tries
        # to build the CUDA extension (and, isolated, to install torch) just to read the metadata.
        env = dict(os.environ, MAMBA_SKIP_CUDA_BUILD="TRUE", MAMBA_FORCE_BUILD="TRUE")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                        "--no-binary", ":all:", f"mamba-ssm=={MAMBA_SSM_VERSION}", "-d", str(cache)],
                       check=True, env=env, capture_output=True, text=True, timeout=600)
    with tarfile.open(tarball) as tar:
        tar.extractall(cache, filter="data")
    return root


# The instantiation mamba_ssm's dispatch picks at L = 2048 (> 1024: 128 threads x 16 items; even
# length; variable B and C; z; bf16 input, real weights).  Its flags are its setup.py's.
_MAMBA_INSTANCES = {
    "fwd": ("selective_scan_fwd_kernel.cuh",
            "template __global__ void selective_scan_fwd_kernel<Selective_Scan_fwd_kernel_traits"
            "<128, 16, 1, true, true, true, true, at::BFloat16, float>>(SSMParamsBase);"),
    "bwd": ("selective_scan_bwd_kernel.cuh",
            "template __global__ void selective_scan_bwd_kernel<Selective_Scan_bwd_kernel_traits"
            "<128, 16, true, true, true, true, true, at::BFloat16, float>>(SSMParamsBwd);"),
}
MAMBA_NVCC_FLAGS = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
                    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo"]


def mamba_ssm_sources(cache: Path, out_dir: Path, arch: int = 90) -> list[CompileJob]:
    """nvcc jobs for the anchor's forward and backward kernel (one instantiation each)."""
    from torch.utils import cpp_extension

    src_dir = fetch_mamba_ssm(cache) / "csrc" / "selective_scan"
    common = [*cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", *MAMBA_NVCC_FLAGS,
              "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
              *torch_includes(out_dir / "stub"), f"-I{src_dir}", "-DTORCH_EXTENSION_NAME=selective_scan_cuda",
              "-DTORCH_API_INCLUDE_EXTENSION_H", _abi_define()]
    jobs = []
    for direction, (header, line) in _MAMBA_INSTANCES.items():
        unit = out_dir / f"mamba_ssm_{direction}_instance.cu"
        unit.write_text(f'#include "{header}"\n{line}\n')
        obj = out_dir / f"mamba_ssm_{direction}.sm{arch}.o"
        label = f"mamba_ssm-{MAMBA_SSM_VERSION}/csrc/selective_scan/{header} ({direction} instance)"
        jobs.append(CompileJob("mamba_ssm", label, str(obj), ["-c", str(unit), "-o", str(obj), *common]))
    return jobs


def run_jobs(jobs: list[CompileJob], workers: int = 2, timeout_s: int = 1800, reuse: bool = False) -> list[CompileResult]:
    """Run nvcc jobs, ``workers`` at a time, backward sources first (the longest).

    Each object's log is kept beside it (``<obj>.log``); ``reuse`` takes an object and its log from an
    earlier run instead of compiling again (for iterating on a model; sources must be unchanged).
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: set CUDA_HOME or put nvcc on PATH")

    def run(job):
        log_path = Path(job.obj + ".log")
        if reuse and Path(job.obj).exists() and log_path.exists():
            return CompileResult(job, 0, log_path.read_text(), 0.0)
        start = time.perf_counter()
        try:
            proc = subprocess.run([nvcc, *job.flags], capture_output=True, text=True, timeout=timeout_s)
            code, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            code, log = -1, f"timed out after {timeout_s} s: {e}"
        if code == 0:
            log_path.write_text(log)
        return CompileResult(job, code, log, time.perf_counter() - start)

    order = sorted(jobs, key=lambda j: ("bwd" not in j.source, j.source))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, order))


def _short_name(demangled: str) -> str:
    """``void ns::kernel<args>(Params)`` -> ``kernel<args>`` (namespaces and parameters dropped)."""
    name = re.sub(r"^void ", "", demangled)
    name = re.sub(r"\((?:[^()]*)\)$", "", name)
    name = re.sub(r"\b[A-Za-z_]\w*::", "", name)
    return name.replace("c10::", "").replace("BFloat16", "bf16").replace("Half", "fp16")


def resource_rows(results: list[CompileResult]) -> list[dict]:
    """One row per kernel instantiation in the ptxas logs (deduplicated by arch and mangled name),
    and one error row per source that failed to compile."""
    rows, seen = [], set()
    for res in results:
        if res.returncode != 0:
            rows.append(dict(family=res.job.family, source=res.job.source, arch="", kernel="", regs="", stack="",
                             spill_stores="", spill_loads="", smem="", compile_s=round(res.seconds, 1),
                             error=res.log[-1500:].replace("\n", " | ")))
            continue
        entries = [e for e in parse_ptxas_log(res.log) if (e.arch, e.mangled) not in seen]
        seen.update((e.arch, e.mangled) for e in entries)
        for entry, name in zip(entries, demangle([e.mangled for e in entries])):
            rows.append(dict(family=res.job.family, source=res.job.source, arch=entry.arch, kernel=_short_name(name),
                             regs=entry.regs, stack=entry.stack, spill_stores=entry.spill_stores,
                             spill_loads=entry.spill_loads, smem=entry.smem, compile_s=round(res.seconds, 1),
                             error="", mangled=entry.mangled))
    for row in rows:
        row.setdefault("mangled", "")
    return rows


def kernel_template(short_name: str) -> str:
    """``selective_scan_bwd_kernel<128, true, bf16>`` -> ``selective_scan_bwd_kernel`` (budget key)."""
    return short_name.split("<", 1)[0]
