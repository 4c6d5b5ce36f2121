"""ops.selective_state_update (the one-token decode step) against the float64 reference.

Every backend's output and new state are compared with ``reference.selective_state_update`` run in
float64 on the same rounded inputs the backend saw.  The Triton kernel runs in Triton's interpreter
without a GPU (tests/conftest.py), on tiny odd shapes; its launcher fills ``out`` with NaN first
(poison), so an element it never writes fails assert_close.  The spec itself is pinned to the scan:
L steps from a zero state are the scan over L tokens, and a prefill scan's last state followed by
steps continues it exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from compressm_mamba import ops
from compressm_mamba.reference import selective_scan as reference_scan
from compressm_mamba.reference import selective_state_update as reference_update

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol) by the dtype compared: fp32 arithmetic on identical inputs, then rounding to the dtype.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 1e-5), torch.float16: (1e-3, 1e-3),
       torch.bfloat16: (8e-3, 8e-3)}


def step_inputs(batch, dim, N, ngroups=None, *, dtype=torch.float32, with_D=True, with_z=True, with_bias=True,
                softplus=True, seed=0):
    """Inputs of one step; ngroups=None gives 2-D B/C (batch, N).  The state is a non-zero (batch, dim, N)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (batch, N) if ngroups is None else (batch, ngroups, N)
    dt = r(batch, dim) - 1.0
    if not softplus:
        dt = F.softplus(dt)  # used as is: keep it a positive step size
    x = dict(state=r(batch, dim, N), x=r(batch, dim), dt=dt, A=-torch.rand(dim, N, generator=g) * 2 - 0.1,
             B=r(*bc), C=r(*bc), D=r(dim) if with_D else None, z=r(batch, dim) if with_z else None,
             dt_bias=r(dim) * 0.5 if with_bias else None)
    kinds = dict(x=dtype, dt=dtype, z=dtype, B=dtype, C=dtype)
    return {k: None if v is None else v.to(DEVICE, kinds.get(k, torch.float32)) for k, v in x.items()}


def expected(inp, softplus):
    """The float64 reference on the same (rounded) inputs: (out, new state)."""
    as64 = {k: None if v is None else v.double() for k, v in inp.items()}
    return reference_update(**as64, dt_softplus=softplus)


def run(inp, softplus, backend):
    state = inp["state"].clone()
    args = {k: v for k, v in inp.items() if k != "state"}
    out = ops.selective_state_update(state, **args, dt_softplus=softplus, backend=backend)
    return out, state


SHAPES = [  # (batch, dim, N, ngroups)
    (1, 5, 1, None),
    (3, 37, 12, None),
    (2, 6, 13, 3),
    (2, 33, 16, 1),
    (1, 9, 128, None),
]


@pytest.mark.requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   # the interpreter's bf16 arithmetic is not the GPU's: bf16 on a GPU only
                                   pytest.param(torch.bfloat16, marks=pytest.mark.requires_cuda)])
@pytest.mark.parametrize("batch,dim,N,ngroups", SHAPES)
def test_triton_kernel_matches_the_reference(batch, dim, N, ngroups, dtype):
    from compressm_mamba.kernels.selective_state_update import selective_state_update_fwd

    inp = step_inputs(batch, dim, N, ngroups, dtype=dtype, seed=N)
    want_out, want_state = expected(inp, True)
    state = inp["state"].clone()
    B = inp["B"] if ngroups is not None else inp["B"].unsqueeze(1)
    C = inp["C"] if ngroups is not None else inp["C"].unsqueeze(1)
    out = selective_state_update_fwd(state, inp["x"], inp["dt"], inp["A"], B, C, inp["D"], inp["z"],
                                     inp["dt_bias"], True, poison=True)
    assert out.dtype == dtype and state.dtype == torch.float32
    assert_close(out, want_out, rtol=TOL[dtype][0], atol=TOL[dtype][1], name="out")
    assert_close(state, want_state, rtol=TOL[torch.float32][0], atol=TOL[torch.float32][1], name="state")


@pytest.mark.requires_triton
@pytest.mark.parametrize("with_D,with_z,with_bias,softplus", [
    (False, False, False, False), (True, False, True, False), (False, True, False, True), (True, True, True, True)])
def test_triton_optional_inputs_on_and_off(with_D, with_z, with_bias, softplus):
    inp = step_inputs(2, 11, 7, None, with_D=with_D, with_z=with_z, with_bias=with_bias, softplus=softplus, seed=3)
    want_out, want_state = expected(inp, softplus)
    out, state = run(inp, softplus, "triton")
    assert ops.selective_state_update.__module__.endswith("selective_state_update")
    assert_close(out, want_out, rtol=2e-5, atol=1e-5, name="out")
    assert_close(state, want_state, rtol=2e-5, atol=1e-5, name="state")


@pytest.mark.requires_triton
@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16])
def test_triton_writes_a_half_precision_state_in_its_dtype(state_dtype):
    inp = step_inputs(2, 10, 16, 2, seed=5)
    inp["state"] = inp["state"].to(state_dtype)
    want_out, want_state = expected(inp, True)
    out, state = run(inp, True, "triton")
    assert state.dtype == state_dtype
    assert_close(state, want_state, rtol=TOL[state_dtype][0], atol=TOL[state_dtype][1], name="state")
    assert_close(out, want_out, rtol=2e-5, atol=1e-5, name="out")


@pytest.mark.requires_triton
def test_triton_updates_a_strided_state_view_in_place():
    """A cache may hold the state as a view (e.g. one slot of a bigger buffer): the kernel writes through it."""
    inp = step_inputs(2, 12, 8, None, seed=7)
    buffer = torch.zeros(2, 8, 12, device=DEVICE)
    state = buffer.transpose(1, 2)  # (batch, dim, N) with non-unit stride in N
    state.copy_(inp["state"])
    want_out, want_state = expected(inp, True)
    out = ops.selective_state_update(state, **{k: v for k, v in inp.items() if k != "state"}, dt_softplus=True,
                                     backend="triton")
    assert_close(buffer.transpose(1, 2), want_state, rtol=2e-5, atol=1e-5, name="state")
    assert_close(out, want_out, rtol=2e-5, atol=1e-5, name="out")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("batch,dim,N,ngroups", SHAPES[:4])
def test_torch_and_reference_backends_match_the_reference(batch, dim, N, ngroups, dtype, backend):
    inp = step_inputs(batch, dim, N, ngroups, dtype=dtype, seed=N + 1)
    if dtype == torch.float64:
        inp["state"] = inp["state"].double()
    want_out, want_state = expected(inp, True)
    out, state = run(inp, True, backend)
    assert out.dtype == dtype
    assert_close(out, want_out, rtol=TOL[dtype][0], atol=TOL[dtype][1], name="out")
    tol = TOL[state.dtype]
    assert_close(state, want_state, rtol=tol[0], atol=tol[1], name="state")


def test_torch_backend_is_differentiable_in_the_step_inputs():
    """Gradients of a decode step (e.g. a cached forward inside a training graph) equal the reference's."""
    inp = step_inputs(2, 6, 5, 2, dtype=torch.float64, seed=11)
    inp["state"] = inp["state"].double()
    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items() if k != "state" and v is not None}
    weights = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = {}
    for backend in ("torch", "reference"):
        params = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
        state = inp["state"].clone()
        out = ops.selective_state_update(state, **params, dt_softplus=True, backend=backend)
        (out * weights).sum().backward()
        grads[backend] = {k: p.grad for k, p in params.items()}
    for name in leaves:
        assert_close(grads["torch"][name], grads["reference"][name], rtol=1e-10, atol=1e-12, name=f"d{name}")


@pytest.mark.parametrize("ngroups", [None, 2])
def test_steps_from_zero_are_the_scan(ngroups):
    """The spec is one step of the scan: L steps from h = 0 reproduce reference.selective_scan."""
    g = torch.Generator().manual_seed(2)
    batch, dim, N, L = 2, 6, 5, 7
    bc = (batch, N, L) if ngroups is None else (batch, ngroups, N, L)
    u, delta, z = (torch.randn(batch, dim, L, generator=g, dtype=torch.float64) for _ in range(3))
    A = -torch.rand(dim, N, generator=g, dtype=torch.float64) - 0.1
    B, C = torch.randn(*bc, generator=g, dtype=torch.float64), torch.randn(*bc, generator=g, dtype=torch.float64)
    D, bias = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    want, want_last = reference_scan(u, delta, A, B, C, D, z, bias, True, return_last_state=True)
    h = torch.zeros(batch, dim, N, dtype=torch.float64)
    outs = []
    for t in range(L):
        out, h = reference_update(h, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias, True)
        outs.append(out)
    assert_close(torch.stack(outs, -1), want, rtol=1e-12, atol=1e-12, name="out")
    assert_close(h, want_last, rtol=1e-12, atol=1e-12, name="last state")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.requires_triton)])
def test_prefill_then_steps_continue_the_scan(backend):
    """ops.selective_scan's last state + ops.selective_state_update steps = one scan over the whole sequence."""
    g = torch.Generator().manual_seed(4)
    batch, dim, N, L, P = 2, 8, 12, 9, 5  # P prefill tokens, then L - P decode steps
    u, delta, z = (torch.randn(batch, dim, L, generator=g).to(DEVICE) for _ in range(3))
    A = (-torch.rand(dim, N, generator=g) - 0.1).to(DEVICE)
    B, C = (torch.randn(batch, N, L, generator=g).to(DEVICE) for _ in range(2))
    D, bias = (torch.randn(dim, generator=g).to(DEVICE) for _ in range(2))
    whole = ops.selective_scan(u, delta, A, B, C, D, z, bias, True, backend="reference")
    head, state = ops.selective_scan(u[..., :P], delta[..., :P], A, B[..., :P], C[..., :P], D, z[..., :P], bias,
                                     True, return_last_state=True, backend=backend)
    state = state.float().contiguous()
    tail = [ops.selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t],
                                       bias, True, backend=backend) for t in range(P, L)]
    assert_close(torch.cat([head, torch.stack(tail, -1)], -1), whole, rtol=1e-4, atol=1e-5, name="out")


def test_bad_inputs_name_the_argument_and_leave_the_state_alone():
    inp = step_inputs(2, 6, 4, None)
    state = inp["state"].clone()
    args = {k: v for k, v in inp.items() if k != "state"}
    with pytest.raises(ValueError, match=r"state must be \(batch=2, dim=6, N=4\)"):
        ops.selective_state_update(state[:, :, :3], **args)
    with pytest.raises(ValueError, match="B must be"):
        ops.selective_state_update(state, **{**args, "B": inp["B"][:, :3]})
    with pytest.raises(ValueError, match="not a multiple of ngroups"):
        ops.selective_state_update(state, **{**args, "B": torch.randn(2, 4, 4), "C": torch.randn(2, 4, 4)})
    with pytest.raises(ValueError, match="dt_bias must be"):
        ops.selective_state_update(state, **{**args, "dt_bias": torch.randn(5)})
    with pytest.raises(RuntimeError, match="no selective_state_update kernel.*use backend='triton'"):
        ops.selective_state_update(state, **args, backend="cuda")
    assert torch.equal(state, inp["state"])


@pytest.mark.requires_triton
def test_triton_refuses_a_step_that_needs_gradients():
    inp = step_inputs(1, 4, 4, None)
    args = {k: v for k, v in inp.items() if k != "state"}
    args["x"] = args["x"].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="has no backward"):
        ops.selective_state_update(inp["state"].clone(), **args, backend="triton")
