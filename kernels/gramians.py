r"""Triton kernels for the token sums of the ``frozen`` and ``ltv`` Gramian estimators.

The specification is ``compressm_mamba.reference.gramians.gramian_statistics(...).sums["P"/"Q"]``
(float64, see that module and docs/ltv_closed_form.md).  Per channel d and token t:

    dt_t = softplus?(delta_t + bias_d),   a_t = exp(dt_t A_d),   e_t = -expm1(dt_t A_d) = 1 - a_t,
    b_t = dt_t B_t[g],   c_t = C_t[g],   g = d // (dim // ngroups);
    a padding token (mask False) is removed: a_t = 1, e_t = b_t = c_t = 0, and it is not summed.

    frozen: P_sum = sum_t (b_t b_t^T) / (e_i + e_j - e_i e_j)   (0 where the denominator is 0)
    ltv:    P_t = (a_t a_t^T) * P_{t-1} + b_t b_t^T,  Q_t = (a_{t+1} a_{t+1}^T) * Q_{t+1} + c_t c_t^T,
            P_sum = sum_t P_t,  Q_sum = sum_t Q_t   (sums over batch and real tokens).

A masked or out-of-range token is given dt = 0 here: that alone makes a = 1, e = 0 and b = 0
exactly, so only c (and the sums) need the mask explicitly.

Three kernels, all with grid (dim, n_tiles**2, batch_splits), one program per channel, output tile
and slice of the batch; the batch and the tokens are looped over inside, so memory is O(dim N^2):

- ``_frozen_kernel``: per token the N x N term is elementwise; a block of BLOCK_T tokens is a
  (BLOCK_N, BLOCK_N, BLOCK_T) tensor reduced over its last axis.
- ``_ltv_kernel``: entry (i, j) of P_t only depends on entry (i, j) of P_{t-1}, so each program runs
  the recurrence of its own tile token by token, summing as it goes (Q runs backwards in time).
- ``_gram_kernel`` (``constant_rows=True``, Mamba2 heads: A_i = A for all i): every per-token factor
  is one scalar, so both sums are weighted Gram matrices, P_sum = sum_s p_s B_s B_s^T and
  Q_sum = sum_s q_s C_s C_s^T, computed with ``tl.dot`` over blocks of tokens.  ltv: p_s = dt_s^2 w_s
  with w_s = keep_s + exp(2 A dt_{s+1}) w_{s+1} (suffix), q_s = keep_s v_s with
  v_s = keep_s + exp(2 A dt_s) v_{s-1} (prefix); these scalar recurrences are scans over each block,
  continued across blocks, so no weight tensor is materialised.  frozen: p_s = dt_s^2 / den_s,
  q_s = keep_s / den_s, den_s = 2 e_s - e_s^2.

P and Q are symmetric, so only tiles with ti <= tj are computed and each off-diagonal tile is also
stored transposed; every output entry is written by exactly one program (or, with batch_splits > 1,
atomically added by one program per split).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["gramian_sums", "DEBUG_FILL_NAN"]

# When set, outputs start as NaN instead of uninitialised memory, so an entry that no program
# wrote shows up in a test instead of passing by luck.
DEBUG_FILL_NAN = os.environ.get("COMPRESSM_MAMBA_KERNEL_DEBUG", "") == "1"

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Elementwise helpers.  libdevice's expm1 / log1p do not run in Triton's interpreter, and
# exp(x) - 1 or log(1 + z) lose all relative accuracy for small arguments, which the frozen
# denominators and small-dt tokens need; short polynomials give full fp32 accuracy everywhere.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _expm1(x):
    # Taylor series in Horner form up to x^9 / 9!: truncation < 1e-9 relative for |x| < 1/2;
    # beyond that exp(x) - 1 loses at most ~2 ulp.
    p = 1.0 + x * (1.0 / 9.0)
    p = 1.0 + x * (1.0 / 8.0) * p
    p = 1.0 + x * (1.0 / 7.0) * p
    p = 1.0 + x * (1.0 / 6.0) * p
    p = 1.0 + x * (1.0 / 5.0) * p
    p = 1.0 + x * (1.0 / 4.0) * p
    p = 1.0 + x * (1.0 / 3.0) * p
    p = 1.0 + x * 0.5 * p
    return tl.where(tl.abs(x) < 0.5, x * p, tl.exp(x) - 1.0)


@triton.jit
def _log1p_unit(z):
    # log1p(z) = 2 atanh(u), u = z / (2 + z) <= 1/3 for z in [0, 1]: the odd series in u keeps
    # full relative accuracy for tiny z (log(1 + z) would round 1 + z to 1); terms up to u^15.
    u = z / (2.0 + z)
    u2 = u * u
    s = 1.0 / 15.0
    s = 1.0 / 13.0 + u2 * s
    s = 1.0 / 11.0 + u2 * s
    s = 1.0 / 9.0 + u2 * s
    s = 1.0 / 7.0 + u2 * s
    s = 1.0 / 5.0 + u2 * s
    s = 1.0 / 3.0 + u2 * s
    s = 1.0 + u2 * s
    return 2.0 * u * s


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus (threshold 20), written as max(x, 0) + log1p(exp(-|x|)) so
    # that exp never overflows and very negative x keep their relative accuracy.
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + _log1p_unit(tl.exp(-tl.abs(x))))


@triton.jit
def _affine_combine(g1, x1, g2, x2):
    # Composition of y -> g1 y + x1 followed by y -> g2 y + x2: the scan of a linear recurrence.
    return g1 * g2, g2 * x1 + x2


@triton.jit
def _token_dt(delta_row, mask_row, t, L, stride_dl, stride_ml, bias,
              HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_MASK: tl.constexpr):
    """(dt, keep) of the tokens at positions t (int64 vector) of one sequence of one channel.

    dt is 0 for tokens outside [0, L) or masked out (then a = 1, e = 0, b = 0 exactly); keep is
    1.0 for real tokens, 0.0 otherwise.
    """
    inside = (t >= 0) & (t < L)
    x = tl.load(delta_row + t * stride_dl, mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + bias
    if SOFTPLUS:
        x = _softplus(x)
    keep = inside
    if HAS_MASK:
        keep = keep & (tl.load(mask_row + t * stride_ml, mask=inside, other=0) != 0)
    return tl.where(keep, x, 0.0), keep.to(tl.float32)


@triton.jit
def _step_dt(d_ptr, m_ptr, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_MASK: tl.constexpr):
    """(dt, keep) of the one token at d_ptr / m_ptr (a real position inside the sequence)."""
    x = tl.load(d_ptr).to(tl.float32)
    if HAS_BIAS:
        x = x + bias
    if SOFTPLUS:
        x = _softplus(x)
    keep = 1.0
    if HAS_MASK:
        real = tl.load(m_ptr) != 0
        x = tl.where(real, x, 0.0)
        keep = real.to(tl.float32)
    return x, keep


@triton.jit
def _store_symmetric(out_ptr, i, j, tile, in_range, mirror, stride_n1, stride_n2, ATOMIC: tl.constexpr):
    """Store tile (rows i, columns j) and, for an off-diagonal tile, its transpose at (j, i)."""
    ptrs = out_ptr + i[:, None] * stride_n1 + j[None, :] * stride_n2
    ptrs_t = out_ptr + j[None, :] * stride_n1 + i[:, None] * stride_n2
    if ATOMIC:
        tl.atomic_add(ptrs, tile, mask=in_range)
        tl.atomic_add(ptrs_t, tile, mask=in_range & mirror)
    else:
        tl.store(ptrs, tile, mask=in_range)
        tl.store(ptrs_t, tile, mask=in_range & mirror)


# ---------------------------------------------------------------------------------------------
# Kernels.  Common layout: delta (batch, dim, L), A (dim, N), B / C (batch, G, N, L), mask
# (batch, L) as uint8, outputs (dim, N, N).  Program (d, ti * n_tiles + tj, split).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _frozen_kernel(
    delta_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, mask_ptr, P_ptr, Q_ptr,
    L, N, n_tiles, chans_per_group, batch, batch_per_split,
    s_db, s_dd, s_dl, s_ad, s_an, s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
    s_mb, s_ml, s_pd, s_pn1, s_pn2,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_MASK: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    d = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    ti = tile // n_tiles
    tj = tile % n_tiles
    if ti > tj:
        return  # the lower triangle is written by the transposed tile's program
    split = tl.program_id(2)
    grp = d // chans_per_group
    i = (ti * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    j = (tj * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mi = i < N
    mj = j < N
    k = tl.arange(0, BLOCK_T)

    A_i = tl.load(A_ptr + d * s_ad + i * s_an, mask=mi, other=0.0).to(tl.float32)
    A_j = tl.load(A_ptr + d * s_ad + j * s_an, mask=mj, other=0.0).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d).to(tl.float32)

    b_lo = split * batch_per_split
    n_b = tl.minimum(batch_per_split, batch - b_lo)
    delta_row = delta_ptr + b_lo.to(tl.int64) * s_db + d * s_dd
    mask_row = mask_ptr + b_lo.to(tl.int64) * s_mb
    B_i_row = B_ptr + b_lo.to(tl.int64) * s_bb + grp * s_bg + i[:, None] * s_bn
    B_j_row = B_ptr + b_lo.to(tl.int64) * s_bb + grp * s_bg + j[:, None] * s_bn
    C_i_row = C_ptr + b_lo.to(tl.int64) * s_cb + grp * s_cg + i[:, None] * s_cn
    C_j_row = C_ptr + b_lo.to(tl.int64) * s_cb + grp * s_cg + j[:, None] * s_cn

    acc_P = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    acc_Q = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for _ in range(0, n_b):
        for t0 in range(0, L, BLOCK_T):
            t = (t0 + k).to(tl.int64)
            dt, keep = _token_dt(delta_row, mask_row, t, L, s_dl, s_ml, bias, HAS_BIAS, SOFTPLUS, HAS_MASK)
            ld_i = mi[:, None] & (t[None, :] < L)
            ld_j = mj[:, None] & (t[None, :] < L)
            e_i = -_expm1(dt[None, :] * A_i[:, None])  # (BLOCK_N, BLOCK_T)
            e_j = -_expm1(dt[None, :] * A_j[:, None])
            b_i = dt[None, :] * tl.load(B_i_row + t[None, :] * s_bl, mask=ld_i, other=0.0).to(tl.float32)
            b_j = dt[None, :] * tl.load(B_j_row + t[None, :] * s_bl, mask=ld_j, other=0.0).to(tl.float32)
            c_i = keep[None, :] * tl.load(C_i_row + t[None, :] * s_cl, mask=ld_i, other=0.0).to(tl.float32)
            c_j = keep[None, :] * tl.load(C_j_row + t[None, :] * s_cl, mask=ld_j, other=0.0).to(tl.float32)
            # 1 - a_i a_j without cancellation, exactly symmetric in (i, j).
            den = e_i[:, None, :] + e_j[None, :, :] - e_i[:, None, :] * e_j[None, :, :]
            pos = den > 0.0
            inv = tl.where(pos, 1.0 / tl.where(pos, den, 1.0), 0.0)  # dt -> 0 limit: the term is 0
            acc_P += tl.sum(b_i[:, None, :] * b_j[None, :, :] * inv, axis=2)
            acc_Q += tl.sum(c_i[:, None, :] * c_j[None, :, :] * inv, axis=2)
        delta_row += s_db
        mask_row += s_mb
        B_i_row += s_bb
        B_j_row += s_bb
        C_i_row += s_cb
        C_j_row += s_cb

    in_range = mi[:, None] & mj[None, :]
    mirror = ti < tj
    _store_symmetric(P_ptr + d * s_pd, i, j, acc_P, in_range, mirror, s_pn1, s_pn2, ATOMIC)
    _store_symmetric(Q_ptr + d * s_pd, i, j, acc_Q, in_range, mirror, s_pn1, s_pn2, ATOMIC)


@triton.jit
def _ltv_kernel(
    delta_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, mask_ptr, P_ptr, Q_ptr,
    L, N, n_tiles, chans_per_group, batch, batch_per_split,
    s_db, s_dd, s_dl, s_ad, s_an, s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
    s_mb, s_ml, s_pd, s_pn1, s_pn2,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_MASK: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    d = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    ti = tile // n_tiles
    tj = tile % n_tiles
    if ti > tj:
        return  # the lower triangle is written by the transposed tile's program
    split = tl.program_id(2)
    grp = d // chans_per_group
    i = (ti * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    j = (tj * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mi = i < N
    mj = j < N
    last = tl.cast(L, tl.int64) - 1

    A_i = tl.load(A_ptr + d * s_ad + i * s_an, mask=mi, other=0.0).to(tl.float32)
    A_j = tl.load(A_ptr + d * s_ad + j * s_an, mask=mj, other=0.0).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d).to(tl.float32)

    b_lo = split * batch_per_split
    n_b = tl.minimum(batch - b_lo, batch_per_split)
    delta_row = delta_ptr + b_lo.to(tl.int64) * s_db + d * s_dd
    mask_row = mask_ptr + b_lo.to(tl.int64) * s_mb
    B_i_row = B_ptr + b_lo.to(tl.int64) * s_bb + grp * s_bg + i * s_bn
    B_j_row = B_ptr + b_lo.to(tl.int64) * s_bb + grp * s_bg + j * s_bn
    C_i_row = C_ptr + b_lo.to(tl.int64) * s_cb + grp * s_cg + i * s_cn
    C_j_row = C_ptr + b_lo.to(tl.int64) * s_cb + grp * s_cg + j * s_cn

    # Entry (i, j) of P_t only depends on entry (i, j) of P_{t-1}: the program carries its own
    # tile through time, one token per step, with no (N, N, tokens) temporary.  A token's B / C
    # values sit L apart, but the next steps read the rest of those cache lines.  The pointers
    # walk along the sequence, so all address arithmetic stays 64-bit.
    acc_P = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    acc_Q = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for _ in range(0, n_b):
        # Controllability, forward in time: P_t = (a_t a_t^T) * P_{t-1} + b_t b_t^T, P_0 = 0.
        P_t = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
        d_ptr = delta_row
        m_ptr = mask_row
        bi_ptr = B_i_row
        bj_ptr = B_j_row
        for _t in range(0, L):
            dt, keep = _step_dt(d_ptr, m_ptr, bias, HAS_BIAS, SOFTPLUS, HAS_MASK)
            a_i = tl.exp(dt * A_i)
            a_j = tl.exp(dt * A_j)
            b_i = dt * tl.load(bi_ptr, mask=mi, other=0.0).to(tl.float32)
            b_j = dt * tl.load(bj_ptr, mask=mj, other=0.0).to(tl.float32)
            P_t = (a_i[:, None] * a_j[None, :]) * P_t + b_i[:, None] * b_j[None, :]
            acc_P += keep * P_t
            d_ptr += s_dl
            m_ptr += s_ml
            bi_ptr += s_bl
            bj_ptr += s_bl

        # Observability, backward in time: Q_t = (a_{t+1} a_{t+1}^T) * Q_{t+1} + c_t c_t^T,
        # Q_{L+1} = 0; the decay of token t is applied one step later, to Q_{t-1}.
        Q_t = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
        a_next_i = tl.full((BLOCK_N,), 1.0, tl.float32)
        a_next_j = tl.full((BLOCK_N,), 1.0, tl.float32)
        d_ptr = delta_row + last * s_dl
        m_ptr = mask_row + last * s_ml
        ci_ptr = C_i_row + last * s_cl
        cj_ptr = C_j_row + last * s_cl
        for _t in range(0, L):
            dt, keep = _step_dt(d_ptr, m_ptr, bias, HAS_BIAS, SOFTPLUS, HAS_MASK)
            c_i = keep * tl.load(ci_ptr, mask=mi, other=0.0).to(tl.float32)
            c_j = keep * tl.load(cj_ptr, mask=mj, other=0.0).to(tl.float32)
            Q_t = (a_next_i[:, None] * a_next_j[None, :]) * Q_t + c_i[:, None] * c_j[None, :]
            acc_Q += keep * Q_t
            a_next_i = tl.exp(dt * A_i)
            a_next_j = tl.exp(dt * A_j)
            d_ptr -= s_dl
            m_ptr -= s_ml
            ci_ptr -= s_cl
            cj_ptr -= s_cl

        delta_row += s_db
        mask_row += s_mb
        B_i_row += s_bb
        B_j_row += s_bb
        C_i_row += s_cb
        C_j_row += s_cb

    in_range = mi[:, None] & mj[None, :]
    mirror = ti < tj
    _store_symmetric(P_ptr + d * s_pd, i, j, acc_P, in_range, mirror, s_pn1, s_pn2, ATOMIC)
    _store_symmetric(Q_ptr + d * s_pd, i, j, acc_Q, in_range, mirror, s_pn1, s_pn2, ATOMIC)


@triton.jit
def _gram_kernel(
    delta_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, mask_ptr, P_ptr, Q_ptr,
    L, N, n_tiles, chans_per_group, batch, batch_per_split,
    s_db, s_dd, s_dl, s_ad, s_an, s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
    s_mb, s_ml, s_pd, s_pn1, s_pn2,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_MASK: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    LTV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    d = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    ti = tile // n_tiles
    tj = tile % n_tiles
    if ti > tj:
        return  # the lower triangle is written by the transposed tile's program
    split = tl.program_id(2)
    grp = d // chans_per_group
    i = (ti * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    j = (tj * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mi = i < N
    mj = j < N
    k = tl.arange(0, BLOCK_T)
    is_last = k == BLOCK_T - 1

    A_d = tl.load(A_ptr + d * s_ad).to(tl.float32)  # the row is constant: one scalar per head
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d).to(tl.float32)

    b_lo = split * batch_per_split
    n_b = tl.minimum(batch_per_split, batch - b_lo)
    delta_row = delta_ptr + b_lo.to(tl.int64) * s_db + d * s_dd
    mask_row = mask_ptr + b_lo.to(tl.int64) * s_mb
    B_i_row = B_ptr + b_lo.to(tl.int64) * s_bb + grp * s_bg + i[:, None] * s_bn
    B_j_row = B_ptr + b_lo.to(tl.int64) * s_bb + grp * s_bg + j[:, None] * s_bn
    C_i_row = C_ptr + b_lo.to(tl.int64) * s_cb + grp * s_cg + i[:, None] * s_cn
    C_j_row = C_ptr + b_lo.to(tl.int64) * s_cb + grp * s_cg + j[:, None] * s_cn

    acc_P = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    acc_Q = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for _b in range(0, n_b):
        # P_sum = sum_s p_s B_s B_s^T.  Both operands are scaled by sqrt(p_s) (p_s >= 0), which
        # keeps the diagonal tiles exactly symmetric.  ltv needs the suffix weights w_s, so its
        # blocks hold the tokens in reverse order.
        carry = 0.0
        for t0 in range(0, L, BLOCK_T):
            if LTV:
                t = (L - 1 - t0 - k).to(tl.int64)
            else:
                t = (t0 + k).to(tl.int64)
            dt, keep = _token_dt(delta_row, mask_row, t, L, s_dl, s_ml, bias, HAS_BIAS, SOFTPLUS, HAS_MASK)
            if LTV:
                # w_s = keep_s + exp(2 A dt_{s+1}) w_{s+1}: sum over real t >= s of the decay s -> t.
                dt_next, keep_next = _token_dt(delta_row, mask_row, t + 1, L, s_dl, s_ml, bias,
                                       HAS_BIAS, SOFTPLUS, HAS_MASK)
                a_next = tl.exp(dt_next * A_d)
                decay, local = tl.associative_scan((a_next * a_next, keep), 0, _affine_combine)
                w = local + decay * carry
                carry = tl.sum(tl.where(is_last, w, 0.0), axis=0)
                scale = tl.abs(dt) * tl.sqrt(w)
            else:
                e = -_expm1(dt * A_d)
                den = e + e - e * e
                pos = den > 0.0
                scale = tl.where(pos, tl.abs(dt) / tl.sqrt(tl.where(pos, den, 1.0)), 0.0)
            ld = (t[None, :] >= 0) & (t[None, :] < L)
            B_i = tl.load(B_i_row + t[None, :] * s_bl, mask=mi[:, None] & ld, other=0.0).to(tl.float32)
            B_j = tl.load(B_j_row + t[None, :] * s_bl, mask=mj[:, None] & ld, other=0.0).to(tl.float32)
            x_i = scale[None, :] * B_i
            x_j = scale[None, :] * B_j
            acc_P += tl.dot(x_i, tl.trans(x_j), input_precision=INPUT_PRECISION)

        # Q_sum = sum_s q_s C_s C_s^T, forward in time (ltv: prefix weights v_s).
        carry = 0.0
        for t0 in range(0, L, BLOCK_T):
            t = (t0 + k).to(tl.int64)
            dt, keep = _token_dt(delta_row, mask_row, t, L, s_dl, s_ml, bias, HAS_BIAS, SOFTPLUS, HAS_MASK)
            if LTV:
                # v_s = keep_s + exp(2 A dt_s) v_{s-1}: sum over real t <= s of the decay t -> s.
                a = tl.exp(dt * A_d)
                decay, local = tl.associative_scan((a * a, keep), 0, _affine_combine)
                v = local + decay * carry
                carry = tl.sum(tl.where(is_last, v, 0.0), axis=0)
                scale = tl.sqrt(keep * v)
            else:
                e = -_expm1(dt * A_d)
                den = e + e - e * e
                pos = (den > 0.0) & (keep > 0.0)
                scale = tl.where(pos, 1.0 / tl.sqrt(tl.where(pos, den, 1.0)), 0.0)
            ld = t[None, :] < L
            C_i = tl.load(C_i_row + t[None, :] * s_cl, mask=mi[:, None] & ld, other=0.0).to(tl.float32)
            C_j = tl.load(C_j_row + t[None, :] * s_cl, mask=mj[:, None] & ld, other=0.0).to(tl.float32)
            y_i = scale[None, :] * C_i
            y_j = scale[None, :] * C_j
            acc_Q += tl.dot(y_i, tl.trans(y_j), input_precision=INPUT_PRECISION)

        delta_row += s_db
        mask_row += s_mb
        B_i_row += s_bb
        B_j_row += s_bb
        C_i_row += s_cb
        C_j_row += s_cb

    in_range = mi[:, None] & mj[None, :]
    mirror = ti < tj
    _store_symmetric(P_ptr + d * s_pd, i, j, acc_P, in_range, mirror, s_pn1, s_pn2, ATOMIC)
    _store_symmetric(Q_ptr + d * s_pd, i, j, acc_Q, in_range, mirror, s_pn1, s_pn2, ATOMIC)


# ---------------------------------------------------------------------------------------------
# Launcher.
# ---------------------------------------------------------------------------------------------


def check_gramian_inputs(delta, A, B, C, delta_bias, mask):
    """Validate the inputs shared by the Gramian kernels; B/C of one group get their group axis.

    Shapes: delta (batch, dim, L) fp32/fp16/bf16; A (dim, N) fp32; B, C (batch, G, N, L) or
    (batch, N, L); delta_bias (dim,) fp32 or None; mask (batch, L) bool or None; one device.

    Returns:
        (B, C, batch, dim, L, N, ngroups) with B, C (batch, G, N, L).
    """
    assert delta.dim() == 3, delta.shape
    batch, dim, L = delta.shape
    assert A.dim() == 2 and A.shape[0] == dim and A.dtype == torch.float32, (A.shape, A.dtype)
    N = A.shape[1]
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    assert B.dim() == 4 and B.shape == C.shape, (B.shape, C.shape)
    assert B.shape[0] == batch and B.shape[2] == N and B.shape[3] == L, (B.shape, delta.shape, A.shape)
    ngroups = B.shape[1]
    assert ngroups >= 1 and dim % ngroups == 0, (dim, ngroups)
    assert delta.dtype in _INPUT_DTYPES and B.dtype in _INPUT_DTYPES and C.dtype in _INPUT_DTYPES
    device = delta.device
    assert A.device == device and B.device == device and C.device == device
    if delta_bias is not None:
        assert delta_bias.shape == (dim,) and delta_bias.dtype == torch.float32, delta_bias.dtype
        assert delta_bias.device == device
    if mask is not None:
        assert mask.shape == (batch, L) and mask.dtype == torch.bool and mask.device == device, mask.shape
    return B, C, batch, dim, L, N, ngroups


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def gramian_sums(
    delta,
    A,
    B,
    C,
    *,
    estimator: str,
    delta_bias=None,
    delta_softplus: bool = False,
    mask=None,
    constant_rows: bool = False,
    block_n: int | None = None,
    block_t: int | None = None,
    batch_splits: int = 1,
    num_warps: int | None = None,
    input_precision: str = "ieee",
):
    """Token sums of the ``frozen`` or ``ltv`` Gramian terms of every channel.

    Args:
        delta: (batch, dim, L) fp32/fp16/bf16 step sizes before bias / softplus.
        A: (dim, N) fp32.
        B, C: (batch, G, N, L) (or (batch, N, L), one group) fp32/fp16/bf16; channel d uses
            group d // (dim // G).
        estimator: ``"frozen"`` or ``"ltv"``.
        delta_bias: (dim,) fp32 or None; delta_softplus: softplus after the bias.
        mask: (batch, L) bool or None; False tokens are removed from their sequence.
        constant_rows: promises that every row of A is constant (Mamba2 heads); both estimators
            then run as weighted Gram matrices with ``tl.dot`` (only A[:, 0] is read).
        block_n: side of the square N x N output tiles (power of two; >= 16 with constant_rows).
        block_t: tokens per inner block (power of two; >= 16 with constant_rows).
        batch_splits: programs per (channel, tile) that share the batch; > 1 adds their partial
            sums atomically (more parallelism for few channels, but not bit-reproducible).
        num_warps: launch setting (default by block size; ignored by the interpreter).
        input_precision: ``tl.dot``'s input precision for constant_rows ("ieee" is fp32-exact;
            "tf32x3" uses tensor cores at about fp32 accuracy on NVIDIA GPUs).

    Returns:
        (P_sum, Q_sum), each (dim, N, N) fp32 on delta's device: the token sums of
        ``compressm_mamba.reference.gramians.gramian_statistics(...).sums``.
    """
    assert estimator in ("frozen", "ltv"), estimator
    B, C, batch, dim, L, N, ngroups = check_gramian_inputs(delta, A, B, C, delta_bias, mask)
    device = delta.device
    assert batch_splits >= 1

    P = torch.empty(dim, N, N, dtype=torch.float32, device=device)
    Q = torch.empty_like(P)
    if dim == 0 or N == 0:
        return P, Q
    batch_splits = min(batch_splits, max(batch, 1))
    atomic = batch_splits > 1
    if atomic:
        P.zero_()
        Q.zero_()
    elif DEBUG_FILL_NAN:
        P.fill_(float("nan"))
        Q.fill_(float("nan"))

    # Defaults keep every program within ~170 registers per thread without spills (checked with
    # ptxas for sm_90); they are starting points, not tuned on hardware.
    if constant_rows:
        # tl.dot needs every dimension >= 16 on GPUs.
        block_n = block_n or _pow2_clamp(N, 16, 64)
        block_t = block_t or 32
        assert block_n >= 16 and block_t >= 16, (block_n, block_t)
        kernel = _gram_kernel
        meta = dict(BLOCK_T=block_t, LTV=estimator == "ltv", INPUT_PRECISION=input_precision)
        # Two fp32 accumulators of 64 x 64 need eight warps to stay in registers.
        num_warps = num_warps or (8 if block_n >= 64 else 4)
    elif estimator == "frozen":
        block_n = block_n or _pow2_clamp(N, 4, 16)
        # Each (BLOCK_N, BLOCK_N, BLOCK_T) temporary holds about 4K values.
        block_t = block_t or _pow2_clamp(4096 // (block_n * block_n), 1, 64)
        kernel = _frozen_kernel
        meta = dict(BLOCK_T=block_t)
        num_warps = num_warps or 4
    else:
        block_n = block_n or _pow2_clamp(N, 4, 16)
        kernel = _ltv_kernel
        meta = {}
        num_warps = num_warps or 4
    assert block_n & (block_n - 1) == 0, block_n
    assert "BLOCK_T" not in meta or block_t & (block_t - 1) == 0, block_t

    n_tiles = triton.cdiv(N, block_n)
    batch_per_split = triton.cdiv(batch, batch_splits) if batch > 0 else 0
    # Unused pointers still need a tensor argument; they are never dereferenced.
    bias_arg = delta_bias if delta_bias is not None else A
    # Zero-copy reinterpretation: Triton loads bytes more portably than i1 pointers.
    mask_arg = mask.view(torch.uint8) if mask is not None else delta
    s_mb, s_ml = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)

    grid = (dim, n_tiles * n_tiles, batch_splits)
    kernel[grid](
        delta, A, B, C, bias_arg, mask_arg, P, Q,
        L, N, n_tiles, dim // ngroups, batch, batch_per_split,
        delta.stride(0), delta.stride(1), delta.stride(2), A.stride(0), A.stride(1),
        B.stride(0), B.stride(1), B.stride(2), B.stride(3),
        C.stride(0), C.stride(1), C.stride(2), C.stride(3),
        s_mb, s_ml, P.stride(0), P.stride(1), P.stride(2),
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), HAS_MASK=mask is not None,
        ATOMIC=atomic, BLOCK_N=block_n, num_warps=num_warps, **meta,
    )
    return P, Q
