r"""Triton kernel for the token sums of the ``mean_lti`` Gramian estimator, in one pass over the inputs.

The specification is ``compressm_mamba.reference.gramians.gramian_statistics(..., estimator="mean_lti")``
(float64).  Per channel d, state n and real token (batch b, time t):

    dt = softplus?(delta[b, d, t] + bias_d)       (0 for a padding token: mask False)
    e_sum[d, n] = sum_{b,t} -expm1(dt A[d, n])    b_sum[d, n] = sum_{b,t} dt B[b, g, n, t]
    c_sum[d, n] = sum_{b,t} real[b, t] C[b, g, n, t],     g = d // (dim // ngroups).

The torch backend (``torch_backend.gramians.mean_lti_sums``) makes the (batch, dim, N, T) block of
dt A one time chunk at a time in memory and runs several launches over it; here each program keeps
a (BLOCK_D, BLOCK_N) tile of the three sums in registers and walks the tokens of its share of the
batch in (BLOCK_D, BLOCK_T) tiles of delta and (BLOCK_N, BLOCK_T) tiles of B and C, loaded along
L (contiguous), so every input is read from memory once.  The e term is the cost: one expm1 per
(b, d, n, t).  It is evaluated in base 2 (log2(e) folded into A once per program):
x = dt A log2(e), expm1 = exp2(x) - 1 for |x| >= 0.72 (|dt A| >= 1/2) and a degree-7 polynomial
in x below, where exp2(x) - 1 would lose its relative accuracy (e_t of a slow mode is tiny, and
the Gramian's denominator 1 - a_i a_j is built from it).  The (D, N, T) terms are accumulated
elementwise in registers and reduced over T once, at the end.

With ``CONSTANT_ROWS`` (Mamba2 heads: A[d, n] = A[d, 0]) the e term does not depend on n and is
evaluated once per (b, d, t).

Grid (ngroups * d_blocks, n_blocks, splits): channel blocks never straddle a B/C group; a split
takes a contiguous range of the (batch, time tile) items and writes its own partial sums, which
the launcher adds in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gramians import _softplus, check_gramian_inputs

__all__ = ["mean_lti_sums", "DEBUG_FILL_NAN"]

# When set, partial outputs start as NaN instead of uninitialised memory, so an entry that no
# program wrote shows up in a test instead of passing by luck.
DEBUG_FILL_NAN = os.environ.get("COMPRESSM_MAMBA_KERNEL_DEBUG", "") == "1"

# Programs to aim for when splitting the tokens: ~8 per SM of a 132-SM GPU, device-independent so
# that the result does not depend on the GPU it ran on.
_TARGET_PROGRAMS = 1024


@triton.jit
def _expm1_base2(x):
    """expm1(x ln 2) for fp32 x, full relative accuracy everywhere.

    |x| < 0.72 (|x ln 2| < 1/2): x p(x), p the degree-6 Chebyshev interpolant of expm1(x ln 2) / x
    on [-0.72, 0.72] (3.6e-9 relative in exact arithmetic; 1.2e-7, two fp32 ulp, evaluated in fp32
    by Horner's rule).  Beyond: exp2(x) - 1, which loses at most ~2 ulp there.
    """
    p = 1.5345331233690297e-05
    p = p * x + 0.00015523836886047058
    p = p * x + 0.0013333317929998703
    p = p * x + 0.009617816949735528
    p = p * x + 0.05550411022186669
    p = p * x + 0.24022652719392137
    p = p * x + 0.6931471805599453
    return tl.where(tl.abs(x) < 0.72, p * x, tl.exp2(x) - 1.0)


@triton.jit
def _mean_lti_sums_kernel(
    delta_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, mask_ptr, e_ptr, b_ptr, c_ptr,
    N, L, chans_per_group, d_blocks, t_tiles, n_items, items_per_split,
    s_db, s_dd, s_dl, s_ad, s_an, s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl, s_mb, s_ml,
    s_os, s_od,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_MASK: tl.constexpr, CONSTANT_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_gd = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    grp = pid_gd // d_blocks
    d_local = (pid_gd % d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d_local < chans_per_group
    d = (grp * chans_per_group + d_local).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < N
    k = tl.arange(0, BLOCK_T)

    # A in base-2 units: exp(dt A) = exp2(dt A2).
    if CONSTANT_ROWS:
        A2 = tl.load(A_ptr + d * s_ad, mask=d_in, other=0.0).to(tl.float32) * 1.4426950408889634
    else:
        A2 = tl.load(A_ptr + d[:, None] * s_ad + n[None, :] * s_an, mask=d_in[:, None] & n_in[None, :],
                     other=0.0).to(tl.float32) * 1.4426950408889634
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d_in, other=0.0).to(tl.float32)

    if CONSTANT_ROWS:
        acc_e = tl.zeros((BLOCK_D, BLOCK_T), dtype=tl.float32)
    else:
        acc_e = tl.zeros((BLOCK_D, BLOCK_N, BLOCK_T), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D, BLOCK_N, BLOCK_T), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)

    delta_rows = delta_ptr + d[:, None] * s_dd
    B_rows = B_ptr + grp.to(tl.int64) * s_bg + n[:, None] * s_bn
    C_rows = C_ptr + grp.to(tl.int64) * s_cg + n[:, None] * s_cn
    item0 = split * items_per_split
    item1 = tl.minimum(item0 + items_per_split, n_items)
    # The (sequence, tile start) of the current item, advanced by a carry instead of a division per
    # item (a 32-bit integer division is ~20 instructions, as much as one element's expm1).
    bi = (item0 // t_tiles).to(tl.int64)
    t0 = (item0 % t_tiles) * BLOCK_T
    for item in range(item0, item1):
        t = t0 + k
        keep = t < L
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + bi * s_mb + t * s_ml, mask=keep, other=0) != 0)
        x = tl.load(delta_rows + bi * s_db + t[None, :] * s_dl, mask=d_in[:, None] & keep[None, :],
                    other=0.0).to(tl.float32)
        if HAS_BIAS:
            x = x + bias[:, None]
        if SOFTPLUS:
            x = _softplus(x)
        # A padding token or a position past L: dt = 0, so its e and b terms are exactly 0.
        dt = tl.where(d_in[:, None] & keep[None, :], x, 0.0)
        Bt = tl.load(B_rows + bi * s_bb + t[None, :] * s_bl, mask=n_in[:, None] & keep[None, :],
                     other=0.0).to(tl.float32)
        Ct = tl.load(C_rows + bi * s_cb + t[None, :] * s_cl, mask=n_in[:, None] & keep[None, :],
                     other=0.0).to(tl.float32)
        acc_c += Ct
        acc_b += dt[:, None, :] * Bt[None, :, :]
        if CONSTANT_ROWS:
            acc_e += _expm1_base2(dt * A2[:, None])
        else:
            acc_e += _expm1_base2(dt[:, None, :] * A2[:, :, None])
        t0 += BLOCK_T
        wrap = t0 >= t_tiles * BLOCK_T
        bi += wrap.to(tl.int64)
        t0 = tl.where(wrap, 0, t0)

    if CONSTANT_ROWS:
        e = -tl.broadcast_to(tl.sum(acc_e, axis=1)[:, None], (BLOCK_D, BLOCK_N))
    else:
        e = -tl.sum(acc_e, axis=2)
    b = tl.sum(acc_b, axis=2)
    c = tl.broadcast_to(tl.sum(acc_c, axis=1)[None, :], (BLOCK_D, BLOCK_N))
    out = split.to(tl.int64) * s_os + d[:, None] * s_od + n[None, :]
    in_range = d_in[:, None] & n_in[None, :]
    tl.store(e_ptr + out, e, mask=in_range)
    tl.store(b_ptr + out, b, mask=in_range)
    tl.store(c_ptr + out, c, mask=in_range)


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def mean_lti_sums(
    delta,
    A,
    B,
    C,
    *,
    delta_bias=None,
    delta_softplus: bool = False,
    mask=None,
    constant_rows: bool = False,
    block_d: int | None = None,
    block_n: int | None = None,
    block_t: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
    maxnreg: int | None = None,
):
    """Token sums of the ``mean_lti`` estimator: (e_sum, b_sum, c_sum), each (dim, N) fp32.

    Args:
        delta: (batch, dim, L) fp32/fp16/bf16 step sizes before bias / softplus.
        A: (dim, N) fp32.
        B, C: (batch, G, N, L) (or (batch, N, L), one group) fp32/fp16/bf16; channel d uses
            group d // (dim // G).  Any strides.
        delta_bias: (dim,) fp32 or None; delta_softplus: softplus after the bias.
        mask: (batch, L) bool or None; False tokens are left out of every sum.
        constant_rows: promises that every row of A is constant (Mamba2 heads): the expm1 term is
            then evaluated once per token and channel (only A[:, 0] is read).
        block_d / block_n / block_t: tile of channels, states and tokens (powers of two).
        splits: programs sharing the (batch, time) tokens of one tile (default: enough for about
            1024 programs); their partial sums are added in a fixed order.
        num_warps, maxnreg: launch settings (ignored by the interpreter); maxnreg caps the registers
            per thread (ptxas spills beyond it).

    Returns:
        (e_sum, b_sum, c_sum): the ``sums`` of ``gramian_statistics(..., estimator="mean_lti")``.
    """
    B, C, batch, dim, L, N, ngroups = check_gramian_inputs(delta, A, B, C, delta_bias, mask)
    device = delta.device

    if dim == 0 or N == 0:
        empty = torch.zeros(dim, N, dtype=torch.float32, device=device)
        return empty, empty.clone(), empty.clone()

    chans = dim // ngroups
    # (16, 16, 8) register tiles at four warps: 80 registers on sm_90 (six programs per SM), no
    # spills; larger tiles cut the per-element overhead a little but cost occupancy or spill
    # (ptxas for sm_90, Triton 3.7.1, bench/static_report.py's model; not tuned on hardware).
    # With constant rows the expm1 runs once per (d, t): the (D, N, T) b term is all that is left,
    # and (16, 32, 16) tiles (117 registers, four programs per SM) halve its overhead per element.
    block_d = block_d or _pow2_clamp(chans, 1, 16)
    block_n = block_n or _pow2_clamp(N, 1, 32 if constant_rows else 16)
    block_t = block_t or _pow2_clamp(L, 1, 16 if constant_rows else 8)
    for name, v in (("block_d", block_d), ("block_n", block_n), ("block_t", block_t)):
        assert v >= 1 and v & (v - 1) == 0, (name, v)
    num_warps = num_warps or 4

    d_blocks = triton.cdiv(chans, block_d)
    n_blocks = triton.cdiv(N, block_n)
    t_tiles = triton.cdiv(L, block_t) if L > 0 else 0
    n_items = batch * t_tiles
    tiles = ngroups * d_blocks * n_blocks
    if splits is None:
        splits = triton.cdiv(_TARGET_PROGRAMS, tiles)
    splits = max(1, min(splits, n_items))
    items_per_split = triton.cdiv(n_items, splits) if n_items > 0 else 0
    splits = triton.cdiv(n_items, items_per_split) if n_items > 0 else 1  # no split left empty

    alloc = torch.full if DEBUG_FILL_NAN else (lambda shape, _v, **kw: torch.empty(shape, **kw))
    parts = [alloc((splits, dim, N), float("nan"), dtype=torch.float32, device=device) for _ in range(3)]
    # Unused pointers still need a tensor argument; they are never dereferenced.
    bias_arg = delta_bias if delta_bias is not None else A
    # Zero-copy reinterpretation: Triton loads bytes more portably than i1 pointers.
    mask_arg = mask.view(torch.uint8) if mask is not None else delta
    s_mb, s_ml = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)

    grid = (ngroups * d_blocks, n_blocks, splits)
    _mean_lti_sums_kernel[grid](
        delta, A, B, C, bias_arg, mask_arg, *parts,
        N, L, chans, d_blocks, t_tiles, n_items, items_per_split,
        delta.stride(0), delta.stride(1), delta.stride(2), A.stride(0), A.stride(1),
        B.stride(0), B.stride(1), B.stride(2), B.stride(3), C.stride(0), C.stride(1), C.stride(2), C.stride(3),
        s_mb, s_ml, dim * N, N,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), HAS_MASK=mask is not None,
        CONSTANT_ROWS=bool(constant_rows), BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=block_t,
        num_warps=num_warps, **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
    if splits == 1:
        return tuple(p[0] for p in parts)
    return tuple(p.sum(0) for p in parts)
