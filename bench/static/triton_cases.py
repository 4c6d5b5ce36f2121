"""Which launches to make: the configuration matrix of every Triton op, through its public op.

Cases call ``compressm_mamba.ops`` (``selective_scan(..., backend="triton")`` forward and backward,
``gramian_sums(..., backend="triton")``), not kernel names, so they stay valid when the kernels
behind an op are redesigned: whatever kernels the op launches are discovered and compiled.

Axes (each where the op's launchers branch on it):

- selective_scan: N in 1..256, dtype fp32 / fp16 / bf16, D / z / delta_bias present or not,
  delta_softplus, ngroups 1 (3-D B/C) or 2, forward without grad and forward + backward;
- gramian_sums: N, dtype, estimator frozen / ltv, general A or constant rows (Mamba2 heads),
  mask or not, delta_bias + softplus or not;
- mean_lti sums (``gramian_sums(estimator="mean_lti")``): N, dtype, general A or constant rows,
  mask or not, delta_bias + softplus or not, ngroups 1 or 2;
- selective_state_update (decode step, when the op exists): N, dtype, D / z / dt_bias / softplus,
  fp32 state or state in the input dtype.

Because today's kernels take N (and, with state splits, the states per split N_PER = ceil(N / KS))
as a constexpr, every N is its own binary, but binaries of one *padding class* (same constexprs
apart from those state counts, e.g. one power-of-two tile, one KS) differ only in the state loop's
trip count and masks; ``padding_classes`` groups discovered launches so that a check compiles the
two ends of each class instead of all 256 sizes.  ``KERNEL_MODULES`` lists the op each kernel module is reached
through; ``undriven_kernels`` names any kernel of ``compressm_mamba.kernels`` no case launches (a new
kernel module needs a case generator here, and the test says so).
"""

from __future__ import annotations

import importlib
import itertools
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

DTYPES = ("float32", "float16", "bfloat16")
ALL_N = tuple(range(1, 257))
# Shapes small enough for CPU tensors; every size a multiple of 16 as at real shapes, so the
# divisibility specialisation matches (batch 2, dim 64, L 128).  ``odd_L`` adds L = 63.
SMALL = dict(batch=2, dim=64, L=128)


@dataclass(frozen=True)
class Case:
    """One call of an op: ``op`` name, its state size ``N``, ``dtype`` name, option ``flags``, and
    ``call`` that makes the launches (run inside an ``AotSession``)."""

    op: str
    N: int
    dtype: str
    flags: tuple
    call: Callable = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in self.flags)
        return f"{self.op} N={self.N} {self.dtype} {opts}".strip()


def _torch_dtype(name):
    import torch

    return getattr(torch, name)


# -- selective_scan ---------------------------------------------------------------------------
SCAN_FLAGS = ("D", "z", "delta_bias", "softplus")
MODEL_SCAN_FLAGS = (("D", 1), ("z", 1), ("delta_bias", 1), ("softplus", 1), ("groups", 1), ("grad", 1))


def all_scan_flag_sets() -> list[tuple]:
    """Every D / z / delta_bias / softplus combination (ngroups 1, forward + backward), plus the
    model configuration with ngroups 2 and as a no-grad forward (those two axes change only
    integer specialisations and which kernels run, not the option branches)."""
    sets = [tuple(zip(SCAN_FLAGS, bits)) + (("groups", 1), ("grad", 1))
            for bits in itertools.product((1, 0), repeat=len(SCAN_FLAGS))]
    return sets + [MODEL_SCAN_FLAGS[:-2] + (("groups", 2), ("grad", 1)), MODEL_SCAN_FLAGS[:-1] + (("grad", 0),)]


def _scan_call(N, dtype, flags, batch, dim, L, device):
    def call():
        import torch

        from compressm_mamba.ops import selective_scan

        f = dict(flags)
        dt = _torch_dtype(dtype)
        G = f.get("groups", 1)
        grad = bool(f.get("grad", 1))

        def t(*shape, dtype=dt):
            return torch.empty(*shape, dtype=dtype, device=device).requires_grad_(grad)

        u, delta = t(batch, dim, L), t(batch, dim, L)
        A = t(dim, N, dtype=torch.float32)
        B = t(batch, N, L) if G == 1 else t(batch, G, N, L)
        C = t(batch, N, L) if G == 1 else t(batch, G, N, L)
        D = t(dim, dtype=torch.float32) if f.get("D") else None
        z = t(batch, dim, L) if f.get("z") else None
        bias = t(dim, dtype=torch.float32) if f.get("delta_bias") else None
        with torch.set_grad_enabled(grad):
            out = selective_scan(u, delta, A, B, C, D, z, bias, bool(f.get("softplus")), backend="triton")
            if grad:
                out.backward(torch.empty_like(out))

    return call


def scan_cases(Ns: Iterable[int] = ALL_N, dtypes: Iterable[str] = DTYPES, flag_sets=None,
               batch=SMALL["batch"], dim=SMALL["dim"], L=SMALL["L"], device="meta") -> list[Case]:
    """Selective-scan cases; ``flag_sets`` defaults to every combination of D / z / delta_bias /
    softplus, ngroups 1 and 2, with and without grad.  Meta tensors: nothing is allocated."""
    if flag_sets is None:
        flag_sets = all_scan_flag_sets()
    return [Case("selective_scan", N, dtype, tuple(flags), _scan_call(N, dtype, flags, batch, dim, L, device))
            for flags in flag_sets for dtype in dtypes for N in Ns]


# -- gramian_sums -----------------------------------------------------------------------------
MODEL_GRAM_FLAGS = (("estimator", "ltv"), ("constant_rows", 0), ("mask", 0), ("bias_softplus", 0))


def all_gram_flag_sets() -> list[tuple]:
    """Every estimator x constant_rows x mask x (delta_bias + softplus) combination."""
    return [(("estimator", est), ("constant_rows", cr), ("mask", m), ("bias_softplus", b))
            for est in ("ltv", "frozen") for cr in (0, 1) for m in (0, 1) for b in (0, 1)]


def _gram_call(N, dtype, flags, batch, dim, L):
    def call():
        import torch

        from compressm_mamba.ops import gramian_sums

        f = dict(flags)
        dt = _torch_dtype(dtype)
        delta = torch.rand(batch, dim, L, dtype=dt)
        A = -torch.rand(dim, N)
        if f.get("constant_rows"):
            A = A[:, :1].expand(dim, N).contiguous()
        B = torch.randn(batch, N, L, dtype=dt)
        C = torch.randn(batch, N, L, dtype=dt)
        mask = torch.ones(batch, L, dtype=torch.bool) if f.get("mask") else None
        bias = torch.rand(dim) if f.get("bias_softplus") else None
        gramian_sums(delta, A, B, C, estimator=f["estimator"], delta_bias=bias,
                     delta_softplus=bool(f.get("bias_softplus")), mask=mask, backend="triton")

    return call


def gram_cases(Ns: Iterable[int] = ALL_N, dtypes: Iterable[str] = DTYPES, flag_sets=None,
               batch=2, dim=8, L=SMALL["L"]) -> list[Case]:
    """Gramian-sum cases; ``flag_sets`` defaults to every estimator x constant_rows x mask x
    (delta_bias + softplus) combination.  CPU tensors (the op reads A's values)."""
    if flag_sets is None:
        flag_sets = all_gram_flag_sets()
    return [Case("gramian_sums", N, dtype, tuple(flags), _gram_call(N, dtype, flags, batch, dim, L))
            for flags in flag_sets for dtype in dtypes for N in Ns]


# -- mean_lti sums (the default estimator's collection pass) ------------------------------------
MODEL_MEAN_LTI_FLAGS = (("constant_rows", 0), ("mask", 0), ("bias_softplus", 0), ("groups", 1))


def all_mean_lti_flag_sets() -> list[tuple]:
    """Every constant_rows x mask x (delta_bias + softplus) combination with one group, and the
    model configuration with 2 groups (an integer specialisation only)."""
    sets = [(("constant_rows", cr), ("mask", m), ("bias_softplus", b), ("groups", 1))
            for cr in (0, 1) for m in (0, 1) for b in (0, 1)]
    return sets + [MODEL_MEAN_LTI_FLAGS[:-1] + (("groups", 2),)]


def _mean_lti_call(N, dtype, flags, batch, dim, L):
    def call():
        import torch

        from compressm_mamba.ops import gramian_sums

        f = dict(flags)
        dt = _torch_dtype(dtype)
        G = f.get("groups", 1)
        delta = torch.empty(batch, dim, L, dtype=dt)
        A = -torch.rand(dim, N)
        if f.get("constant_rows"):
            A = A[:, :1].expand(dim, N).contiguous()
        B = torch.empty(batch, G, N, L, dtype=dt)
        C = torch.empty(batch, G, N, L, dtype=dt)
        mask = torch.ones(batch, L, dtype=torch.bool) if f.get("mask") else None
        bias = torch.rand(dim) if f.get("bias_softplus") else None
        gramian_sums(delta, A, B, C, estimator="mean_lti", delta_bias=bias,
                     delta_softplus=bool(f.get("bias_softplus")), mask=mask, backend="triton")

    return call


def mean_lti_cases(Ns: Iterable[int] = ALL_N, dtypes: Iterable[str] = DTYPES, flag_sets=None,
                   batch=2, dim=SMALL["dim"], L=SMALL["L"]) -> list[Case]:
    """mean_lti sum cases (``gramian_sums(estimator="mean_lti", backend="triton")``); CPU tensors
    (the op reads A's values to detect constant rows)."""
    if flag_sets is None:
        flag_sets = all_mean_lti_flag_sets()
    return [Case("mean_lti_sums", N, dtype, tuple(flags), _mean_lti_call(N, dtype, flags, batch, dim, L))
            for flags in flag_sets for dtype in dtypes for N in Ns]


# -- selective_state_update (the one-token decode step; present once that op family exists) -----
MODEL_UPDATE_FLAGS = (("D", 1), ("z", 1), ("dt_bias", 1), ("softplus", 1), ("state", "float32"))


def all_update_flag_sets() -> list[tuple]:
    """Every D / z / dt_bias / softplus combination with an fp32 state, and the model configuration
    with the state in the input dtype."""
    sets = [tuple(zip(("D", "z", "dt_bias", "softplus"), bits)) + (("state", "float32"),)
            for bits in itertools.product((1, 0), repeat=4)]
    return sets + [MODEL_UPDATE_FLAGS[:-1] + (("state", "input"),)]


def _update_call(N, dtype, flags, batch, dim, device):
    def call():
        import torch

        from compressm_mamba import ops

        f = dict(flags)
        dt = _torch_dtype(dtype)
        state_dtype = dt if f.get("state") == "input" else torch.float32

        def t(*shape, dtype=dt):
            return torch.empty(*shape, dtype=dtype, device=device)

        with torch.no_grad():
            ops.selective_state_update(
                t(batch, dim, N, dtype=state_dtype), t(batch, dim), t(batch, dim), t(dim, N, dtype=torch.float32),
                t(batch, N), t(batch, N), t(dim, dtype=torch.float32) if f.get("D") else None,
                t(batch, dim) if f.get("z") else None, t(dim, dtype=torch.float32) if f.get("dt_bias") else None,
                bool(f.get("softplus")), backend="triton")

    return call


def update_cases(Ns: Iterable[int] = ALL_N, dtypes: Iterable[str] = DTYPES, flag_sets=None,
                 batch=SMALL["batch"], dim=SMALL["dim"], device="meta") -> list[Case]:
    """Decode-step cases (``ops.selective_state_update``); empty when the op does not exist."""
    if not _has_op("selective_state_update"):
        return []
    flag_sets = all_update_flag_sets() if flag_sets is None else flag_sets
    return [Case("selective_state_update", N, dtype, tuple(flags), _update_call(N, dtype, flags, batch, dim, device))
            for flags in flag_sets for dtype in dtypes for N in Ns]


def _has_op(name: str) -> bool:
    import compressm_mamba.ops as ops

    return hasattr(ops, name)


# The op every kernel module is reached through, and its case generator.
KERNEL_MODULES = {
    "compressm_mamba.kernels.selective_scan": scan_cases,
    "compressm_mamba.kernels.gramians": gram_cases,
    "compressm_mamba.kernels.mean_lti_sums": mean_lti_cases,
    "compressm_mamba.kernels.selective_state_update": update_cases,
}


# -- discovery of kernels and padding classes --------------------------------------------------
def kernel_modules() -> list[str]:
    """Every module of ``compressm_mamba.kernels`` (importing each; needs triton)."""
    import compressm_mamba.kernels as pkg

    return sorted(f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__))


def launched_kernels(module_name: str) -> set[str]:
    """``module.function`` of every ``@triton.jit`` function the module launches (``fn[grid](...)``)."""
    import inspect

    from triton.runtime.jit import JITFunction

    module = importlib.import_module(module_name)
    source = inspect.getsource(module)
    names = set()
    for name, obj in vars(module).items():
        fn = getattr(obj, "fn", obj)  # autotune / heuristics wrappers hold the JITFunction in .fn
        while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
            fn = fn.fn
        if isinstance(fn, JITFunction) and fn.fn.__module__ == module_name and re.search(rf"\b{name}\s*\[", source):
            names.add(f"{module_name}.{fn.fn.__qualname__}")
    return names


def undriven_kernels(discovered: Iterable[str]) -> dict[str, list[str]]:
    """{module: kernels} of launched kernels that no discovered launch compiled."""
    seen = set(discovered)
    missing = {}
    for module in kernel_modules():
        lost = sorted(launched_kernels(module) - seen)
        if lost:
            missing[module] = lost
    return missing


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def state_count_constexprs(group, cases_by_label) -> set[str]:
    """Constexprs of one kernel's launches that count states: the state size itself (equal to the
    case's N in every launch) and the states per split (equal to ceil(N / S) for another integer
    constexpr S, the number of state splits, in every launch).  Both only bound the state loop
    (``for i in range(N_PER)``) and its masks, so two launches that differ in nothing else run the
    same code; S itself changes the tile shapes and stays in the class."""
    names = None
    for launch in group:
        N = cases_by_label[launch.case].N
        consts = launch.constants
        here = {k for k, v in consts.items() if _is_int(v) and v == N}
        here |= {(k, d) for k, v in consts.items() if _is_int(v)
                 for d, s in consts.items() if d != k and _is_int(s) and s >= 1 and v == -(-N // s)}
        names = here if names is None else names & here
    names = names or set()
    plain = {n for n in names if isinstance(n, str)}
    # N_PER = ceil(N / KS) and KS = ceil(N / N_PER) both hold: the count of states is the one of
    # the pair that takes more values over N = 1..256 (KS takes a few).
    values = {}
    for launch in group:
        for k, v in launch.constants.items():
            values.setdefault(k, set()).add(v)
    per_split = {k for n in names if isinstance(n, tuple) for k, d in [n]
                 if d not in plain and len(values[k]) > len(values[d])}
    return plain | per_split


def padding_classes(launches, cases_by_label) -> dict:
    """Group launches into padding classes.

    The class of a launch is its kernel, its case's options other than N, and its constexprs other
    than the state counts of ``state_count_constexprs`` (N, states per split), and its launch
    options: members of a class differ only in the state loop's trip count and its masks.  Returns
    {class key: [launches sorted by N]}.
    """
    by_kernel = {}
    for launch in launches:
        by_kernel.setdefault(launch.kernel, []).append(launch)
    classes = {}
    for kernel, group in by_kernel.items():
        n_named = state_count_constexprs(group, cases_by_label)
        for launch in group:
            case = cases_by_label[launch.case]
            others = tuple(sorted((k, v) for k, v in launch.constants.items() if k not in n_named))
            key = (kernel, case.op, case.dtype, case.flags, others, launch.num_warps, launch.num_stages)
            classes.setdefault(key, []).append(launch)
    for members in classes.values():
        members.sort(key=lambda la: cases_by_label[la.case].N)
    return classes


def class_ends(classes, cases_by_label) -> list:
    """The launches at the smallest and largest N of every padding class (one if they coincide)."""
    picked = []
    for members in classes.values():
        ends = [members[0]] if len(members) == 1 else [members[0], members[-1]]
        for launch in ends:
            if not any(launch is p for p in picked):
                picked.append(launch)
    return picked


# -- levels: which cases, and which launches of them to compile ---------------------------------
# A level maps an arch to groups of (cases, select): ``select`` says which launches of the group's
# padding classes are compiled ("ends": smallest and largest N, "max": largest, "all": every one).

def _ci(arch: int):
    """CI (216 binaries for sm_90, 34 for sm_80 with the kernels of November 2026; 0.2 to 10 s of CPU
    each, the backward scan the most).

    sm_90: the model configuration (D, z, delta_bias, softplus) at both ends of every padding
    class in bf16 and at the largest N of every class in fp32 and fp16; every other scan option
    combination (ngroups 2, the no-grad forward) at N = 16 in bf16; the Gramian configurations
    of the collection pass (ltv / frozen x general / constant-row A x mask or not) at the largest
    N of every class in bf16, and delta_bias + softplus at N = 16; the mean_lti sums in the model
    configuration at the largest N of every class in bf16 (inputs are upcast on load: fp32 is the
    same code), every option combination at N = 16 in bf16; the decode step (when the op exists) at the largest N of every class in every
    dtype, every option combination at N = 16.
    sm_80: the model configurations in bf16 at the largest N of every class.
    """
    if arch == 80:
        return [(scan_cases(dtypes=("bfloat16",), flag_sets=[MODEL_SCAN_FLAGS]), "max"),
                (gram_cases(dtypes=("bfloat16",), flag_sets=[MODEL_GRAM_FLAGS]), "max"),
                (mean_lti_cases(dtypes=("bfloat16",), flag_sets=[MODEL_MEAN_LTI_FLAGS]), "max"),
                (update_cases(dtypes=("bfloat16",), flag_sets=[MODEL_UPDATE_FLAGS]), "max")]
    other = [f for f in all_scan_flag_sets() if f != MODEL_SCAN_FLAGS]
    collection = [f for f in all_gram_flag_sets() if not dict(f)["bias_softplus"]]
    with_bias = [f for f in all_gram_flag_sets() if dict(f)["bias_softplus"]]
    return [
        (scan_cases(dtypes=("bfloat16",), flag_sets=[MODEL_SCAN_FLAGS]), "ends"),
        (scan_cases(dtypes=("float32", "float16"), flag_sets=[MODEL_SCAN_FLAGS]), "max"),
        (scan_cases(Ns=(16,), dtypes=("bfloat16",), flag_sets=other), "all"),
        (gram_cases(dtypes=("bfloat16",), flag_sets=collection), "max"),
        (gram_cases(Ns=(16,), dtypes=("bfloat16",), flag_sets=with_bias), "all"),
        (mean_lti_cases(dtypes=("bfloat16",), flag_sets=[MODEL_MEAN_LTI_FLAGS]), "max"),
        (mean_lti_cases(Ns=(16,), dtypes=("bfloat16",)), "all"),
        (update_cases(flag_sets=[MODEL_UPDATE_FLAGS]), "max"),
        (update_cases(Ns=(16,), dtypes=("bfloat16",)), "all"),
    ]


def _full(arch: int):
    """The bench's matrix: every case of every op, both ends of every padding class."""
    return [(scan_cases(), "ends"), (gram_cases(), "ends"), (mean_lti_cases(), "ends"),
            (update_cases(), "ends")]


LEVELS = {"ci": _ci, "full": _full}
