"""Where the GPU compilers and disassemblers are, and what ``ptxas -v`` says.

No path is hard-coded: Triton ships ptxas, nvdisasm and cuobjdump for the CUDA version it targets
(``triton.knobs.nvidia``; the ``TRITON_PTXAS_PATH`` etc. environment variables override them), and
nvcc comes from ``$CUDA_HOME/bin`` or ``PATH``.  A CUDA toolkit without a driver (the CPU machines of
this project) is enough for all of them.

Architecture limits used by the checks (CUDA C Programming Guide, "Technical Specifications per
Compute Capability"): shared memory per block 227 KB on sm_90, 163 KB on sm_80 (the opt-in maximum
a kernel may request), 65536 registers per SM, 255 per thread, 2048 threads per SM (sm_80 / sm_90).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Opt-in maximum dynamic + static shared memory of one block, bytes.
SMEM_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
# Shared memory of one SM (what occupancy divides), bytes.
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32


class ToolMissing(RuntimeError):
    """A compiler or disassembler the static tooling needs is not installed."""


def triton_tool(name: str) -> str:
    """Path of a tool Triton ships (``ptxas``, ``nvdisasm``, ``cuobjdump``)."""
    try:
        from triton import knobs
    except ImportError as e:  # pragma: no cover - triton is a dependency of the static tooling
        raise ToolMissing(f"{name}: triton is not installed (pip install triton)") from e
    tool = getattr(knobs.nvidia, name.replace("-", "_")).path
    if not tool or not os.path.exists(tool):
        raise ToolMissing(f"{name}: not found where triton.knobs.nvidia.{name} points ({tool!r})")
    return tool


def nvcc_path() -> str | None:
    """nvcc from ``$CUDA_HOME/bin`` or ``PATH``; None when there is none."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def disassembler() -> str:
    """nvdisasm: Triton's, else the CUDA toolkit's (next to nvcc or on PATH)."""
    try:
        return triton_tool("nvdisasm")
    except ToolMissing:
        nvcc = nvcc_path()
        near = os.path.join(os.path.dirname(nvcc), "nvdisasm") if nvcc else None
        found = near if near and os.path.exists(near) else shutil.which("nvdisasm")
        if not found:
            raise
        return found


def cuobjdump() -> str:
    """cuobjdump: Triton's, else the CUDA toolkit's."""
    try:
        return triton_tool("cuobjdump")
    except ToolMissing:
        found = shutil.which("cuobjdump")
        if not found:
            raise
        return found


@dataclass
class PtxasEntry:
    """One entry function of a ``ptxas -v`` log: resources of one compiled kernel.

    regs: registers per thread; stack: bytes of stack frame per thread; spill_stores / spill_loads:
    bytes per thread; smem: static shared memory, bytes; cmem0: bytes of constant bank 0 (kernel
    parameters).
    """

    mangled: str
    arch: str
    regs: int
    stack: int
    spill_stores: int
    spill_loads: int
    smem: int
    cmem0: int


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM0 = re.compile(r"(\d+) bytes cmem\[0\]")


def parse_ptxas_log(log: str) -> list[PtxasEntry]:
    """Entries of a ``ptxas -v`` log (from nvcc ``-Xptxas -v`` or ptxas itself), in log order.

    Each entry's block starts at its "Compiling entry function" line and ends at the next one;
    "Function properties" / "Used N registers" lines inside it belong to that entry.
    """
    entries = []
    starts = list(_ENTRY.finditer(log))
    for i, m in enumerate(starts):
        block = log[m.end(): starts[i + 1].start() if i + 1 < len(starts) else len(log)]
        frame = _FRAME.search(block)
        used = _USED.search(block)
        smem = _SMEM.search(block)
        cmem = _CMEM0.search(block)
        if used is None:
            raise ValueError(f"ptxas log has no register count for {m.group(1)}:\n{block[:2000]}")
        stack, st, ld = (int(x) for x in frame.groups()) if frame else (0, 0, 0)
        entries.append(PtxasEntry(m.group(1), m.group(2), int(used.group(1)), stack, st, ld,
                                  int(smem.group(1)) if smem else 0, int(cmem.group(1)) if cmem else 0))
    return entries


def demangle(names: list[str]) -> list[str]:
    """C++ names demangled with c++filt (unchanged where it is missing)."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else list(names)


def blocks_per_sm(arch: int, threads: int, regs: int, smem: int) -> int:
    """Resident blocks per SM from registers, shared memory and threads (occupancy calculator rules:
    registers allocated per warp in units of 256, shared memory per block rounded to 128 bytes plus
    the 1 KB the runtime reserves per block on sm_80+)."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_threads = MAX_THREADS_PER_SM // (warps * 32)
    smem_block = -(-smem // 128) * 128 + 1024
    by_smem = SMEM_PER_SM[arch] // smem_block
    return max(0, min(by_regs, by_threads, by_smem, MAX_BLOCKS_PER_SM))


def repo_root() -> Path:
    """The repository this file belongs to (bench/static/ -> ../..)."""
    return Path(__file__).resolve().parents[2]
