"""Loops of compiled GPU code (SASS) and their instruction mix per iteration.

The SASS of a cubin (Triton's ``asm["cubin"]``) or of an nvcc object (its embedded cubins) is
disassembled with nvdisasm, with line information (both compilers emit ``-lineinfo``), and split
into functions.  A loop is a backward branch (``BRA`` to a label at or before it); a loop's body is
the instructions from its label to its branch; an innermost loop contains no other loop.  For
each loop: instructions per iteration, the instruction classes below, and the source lines its
body comes from (so a model can tell the time-step loop from a staging loop).

Counts are *per warp per iteration*: every SASS instruction is issued once per warp.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .toolchain import cuobjdump, disassembler

# Instruction classes counted per loop (regular expressions on the opcode).
CLASSES = {
    "global_ld": r"^LDG", "global_st": r"^(STG|RED|ATOMG)", "shared_ld": r"^LDS", "shared_st": r"^STS",
    "shared_atom": r"^ATOMS", "local": r"^(LDL|STL)", "barrier": r"^BAR", "mufu": r"^MUFU", "shuffle": r"^SHFL",
    "fma": r"^(FFMA|FMUL|FADD|HFMA2|HMUL2|HADD2)", "branch": r"^(BRA|BRX|JMP)",
}


@dataclass
class Loop:
    """One loop of a function: [start, end] instruction indices, nesting depth, body counts."""

    start: int
    end: int
    depth: int = 0
    innermost: bool = True
    instructions: int = 0
    classes: dict = field(default_factory=dict)
    lines: tuple = ()  # (file, line) pairs the body's instructions come from, most frequent first
    branch_line: tuple | None = None  # (file, line) of the backward branch: the loop's header


@dataclass
class Function:
    """One kernel's SASS: name (mangled), instructions (opcode text), the source line of each
    instruction ((file, line) or None), and its loops, outermost first."""

    name: str
    instructions: list
    lines: list
    loops: list = field(default_factory=list)

    @property
    def innermost(self) -> list:
        return [lp for lp in self.loops if lp.innermost]


_SECTION = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LINE = re.compile(r'//##\s*File\s+"([^"]+)",\s*line\s+(\d+)')
_BRANCH = re.compile(r"\bBRA\b(?:\.\w+)*\s+`?\(?(\.L_x_\d+)")


def disassemble_cubin(cubin: bytes | str | Path) -> str:
    """nvdisasm text of a cubin (bytes or a path), with line information."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        if isinstance(cubin, (bytes, bytearray)):
            path.write_bytes(cubin)
        else:
            path = Path(cubin)
        proc = subprocess.run([disassembler(), "-c", "-g", str(path)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {proc.stderr[-2000:]}")
    return proc.stdout


def cubins_of_object(obj: str | Path, out_dir: str | Path) -> list[Path]:
    """Extract the cubins embedded in an nvcc object file into ``out_dir`` (cuobjdump -xelf all)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.cubin"):  # a previous extraction: cuobjdump would overwrite them anyway
        old.unlink()
    proc = subprocess.run([cuobjdump(), "-xelf", "all", str(Path(obj).resolve())], cwd=out_dir, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump -xelf failed on {obj}: {proc.stderr[-2000:]}")
    return sorted(out_dir.glob("*.cubin"))


def parse(text: str) -> list[Function]:
    """Functions of an nvdisasm listing, with their loops."""
    functions = []
    current = None
    labels = {}
    line = None
    for raw in text.splitlines():
        m = _SECTION.match(raw)
        if m:
            if current is not None:
                functions.append(_finish(current, labels))
            current, labels, line = Function(m.group(1), [], []), {}, None
            continue
        if current is None:
            continue
        m = _LINE.search(raw)
        if m:
            line = (m.group(1).rsplit("/", 1)[-1], int(m.group(2)))
            continue
        m = _LABEL.match(raw)
        if m:
            labels[m.group(1)] = len(current.instructions)
            continue
        m = _INSTR.match(raw)
        if m:
            current.instructions.append(m.group(2).strip())
            current.lines.append(line)
    if current is not None:
        functions.append(_finish(current, labels))
    return functions


def _opcode(instr: str) -> str:
    instr = re.sub(r"^@!?U?P\w+\s+", "", instr)  # predicate guard
    return instr.split()[0] if instr else ""


def _finish(fn: Function, labels: dict) -> Function:
    loops = []
    for i, instr in enumerate(fn.instructions):
        m = _BRANCH.search(instr)
        # A branch to itself is the trap after EXIT that pads every function, not a loop.
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            loops.append(Loop(labels[m.group(1)], i))
    loops.sort(key=lambda lp: (lp.start, -lp.end))
    for lp in loops:
        inner = [o for o in loops if o is not lp and lp.start <= o.start and o.end <= lp.end]
        outer = [o for o in loops if o is not lp and o.start <= lp.start and lp.end <= o.end]
        lp.innermost = not inner
        lp.depth = len(outer)
        body = fn.instructions[lp.start: lp.end + 1]
        ops = [_opcode(x) for x in body]
        lp.instructions = len(body)
        lp.classes = {name: sum(1 for op in ops if re.match(pat, op)) for name, pat in CLASSES.items()}
        lp.branch_line = fn.lines[lp.end]
        lp.lines = tuple(k for k, _ in Counter(x for x in fn.lines[lp.start: lp.end + 1] if x).most_common())
    fn.loops = loops
    return fn


def functions_of(cubin: bytes | str | Path) -> list[Function]:
    """Parsed functions of one cubin."""
    return parse(disassemble_cubin(cubin))


def loop_rows(fn: Function, label: str = "") -> list[dict]:
    """One row per loop (innermost flagged): instructions per iteration and the class counts."""
    rows = []
    for lp in fn.loops:
        rows.append(dict(function=label or fn.name, start=lp.start, end=lp.end, depth=lp.depth,
                         innermost=lp.innermost, instructions=lp.instructions, **lp.classes,
                         header=":".join(map(str, lp.branch_line)) if lp.branch_line else "",
                         source_lines=" ".join(f"{f}:{n}" for f, n in lp.lines[:4])))
    return rows
