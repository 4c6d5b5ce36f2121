"""Compile Triton kernels ahead of time for a GPU target on a machine without a GPU.

The real launchers run, with CPU (or meta) tensors, under a stand-in Triton driver that reports
``GPUTarget("cuda", arch, 32)``; every ``JITFunction.run`` is turned into a warm-up, so a kernel is
specialised exactly as a launch would specialise it (constexprs, num_warps, pointer dtypes,
divisibility by 16 of integers and pointers) and compiled, never launched.  Triton then compiles
with the ptxas it ships, so registers, spills and shared memory are those of the real binary.

Two passes, so that a large configuration matrix costs only its distinct binaries:

1. ``discover``: run every case with compilation skipped (Triton's ``jit_cache_hook``), recording
   each launch (kernel, specialisation key, grid, launch options).  Cheap: only the launchers'
   Python runs.
2. ``compile_launches``: compile each distinct (kernel, key) once and read its resources.

Typical use::

    with AotSession(arch=90) as session:
        for case in cases:
            session.run_case(case)          # discovery
        rows = session.compile_all()        # one KernelResources per distinct binary
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .toolchain import SMEM_PER_BLOCK, PtxasEntry, blocks_per_sm, parse_ptxas_log, triton_tool


@dataclass
class Launch:
    """One kernel launch a case made (as recorded during discovery).

    kernel: ``module.function`` of the ``@triton.jit`` function; key: Triton's specialisation key
    (equal keys = the same binary); constants: the constexpr values by parameter name; grid: the
    launch grid (a tuple, or None when the launcher passed a callable); num_warps / num_stages: launch
    options; case: label of the case that launched it; args, kwargs: what was passed (kept to compile).
    """

    kernel: str
    key: Any
    constants: dict
    grid: tuple | None
    num_warps: int
    num_stages: int
    case: str
    fn: Any = field(repr=False, default=None)
    args: tuple = field(repr=False, default=())
    kwargs: dict = field(repr=False, default_factory=dict)


@dataclass
class KernelResources:
    """Resources of one compiled Triton kernel for one architecture.

    regs / spill_stores / spill_loads / stack: per thread, from ptxas -v; shared: bytes of shared
    memory per block (Triton's metadata: dynamic + static); blocks_per_sm: occupancy bound by
    registers, shared memory and threads; cubin: the binary (for the SASS analysis).
    """

    arch: int
    kernel: str
    case: str
    constants: dict
    num_warps: int
    num_stages: int
    shared: int
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    blocks_per_sm: int
    compile_s: float
    error: str = ""
    cubin: bytes = field(repr=False, default=b"")

    @property
    def shared_limit(self) -> int:
        return SMEM_PER_BLOCK[self.arch]


class StandInDriver:
    """A Triton driver that reports a GPU target and a device, and can launch nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def is_active(self):
        return True


def _qualified(fn) -> str:
    return f"{fn.fn.__module__}.{fn.fn.__qualname__}"


class AotSession(contextlib.AbstractContextManager):
    """Context in which Triton launches are discovered and compiled for ``arch`` instead of run.

    Inside it: the active Triton driver is a ``StandInDriver``; ``JITFunction.run`` records each
    launch and never launches; autotuned kernels record one launch per config; and
    ``compressm_mamba._optional.triton_usable`` answers True for any device, because the ops would
    otherwise refuse to route CPU tensors to Triton.  Everything is restored on exit.
    ``cache_dir``: Triton's cache for the session (a fresh temporary folder by default, so every
    binary is really compiled, as on a clean clone).
    """

    def __init__(self, arch: int, cache_dir: str | None = None):
        self.arch = arch
        self.launches: list[Launch] = []
        self._case = ""
        self._tmp = None
        self._cache_dir = cache_dir
        self._saved = []
        self._discovering = False
        self._last_hook: dict | None = None
        self._reset_fns: set = set()

    # -- context ----------------------------------------------------------------------------
    def __enter__(self):
        os.environ.pop("TRITON_INTERPRET", None)
        from triton import knobs
        from triton.runtime import autotuner, driver
        from triton.runtime.jit import JITFunction

        import compressm_mamba._optional as optional

        if self._cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="triton_aot_")
            self._cache_dir = self._tmp.name
        self._saved = [
            (knobs.cache, "dir", knobs.cache.dir),
            (knobs.runtime, "jit_cache_hook", knobs.runtime.jit_cache_hook),
            (JITFunction, "run", JITFunction.run),
            (autotuner.Autotuner, "run", autotuner.Autotuner.run),
            (optional, "triton_usable", optional.triton_usable),
            # The private slot, not reset_active(): on a machine without a GPU there is no default
            # driver to go back to, and the lazily created one must stay lazy.
            (driver, "_active", driver._active),
        ]
        knobs.cache.dir = self._cache_dir
        driver.set_active(StandInDriver(self.arch))
        session = self
        original_run = JITFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            if fn not in session._reset_fns:
                # A JITFunction caches its target per device; forget targets of an earlier arch.
                fn.device_caches.clear()
                session._reset_fns.add(fn)
            session._last_hook = None
            knobs.runtime.jit_cache_hook = session._hook if session._discovering else None
            result = original_run(fn, *args, grid=grid, warmup=True, **kwargs)
            if session._discovering:
                info = session._last_hook
                if info is None:
                    raise RuntimeError(f"{_qualified(fn)}: Triton compiled nothing and called no hook")
                session.launches.append(Launch(
                    kernel=_qualified(fn), key=info["key"], constants=info["constants"],
                    grid=tuple(grid) if isinstance(grid, (tuple, list)) else None,
                    num_warps=info["num_warps"], num_stages=info["num_stages"], case=session._case,
                    fn=fn, args=args, kwargs=dict(kwargs)))
            return result

        def autotune_run(tuner, *args, **kwargs):
            # Every config is a binary the launcher may pick on a GPU: compile them all.
            kwargs.pop("warmup", None)
            grid = kwargs.pop("grid")
            configs = tuner.prune_configs(kwargs) if hasattr(tuner, "prune_configs") else tuner.configs
            # Pre-hooks (zeroing, restoring tensors) are not called: nothing runs.
            for config in configs:
                tuner.fn.run(*args, grid=grid, warmup=True, **{**kwargs, **config.all_kwargs()})

        JITFunction.run = run
        autotuner.Autotuner.run = autotune_run
        optional.triton_usable = lambda device: True
        return self

    def __exit__(self, *exc):
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        for fn in self._reset_fns:
            fn.device_caches.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
        return False

    def _hook(self, *, key, fn, compile, **_):
        self._last_hook = dict(key=key, constants={_param_name(fn.jit_function, k): _plain(v)
                                                   for k, v in compile["constants"].items()},
                               num_warps=compile["num_warps"], num_stages=compile["num_stages"])
        return True  # skip compilation

    # -- discovery ---------------------------------------------------------------------------
    def run_case(self, label: str, call: Callable[[], Any]) -> list[Launch]:
        """Run ``call`` (a launcher invocation) in discovery mode; returns the launches it made."""
        start = len(self.launches)
        self._case = label
        self._discovering = True
        try:
            call()
        finally:
            self._discovering = False
        return self.launches[start:]

    def distinct(self, launches: list[Launch] | None = None) -> list[Launch]:
        """First launch of each distinct (kernel, specialisation key), in discovery order."""
        seen, out = set(), []
        for launch in self.launches if launches is None else launches:
            ident = (launch.kernel, str(launch.key))
            if ident not in seen:
                seen.add(ident)
                out.append(launch)
        return out

    # -- compilation -------------------------------------------------------------------------
    def compile(self, launch: Launch, keep_cubin: bool = False) -> KernelResources:
        """Compile one discovered launch for the session's arch and read its resources."""
        from triton import knobs

        self._discovering = False
        knobs.runtime.jit_cache_hook = None
        start = time.perf_counter()
        log = io.StringIO()
        error = ""
        kernel = None
        try:
            # Triton prints ptxas -v output when asked; capturing it avoids a second ptxas run.
            saved = knobs.nvidia.dump_ptxas_log
            knobs.nvidia.dump_ptxas_log = True
            try:
                with contextlib.redirect_stdout(log):
                    kernel = launch.fn.run(*launch.args, grid=launch.grid or (1,), warmup=True, **launch.kwargs)
            finally:
                knobs.nvidia.dump_ptxas_log = saved
        except Exception as e:  # noqa: BLE001 - a compile error is a result here, reported as a row
            error = f"{type(e).__name__}: {e}"[-2000:]
        seconds = time.perf_counter() - start
        if kernel is None:
            return KernelResources(self.arch, launch.kernel, launch.case, launch.constants, launch.num_warps,
                                   launch.num_stages, 0, 0, 0, 0, 0, 0, seconds, error or "no kernel returned")
        entry = _ptxas_entry(log.getvalue(), kernel.asm.get("ptx", ""), self.arch)
        md = kernel.metadata
        threads = md.num_warps * 32 * getattr(md, "num_ctas", 1)
        return KernelResources(
            arch=self.arch, kernel=launch.kernel, case=launch.case, constants=launch.constants,
            num_warps=md.num_warps, num_stages=md.num_stages, shared=int(md.shared), regs=entry.regs,
            spill_stores=entry.spill_stores, spill_loads=entry.spill_loads, stack=entry.stack,
            blocks_per_sm=blocks_per_sm(self.arch, threads, entry.regs, int(md.shared)),
            compile_s=seconds, cubin=kernel.asm.get("cubin", b"") if keep_cubin else b"",
        )


def _param_name(jit_function, path) -> str:
    """Name of the kernel parameter at a constants path ((index,) tuples in Triton >= 3.3)."""
    index = path[0] if isinstance(path, tuple) else path
    if isinstance(index, int):
        return jit_function.arg_names[index]
    return str(index)


def _plain(value):
    """A constexpr as a plain Python value (Triton wraps some in ``constexpr`` objects)."""
    if hasattr(value, "value") and not isinstance(value, (int, float, bool, str)):
        value = value.value
    return value if isinstance(value, (int, float, bool, str, type(None))) else str(value)


def _ptxas_entry(log: str, ptx: str, arch: int) -> PtxasEntry:
    """The ptxas -v entry of a kernel: from Triton's captured log, else by running ptxas again."""
    entries = parse_ptxas_log(log)
    if entries:
        return entries[-1]
    # Cached binary (no log printed): rerun Triton's ptxas with Triton's flags on the PTX.
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([triton_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                               src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, timeout=600)
    entries = parse_ptxas_log(proc.stdout + proc.stderr)
    if not entries:
        raise RuntimeError(f"ptxas gave no resource report:\n{proc.stderr[-2000:]}")
    return entries[-1]


def resources_to_row(r: KernelResources) -> dict:
    """A flat CSV/JSON row of one compiled kernel (no cubin)."""
    return dict(arch=f"sm_{r.arch}", kernel=r.kernel, case=r.case,
                constexprs=" ".join(f"{k}={v}" for k, v in sorted(r.constants.items())),
                num_warps=r.num_warps, num_stages=r.num_stages, regs=r.regs, spill_stores=r.spill_stores,
                spill_loads=r.spill_loads, stack=r.stack, shared=r.shared, shared_limit=r.shared_limit,
                blocks_per_sm=r.blocks_per_sm, compile_s=round(r.compile_s, 2), error=r.error)


def compile_cases(arch: int, groups, shard: tuple[int, int] = (0, 1), keep_cubin: bool = False,
                  cache_dir: str | None = None):
    """Discover the cases of ``groups`` for ``arch`` and compile the chosen launches.

    groups: [(cases, select)] (``triton_cases.LEVELS``); select ``"ends"`` compiles the smallest and
    largest N of each padding class (``triton_cases.padding_classes``), ``"max"`` only the largest,
    ``"all"`` every distinct binary.  A binary chosen by two groups is compiled once.
    shard: (k, n) compiles every n-th chosen launch starting at k, so n processes share the work
    (discovery is deterministic, so every shard sees the same list).
    Returns (resources, discovered kernel names, number of chosen launches).
    """
    from . import triton_cases

    chosen, seen = [], set()
    with AotSession(arch, cache_dir=cache_dir) as session:
        for cases, select in groups:
            by_label = {case.label: case for case in cases}
            launches = []
            for case in cases:
                launches += session.run_case(case.label, case.call)
            distinct = session.distinct(launches)
            if select != "all":
                classes = triton_cases.padding_classes(distinct, by_label)
                if select == "max":
                    distinct = [members[-1] for members in classes.values()]
                else:
                    distinct = triton_cases.class_ends(classes, by_label)
            for launch in distinct:
                ident = (launch.kernel, str(launch.key))
                if ident not in seen:
                    seen.add(ident)
                    chosen.append(launch)
        k, n = shard
        results = [session.compile(launch, keep_cubin=keep_cubin) for launch in chosen[k::n]]
        kernels = sorted({launch.kernel for launch in session.launches})
    return results, kernels, len(chosen)


def run_level(arch: int, level: str, workers: int, work_dir, timeout_s: int = 3600) -> dict:
    """Compile a level of ``triton_cases.LEVELS`` for ``arch`` in ``workers`` processes (shards), each
    with a fresh Triton cache under ``work_dir``.  Returns {rows, kernels, chosen}: the resource rows
    of every chosen binary, every kernel discovered, and how many binaries were chosen."""
    return run_levels((arch,), level, workers, work_dir, timeout_s)[arch]


def run_levels(archs, level: str, workers: int, work_dir, timeout_s: int = 3600) -> dict:
    """``run_level`` for several archs at once: all ``len(archs) * workers`` processes start together,
    so that no core waits for the slowest shard of one arch before the next arch starts.  On a
    failure or after ``timeout_s`` (for all of them) every process still running is killed.
    Returns {arch: {rows, kernels, chosen}}."""
    import json
    import sys
    from pathlib import Path

    work_dir = Path(work_dir)
    bench_dir = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([bench_dir, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    procs = []
    for arch in archs:
        for k in range(workers):
            out = work_dir / f"sm{arch}_{level}_{k}.jsonl"
            cmd = [sys.executable, "-m", "static.triton_aot", "--arch", str(arch), "--level", level,
                   "--shard", f"{k}/{workers}", "--out", str(out)]
            cache = work_dir / f"cache{arch}_{k}"
            procs.append((arch, out, subprocess.Popen(cmd, cwd=bench_dir, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True,
                                                      env=dict(env, TRITON_CACHE_DIR=str(cache)))))
    deadline = time.monotonic() + timeout_s
    results = {arch: dict(rows=[], kernels=set(), chosen=0) for arch in archs}
    failures = []
    try:
        for arch, out, proc in procs:
            try:
                log, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failures.append(f"sm_{arch} {out.name}: timed out after {timeout_s} s")
                break
            if proc.returncode != 0:
                failures.append(f"sm_{arch} {out.name}:\n{log[-6000:]}")
                continue
            res = results[arch]
            with open(out) as f:
                head = json.loads(f.readline())
                res["kernels"].update(head["discovered_kernels"])
                res["chosen"] = head["chosen"]
                res["rows"] += [json.loads(line) for line in f]
    finally:
        for _, _, proc in procs:  # never leave a compiler behind (a timeout, an error, ^C)
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    if failures:
        raise RuntimeError(f"triton_aot {level} failed:\n" + "\n".join(failures))
    return {arch: dict(res, kernels=sorted(res["kernels"])) for arch, res in results.items()}


def main(argv=None):
    """``cd bench && python -m static.triton_aot --arch 90 --level ci --shard 0/2 --out rows.jsonl``."""
    import argparse
    import json

    from . import triton_cases

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--arch", type=int, choices=(80, 90), default=90)
    parser.add_argument("--level", choices=tuple(triton_cases.LEVELS), default="ci")
    parser.add_argument("--shard", default="0/1", help="k/n: this process compiles every n-th launch from k")
    parser.add_argument("--out", required=True, help="JSON lines, one per compiled kernel")
    args = parser.parse_args(argv)
    k, n = (int(x) for x in args.shard.split("/"))
    groups = triton_cases.LEVELS[args.level](args.arch)
    results, kernels, chosen = compile_cases(args.arch, groups, shard=(k, n))
    with open(args.out, "w") as f:
        f.write(json.dumps({"discovered_kernels": kernels, "chosen": chosen}) + "\n")
        for r in results:
            f.write(json.dumps(resources_to_row(r)) + "\n")


if __name__ == "__main__":
    main()
