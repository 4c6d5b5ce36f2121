"""Triton selective scan (Mamba1, ``selective_scan_fn`` layout): forward and backward kernels.

Mechanism only.  The launchers assert shapes and layouts and launch; input validation, making inputs
contiguous, viewing 3-D B/C as one group and the autograd wrapper live in ``compressm_mamba.ops``.
The float64 specification is ``compressm_mamba.reference.selective_scan``.

Layout of the work: one program per (batch, group, block of ``BLOCK_D`` channels inside the group).
Blocks never straddle a group, so every program reads a single B/C row per time step and its
contributions to dB/dC belong to one group.  The state h (BLOCK_D x NP, NP = next power of two of
N, padded lanes masked) lives in registers and the program walks time sequentially.  Everything is
accumulated in fp32 whatever the input dtype.

Forward: besides ``out`` and the last state it stores, for every chunk of ``chunk_size`` steps, the
state at the chunk's start ("checkpoint").  Backward: chunks in reverse; each chunk's states are
recomputed from its checkpoint into a per-program fp32 scratch buffer in global memory (chunk_size x
BLOCK_D x NP per program, i.e. about batch * dim * chunk_size * N * 4 bytes in all), then the reverse
recurrence runs over the chunk reading them back.

Cross-program sums are written as per-program partials and reduced in torch by the launcher (no
atomics), so results are deterministic run to run: dB/dC over the channel blocks of a group, dA / dD
/ ddelta_bias over the batch.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["selective_scan_fwd", "selective_scan_bwd"]

# Debug aid: when set (or poison=True is passed), every buffer the kernels must fill is first
# filled with NaN, so an element a kernel forgets to write shows up as NaN instead of stale memory.
_POISON_ENV = "COMPRESSM_MAMBA_POISON"


@triton.jit
def _softplus(x):
    # log1p(exp(x)) without a log1p intrinsic (none is portable to the interpreter): for w = 1 + e,
    # log(w) * e / (w - 1) cancels the rounding of 1 + e (Goldberg), so tiny exp(x) keep their
    # relative accuracy.  Above 20, softplus(x) == x in fp32 (mamba_ssm's threshold as well).
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > 20.0, x, log1p_e)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_state_ptr, ckpt_ptr,
    dim, L, ngroups, dim_per_group, n_chunks, chunk_size,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """One program: batch ``pid_b``, group ``pid_g``, channels ``pid_blk * BLOCK_D + [0, BLOCK_D)`` of it.

    u, delta, z, out: (batch, dim, L) contiguous; A: (dim, N); B, C: (batch, ngroups, N, L)
    contiguous; D, bias: (dim,); last_state: (batch, dim, N) fp32; ckpt: (batch, dim, n_chunks, N) fp32.
    """
    pid_b = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_blk = tl.program_id(2)

    offs_j = pid_blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_j < dim_per_group
    offs_d = pid_g * dim_per_group + offs_j
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]

    # int64: batch * dim * L and batch * ngroups * N * L may exceed 2**31 for long sequences.
    row = (pid_b * dim + offs_d).to(tl.int64) * L  # (BLOCK_D,) start of each channel's time row
    bc_base = (pid_b * ngroups + pid_g).to(tl.int64) * N * L
    bc_offs = bc_base + offs_n.to(tl.int64) * L  # (NP,) start of each state's time row
    state_offs = (pid_b * dim + offs_d).to(tl.int64)[:, None] * N + offs_n[None, :]
    ckpt_offs = (pid_b * dim + offs_d).to(tl.int64)[:, None] * n_chunks * N + offs_n[None, :]

    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    # Padded channels and state lanes load u = 0 and B = 0, so their state stays exactly 0.
    h = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    for c in range(0, n_chunks):
        tl.store(ckpt_ptr + ckpt_offs + c * N, h, mask=mask_dn)
        t_start = c * chunk_size
        t_end = tl.minimum(t_start + chunk_size, L)
        for t in range(t_start, t_end):
            u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = _softplus(dt)
            B_t = tl.load(B_ptr + bc_offs + t, mask=mask_n, other=0.0).to(tl.float32)
            C_t = tl.load(C_ptr + bc_offs + t, mask=mask_n, other=0.0).to(tl.float32)
            a = tl.exp(dt[:, None] * A)
            h = a * h + (dt * u_t)[:, None] * B_t[None, :]
            y = tl.sum(h * C_t[None, :], axis=1)
            if HAS_D:
                y = y + Dv * u_t
            if HAS_Z:
                z_t = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                y = y * (z_t * _sigmoid(z_t))
            tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(last_state_ptr + state_offs, h, mask=mask_dn)


@triton.jit
def _selective_scan_bwd_kernel(
    dout_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_part_ptr, dB_part_ptr, dC_part_ptr, dD_part_ptr, dbias_part_ptr,
    dim, L, ngroups, dim_per_group, n_blocks, n_chunks, chunk_size,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """One program per (batch, group, channel block), as in the forward.

    dout, u, delta, z, du, ddelta, dz: (batch, dim, L) contiguous; ckpt: (batch, dim, n_chunks, N) fp32;
    scratch: fp32, chunk_size * BLOCK_D * NP per program; partials (fp32, all fully written):
    dA_part (batch, dim, N), dB_part / dC_part (batch, ngroups, n_blocks, L, N), dD_part and
    dbias_part (batch, dim).
    """
    pid_b = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_blk = tl.program_id(2)

    offs_j = pid_blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_j < dim_per_group
    offs_d = pid_g * dim_per_group + offs_j
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]

    row = (pid_b * dim + offs_d).to(tl.int64) * L
    bc_base = (pid_b * ngroups + pid_g).to(tl.int64) * N * L
    bc_offs = bc_base + offs_n.to(tl.int64) * L
    state_offs = (pid_b * dim + offs_d).to(tl.int64)[:, None] * N + offs_n[None, :]
    ckpt_offs = (pid_b * dim + offs_d).to(tl.int64)[:, None] * n_chunks * N + offs_n[None, :]
    program = (pid_b * ngroups + pid_g) * n_blocks + pid_blk
    part_bc = program.to(tl.int64) * L * N + offs_n  # (NP,) this program's dB/dC partial rows
    scratch_base = program.to(tl.int64) * chunk_size * (BLOCK_D * NP)
    scratch_offs = tl.arange(0, BLOCK_D)[:, None] * NP + offs_n[None, :]

    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    # g_carry = a_{t+1} * dL/dh_{t+1}: the part of dL/dh_t that flows back from the future.
    g_carry = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c_rev in range(0, n_chunks):
        c = n_chunks - 1 - c_rev
        t_start = c * chunk_size
        t_end = tl.minimum(t_start + chunk_size, L)

        # Recompute the chunk's states; slot t - t_start holds h_{t-1}, the state before step t.
        h = tl.load(ckpt_ptr + ckpt_offs + c * N, mask=mask_dn, other=0.0)
        for t in range(t_start, t_end):
            tl.store(scratch_ptr + scratch_base + (t - t_start) * (BLOCK_D * NP) + scratch_offs, h)
            u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = _softplus(dt)
            B_t = tl.load(B_ptr + bc_offs + t, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u_t)[:, None] * B_t[None, :]
        # The scratch is written and read back in the same register layout, but a barrier makes the
        # global-memory round trip correct whichever thread the compiler assigns to an element.
        tl.debug_barrier()

        # Reverse over the chunk; h_cur = h_t, with h_{t-1} read back from the scratch.
        h_cur = h
        for i in range(0, t_end - t_start):
            t = t_end - 1 - i
            h_prev = tl.load(scratch_ptr + scratch_base + (t - t_start) * (BLOCK_D * NP) + scratch_offs)
            u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            raw = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                raw = raw + bias
            if SOFTPLUS:
                dt = _softplus(raw)
            else:
                dt = raw
            B_t = tl.load(B_ptr + bc_offs + t, mask=mask_n, other=0.0).to(tl.float32)
            C_t = tl.load(C_ptr + bc_offs + t, mask=mask_n, other=0.0).to(tl.float32)
            # Padded channels load dout = 0, so dy, g and every partial they feed are exactly 0.
            dout_t = tl.load(dout_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_Z:
                z_t = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                sig_z = _sigmoid(z_t)
                dy = dout_t * z_t * sig_z
                y_pre = tl.sum(h_cur * C_t[None, :], axis=1)
                if HAS_D:
                    y_pre = y_pre + Dv * u_t
                dz = dout_t * y_pre * sig_z * (1.0 + z_t * (1.0 - sig_z))
                tl.store(dz_ptr + row + t, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
            else:
                dy = dout_t

            g = g_carry + dy[:, None] * C_t[None, :]  # dL/dh_t
            a = tl.exp(dt[:, None] * A)
            g_B = tl.sum(g * B_t[None, :], axis=1)
            du = dt * g_B
            if HAS_D:
                du = du + dy * Dv
                dD_acc += dy * u_t
            tl.store(du_ptr + row + t, du.to(du_ptr.dtype.element_ty), mask=mask_d)

            tl.store(dB_part_ptr + part_bc + t * N, tl.sum(g * (dt * u_t)[:, None], axis=0), mask=mask_n)
            tl.store(dC_part_ptr + part_bc + t * N, tl.sum(h_cur * dy[:, None], axis=0), mask=mask_n)

            g_a_hprev = g * a * h_prev
            ddt = u_t * g_B + tl.sum(g_a_hprev * A, axis=1)
            dA_acc += g_a_hprev * dt[:, None]
            if SOFTPLUS:
                ddt = ddt * _sigmoid(raw)
            dbias_acc += ddt
            tl.store(ddelta_ptr + row + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)

            g_carry = g * a
            h_cur = h_prev
        # The next chunk's recompute overwrites the scratch slots just read.
        tl.debug_barrier()

    tl.store(dA_part_ptr + state_offs, dA_acc, mask=mask_dn)
    bd_offs = (pid_b * dim + offs_d).to(tl.int64)
    if HAS_D:
        tl.store(dD_part_ptr + bd_offs, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + bd_offs, dbias_acc, mask=mask_d)


def _config(N: int, dim_per_group: int, block_d: int | None):
    """(NP, BLOCK_D, num_warps) for a launch.

    The register tile BLOCK_D x NP is kept near 512 fp32 elements, about 4 per thread: with that,
    ptxas -v (sm_90) showed the backward, which keeps several such tiles live, at most ~230 registers
    and no more than a few bytes of spills for N = 1..256, while 2048-element tiles spilled
    kilobytes.  At least 4 channels per program so that each program has some work per time step
    even for N = 256.
    """
    NP = triton.next_power_of_2(max(N, 1))
    if block_d is None:
        block_d = max(4, min(32, 512 // NP))
        block_d = min(block_d, triton.next_power_of_2(dim_per_group))
    assert block_d >= 1 and block_d & (block_d - 1) == 0, f"block_d must be a power of two, got {block_d}"
    num_warps = min(8, max(1, block_d * NP // 128))
    return NP, block_d, num_warps


def _want_poison(poison: bool | None) -> bool:
    if poison is None:
        return os.environ.get(_POISON_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return poison


def _empty(shape, dtype, device, poison: bool):
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def _check_args(u, delta, A, B, C, D, z, delta_bias, chunk_size):
    assert u.dim() == 3, f"u must be (batch, dim, L), got {tuple(u.shape)}"
    batch, dim, L = u.shape
    assert A.dim() == 2 and A.shape[0] == dim, f"A must be (dim={dim}, N), got {tuple(A.shape)}"
    N = A.shape[1]
    assert 1 <= N <= 256, f"N must be in [1, 256], got {N}"
    assert B.dim() == 4 and B.shape[0] == batch and B.shape[2:] == (N, L), f"bad B shape {tuple(B.shape)}"
    assert C.shape == B.shape, f"C shape {tuple(C.shape)} != B shape {tuple(B.shape)}"
    ngroups = B.shape[1]
    assert ngroups >= 1 and dim % ngroups == 0, f"dim={dim} is not a multiple of ngroups={ngroups}"
    assert chunk_size >= 1, f"chunk_size must be positive, got {chunk_size}"
    assert delta.shape == u.shape and delta.dtype == u.dtype, "delta must match u's shape and dtype"
    if z is not None:
        assert z.shape == u.shape and z.dtype == u.dtype, "z must match u's shape and dtype"
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            assert t.shape == (dim,), f"{name} must be (dim={dim},), got {tuple(t.shape)}"
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if t is not None:
            assert t.is_contiguous(), f"{name} must be contiguous"
            assert t.device == u.device, f"{name} is on {t.device}, u on {u.device}"
    return batch, dim, L, N, ngroups


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk_size: int = 64, *,
                       block_d: int | None = None, poison: bool | None = None):
    """Forward selective scan.

    Args:
        u, delta, z: (batch, dim, L) contiguous, one dtype (fp32 / fp16 / bf16); z may be None.
        A: (dim, N) fp32, 1 <= N <= 256.
        B, C: (batch, G, N, L) contiguous, in u's dtype or fp32; channel d uses group d // (dim // G).
        D, delta_bias: (dim,) fp32 or None.
        delta_softplus: apply softplus to delta + delta_bias.
        chunk_size: time steps between two checkpoints.
        block_d: channels per program (power of two); None picks one from N.
        poison: fill the outputs with NaN before launching (debug); None reads COMPRESSM_MAMBA_POISON.

    Returns:
        (out, last_state, checkpoints): out (batch, dim, L) in u.dtype; last_state (batch, dim, N) fp32;
        checkpoints (batch, dim, ceil(L / chunk_size), N) fp32, the state h at the start of each chunk
        (before its first step), from which the backward recomputes states chunk by chunk.
    """
    batch, dim, L, N, ngroups = _check_args(u, delta, A, B, C, D, z, delta_bias, chunk_size)
    poison = _want_poison(poison)
    dim_per_group = dim // ngroups
    n_chunks = math.ceil(L / chunk_size)
    NP, BLOCK_D, num_warps = _config(N, dim_per_group, block_d)
    n_blocks = triton.cdiv(dim_per_group, BLOCK_D)

    out = _empty((batch, dim, L), u.dtype, u.device, poison)
    last_state = _empty((batch, dim, N), torch.float32, u.device, poison)
    checkpoints = _empty((batch, dim, n_chunks, N), torch.float32, u.device, poison)
    if batch == 0 or dim == 0:
        return out, last_state, checkpoints

    grid = (batch, ngroups, n_blocks)
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else A, z if z is not None else u,
        delta_bias if delta_bias is not None else A,
        out, last_state, checkpoints,
        dim, L, ngroups, dim_per_group, n_chunks, chunk_size,
        N=N, NP=NP, BLOCK_D=BLOCK_D,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), num_warps=num_warps,
    )
    return out, last_state, checkpoints


def selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, checkpoints,
                       chunk_size: int = 64, *, block_d: int | None = None, poison: bool | None = None):
    """Gradients of the scalar sum(out * dout) of ``selective_scan_fwd``.

    Args:
        dout: (batch, dim, L) contiguous, u's dtype.
        u, delta, A, B, C, D, z, delta_bias, delta_softplus: as given to ``selective_scan_fwd``.
        checkpoints: (batch, dim, ceil(L / chunk_size), N) fp32 from ``selective_scan_fwd`` with the
            same chunk_size.
        block_d, poison: as in ``selective_scan_fwd`` (block_d need not match the forward's).

    Returns:
        (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias): du, ddelta, dz (batch, dim, L) in the dtype of
        u / delta / z, dz None when z is None; dA (dim, N) fp32; dB, dC with B's / C's shape and dtype;
        dD, ddelta_bias (dim,) fp32, None when D / delta_bias are None.  ddelta is with respect to
        the raw delta (before bias and softplus).
    """
    batch, dim, L, N, ngroups = _check_args(u, delta, A, B, C, D, z, delta_bias, chunk_size)
    assert dout.shape == u.shape and dout.is_contiguous(), "dout must be contiguous with u's shape"
    poison = _want_poison(poison)
    dim_per_group = dim // ngroups
    n_chunks = math.ceil(L / chunk_size)
    assert checkpoints.shape == (batch, dim, n_chunks, N) and checkpoints.dtype == torch.float32, (
        f"checkpoints must be (batch, dim, {n_chunks}, N) fp32, got {tuple(checkpoints.shape)} {checkpoints.dtype}"
    )
    assert checkpoints.is_contiguous(), "checkpoints must be contiguous"
    NP, BLOCK_D, num_warps = _config(N, dim_per_group, block_d)
    n_blocks = triton.cdiv(dim_per_group, BLOCK_D)
    dev = u.device
    f32 = torch.float32

    du = _empty(u.shape, u.dtype, dev, poison)
    ddelta = _empty(delta.shape, delta.dtype, dev, poison)
    dz = _empty(z.shape, z.dtype, dev, poison) if z is not None else None
    dA_part = _empty((batch, dim, N), f32, dev, poison)
    dB_part = _empty((batch, ngroups, n_blocks, L, N), f32, dev, poison)
    dC_part = _empty((batch, ngroups, n_blocks, L, N), f32, dev, poison)
    dD_part = _empty((batch, dim), f32, dev, poison) if D is not None else None
    dbias_part = _empty((batch, dim), f32, dev, poison) if delta_bias is not None else None
    # A chunk never holds more than min(chunk_size, L) steps, so the scratch needs only that many
    # slots per program.  Passing this clamped value as the kernel's chunk_size changes no chunk
    # boundary (when L < chunk_size there is a single chunk either way); max(1, .) keeps the buffer
    # non-empty so its pointer is valid when L == 0.
    scratch_chunk = max(1, min(chunk_size, L))
    scratch = _empty((max(1, batch * ngroups * n_blocks * scratch_chunk * BLOCK_D * NP),), f32, dev, poison)

    if batch > 0 and dim > 0:
        grid = (batch, ngroups, n_blocks)
        _selective_scan_bwd_kernel[grid](
            dout, u, delta, A, B, C, D if D is not None else A, z if z is not None else u,
            delta_bias if delta_bias is not None else A, checkpoints, scratch,
            du, ddelta, dz if dz is not None else du, dA_part, dB_part, dC_part,
            dD_part if dD_part is not None else dA_part, dbias_part if dbias_part is not None else dA_part,
            dim, L, ngroups, dim_per_group, n_blocks, n_chunks, scratch_chunk,
            N=N, NP=NP, BLOCK_D=BLOCK_D,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), num_warps=num_warps,
        )
    else:
        # No program runs: every sum is empty.
        for t in (du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part):
            if t is not None:
                t.zero_()

    dA = dA_part.sum(0)
    dB = dB_part.sum(2).transpose(-1, -2).to(B.dtype).contiguous()
    dC = dC_part.sum(2).transpose(-1, -2).to(C.dtype).contiguous()
    dD = dD_part.sum(0) if dD_part is not None else None
    ddelta_bias = dbias_part.sum(0) if dbias_part is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias
