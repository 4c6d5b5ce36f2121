"""Predicted fwd / bwd times of the selective scans (ours: Triton and CUDA; mamba_ssm's CUDA scan as
the anchor) and of the Gramian collection pass, at one shape, from compiled sm_90 code.

Each ``*_work`` function compiles what the backend would run at the shape, reads its SASS and
returns ``perf_model.KernelWork`` per launch; ``perf_model.predict`` turns them into times.  All
PREDICTIONS (see ``perf_model`` for the assumptions).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from . import cuda_ptxas, perf_model, sass, triton_aot
from .perf_model import KernelWork, SourceLines
from .toolchain import demangle, repo_root

REFERENCE = dict(batch=8, dim=3072, L=2048, dtype="bfloat16")
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _triton_sources():
    return SourceLines([repo_root() / "kernels"])


def _launch_consts(launch) -> dict:
    """Integer arguments of a Triton launch by parameter name, plus its constexprs."""
    names = launch.fn.arg_names
    consts = {name: value for name, value in zip(names, launch.args) if isinstance(value, int)}
    consts.update({k: v for k, v in launch.kwargs.items() if isinstance(v, (int, float))})
    consts.update({k: v for k, v in launch.constants.items() if isinstance(v, (int, float))})
    return consts


def _tensor_bytes(launch) -> int:
    import torch

    seen, total = set(), 0
    for value in list(launch.args) + list(launch.kwargs.values()):
        if torch.is_tensor(value) and id(value) not in seen:
            seen.add(id(value))
            total += value.numel() * value.element_size()
    return total


def _triton_works(backend_label, cases, rules, extra_consts, arch=90, active_fraction=None):
    """Discover the launches of ``cases`` at the real shape, compile each once, model each launch."""
    works = []
    sources = _triton_sources()
    with triton_aot.AotSession(arch) as session:
        launches = []
        for label, call in cases:
            launches += session.run_case(label, call)
        compiled = {}
        for launch in launches:
            ident = (launch.kernel, str(launch.key))
            if ident not in compiled:
                compiled[ident] = session.compile(launch, keep_cubin=True)
            res = compiled[ident]
            if res.error:
                raise perf_model.ModelError(f"{launch.kernel}: {res.error}")
            fn = sass.functions_of(res.cubin)[0]
            consts = {**_launch_consts(launch), **extra_consts, "_grid": tuple(launch.grid or ())}
            per_warp, rows = perf_model.dynamic_instructions(fn, rules, consts, sources)
            blocks = math.prod(launch.grid)
            if active_fraction is not None:
                blocks = blocks * active_fraction(consts)
            warps = blocks * res.num_warps
            short = launch.kernel.rsplit(".", 1)[-1]
            direction = "bwd" if "bwd" in short else "fwd"
            works.append(KernelWork(backend_label, short, direction, int(round(blocks)), res.num_warps * 32,
                                    per_warp * warps, _tensor_bytes(launch), res.regs, res.shared, rows))
    return works


def triton_scan_work(N, batch, dim, L, dtype):
    """Triton selective scan fwd + bwd through ``ops.selective_scan`` (meta tensors, nothing allocated)."""
    from .triton_cases import MODEL_SCAN_FLAGS, _scan_call

    call = _scan_call(N, dtype, MODEL_SCAN_FLAGS, batch, dim, L, "meta")
    return _triton_works("triton", [(f"scan N={N}", call)], perf_model.TRITON_SCAN_RULES, {"L": L})


def triton_gram_work(N, batch, dim, L, dtype, estimator="ltv"):
    """The collection pass's Gramian sums (general A, no mask) through ``ops.gramian_sums``."""
    from .triton_cases import _gram_call

    flags = (("estimator", estimator), ("constant_rows", 0), ("mask", 0), ("bias_softplus", 0))
    call = _gram_call(N, dtype, flags, batch, dim, L)

    def active(consts):  # programs of tiles below the diagonal return at once
        n = consts["n_tiles"]
        return n * (n + 1) / 2 / (n * n)

    return _triton_works("triton", [(f"gram N={N}", call)], perf_model.TRITON_GRAM_RULES, {"L": L},
                         active_fraction=active)


def triton_mean_lti_work(N, batch, dim, L, dtype):
    """The ``mean_lti`` collection pass on a GPU: ``ops.gramian_sums(estimator="mean_lti")`` runs
    ``kernels.mean_lti_sums`` (general A, no mask, delta after bias and softplus as the collector
    passes it), one launch; bytes: delta, B and C read once, the (dim, N) sums written."""
    from .triton_cases import MODEL_MEAN_LTI_FLAGS, _mean_lti_call

    call = _mean_lti_call(N, dtype, MODEL_MEAN_LTI_FLAGS, batch, dim, L)
    return _triton_works("triton", [(f"mean_lti N={N}", call)], perf_model.TRITON_MEAN_LTI_RULES, {"L": L})


def mean_lti_torch_work(N, batch, dim, L, dtype):
    """The ``mean_lti`` collection pass as ``ops.gramian_sums`` runs it (every backend but the
    reference): ``torch_backend.gramians.mean_lti_sums``, torch ops, no compiled code to read.
    Modelled as one memory-bound elementwise launch per torch op (each tensor read / written once,
    a few warp-instructions per element): dt cast; sum_t dt B as a per-group matmul (reads dt and B
    once); sum C over (batch, L) (reads C); per time chunk, the (batch, dim, N, T) block dt A, its
    expm1 and its sum over (batch, T) — the only work at the size of the system."""
    E = batch * dim * N * L  # elements of one (batch, dim, N, L) tensor, made a chunk at a time
    f32, e_in = 4, _BYTES[dtype]
    small = batch * dim * L
    ops = [("dt = delta.float()", small * (e_in + f32), small),
           ("sum dt B (matmul)", (small + batch * N * L) * f32, small * N // 32),
           ("sum C", batch * N * L * f32, batch * N * L),
           ("block = dt A", E * f32, E), ("expm1(block)", 2 * E * f32, E), ("block.sum", E * f32, E)]
    instr_per_element = 4  # load, math, store, index: an elementwise torch kernel is bytes-bound anyway
    return [KernelWork("torch", name, "fwd", 132 * 16, 256, n * instr_per_element / 32, nbytes, 32, 0)
            for name, nbytes, n in ops]


def _cuda_functions(results, work_dir):
    """{demangled short name: sass.Function} of the compiled objects."""
    out = {}
    for res in results:
        if res.returncode != 0:
            raise perf_model.ModelError(f"{res.job.source} failed to compile:\n{res.log[-2000:]}")
        for cubin in sass.cubins_of_object(res.job.obj, Path(work_dir) / Path(res.job.obj).stem):
            fns = sass.functions_of(cubin)
            for fn, name in zip(fns, demangle([f.name for f in fns])):
                out[cuda_ptxas._short_name(name)] = fn
    return out


def compile_our_cuda(work_dir, dtype="bfloat16", arch=90, workers=2, reuse=False):
    """Objects of csrc/selective_scan's forward and backward .cu of one dtype, all state sizes."""
    suffix = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
    jobs = [j for j in cuda_ptxas.project_sources(Path(work_dir), arch) if j.source.endswith(f"_{suffix}.cu")
            and "selective_scan" in j.source]
    return cuda_ptxas.run_jobs(jobs, workers, reuse=reuse)


def our_cuda_work(functions, ptxas_rows, N, batch, dim, L, dtype):
    """csrc/selective_scan fwd + bwd at the shape (launch geometry of launch_fwd / launch_bwd)."""
    t = perf_model.our_cuda_traits(N, L, batch, dim, _BYTES[dtype])
    sources = SourceLines([repo_root() / "csrc"])
    tname = {"bfloat16": "bf16", "float16": "fp16", "float32": "float"}[dtype]
    e = _BYTES[dtype]
    works = []
    # fwd grid (n_slices, groups, batch); bwd grid (n_slots, groups, batch), each block walking
    # ceil(n_slices / n_slots) slices per chunk (launch_fwd / launch_bwd, bindings.cpp).
    plans = (("fwd", t["kFwdT"], t["kFwdT"], t["n_slices"] * batch),
             ("bwd", t["kBwdT"], 64, t["n_slots"] * batch))
    for direction, kT, stage_t, blocks in plans:
        name = f"selective_scan_{direction}_kernel<{t['kNState']}, true, {tname}>"
        if name not in functions:
            raise perf_model.ModelError(f"no compiled {name} (compiled: {sorted(functions)[:6]} ...)")
        row = next(r for r in ptxas_rows if r["kernel"] == name)
        consts = {**t, "kT": kT, "kStageT": stage_t}
        per_warp, loops = perf_model.dynamic_instructions(functions[name], perf_model.OUR_CUDA_RULES, consts, sources)
        io = batch * dim * L * e
        bc = 2 * batch * N * L * e
        ckpt = batch * dim * t["n_chunks"] * N * 4
        partials = 2 * t["n_slots"] * batch * L * N * 4  # dB / dC per slot: written, then summed
        nbytes = (4 * io + bc + ckpt) if direction == "fwd" else (7 * io + bc + ckpt + 2 * partials)
        works.append(KernelWork("cuda", name, direction, blocks, t["kThreads"], per_warp * blocks * 4, nbytes,
                                int(row["regs"]), int(row["smem"]), loops))
    return works


def compile_mamba_ssm(cache, work_dir, arch=90, workers=2, reuse=False):
    jobs = cuda_ptxas.mamba_ssm_sources(Path(cache), Path(work_dir), arch)
    return cuda_ptxas.run_jobs(jobs, workers, reuse=reuse)


def mamba_ssm_work(functions, ptxas_rows, cache, N, batch, dim, L, dtype):
    """mamba_ssm 2.3.2's selective_scan_{fwd,bwd}_kernel at the shape: grid (batch, dim), 128 threads
    x 16 items per chunk of 2048 steps (its dispatch for L > 1024); dynamic shared memory from its
    kSmemSize is not in ptxas' static figure, so occupancy uses the static figure (a lower bound)."""
    root = cuda_ptxas.fetch_mamba_ssm(Path(cache))
    sources = SourceLines([root / "csrc" / "selective_scan"])
    consts = dict(N=N, n_chunks=math.ceil(L / 2048), kNItems=16, L=L)
    e = _BYTES[dtype]
    works = []
    for direction in ("fwd", "bwd"):
        name = next((k for k in functions if k.startswith(f"selective_scan_{direction}_kernel")), None)
        if name is None:
            raise perf_model.ModelError(f"no compiled mamba_ssm {direction} kernel")
        row = next(r for r in ptxas_rows if r["kernel"] == name)
        per_warp, loops = perf_model.dynamic_instructions(functions[name], perf_model.MAMBA_SSM_RULES, consts,
                                                          sources)
        blocks = batch * dim
        io = batch * dim * L * e
        bc = 2 * batch * N * L * e
        nbytes = (4 * io + bc) if direction == "fwd" else (7 * io + 2 * bc)
        works.append(KernelWork("mamba_ssm", name, direction, blocks, 128, per_warp * blocks * 4, nbytes,
                                int(row["regs"]), int(row["smem"]), loops))
    return works


def temporary_dir():
    return tempfile.TemporaryDirectory(prefix="static_report_")
