"""Triton one-token selective state update (Mamba1 decode step): one kernel, state updated in place.

Mechanism only.  The launcher asserts layouts and launches; validation, dtype policy and backend
choice live in ``compressm_mamba.ops.selective_state_update``.  The float64 specification is
``compressm_mamba.reference.selective_state_update``.

A decode step touches each state element once (read h, write h), so it is bound by memory and, at
the batch sizes of generation, by launch latency.  Everything of the step is therefore fused into a
single launch: bias + softplus of dt, the decay exp(dt A), the input dt x B, the state write-back,
y = <C, h>, the D skip and the silu(z) gate.  One program owns BLOCK_D channels x all N states of
one sequence (N padded to a power of two, padded lanes masked), so the reduction over N for y
stays inside the program and no second pass or atomic is needed.  fp32 arithmetic whatever the
storage dtypes; the state is written back in its own dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .elementwise import softplus as _softplus

__all__ = ["selective_state_update_fwd"]

_POISON_ENV = "COMPRESSM_MAMBA_POISON"
# Elements of one program's (BLOCK_D, BLOCK_N) state tile: large enough to amortise the per-program
# loads of x/dt/z, small enough that a small batch still spreads over many programs.
_TILE_ELEMENTS = 2048
_MIN_PROGRAMS = 256


@triton.jit
def _selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    dim, N, dim_per_group,
    stride_state_b, stride_state_d, stride_state_n,
    stride_B_b, stride_B_g, stride_C_b, stride_C_g,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # x, dt, z, out: contiguous (batch, dim); A: contiguous (dim, N); B, C: (batch, G, N), unit stride in N.
    b = tl.program_id(1).to(tl.int64)
    d = (tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    d_ok = d < dim
    tile_ok = d_ok[:, None] & (n < N)[None, :]
    row = b * dim + d

    x = tl.load(x_ptr + row, mask=d_ok, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + row, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    g = d // dim_per_group  # the B/C group of each channel (a block may straddle groups)
    B = tl.load(B_ptr + b * stride_B_b + g[:, None] * stride_B_g + n[None, :], mask=tile_ok, other=0.0)
    C = tl.load(C_ptr + b * stride_C_b + g[:, None] * stride_C_g + n[None, :], mask=tile_ok, other=0.0)

    state_ptrs = state_ptr + b * stride_state_b + d[:, None] * stride_state_d + n[None, :] * stride_state_n
    h = tl.load(state_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * B.to(tl.float32)
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=tile_ok)

    y = tl.sum(h * C.to(tl.float32), axis=1)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=d_ok, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + row, mask=d_ok, other=0.0).to(tl.float32)
        y = y * z / (1.0 + tl.exp(-z))
    tl.store(out_ptr + row, y.to(out_ptr.dtype.element_ty), mask=d_ok)


def selective_state_update_fwd(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               *, poison=False):
    """Launch the fused decode step; ``state`` is updated in place.  Returns out (batch, dim) in x's dtype.

    state: (batch, dim, N) any strides; x, dt, z: contiguous (batch, dim); A: contiguous (dim, N);
    B, C: (batch, ngroups, N) with unit stride in N; D, dt_bias: contiguous (dim,) or None.
    """
    batch, dim = x.shape
    N = A.shape[1]
    ngroups = B.shape[1]
    assert state.shape == (batch, dim, N) and dt.shape == x.shape and A.shape[0] == dim
    assert B.shape == (batch, ngroups, N) and C.shape == B.shape and dim % ngroups == 0
    assert x.is_contiguous() and dt.is_contiguous() and A.is_contiguous()
    assert B.stride(2) == 1 and C.stride(2) == 1
    assert z is None or (z.shape == x.shape and z.is_contiguous())
    out = torch.empty_like(x)
    if poison or os.environ.get(_POISON_ENV):
        out.fill_(float("nan"))
    if batch == 0 or dim == 0:
        return out
    block_n = max(2, triton.next_power_of_2(N))
    block_d = min(128, max(4, _TILE_ELEMENTS // block_n))
    # At generation's small batches a few big tiles would leave most SMs idle: shrink the tile until
    # there are about two programs per SM of a large GPU (the per-program fixed cost is a few loads).
    while block_d > 4 and batch * triton.cdiv(dim, block_d) < _MIN_PROGRAMS:
        block_d //= 2
    grid = (triton.cdiv(dim, block_d), batch)
    _selective_state_update_kernel[grid](
        state, x, dt, A, B, C, D if D is not None else x, z if z is not None else x,
        dt_bias if dt_bias is not None else x, out,
        dim, N, dim // ngroups,
        state.stride(0), state.stride(1), state.stride(2),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4,
    )
    return out
