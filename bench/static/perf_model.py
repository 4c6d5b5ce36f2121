"""An issue-rate + bytes-moved model: SASS instruction counts -> PREDICTED kernel times.

Every number this module returns is a PREDICTION, not a measurement.  The model, and its assumptions:

1. Instructions.  A kernel's dynamic warp-instruction count is the sum, over its SASS, of each
   instruction times how often it runs: straight-line code once per warp, a loop's own body (without
   its inner loops) once per iteration of it and of every loop around it.  Trip counts come from
   the loop's header (the source line of its backward branch, read through the compiler's line
   information) matched against the kernel family's ``TripRule``s below; a loop of the kernel's
   own source that no rule matches makes the model refuse (``ModelError``) rather than guess; a
   loop inside a library header (CUDA's float-atomic compare-and-swap retry, cub) counts one trip;
   of sibling loops with one header (versions the compiler made by unswitching a runtime flag)
   only the largest counts.  Straight-line code counts every branch arm (an overestimate where
   arms are exclusive).  Warps launched come from the launch
   (captured for Triton, from the family's launch geometry for CUDA).
2. Issue rate.  An SM issues at most one warp-instruction per scheduler per clock (4 schedulers,
   132 SMs, 1.98 GHz boost on an H200).  The achieved fraction ``efficiency`` is a range, not a
   fit: (0.50, 0.75) when each scheduler holds >= 4 resident warps to hide latency, scaled down in
   proportion below that; resident warps follow from registers, shared memory and threads
   (``toolchain.blocks_per_sm``) and from how many blocks the grid has per SM.  The busiest SM's
   blocks run in rounds of blocks_per_sm (a partial last round at its own, lower, occupancy);
   SMs are otherwise independent (``predict``).
3. Bytes.  Each tensor a launch touches is read or written once from DRAM (caches assumed to absorb
   re-reads; scratch reuse inside a launch is not counted, so this is a lower bound), at 4.3 TB/s
   (the H200's measured device-copy bandwidth, shared GPU.md).
4. A launch takes max(issue time, memory time): the two overlap.  Launch overheads are ignored.

When a GPU measures the same shapes (bench/gpu_check.sh), the measured column sits beside these
rows (``bench/static_report.py`` joins them) and says how far off the model was.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .sass import Function
from .toolchain import blocks_per_sm


@dataclass(frozen=True)
class GPU:
    name: str
    arch: int
    sms: int
    schedulers: int
    clock_hz: float
    dram_bytes_per_s: float


H200 = GPU("H200 (PREDICTION model)", 90, 132, 4, 1.98e9, 4.3e12)
EFFICIENCY = (0.50, 0.75)
WARPS_PER_SCHEDULER_TO_HIDE_LATENCY = 4

ASSUMPTIONS = ("issue-bound model: 4 warp-instr/SM/clock x 132 SMs x 1.98 GHz, efficiency 0.50-0.75 scaled by "
               "resident warps/scheduler (<4), busiest SM's rounds of resident blocks; bytes = tensors touched once at 4.3 TB/s; "
               "time = max(issue, bytes); SASS counts from sm_90 compiles; no GPU ran")


class ModelError(RuntimeError):
    """The model cannot account for a kernel (an unmodelled loop, a missing source line)."""


@dataclass(frozen=True)
class TripRule:
    """Loops whose header source line matches ``pattern`` run ``trips`` times per iteration of the
    loop around them; ``trips`` is a Python expression over the kernel's constants."""

    pattern: str
    trips: str


@dataclass
class KernelWork:
    """One launch at one shape: ``blocks`` of ``threads`` threads, ``warp_instr`` in all, ``bytes``
    moved; ``regs`` / ``smem`` for occupancy; ``loops`` the per-loop breakdown."""

    backend: str
    kernel: str
    direction: str
    blocks: int
    threads: int
    warp_instr: float
    bytes: float
    regs: int
    smem: int
    loops: list = field(default_factory=list)


@dataclass
class Prediction:
    work: KernelWork
    blocks_per_sm: int
    warps_per_scheduler: float
    issue_ms: tuple
    memory_ms: float
    ms: tuple  # (optimistic, pessimistic)


class SourceLines:
    """Source text by (basename, line) over a list of folders (the line info holds base names)."""

    def __init__(self, roots):
        self.files = {}
        for root in roots:
            for path in sorted(Path(root).rglob("*")):
                if path.suffix in (".py", ".cu", ".cuh", ".h") and path.name not in self.files:
                    self.files[path.name] = path
        self._cache = {}

    def text(self, name: str) -> list[str] | None:
        """All lines of a source file by base name (None outside the roots)."""
        if name not in self.files:
            return None
        if name not in self._cache:
            self._cache[name] = self.files[name].read_text().splitlines()
        return self._cache[name]

    def line(self, where) -> str | None:
        """The stripped source line, or None for a file outside the roots (a library header)."""
        name, number = where
        if name not in self.files:
            return None
        if name not in self._cache:
            self._cache[name] = self.files[name].read_text().splitlines()
        return self._cache[name][number - 1].strip()


def _eval(expr: str, consts: dict) -> float:
    return float(eval(expr, {"__builtins__": {}, "ceil": math.ceil, "min": min, "max": max}, dict(consts)))


_RANGE = re.compile(r"^for\s+\w+\s+in\s+(?:tl\.)?(?:range|static_range)\((.*)\)\s*:")
_ASSIGN = re.compile(r"^\s*(\w+)\s*=\s*(.+?)\s*(#.*)?$")


def _split_args(text: str) -> list[str]:
    depth, start, out = 0, 0, []
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    return [a.strip() for a in out + [text[start:]] if a.strip()]


def python_range_trips(sources: SourceLines, where, consts: dict) -> float | None:
    """Trips of a Triton ``for x in range(start, stop[, step])`` loop of the first program.

    The bounds are evaluated with the launch's integer arguments and constexprs (``consts``), the
    kernel's scalar assignments above the loop replayed in order (``tl.program_id`` = 0,
    ``tl.num_programs(a)`` = the grid, ``tl.minimum`` / ``tl.maximum`` / ``tl.cdiv``; assignments
    that are not scalar arithmetic are skipped).  None when the header is not such a loop or a
    bound cannot be evaluated: then a ``TripRule`` must say it.
    """
    lines = sources.text(where[0])
    if lines is None:
        return None
    m = _RANGE.match(lines[where[1] - 1].strip())
    if not m:
        return None
    start = where[1] - 1
    while start > 0 and not lines[start].lstrip().startswith("def "):
        start -= 1
    grid = tuple(consts.get("_grid", ())) + (1, 1, 1)
    names = {"__builtins__": {}, "min": min, "max": max,
             "tl": type("tl", (), {"minimum": staticmethod(min), "maximum": staticmethod(max),
                                   "cdiv": staticmethod(lambda a, b: -(-a // b)),
                                   "program_id": staticmethod(lambda axis: 0),
                                   "num_programs": staticmethod(lambda axis: grid[axis])})}
    space = {k: v for k, v in consts.items() if not k.startswith("_")}
    for text in lines[start + 1: where[1] - 1]:
        a = _ASSIGN.match(text)
        if a:
            try:
                value = eval(a.group(2).replace(".to(tl.int64)", ""), names, space)
            except Exception:  # noqa: BLE001 - tensor expressions are not replayed
                space.pop(a.group(1), None)
                continue
            if isinstance(value, (int, float)):
                space[a.group(1)] = value
    args = _split_args(m.group(1))
    try:
        vals = [eval(a, names, space) for a in args]
    except Exception:  # noqa: BLE001
        return None
    lo, hi, step = (0, vals[0], 1) if len(vals) == 1 else (vals[0], vals[1], vals[2] if len(vals) > 2 else 1)
    return float(max(0, -(-(hi - lo) // step)))


def dynamic_instructions(fn: Function, rules, consts: dict, sources: SourceLines):
    """Warp-instructions one warp issues running ``fn``, and the per-loop breakdown.

    Returns (total, rows): rows give each loop's header, trips per enclosing iteration, total
    iterations, and its own instructions per iteration.
    """
    loops = sorted(fn.loops, key=lambda lp: (lp.start, -lp.end))
    parent = {}
    for lp in loops:
        enclosing = [o for o in loops if o is not lp and o.start <= lp.start and lp.end <= o.end]
        parent[id(lp)] = max(enclosing, key=lambda o: o.start) if enclosing else None
    # Sibling loops with one header are versions of one source loop (the compiler unswitched it on a
    # runtime flag, e.g. has_delta_bias): one version runs, so only the largest is counted.
    versions = {}
    for lp in loops:
        versions.setdefault((id(parent[id(lp)]), lp.branch_line), []).append(lp)
    unused = {id(lp) for group in versions.values() for lp in group
              if lp is not max(group, key=lambda o: o.instructions)}
    multiplier, rows = {}, []
    for lp in loops:  # outer loops come first
        if lp.branch_line is None:
            raise ModelError(f"{fn.name}: a loop without line information (compile with -lineinfo)")
        header = sources.line(lp.branch_line)
        if header is None:
            # A loop of a library header (CUDA's float atomicAdd compare-and-swap retry, cub): the
            # kernel's source does not say how often it runs; one trip = the uncontended case.
            header, trips = f"(library loop, 1 trip assumed) {lp.branch_line[0]}", 1.0
        else:
            rule = next((r for r in rules if re.search(r.pattern, header)), None)
            trips = _eval(rule.trips, consts) if rule else python_range_trips(sources, lp.branch_line, consts)
            if trips is None:
                raise ModelError(f"{fn.name}: no trip rule for the loop at {lp.branch_line[0]}:{lp.branch_line[1]} "
                                 f"`{header}`; add one to bench/static/perf_model.py")
        if id(lp) in unused:
            header, trips = f"(unused version) {header}", 0.0
        outer = parent[id(lp)]
        multiplier[id(lp)] = trips * (multiplier[id(outer)] if outer is not None else 1.0)
        children = [o for o in loops if parent[id(o)] is lp]
        own = lp.instructions - sum(c.instructions for c in children)
        rows.append(dict(header=f"{lp.branch_line[0]}:{lp.branch_line[1]} {header}", trips=trips,
                         iterations=multiplier[id(lp)], instructions=own))
    top = [lp for lp in loops if parent[id(lp)] is None]
    straight = len(fn.instructions) - sum(lp.instructions for lp in top)
    total = straight + sum(r["instructions"] * r["iterations"] for r in rows)
    return total, rows


def predict(work: KernelWork, gpu: GPU = H200) -> Prediction:
    """Predicted (optimistic, pessimistic) milliseconds of one launch.

    Rounds per SM: the busiest SM gets ceil(blocks / SMs) blocks, run ``blocks_per_sm`` at a time
    (equal blocks finish together), then the remainder.  A round of k blocks issues its k x
    (warp-instructions per block) at ``eff x hide(k)`` of the SM's issue rate, hide(k) = resident
    warps per scheduler / 4 (capped at 1): below 4 warps a scheduler idles on latency.  Resident
    slots left empty cost nothing by themselves (the SM's schedulers serve whatever warps it has);
    the fewer warps are charged once, through hide.  (The model of 92f9d14 also divided by the
    fraction of resident slots filled, charging an under-filled wave twice: 2.4x too slow for the
    CUDA scan's 384 blocks.)
    """
    warps_per_block = -(-work.threads // 32)
    bps = max(1, blocks_per_sm(gpu.arch, work.threads, work.regs, work.smem))
    per_sm = -(-work.blocks // gpu.sms) if work.blocks else 0
    per_block = work.warp_instr / max(work.blocks, 1)
    rounds = [bps] * (per_sm // bps) + ([per_sm % bps] if per_sm % bps else [])

    def hide(k):
        return min(1.0, k * warps_per_block / gpu.schedulers / WARPS_PER_SCHEDULER_TO_HIDE_LATENCY)

    sm_rate = gpu.schedulers * gpu.clock_hz
    issue = tuple(sum(k * per_block / (sm_rate * eff * hide(k)) for k in rounds) * 1e3
                  for eff in (EFFICIENCY[1], EFFICIENCY[0]))
    wps = (rounds[0] if rounds else 0) * warps_per_block / gpu.schedulers
    memory = work.bytes / gpu.dram_bytes_per_s * 1e3
    return Prediction(work, bps, wps, issue, memory, (max(issue[0], memory), max(issue[1], memory)))


# -- the kernel families ------------------------------------------------------------------------
# Each family: trip rules for its loop headers and a function giving launch geometry and constants.

TRITON_SCAN_RULES = [
    # kernels/selective_scan.py as of main 92f9d14: (BLOCK_D, NP) state tile, one time step per iteration.
    TripRule(r"for c(_rev)? in range\(0, n_chunks\)", "n_chunks"),
    TripRule(r"for t in range\(t_start, t_end\)", "min(chunk_size, L)"),
    TripRule(r"for i in range\(0, t_end - t_start\)", "min(chunk_size, L)"),
    # The redesign on branch `triton` (64992a6): (BLOCK_D, BLOCK_T) tiles, a loop over states inside.
    TripRule(r"for k in range\(k0, k1\)", "tiles_per_split"),
    TripRule(r"for n in range\(N\)", "N"),
    TripRule(r"for blk in range\(blk0, blk1\)", "blocks_per_psplit"),
    TripRule(r"for c_rev in range\(c0, c1\)", "chunks_per_split"),
    TripRule(r"for k in range\(kc0, kc1 - 1\)", "tiles_per_chunk - 1"),
    TripRule(r"for k_rev in range\(kc0, kc1\)", "tiles_per_chunk"),
]
TRITON_GRAM_RULES = [
    TripRule(r"for _ in range\(0, n_b\)", "batch_per_split"),
    TripRule(r"for _t in range\(0, L\)", "L"),
]
# kernels/mean_lti_sums.py: one loop over a program's share of the (batch, time tile) items, a
# launch argument (the last split may get fewer; the busiest program is what the model charges).
TRITON_MEAN_LTI_RULES = [
    TripRule(r"for item in range\(item0, item1\)", "items_per_split"),
]

OUR_CUDA_RULES = [
    # csrc/selective_scan as redesigned (csrc/README.md): lanes x states per channel, kFwdT-step
    # forward tiles, 64-step backward chunks walked slot by slot in kBwdT-step sub-tiles.
    TripRule(r"for \(int t0 = 0; t0 < L; t0 \+= kT\)", "ceil(L / kT)"),
    TripRule(r"for \(int tt = 0; tt < kT; \+\+tt\)", "kT / 4"),  # forward: `#pragma unroll 4`
    TripRule(r"for \(int chunk = p\.n_chunks - 1", "n_chunks"),
    TripRule(r"for \(int slice = slot; slice < p\.n_slices; slice \+= p\.n_slots\)", "ceil(n_slices / n_slots)"),
    TripRule(r"for \(int s = 0; s < n_sub", "n_sub"),  # pass 1 (its last sub-tile only copies and breaks)
    TripRule(r"for \(int s = n_sub - 1; s >= 0", "n_sub"),
    # stage_channels: kStageT steps (the forward tile; the backward's whole 64-step chunk).
    TripRule(r"i < Traits::kChans \* kVecs; i \+= Traits::kThreads", "ceil(kChans * kStageT / 4 / kThreads)"),
    TripRule(r"i < kChans \* kVecs; i \+= Traits::kThreads", "ceil(kChans * kT / 4 / kThreads)"),  # fwd write-back
    TripRule(r"i < Traits::kNState \* kVecs; i \+= Traits::kThreads", "ceil(kNState * kT / 4 / kThreads)"),  # stage_bc
    TripRule(r"i < kT \* kNState; i \+= kThreads", "ceil(kT * kNState / kThreads)"),  # bwd dB / dC warp sums
    TripRule(r"for \(int w = 0; w < kWarps", "kWarps"),
    TripRule(r"for \(int v = 0; v < kVecs", "kT / 4"),
]

MAMBA_SSM_RULES = [
    TripRule(r"chunk < params\.n_chunks|chunk = params\.n_chunks - 1", "n_chunks"),
    TripRule(r"state_idx < params\.dstate", "N"),
    TripRule(r"r < kNRows", "1"),
    TripRule(r"i < kNItems|i < kNLoads|i < kNElts", "kNItems"),
]


def our_cuda_traits(N: int, L: int, batch: int = 8, dim: int = 3072, in_bytes: int = 2, has_z: bool = True) -> dict:
    """Constants and launch plan of csrc/selective_scan for the compiled size serving N (mirrors the
    C++: ScanTraits in csrc/selective_scan/selective_scan.cuh, scan_lanes_per_channel in
    selective_scan.h, the backward's slot count in csrc/bindings.cpp; update with them).  One group."""
    sizes = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
    K = next(s for s in sizes if s >= N)
    lanes = 2
    while lanes < 32 and K % (2 * lanes) == 0 and K // (2 * lanes) >= 6:
        lanes *= 2
    threads, chunk = 128, 64
    chans = threads // lanes

    def pow2_floor(x):
        p = 1
        while 2 * p <= x:
            p *= 2
        return p

    fwd_t = min(chunk, min(pow2_floor(2730 // chans - 1), pow2_floor(2304 // (K + 4))))
    bwd_t = 4 if K >= 256 else 8
    n_chunks = math.ceil(L / chunk)
    n_slices = math.ceil(dim / chans)
    # bindings.cpp: as many slots as slices, but the dB / dC partials within the inputs' bytes.
    slot_bytes = 2 * batch * L * N * 4
    input_bytes = (batch * dim * n_chunks * N * 4 + dim * N * 4 + 2 * batch * N * L * in_bytes
                   + (4 if has_z else 3) * batch * dim * L * in_bytes)
    n_slots = min(n_slices, max(1, input_bytes // slot_bytes))
    return dict(kNState=K, kLanes=lanes, kStates=K // lanes, kThreads=threads, kWarps=threads // 32, kChans=chans,
                kFwdT=fwd_t, kBwdT=bwd_t, n_chunks=n_chunks, n_sub=chunk // bwd_t, n_slices=n_slices,
                n_slots=n_slots, L=L)
