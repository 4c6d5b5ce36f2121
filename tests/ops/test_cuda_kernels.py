"""CUDA kernels (compressm_mamba._C) against the float64 reference: scan forward and backward, Gramians.

Every kernel-vs-reference check runs the reference in float64 on the very inputs the kernel saw
(after rounding to fp16 / bf16).  Outputs are poisoned: COMPRESSM_MAMBA_POISON=1 makes the bindings
fill every output (and the backward's partial buffers) with NaN before the kernel runs, and
assert_close rejects non-finite values, so an element a kernel never writes fails the test.  Shapes
are small and odd on purpose: dim is never a multiple of a block's channels, L crosses the 64-step
checkpoint chunk, N covers every compiled state size and sizes in between (which run on the next
larger kernel, masked); L % 4 == 0 takes the vector loads, other L the element loads; one case has
fewer backward slots than channel slices.

Needs a GPU and the built extension: the requires_cuda mark skips without a GPU (tests/conftest.py);
the module skips itself when compressm_mamba._C does not import.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_close,
    gramian_padding_mask,
    random_gramian_inputs,
    random_scan_inputs,
    reference_checkpoints,
    reference_scan_with_grads,
)

from compressm_mamba import ops
from compressm_mamba.reference import selective_scan as reference_scan
from compressm_mamba.reference.gramians import gramian_statistics

pytestmark = [pytest.mark.requires_cuda, pytest.mark.requires_cuda_ext]

try:
    from compressm_mamba import _C  # noqa: F401
except ImportError as exc:  # not built here (CPU machine, or built without CUDA)
    pytest.skip(f"compressm_mamba._C does not import: {exc}", allow_module_level=True)

from compressm_mamba.ops import _cuda  # noqa: E402

DEVICE = "cuda"
CHUNK = _cuda.CHECKPOINT_CHUNK
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# (rtol, atol as a fraction of the compared tensor's largest |entry|, at least 1) by the dtype of the
# tensor compared.  The kernels compute in fp32 from exactly the inputs the reference sees; the
# error is fp32 accumulation (in the kernels' fixed order), exp2 by MUFU.EX2 (within 2 ulp; the CPU
# emulation, tests/ops/test_cuda_scan_emulation.py, shows twice that stays within these tolerances)
# plus the final rounding to the output's dtype: fp16 keeps 11 significant bits, bf16 8.  Same
# values as the Triton tests.
SCAN_TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}
# Gramian sums: (rtol, atol as a fraction of the largest |entry| of the reference sum).  Inputs are
# exact in fp32 whatever their dtype, so only the fp32 arithmetic differs; longer bf16 sequences
# leave a little more room (values of the Triton tests).
GRAM_TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-5, 2e-6),
    torch.bfloat16: (1e-4, 1e-5),
}

# Every compiled state size, and sizes that round up to one (1, 13, 200) or sit between two.
STATE_SIZES = [1, 4, 8, 12, 13, 16, 24, 32, 48, 64, 96, 128, 200, 256]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setenv("COMPRESSM_MAMBA_POISON", "1")


def _check(tensor, expected, name, tol=SCAN_TOL):
    rtol, atol = tol[tensor.dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    assert_close(tensor.detach().cpu(), expected, rtol=rtol, atol=atol * scale, name=name)


# ---------------------------------------------------------------------------------------------
# Selective scan
# ---------------------------------------------------------------------------------------------


def _scan_inputs(batch, dim, N, L, ngroups, dtype, *, with_D=True, with_z=True, with_bias=True, softplus=True,
                 seed=0):
    """Kernel inputs on the GPU: u / delta / z / B / C in ``dtype`` ((batch, G, N, L) B / C), A / D / bias fp32."""
    x = random_scan_inputs(batch, dim, N, L, ngroups=ngroups, seed=seed, with_D=with_D, with_z=with_z,
                           with_bias=with_bias)
    if not softplus:
        # Without softplus the step size is used as is: keep it positive (a real discretisation).
        x["delta"] = F.softplus(x["delta"])
        if with_bias:
            x["delta_bias"] = x["delta_bias"].abs()
    if x["B"].dim() == 3:
        x["B"], x["C"] = x["B"].unsqueeze(1), x["C"].unsqueeze(1)
    fp32 = ("A", "D", "delta_bias")
    return {k: None if v is None else v.to(DEVICE, torch.float32 if k in fp32 else dtype).contiguous()
            for k, v in x.items()}






def _run_raw_ops(batch, dim, N, L, ngroups, dtype, softplus=True, seed=0, **opts):
    """selective_scan_fwd / _bwd ops against the reference: out, last state, checkpoints, all gradients."""
    ops_ = _cuda._ops()
    inputs = _scan_inputs(batch, dim, N, L, ngroups, dtype, softplus=softplus, seed=seed, **opts)
    args = [inputs[k] for k in GRAD_NAMES]
    out, last_state, ckpts = ops_.selective_scan_fwd(*args, softplus)
    assert out.dtype == dtype and last_state.dtype == torch.float32 and ckpts.dtype == torch.float32
    assert ckpts.shape == (batch, dim, math.ceil(L / CHUNK), N)

    dout = torch.randn(batch, dim, L, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    ref_out, ref_last, ref_grads = reference_scan_with_grads(inputs, dout, softplus)
    _check(out, ref_out, "out")
    _check(last_state, ref_last, "last_state")
    _check(ckpts, reference_checkpoints(inputs, softplus, CHUNK), "checkpoints")

    grads = ops_.selective_scan_bwd(dout, *args, softplus, ckpts)
    for name, grad in zip(GRAD_NAMES, grads):
        if inputs[name] is None:
            assert grad.numel() == 0, f"d{name} should be empty when {name} is None"
            continue
        assert grad.shape == inputs[name].shape, f"d{name} shape {tuple(grad.shape)}"
        assert grad.dtype == inputs[name].dtype, f"d{name} dtype {grad.dtype} != {inputs[name].dtype}"
        _check(grad, ref_grads[name], f"d{name}")


@pytest.mark.parametrize("N", STATE_SIZES)
def test_scan_fp32_every_state_size(N):
    # dim = 2 groups of 67 channels: more than one block per group for every N (up to 128 channels
    # per block), a ragged last block; L = 130 crosses two checkpoint chunks.
    _run_raw_ops(batch=2, dim=134, N=N, L=130, ngroups=2, dtype=torch.float32, seed=N)


@pytest.mark.parametrize("L", [75, 132], ids=["element-loads", "vector-loads"])  # L % 4 picks the path
@pytest.mark.parametrize("N", [1, 12, 16, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_scan_half_precision(N, dtype, L):
    _run_raw_ops(batch=2, dim=37, N=N, L=L, ngroups=1, dtype=dtype, seed=N)


@pytest.mark.parametrize(
    "batch, dim, N, L, ngroups, opts",
    [
        pytest.param(1, 5, 16, 1, 1, {}, id="L1"),
        pytest.param(2, 5, 12, 7, 1, dict(with_z=False), id="noz"),
        pytest.param(1, 10, 13, 7, 2, dict(with_D=False, with_bias=False, softplus=False), id="bare-nosoftplus"),
        pytest.param(3, 9, 4, 64, 3, dict(with_z=False, with_D=False), id="L-one-chunk-G3"),
        pytest.param(1, 200, 8, 65, 1, {}, id="L-chunk-plus-1"),
        pytest.param(1, 4, 256, 200, 4, dict(softplus=False), id="N256-one-channel-per-group"),
        # 16 slices of 4 channels, but the dB / dC partials may only take ~2 slots' worth of memory
        # (bindings.cpp: 576 KiB of inputs / 256 KiB per slot = 2 slots): blocks walk 8 slices each.
        pytest.param(1, 64, 256, 128, 1, {}, id="N256-slots-fewer-than-slices"),
        pytest.param(2, 130, 16, 256, 1, dict(with_bias=False), id="N16-vector-path-4-chunks"),
    ],
)
def test_scan_options_and_edges(batch, dim, N, L, ngroups, opts):
    _run_raw_ops(batch, dim, N, L, ngroups, torch.float32, **opts)


def test_scan_misaligned_rows_use_element_loads():
    """Inputs and dout one element off vector alignment (contiguous views) take the element-wise path."""
    def misaligned(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEVICE)
        view = buf[1:].view(t.shape).copy_(t)
        assert view.is_contiguous() and view.data_ptr() % 8 != 0
        return view

    x = _scan_inputs(2, 7, 12, 68, 1, torch.bfloat16, seed=4)
    for name in ("u", "delta", "z"):
        x[name] = misaligned(x[name])
    args = [x[k] for k in GRAD_NAMES]
    out, _, ckpts = _cuda._ops().selective_scan_fwd(*args, True)
    dout = misaligned(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, out.dtype))
    ref_out, _, ref_grads = reference_scan_with_grads(x, dout, True)
    _check(out, ref_out, "out")
    grads = _cuda._ops().selective_scan_bwd(dout, *args, True, ckpts)
    for name, grad in zip(GRAD_NAMES, grads):
        _check(grad, ref_grads[name], f"d{name}")


@pytest.mark.parametrize("N", [16, 128])
def test_scan_backward_is_deterministic(N):
    """No atomics: two backward runs give bit-identical gradients, dB / dC included (many channels per group)."""
    x = _scan_inputs(2, 200, N, 150, 1, torch.float32, seed=6)
    args = [x[k] for k in GRAD_NAMES]
    ops_ = _cuda._ops()
    _, _, ckpts = ops_.selective_scan_fwd(*args, True)
    dout = torch.randn(2, 200, 150, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    first = ops_.selective_scan_bwd(dout, *args, True, ckpts)
    second = ops_.selective_scan_bwd(dout, *args, True, ckpts)
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), f"d{name} differs between runs"


def test_scan_empty_sequence():
    """L = 0: empty outputs, a zero last state, zero parameter gradients."""
    ops_ = _cuda._ops()
    x = _scan_inputs(2, 5, 16, 0, 1, torch.float32)
    args = [x[k] for k in GRAD_NAMES]
    out, last, ckpts = ops_.selective_scan_fwd(*args, True)
    assert out.shape == (2, 5, 0) and ckpts.shape == (2, 5, 0, 16)
    assert torch.equal(last, torch.zeros_like(last))
    grads = ops_.selective_scan_bwd(torch.empty_like(out), *args, True, ckpts)
    for name in ("A", "D", "delta_bias"):
        g = grads[GRAD_NAMES.index(name)]
        assert torch.equal(g, torch.zeros_like(g)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("grouped", [False, True], ids=["BC3d", "BC4d"])
def test_ops_selective_scan_backend_cuda_with_autograd(dtype, grouped):
    """ops.selective_scan(backend="cuda"): dispatch, the autograd.Function and the dtype policy."""
    x = random_scan_inputs(batch=2, dim=6, N=16, L=70, ngroups=2 if grouped else None, seed=3)
    x = {k: None if v is None else v.to(DEVICE, torch.float32 if k in ("A", "D", "delta_bias") else dtype)
         for k, v in x.items()}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items() if v is not None}
    out, last = ops.selective_scan(**leaves, delta_softplus=True, return_last_state=True, backend="cuda")
    from compressm_mamba.ops.selective_scan import last_call

    assert last_call["backend"] == "cuda"
    assert out.dtype == dtype and last.dtype == torch.float32 and not last.requires_grad
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    (out * dout).sum().backward()
    ref_out, ref_last, ref_grads = reference_scan_with_grads(x, dout, True)
    _check(out, ref_out, "out")
    _check(last, ref_last, "last_state")
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, name
        _check(leaf.grad, ref_grads[name], f"d{name}")


def test_ops_selective_scan_mixed_dtypes_compute_in_fp32():
    """fp16 u with fp32 B / C: the kernel runs in fp32 (exact upcast), out comes back in fp16."""
    x = random_scan_inputs(batch=1, dim=4, N=8, L=20, seed=5)
    x = {k: None if v is None else v.to(DEVICE, torch.float16 if k in ("u", "delta", "z") else torch.float32)
         for k, v in x.items()}
    out = ops.selective_scan(**x, delta_softplus=True, backend="cuda")
    assert out.dtype == torch.float16
    ref = reference_scan(**{k: None if v is None else v.cpu().double() for k, v in x.items()}, delta_softplus=True)
    _check(out, ref, "out")


def test_auto_backend_prefers_cuda():
    x = {k: None if v is None else v.to(DEVICE, torch.float32)
         for k, v in random_scan_inputs(batch=1, dim=3, N=4, L=5).items()}
    ops.selective_scan(**x, delta_softplus=True)
    from compressm_mamba.ops.selective_scan import last_call

    assert last_call["backend"] == "cuda"


def test_scan_torch_compile_matches_eager():
    """The fakes let torch.compile trace the autograd.Function around the two ops."""
    x = {k: None if v is None else v.to(DEVICE, torch.float32)
         for k, v in random_scan_inputs(batch=2, dim=6, N=16, L=40, seed=11).items()}

    def f(u, delta, A, B, C, D, z, delta_bias):
        out, _ = _cuda.selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, True)
        return out

    def run(fn):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        out = fn(**leaves)
        out.square().sum().backward()
        return out.detach(), {k: v.grad for k, v in leaves.items()}

    eager_out, eager_grads = run(f)
    compiled_out, compiled_grads = run(torch.compile(f))
    _check(compiled_out, eager_out.cpu().double(), "compiled out")
    for name in eager_grads:
        _check(compiled_grads[name], eager_grads[name].cpu().double(), f"compiled d{name}")


# ---------------------------------------------------------------------------------------------
# Gramian token sums
# ---------------------------------------------------------------------------------------------


def _gram_case(batch, dim, N, L, ngroups, estimator, *, dtype=torch.float32, bias=True, softplus=True, masked=True,
               constant_rows=False, seed=0):
    delta, A, B, C, delta_bias = random_gramian_inputs(batch, dim, N, L, ngroups=ngroups, seed=seed)
    if constant_rows:
        A = A[:, :1].expand(dim, N).contiguous()
    if not softplus:
        delta = F.softplus(delta)
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    args = dict(
        delta=delta.to(DEVICE, dtype).contiguous(), A=A.to(DEVICE, torch.float32).contiguous(),
        B=B.to(DEVICE, dtype).contiguous(), C=C.to(DEVICE, dtype).contiguous(),
        delta_bias=delta_bias.to(DEVICE, torch.float32) if bias else None,
        mask=gramian_padding_mask(batch, L).to(DEVICE) if masked else None,
    )
    P, Q = _cuda._ops().gramian_sums(args["delta"], args["A"], args["B"], args["C"], args["delta_bias"], softplus,
                                     args["mask"], estimator, constant_rows)
    ref = {k: (v.cpu().double() if v.is_floating_point() else v.cpu()) if v is not None else None
           for k, v in args.items()}
    stats = gramian_statistics(ref["delta"], ref["A"], ref["B"], ref["C"], estimator=estimator,
                               delta_bias=ref["delta_bias"], delta_softplus=softplus, mask=ref["mask"])
    rtol, atol = GRAM_TOL[dtype]
    for name, got, want in (("P", P, stats.sums["P"]), ("Q", Q, stats.sums["Q"])):
        assert got.dtype == torch.float32 and got.shape == (dim, N, N), (name, got.dtype, got.shape)
        got = got.cpu()
        assert_close(got, want, rtol=rtol, atol=atol * float(want.abs().max().clamp_min(1e-30)),
                     name=f"{estimator} {name}")
        assert torch.equal(got, got.transpose(-1, -2)), f"{name} is not exactly symmetric"


# Every tile shape (N <= 4, 8, 16, 32, then 64 x 64 tiles) with ragged N, several output tiles
# (70, 128, 200), one and several channel blocks (up to 16 channels per block).
GRAM_SIZES = [1, 3, 4, 7, 8, 12, 16, 24, 32, 48, 64, 70, 128, 200]


@pytest.mark.parametrize("estimator", ["frozen", "ltv"])
@pytest.mark.parametrize("constant_rows", [False, True], ids=["general", "constant_rows"])
@pytest.mark.parametrize("N", GRAM_SIZES)
def test_gramians_every_tile_shape(N, constant_rows, estimator):
    _gram_case(2, 18, N, 45, 2, estimator, constant_rows=constant_rows, seed=N)


@pytest.mark.parametrize("estimator", ["frozen", "ltv"])
@pytest.mark.parametrize("constant_rows", [False, True], ids=["general", "constant_rows"])
@pytest.mark.parametrize(
    "batch, dim, N, L, ngroups, opts",
    [
        pytest.param(2, 3, 1, 1, 1, {}, id="N1-L1"),
        pytest.param(2, 6, 13, 63, 2, {}, id="N13-L63-G2"),
        pytest.param(2, 3, 64, 7, 1, dict(bias=False, softplus=False, masked=False), id="N64-plain"),
        pytest.param(2, 6, 16, 1, 2, dict(bias=False), id="N16-L1-nobias"),
        pytest.param(3, 5, 12, 100, None, dict(softplus=False), id="N12-L100-positive-dt"),
        pytest.param(1, 33, 4, 70, 3, {}, id="N4-three-channel-blocks"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gramians_options_and_dtypes(batch, dim, N, L, ngroups, opts, dtype, constant_rows, estimator):
    _gram_case(batch, dim, N, L, ngroups, estimator, dtype=dtype, constant_rows=constant_rows, **opts)


def test_gramians_empty_sequence_gives_zero_sums():
    P, Q = _cuda._ops().gramian_sums(
        torch.zeros(2, 3, 0, device=DEVICE), -torch.ones(3, 5, device=DEVICE), torch.zeros(2, 1, 5, 0, device=DEVICE),
        torch.zeros(2, 1, 5, 0, device=DEVICE), None, True, None, "ltv", False,
    )
    assert torch.equal(P, torch.zeros_like(P)) and torch.equal(Q, torch.zeros_like(Q))


@pytest.mark.parametrize("estimator", ["frozen", "ltv"])
def test_ops_gramian_sums_backend_cuda(estimator):
    """ops.gramian_sums(backend="cuda") against backend="reference" (count and sums)."""
    inputs = dict(zip(("delta", "A", "B", "C", "delta_bias"), random_gramian_inputs(2, 6, 16, 30, ngroups=2, seed=2)))
    inputs = {k: v.float() for k, v in inputs.items()}  # the values the kernel sees, exactly
    mask = gramian_padding_mask(2, 30)
    got = ops.gramian_sums(**{k: v.to(DEVICE) for k, v in inputs.items()}, mask=mask.to(DEVICE), estimator=estimator,
                           delta_softplus=True, backend="cuda")
    want = ops.gramian_sums(**{k: v.double() for k, v in inputs.items()}, mask=mask, estimator=estimator,
                            delta_softplus=True, backend="reference")
    assert got.count == want.count
    for name in ("P", "Q"):
        ref = want.sums[name]
        assert_close(got.sums[name].cpu(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()), name=name)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake (meta) kernels, autograd registration, AOT dispatch
# ---------------------------------------------------------------------------------------------


def _opcheck(op, args, *, grad_args=None):
    """All of opcheck's tests; the autograd-registration one on copies of the inputs that require grad.

    The ops themselves have no autograd formula (the autograd.Function around them has), so that test
    must see inputs requiring grad and outputs that do not; the others run on plain inputs.
    """
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    grad_args = grad_args or [a.detach().clone().requires_grad_() if torch.is_tensor(a) and a.is_floating_point()
                              else a for a in args]
    torch.library.opcheck(op, grad_args, test_utils=("test_autograd_registration",))


@pytest.mark.parametrize("with_options", [True, False], ids=["D-z-bias", "bare"])
def test_opcheck_selective_scan_fwd(with_options):
    x = _scan_inputs(2, 6, 12, 70, 2, torch.float32, with_D=with_options, with_z=with_options,
                     with_bias=with_options)
    _opcheck(_cuda._ops().selective_scan_fwd.default, [x[k] for k in GRAD_NAMES] + [True])


@pytest.mark.parametrize("with_options", [True, False], ids=["D-z-bias", "bare"])
def test_opcheck_selective_scan_bwd(with_options):
    # The backward is deterministic (no atomics), so opcheck's repeated runs agree bit for bit even
    # with several channels per group.
    x = _scan_inputs(2, 6, 12, 70, 2, torch.float32, with_D=with_options, with_z=with_options,
                     with_bias=with_options)
    args = [x[k] for k in GRAD_NAMES]
    ops_ = _cuda._ops()
    _, _, ckpts = ops_.selective_scan_fwd(*args, True)
    dout = torch.randn(2, 6, 70, device=DEVICE)
    _opcheck(ops_.selective_scan_bwd.default, [dout] + args + [True, ckpts])


@pytest.mark.parametrize("estimator", ["frozen", "ltv"])
@pytest.mark.parametrize("constant_rows", [False, True], ids=["general", "constant_rows"])
def test_opcheck_gramian_sums(estimator, constant_rows):
    delta, A, B, C, delta_bias = random_gramian_inputs(2, 4, 12, 20, ngroups=2, seed=1)
    if constant_rows:
        A = A[:, :1].expand(4, 12).contiguous()
    args = [delta.float().to(DEVICE), A.float().to(DEVICE), B.float().to(DEVICE), C.float().to(DEVICE),
            delta_bias.float().to(DEVICE), True, gramian_padding_mask(2, 20).to(DEVICE), estimator, constant_rows]
    _opcheck(_cuda._ops().gramian_sums.default, args)


# ---------------------------------------------------------------------------------------------
# Input checks in the bindings: every error names the argument
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, bad, match",
    [
        ("u", lambda x: x["u"].cpu(), "u must be a CUDA tensor"),
        ("delta", lambda x: x["delta"][..., :-1].contiguous(), "delta must have shape"),
        ("A", lambda x: x["A"].double(), "A must be Float"),
        ("B", lambda x: x["B"].transpose(-1, -2), "B must be contiguous"),
        ("C", lambda x: x["C"].half(), "C must be Float"),
        ("D", lambda x: x["D"][:-1].contiguous(), "D must have shape"),
        ("z", lambda x: x["z"].half(), "z must be Float"),
        ("delta_bias", lambda x: x["delta_bias"].double(), "delta_bias must be Float"),
    ],
)
def test_bindings_name_the_bad_argument(field, bad, match):
    x = _scan_inputs(1, 4, 8, 9, 1, torch.float32)
    x[field] = bad(x)
    with pytest.raises(RuntimeError, match=match):
        _cuda._ops().selective_scan_fwd(*[x[k] for k in GRAD_NAMES], True)


def test_bindings_reject_too_large_state():
    x = _scan_inputs(1, 2, 257, 3, 1, torch.float32)
    with pytest.raises(RuntimeError, match=r"N \(A.shape\[1\]\) must be in \[1, 256\]"):
        _cuda._ops().selective_scan_fwd(*[x[k] for k in GRAD_NAMES], True)


def test_extension_exposes_the_ops():
    for name in ("selective_scan", "selective_scan_fwd", "selective_scan_bwd", "gramian_sums"):
        assert hasattr(_C, name), name
