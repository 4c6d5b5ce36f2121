"""Triton selective scan (Mamba1, ``selective_scan_fn`` layout): forward and backward kernels.

Mechanism only: the launchers assert shapes and layouts, choose tiles and splits, and launch.  Input
validation, contiguity, viewing 3-D B/C as one group and the autograd wrapper live in
``compressm_mamba.ops``.  The float64 specification is ``compressm_mamba.reference.selective_scan``.
Costs quoted below are PREDICTIONS from the sm_90 SASS of these kernels (Triton 3.7.1 AOT) and an
issue-rate model, not measurements.  The project's prediction (bench/static_report.py, bench/README.md)
at (batch 8, dim 3072, L 2048) bf16 on an H200, fwd+bwd: 4.3 ms at N = 16 (1.04x mamba_ssm),
3.5 ms at N = 12, 40 ms at N = 128 (11.6x N = 12), with the backward at one channel per thread
(under a 128-register cap at N <= 16) and wave-filling time splits (below); before them 6.0 ms
(1.44x), 4.7 and 51 ms: the backward then ran 255 registers, 2 warps per scheduler.

The problem: an element-wise linear recurrence over (batch, channel d, state n) lanes along time,
h_t = a_t h_{t-1} + b_t with a_t = exp(dt_t A[d, n]), b_t = dt_t u_t B_t[n], plus reductions over n
(out, du, ddelta) and over d (dB, dC).  Why each choice:

* A thread owns BLOCK_T consecutive steps of one channel: one 16-byte load per input and tile (8
  steps of bf16/fp16, 4 of fp32; the widest of u's and B's dtypes decides, so that Triton's
  coalescing layout is exactly "time inside a thread").  A warp's 32 channels x 8 steps are read as
  32 full sectors along L, never one element per step at stride L.  Then every scan along time is a
  sequential loop inside a thread: no shuffles, no shared memory (the first design, with time across
  8 lanes, spent ~170 shuffles per state and tile in the reverse scan alone).  Both directions have
  one channel per thread (BLOCK_D = 32, one warp); ``block_d`` = 64 (two per thread) remains an
  option (below, for why it is not the backward's default).

* States are a runtime loop ``for n in range(N)`` around (BLOCK_D, BLOCK_T) tiles, not a padded
  (BLOCK_D, next_pow2(N)) register tile: N = 12 does 12 iterations, not 16.  Registers do not grow
  with N and any N <= 256 runs the same code.  Per-element work (loads, softplus, sigmoid(z), D u,
  the epilogues) is done once per element, outside the state loop.

* exp2 with log2(e) folded into A: the launcher passes A2 = A^T log2(e) (N, dim), so a_t is one FMUL
  and one MUFU.EX2, and a state's A row for a channel block is one coalesced load.  Gradients with
  respect to the natural A multiply by ln 2 once per element.

* The carry enters a scan as its first step (b_0 + a_0 h_in): the scan's running product of a is
  then unused and dropped by the compiler.  Between tiles the per-state carries (BLOCK_D values per
  n) go through a small global buffer; one ``debug_barrier`` per tile orders them.

* Parallelism over time where batch x channels cannot fill the GPU, which with one thread per
  channel is the common case (batch 8 x dim 3072 = 768 warps; an H200 holds 8448): time is cut into
  ``n_splits`` splits of whole chunks.  A local pass (zero initial carry) gives each split's end state
  and its sum of dt; a sequential carry pass over splits in torch (h_start[s+1] = h_end_local[s] +
  exp2(A2 sum dt[s]) h_start[s], tiny) gives the true starts; the full pass runs from them.  The
  local pass costs ~0.65x a forward state step; splits are chosen only up to ~32 warps per SM (and
  then so that the last wave of programs is nearly full, below).

* Parallelism over states where time splits cannot fill the GPU (the backward at large N, whose
  time splits the tile-start scratch caps): ``n_state_splits`` = KS warps per program on the same
  channels, warp ks scanning states ks * ceil(N / KS) ... (rows past N are identity maps).  The N
  recurrences are independent; only the sums over n (y; sum_n g B and sum_n g (h - b) A2, which give
  du and ddelta) couple them, and they meet across the warps once per tile (a fixed-order sum
  through shared memory), before D u, the gate and the epilogue, applied once.  No extra memory:
  carries, checkpoints, scratch and dB/dC partials are per state, already disjoint (per-split fp32
  partials of y / du / ddelta across programs would cost 12 B per element and split, beyond the 2x
  inputs rule).  ``backward_plan`` picks KS = 4 from N >= 32 when the other splits leave the GPU
  short of warps; at N <= 16 KS = 1 compiles to the unsplit kernel.  PREDICTION
  (bench/static_report.py): the backward at N = 128, 4-warp programs of 32 channels at 168
  registers (3 warps per scheduler; uncapped: under the 128 cap state splits spill on sm_80), 33 ms;
  with 64-channel blocks at 255 registers (2 per scheduler) it was 41 ms; capped on sm_90 (no spill
  there) it would be 26 ms.

* Backward, per chunk (``chunk_size`` steps, the checkpoint interval) in reverse: re-walk the chunk
  forward from its checkpoint keeping only the state at each tile start (a scratch of
  tiles_per_chunk x N x BLOCK_D per program), then per tile in reverse recompute the tile's states
  and run the adjoint.  The re-walk costs (tiles_per_chunk - 1) / tiles_per_chunk of a forward
  state step, so the chunk is the shortest that keeps the checkpoints <= 8 bytes per step
  (``default_chunk_size``): at N <= 16 one bf16 tile, and the re-walk and its scratch are compiled
  out (ONE_TILE_CHUNKS); N = 128 keeps 64 steps.  With q_t = a_t dL/dh_t,
  q_t = a_t q_{t+1} + a_t dy_t C_t is a forward scan of the time-flipped tile (a flip inside a
  thread is a register renaming; Triton's reverse=True scan shuffles across all lanes even then),
  and its exclusive value q_{t+1} gives
  dL/dh_t = dy_t C_t + q_{t+1}: the same a_t as the state recompute, no shifted delta.
  a_t h_{t-1} = h_t - b_t, so dA and ddelta need no shifted state either.  Time splits work as in
  the forward (a local reverse pass, a carry pass over splits, the full pass).

* dB, dC deterministic, without atomics: a program owns (batch, group, channel split p, time split)
  and walks its channel blocks one after the other, adding each block's sum over channels into its
  own fp32 partial (batch, group, p, N, L); torch sums the P partials.  P is the largest whose
  partials fit in the size of the backward's inputs.  The sum over channels is a warp-sum: 5
  butterfly steps (SHFL + FADD) for each of a thread's 8 steps, for dB and dC, 80 SHFL per state
  and tile.  Two channels per thread (block_d = 64) would fold them first with one in-thread FADD,
  so the same shuffles serve 64 channels: 606 SASS instructions per state per 64 x 8 tile (1.18 per
  element-step) against 403 per 32 x 8 (1.57).  It is not the default because of registers: 64
  channels take 255 (8 one-warp programs per SM, 2 warps per scheduler, too few to hide latency)
  and spill under any cap that would allow more (572 B per thread at 168, 1168 B at 128: ptxas,
  sm_90, Triton 3.7.1).  32 channels take 168 left alone, and 128 under the cap ``_BWD_MAXNREG``
  with no spill and ~5% more instructions (values recomputed instead of kept): 16 programs per
  SM, 4 warps per scheduler (where it compiles without spills: ``_BWD_MAXNREG_NO_D``).
  PREDICTION (bench/static_report.py), the backward's full pass at N = 16: 3.80 ms with 64
  channels, 2.55 ms with 32 under the cap.  A reduce-scatter would need 9
  shuffles for 8 values over 32 lanes instead of 40, but tl.sum lowers to an all-reduce butterfly
  and Triton has no shuffle primitive; inline PTX shuffles would run on no CPU interpreter, so
  nothing here could check them.

* Launch plans fill whole waves.  Each launch carries a register cap (``_BWD_MAXNREG``,
  ``_FWD_MAXNREG``, ``_FWD_LOCAL_MAXNREG``), so the plan knows how many programs an SM holds, and
  ``_time_splits`` picks the split count (up to twice the least that fills the GPU) whose last
  wave is least empty: at the reference shape 8 time splits (47 one-warp programs per SM: waves
  of 28 + 19 forward, 16 + 16 + 15 backward) instead of 6 (35 per SM: a wave of 28 and a
  latency-bound tail of 7, costing a whole wave).

* Memory (bytes; the backward's extra, besides its outputs): dB/dC partials 8 B G P N L (<= the
  inputs' size); tile-start scratch 4 S B G P BLOCK_D (chunk / BLOCK_T) N (<= half of it; S, the
  time splits, is capped by this); carries and dA / dD / dbias partials 4 S B dim (N + 3).  The
  forward saves checkpoints 4 B dim N L / chunk <= 8 B dim L (``default_chunk_size``).

* Everything accumulates in fp32; addresses are int64 where products can pass 2**31; every load
  and store is masked on channel and time edges (steps past L are identity maps a = 1, b = 0, so a
  partial last tile needs no special case).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .elementwise import sigmoid as _sigmoid
from .elementwise import softplus as _softplus

__all__ = ["selective_scan_fwd", "selective_scan_bwd", "default_chunk_size", "tile_config", "backward_plan", "LOG2E"]

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)

# Debug aid: when set (or poison=True is passed), every buffer the kernels must fill is first
# filled with NaN, so an element a kernel forgets to write shows up as NaN instead of stale memory.
_POISON_ENV = "COMPRESSM_MAMBA_POISON"

# 32 channels per warp (one thread each), one warp per program.
_NUM_WARPS = 1
# The backward's channels per program: 32, one per thread, like the forward.  (64, two per thread,
# halves the dB / dC warp-sums per channel but needs 255 registers, 2 warps per scheduler, and
# spills under any cap that would give more: the module docstring.)
_BWD_BLOCK_D = 32
# Resident warps per SM the launch plan aims for (half of the 64 an H100/H200 SM can hold).
_WARPS_PER_SM = 32
# Register caps (ptxas .maxnreg, a Triton launch option; the CPU interpreter ignores it), each the
# most that still gives the residency the launch plan counts on, per thread: the backward's full
# pass 128 (16 warps per SM, 4 per scheduler: what hides latency; left to itself ptxas takes 168,
# 12 warps), the forward's full pass 72 (28 one-warp programs per SM; it needs 69-72) and its local
# pass 64 (32 per SM, the most blocks an SM holds).  tests/static compiles every configuration
# and fails on a spill, so a cap that forced one would be seen.
_BWD_MAXNREG = 128
# The cap holds only where it compiles without a spill in every configuration tried: one warp per
# program (no state splits) and D present (the mamba configuration).  Elsewhere ptxas spills under
# it, erratically: without D, bf16 N = 16, sm_90, z without delta_bias 148 B at 128 (at 144, 0 B
# with softplus, 72 B without); state splits on sm_80 88-156 B, on sm_90 24 B at N = 33.  Those
# run uncapped; the plan counts on what ptxas takes when left alone (168 registers, 12 warps per SM).
_BWD_MAXNREG_NO_D = None
_BWD_UNCAPPED_REGS = 168
_FWD_MAXNREG = 72
_FWD_LOCAL_MAXNREG = 64
# Registers per SM and the most blocks an SM holds (sm_80 / sm_90), for the residency of a cap.
_REGS_PER_SM = 65536
_MAX_BLOCKS_PER_SM = 32


def _resident_blocks(maxnreg: int, num_warps: int) -> int:
    """Blocks of ``num_warps`` warps an SM holds at ``maxnreg`` registers per thread (allocation in 256s per warp)."""
    per_warp = -(-maxnreg * 32 // 256) * 256
    return max(1, min(_MAX_BLOCKS_PER_SM, 64 // num_warps, _REGS_PER_SM // (per_warp * num_warps)))


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # Composition of x -> a1 x + b1 (first) then x -> a2 x + b2.  A forward scan gives the running
    # state from a zero start; with reverse=True the first argument is the later accumulated map,
    # so the same function composes g_t = c_t + alpha_t g_{t+1}.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _load_dt(delta_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw, dt): delta + bias, and softplus of it; dt is 0 where masked (the identity step)."""
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    return raw, tl.where(mask, dt, 0.0)


@triton.jit
def _scan_from(a, b, h_in, offs_t):
    """States of h_t = a_t h_{t-1} + b_t along axis 1 of the tile, starting from h_in (BLOCK_D,).

    h_in enters as b_0 + a_0 h_in, so the scan's running product of a is never used and the compiler
    drops it (with time inside a thread the select on column 0 folds away too).
    """
    b = tl.where((offs_t == 0)[None, :], b + a * h_in[:, None], b)
    _, h = tl.associative_scan((a, b), axis=1, combine_fn=_affine_combine)
    return h


@triton.jit
def _affine_combine_excl(a1, b1, ae1, be1, a2, b2, ae2, be2):
    # (a, b): the map of the whole segment; (ae, be): the map of the segment without its last
    # element.  A single element's second map is the identity (1, 0), which the compiler folds, so
    # the exclusive result costs no arithmetic.
    return a1 * a2, a2 * b1 + b2, a1 * ae2, ae2 * b1 + be2


@triton.jit
def _scan_from_excl(a, b, x_in, offs_t):
    """(inclusive, exclusive) states of x_t = a_t x_{t-1} + b_t along axis 1, starting from x_in."""
    first = (offs_t == 0)[None, :]
    b = tl.where(first, b + a * x_in[:, None], b)
    # -0.0, not 0.0: x + (-0.0) == x exactly, so the compiler may drop the addition.
    ae = tl.broadcast_to(tl.where(first, 0.0, 1.0), a.shape)
    be = tl.where(first, tl.broadcast_to(x_in[:, None], a.shape), -0.0)
    _, incl, _, excl = tl.associative_scan((a, b, ae, be), axis=1, combine_fn=_affine_combine_excl)
    return incl, excl


@triton.jit
def _load_dy(dout_ptr, z_ptr, offs, mask, HAS_Z: tl.constexpr):
    """dL/dy before the gate: dout * silu(z), or dout without z."""
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dout = dout * zv * _sigmoid(zv)
    return dout


@triton.jit
def _column(value, col, offs_t):
    """value[:, col] as a (BLOCK_D,) vector: a masked sum along time, in value's own layout.

    (A store masked to one column would be cheaper per element but makes the compiler convert the
    whole tile to a one-element-per-thread layout through shared memory, with two barriers.)
    """
    return tl.sum(tl.where((offs_t == col)[None, :], value, 0.0), axis=1)


@triton.jit
def _rows(BLOCK_D: tl.constexpr, KS: tl.constexpr):
    """(channel j, state split ks) of each of the KS * BLOCK_D rows of a state-split tile.

    Row r = (half * KS + ks) * W + lane with W = min(BLOCK_D, 32): warp ks holds state split ks for
    all BLOCK_D channels (lane and half pick the channel, as in the unsplit tile), so that sums over
    the state splits are cross-warp and sums over channels stay inside a warp.
    """
    W: tl.constexpr = 32 if BLOCK_D > 32 else BLOCK_D
    r = tl.arange(0, KS * BLOCK_D)
    if KS == 1:
        # Constant zeros: the unsplit kernel's state index folds to the loop counter.
        return r, tl.zeros((BLOCK_D,), dtype=tl.int32)
    # Contiguity 1: runs of W channels would otherwise make the compiler load per-row vectors two
    # elements per thread, a layout other than the tile's rows, converted through shared memory
    # (with barriers) on every state.
    return tl.max_contiguous((r // (W * KS)) * W + r % W, 1), (r // W) % KS


@triton.jit
def _sum_splits(x, BLOCK_D: tl.constexpr, KS: tl.constexpr, BLOCK_T: tl.constexpr):
    """(KS * BLOCK_D, BLOCK_T) rows of ``_rows`` -> (BLOCK_D, BLOCK_T): the sum over state splits, fixed order."""
    W: tl.constexpr = 32 if BLOCK_D > 32 else BLOCK_D
    return tl.reshape(tl.sum(tl.reshape(x, (BLOCK_D // W, KS, W, BLOCK_T)), axis=1), (BLOCK_D, BLOCK_T))


@triton.jit
def _sum_channels(x, BLOCK_D: tl.constexpr, KS: tl.constexpr, BLOCK_T: tl.constexpr):
    """(KS * BLOCK_D, BLOCK_T) rows of ``_rows`` -> (KS, BLOCK_T): per state split, the sum over channels."""
    W: tl.constexpr = 32 if BLOCK_D > 32 else BLOCK_D
    # The two channel halves of a thread first (in-thread adds), then the lanes (butterflies).
    return tl.sum(tl.sum(tl.reshape(x, (BLOCK_D // W, KS, W, BLOCK_T)), axis=0), axis=1)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A2t_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, ckpt_ptr, carry_ptr, dtsum_ptr,
    dim, L, ngroups, dim_per_group, blocks_per_group, n_tiles, tiles_per_split, tiles_per_chunk, n_chunks,
    N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, KS: tl.constexpr, N_PER: tl.constexpr,
    LOCAL: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):
    """Program (group * blocks_per_group + block, batch, time split s): BLOCK_D channels, the tiles of s in order.

    u, delta, z, out: (batch, dim, L); A2t: (N, dim) fp32 = A^T log2(e); B, C: (batch, ngroups, N, L);
    D, bias: (dim,); ckpt: (batch, dim, n_chunks, N) fp32, the state before each chunk;
    carry: (batch, n_splits, N, dim) fp32, the running state of split s (on entry its start, on exit
    its end); dtsum: (batch, n_splits, dim) fp32.
    KS state splits (KS warps): warp ks scans states ks * N_PER ... (ks + 1) * N_PER - 1 (< N) of the
    same BLOCK_D channels; y is summed over the warps once per tile, before D u and the gate.
    LOCAL: start from a zero state and write only the carry (the split's local end state) and the
    split's sum of dt, for the carry pass.  Otherwise start from the carry and write out and ckpt.
    """
    pid_blk = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    pid_g = pid_blk // blocks_per_group
    blk = pid_blk % blocks_per_group

    # Rows of the state loop's tiles: (channel, state split); KS = 1 is the plain channel block.
    jj, ks = _rows(BLOCK_D, KS)
    offs_j = blk * BLOCK_D + jj
    mask_d = offs_j < dim_per_group
    offs_d = pid_g * dim_per_group + offs_j
    offs_t = tl.arange(0, BLOCK_T)
    zero2 = (offs_j * 0)[:, None] + offs_t[None, :] * 0  # broadcasts B/C rows to the tile's layout
    # Channels of the epilogue (after the sum over state splits).
    offs_je = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_de = offs_je < dim_per_group
    offs_de = pid_g * dim_per_group + offs_je

    # int64: batch * dim * L and batch * ngroups * N * L may exceed 2**31 for long sequences.
    row = (pid_b * dim + offs_d).to(tl.int64) * L
    row_e = (pid_b * dim + offs_de).to(tl.int64) * L
    bc_base = (pid_b * ngroups + pid_g).to(tl.int64) * N * L
    ck_row = (pid_b * dim + offs_d).to(tl.int64) * n_chunks * N
    car_base = (pid_b * n_splits + pid_s).to(tl.int64) * N * dim

    if HAS_D:
        Dv = tl.load(D_ptr + offs_de, mask=mask_de, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((KS * BLOCK_D,), dtype=tl.float32)

    k0 = pid_s * tiles_per_split
    k1 = tl.minimum(k0 + tiles_per_split, n_tiles)
    dt_sum = tl.zeros((KS * BLOCK_D,), dtype=tl.float32)
    for k in range(k0, k1):
        t = k * BLOCK_T + offs_t
        mask_t = t < L
        m2 = mask_d[:, None] & mask_t[None, :]
        offs2 = row[:, None] + t[None, :]
        bc2 = bc_base + t[None, :] + zero2
        chunk_start = (k % tiles_per_chunk) == 0

        u = tl.load(u_ptr + offs2, mask=m2, other=0.0).to(tl.float32)
        raw, dt = _load_dt(delta_ptr, offs2, m2, bias, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        if LOCAL:
            dt_sum += tl.sum(dt, axis=1)
        else:
            y = tl.zeros((KS * BLOCK_D, BLOCK_T), dtype=tl.float32)
        for i in range(N_PER):
            n = ks * N_PER + i  # this row's state (a vector: one state per warp)
            mask_n = mask_d & (n < N)
            # Rows past N (N not a multiple of KS) load A2 = 0, B = C = 0: identity maps adding nothing.
            mask_nt = (zero2 + t[None, :] < L) & (n < N)[:, None]
            A2 = tl.load(A2t_ptr + n * dim + offs_d, mask=mask_n, other=0.0)
            B_n = tl.load(B_ptr + bc2 + (n * L)[:, None], mask=mask_nt, other=0.0).to(tl.float32)
            car_ptrs = carry_ptr + car_base + n * dim + offs_d
            if LOCAL:
                h_in = tl.load(car_ptrs, mask=mask_n & (k > k0), other=0.0)
            else:
                h_in = tl.load(car_ptrs, mask=mask_n, other=0.0)
                tl.store(ckpt_ptr + ck_row + (k // tiles_per_chunk) * N + n, h_in, mask=mask_n & chunk_start)
            h = _scan_from(tl.exp2(dt * A2[:, None]), dtu * B_n, h_in, offs_t)
            if not LOCAL:
                C_n = tl.load(C_ptr + bc2 + (n * L)[:, None], mask=mask_nt, other=0.0).to(tl.float32)
                y += h * C_n
            # Steps past L are identity maps, so the last column is the state after the tile.
            tl.store(car_ptrs, _column(h, BLOCK_T - 1, offs_t), mask=mask_n)
        # The carries are read back next tile, possibly by another thread of the program.
        tl.debug_barrier()

        if not LOCAL:
            m2e = mask_de[:, None] & mask_t[None, :]
            offs2e = row_e[:, None] + t[None, :]
            if KS > 1:
                y = _sum_splits(y, BLOCK_D, KS, BLOCK_T)
                if HAS_D:
                    u = tl.load(u_ptr + offs2e, mask=m2e, other=0.0).to(tl.float32)
            if HAS_D:
                y += Dv[:, None] * u
            if HAS_Z:
                zv = tl.load(z_ptr + offs2e, mask=m2e, other=0.0).to(tl.float32)
                y = y * (zv * _sigmoid(zv))
            tl.store(out_ptr + offs2e, y.to(out_ptr.dtype.element_ty), mask=m2e)
    if LOCAL:
        # Every state split has the same sum of dt; warp 0 writes it.
        tl.store(dtsum_ptr + (pid_b * n_splits + pid_s).to(tl.int64) * dim + offs_d, dt_sum, mask=mask_d & (ks == 0))


@triton.jit
def _scan_bwd_kernel(
    dout_ptr, u_ptr, delta_ptr, A2t_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, gcarry_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_part_ptr, dBC_part_ptr, dD_part_ptr, dbias_part_ptr, dtsum_ptr,
    batch, dim, L, ngroups, dim_per_group, blocks_per_group, blocks_per_psplit, n_psplits,
    n_tiles, tiles_per_chunk, n_chunks, chunks_per_split, dC_offset,
    N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, KS: tl.constexpr, N_PER: tl.constexpr,
    LOCAL: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, ONE_TILE_CHUNKS: tl.constexpr,
):
    """Program (group * n_psplits + p, batch, time split s): channel blocks of p; chunks of s last first.

    dout, u, delta, z, du, ddelta, dz: (batch, dim, L); A2t: (N, dim) fp32; B, C: (batch, ngroups,
    N, L); ckpt: (batch, dim, n_chunks, N) fp32 from the forward; gcarry: (batch, n_splits, N, dim)
    fp32, dL/dh at the first step after the split on entry, at the split's current first step as it
    goes; scratch: fp32, tiles_per_chunk * N * BLOCK_D per program, the states at the tile starts of
    the current chunk; dA_part: (n_splits, batch, N, dim) fp32, zero on entry; dBC_part: (2, batch,
    ngroups, n_psplits, N, L) fp32 (dC at dC_offset); dD_part, dbias_part: (n_splits, batch, dim);
    dtsum: (batch, n_splits, dim).
    KS state splits (KS warps): warp ks handles states ks * N_PER ... (ks + 1) * N_PER - 1 (< N) of
    the same channels; the sums over n (y, sum_n g B, sum_n g (h - b) A2) are summed over the warps
    once per tile, in a fixed order, before the epilogue.
    LOCAL: only the reverse scan from a zero carry, giving gcarry at the split's start and the split's
    sum of dt_{t+1} (the exponent of its total decay), for the carry pass.
    """
    pid_gp = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    pid_g = pid_gp // n_psplits
    pid_p = pid_gp % n_psplits

    offs_t = tl.arange(0, BLOCK_T)
    # Rows of the state loop's tiles: (channel, state split); KS = 1 is the plain channel block.
    offs_jj, ks = _rows(BLOCK_D, KS)
    offs_je = tl.arange(0, BLOCK_D)  # channels of the epilogue
    ks_c = tl.arange(0, KS)  # state splits of the channel sums (dB, dC)
    zero2 = (offs_jj * 0)[:, None] + offs_t[None, :] * 0
    bc_base = (pid_b * ngroups + pid_g).to(tl.int64) * N * L
    part_B = ((pid_b * ngroups + pid_g) * n_psplits + pid_p).to(tl.int64) * N * L
    part_C = part_B + dC_offset
    car_base = (pid_b * n_splits + pid_s).to(tl.int64) * N * dim
    dA_base = (pid_s * batch + pid_b).to(tl.int64) * N * dim
    prog = (pid_gp * batch + pid_b) * n_splits + pid_s
    scr_base = prog.to(tl.int64) * tiles_per_chunk * N * BLOCK_D

    c0 = pid_s * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, n_chunks)
    blk0 = pid_p * blocks_per_psplit
    blk1 = tl.minimum(blk0 + blocks_per_psplit, blocks_per_group)
    for blk in range(blk0, blk1):
        offs_j = blk * BLOCK_D + offs_jj
        mask_d = offs_j < dim_per_group
        offs_d = pid_g * dim_per_group + offs_j
        row = (pid_b * dim + offs_d).to(tl.int64) * L
        ck_row = (pid_b * dim + offs_d).to(tl.int64) * n_chunks * N
        offs_j_e = blk * BLOCK_D + offs_je
        mask_de = offs_j_e < dim_per_group
        offs_de = pid_g * dim_per_group + offs_j_e
        row_e = (pid_b * dim + offs_de).to(tl.int64) * L
        if HAS_D:
            Dv = tl.load(D_ptr + offs_de, mask=mask_de, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            bias_e = tl.load(bias_ptr + offs_de, mask=mask_de, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros((KS * BLOCK_D,), dtype=tl.float32)
            bias_e = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dt_sum = tl.zeros((KS * BLOCK_D,), dtype=tl.float32)

        for c_rev in range(c0, c1):
            c = c1 - 1 - (c_rev - c0)
            kc0 = c * tiles_per_chunk
            kc1 = tl.minimum(kc0 + tiles_per_chunk, n_tiles)
            if not LOCAL and not ONE_TILE_CHUNKS:
                # Re-walk the chunk forward from its checkpoint, keeping the state at each tile start
                # (slot j = tile kc0 + j; slot 0 is the checkpoint itself and is not copied).
                for k in range(kc0, kc1 - 1):
                    j = k - kc0
                    t = k * BLOCK_T + offs_t
                    m2 = mask_d[:, None] & (t < L)[None, :]
                    offs2 = row[:, None] + t[None, :]
                    bc2 = bc_base + t[None, :] + zero2
                    u = tl.load(u_ptr + offs2, mask=m2, other=0.0).to(tl.float32)
                    _, dt = _load_dt(delta_ptr, offs2, m2, bias, HAS_BIAS, SOFTPLUS)
                    dtu = dt * u
                    for i in range(N_PER):
                        n = ks * N_PER + i
                        mask_n = mask_d & (n < N)
                        mask_nt = (zero2 + t[None, :] < L) & (n < N)[:, None]
                        A2 = tl.load(A2t_ptr + n * dim + offs_d, mask=mask_n, other=0.0)
                        B_n = tl.load(B_ptr + bc2 + (n * L)[:, None], mask=mask_nt, other=0.0).to(tl.float32)
                        h_in = tl.load(ckpt_ptr + ck_row + c * N + n, mask=mask_n & (j == 0), other=0.0)
                        h_in += tl.load(scratch_ptr + scr_base + (j * N + n) * BLOCK_D + offs_jj,
                                        mask=mask_n & (j > 0), other=0.0)
                        h = _scan_from(tl.exp2(dt * A2[:, None]), dtu * B_n, h_in, offs_t)
                        tl.store(scratch_ptr + scr_base + ((j + 1) * N + n) * BLOCK_D + offs_jj,
                                 _column(h, BLOCK_T - 1, offs_t), mask=mask_n)
                    tl.debug_barrier()

            for k_rev in range(kc0, kc1):
                k = kc1 - 1 - (k_rev - kc0)
                j = k - kc0
                t = k * BLOCK_T + offs_t
                mask_t = t < L
                m2 = mask_d[:, None] & mask_t[None, :]
                offs2 = row[:, None] + t[None, :]
                bc2 = bc_base + t[None, :] + zero2
                _, dt = _load_dt(delta_ptr, offs2, m2, bias, HAS_BIAS, SOFTPLUS)
                # Padded channels and steps load dout = 0, so dy, g and every sum they feed are 0.
                dy = _load_dy(dout_ptr, z_ptr, offs2, m2, HAS_Z)
                if LOCAL:
                    dt_sum += tl.sum(dt, axis=1)
                else:
                    # Only what the state loop needs stays live across it (registers); u, delta,
                    # dout and z are loaded again for the epilogue (L1 / L2 hits).
                    dtu = dt * tl.load(u_ptr + offs2, mask=m2, other=0.0).to(tl.float32)
                    if HAS_Z:
                        y = tl.zeros((KS * BLOCK_D, BLOCK_T), dtype=tl.float32)
                    gB = tl.zeros((KS * BLOCK_D, BLOCK_T), dtype=tl.float32)  # sum_n g B
                    gxA = tl.zeros((KS * BLOCK_D, BLOCK_T), dtype=tl.float32)  # sum_n g (h - b) A2
                    later = blk != blk0
                for i in range(N_PER):
                    n = ks * N_PER + i  # this row's state (a vector: one state per warp)
                    mask_n = mask_d & (n < N)
                    # Rows past N (N not a multiple of KS) load A2 = 0 and B = C = 0: a = 1 and
                    # every term they add is 0; their stores are masked.
                    mask_nt = (zero2 + t[None, :] < L) & (n < N)[:, None]
                    A2 = tl.load(A2t_ptr + n * dim + offs_d, mask=mask_n, other=0.0)
                    C_n = tl.load(C_ptr + bc2 + (n * L)[:, None], mask=mask_nt, other=0.0).to(tl.float32)
                    q_ptrs = gcarry_ptr + car_base + n * dim + offs_d
                    q_in = tl.load(q_ptrs, mask=mask_n, other=0.0)
                    a = tl.exp2(dt * A2[:, None])
                    cy = dy * C_n
                    # q_t = a_t dL/dh_t obeys q_t = a_t q_{t+1} + a_t dy_t C_t, a forward scan of the
                    # time-flipped tile (a flip inside a thread is a register renaming; Triton's
                    # reverse=True scan shuffles across all lanes even then); its exclusive value is
                    # q_{t+1}, so dL/dh_t = dy_t C_t + q_{t+1} needs no shifted a.
                    q_incl, q_excl = _scan_from_excl(tl.flip(a, 1), tl.flip(a * cy, 1), q_in, offs_t)
                    tl.store(q_ptrs, _column(q_incl, BLOCK_T - 1, offs_t), mask=mask_n)
                    if not LOCAL:
                        g = cy + tl.flip(q_excl, 1)  # dL/dh_t
                        B_n = tl.load(B_ptr + bc2 + (n * L)[:, None], mask=mask_nt, other=0.0).to(tl.float32)
                        h_in = tl.load(ckpt_ptr + ck_row + c * N + n, mask=mask_n & (j == 0), other=0.0)
                        if not ONE_TILE_CHUNKS:
                            h_in += tl.load(scratch_ptr + scr_base + (j * N + n) * BLOCK_D + offs_jj,
                                            mask=mask_n & (j > 0), other=0.0)
                        b = dtu * B_n
                        h = _scan_from(a, b, h_in, offs_t)
                        if HAS_Z:
                            y += h * C_n
                        # a_t h_{t-1} = h_t - b_t: the gradient through a_t needs no shifted state.
                        x = g * (h - b)
                        gxA += x * A2[:, None]
                        gB += g * B_n
                        dA_ptrs = dA_part_ptr + dA_base + n * dim + offs_d
                        tl.store(dA_ptrs, tl.load(dA_ptrs, mask=mask_n, other=0.0) + tl.sum(x * dt, axis=1),
                                 mask=mask_n)
                        # This program's partial over its channel split: the first block stores, the
                        # later ones add (barriers between tiles order them; nothing else writes it).
                        if KS > 1:
                            n_c = ks_c * N_PER + i
                            mask_c = (n_c < N)[:, None] & mask_t[None, :]
                            bc_offs = (n_c * L)[:, None] + t[None, :]
                            dB_ptrs = dBC_part_ptr + part_B + bc_offs
                            dB_prev = tl.load(dB_ptrs, mask=mask_c & later, other=0.0)
                            tl.store(dB_ptrs, dB_prev + _sum_channels(g * dtu, BLOCK_D, KS, BLOCK_T), mask=mask_c)
                            dC_ptrs = dBC_part_ptr + part_C + bc_offs
                            dC_prev = tl.load(dC_ptrs, mask=mask_c & later, other=0.0)
                            tl.store(dC_ptrs, dC_prev + _sum_channels(h * dy, BLOCK_D, KS, BLOCK_T), mask=mask_c)
                        else:
                            bc_offs = i * L + t
                            dB_ptrs = dBC_part_ptr + part_B + bc_offs
                            dB_prev = tl.load(dB_ptrs, mask=mask_t & later, other=0.0)
                            tl.store(dB_ptrs, dB_prev + tl.sum(g * dtu, axis=0), mask=mask_t)
                            dC_ptrs = dBC_part_ptr + part_C + bc_offs
                            dC_prev = tl.load(dC_ptrs, mask=mask_t & later, other=0.0)
                            tl.store(dC_ptrs, dC_prev + tl.sum(h * dy, axis=0), mask=mask_t)
                tl.debug_barrier()

                if not LOCAL:
                    m2e = mask_de[:, None] & mask_t[None, :]
                    offs2e = row_e[:, None] + t[None, :]
                    if KS > 1:
                        gB = _sum_splits(gB, BLOCK_D, KS, BLOCK_T)
                        gxA = _sum_splits(gxA, BLOCK_D, KS, BLOCK_T)
                        if HAS_Z:
                            y = _sum_splits(y, BLOCK_D, KS, BLOCK_T)
                        _, dt = _load_dt(delta_ptr, offs2e, m2e, bias_e, HAS_BIAS, SOFTPLUS)
                        dy = _load_dy(dout_ptr, z_ptr, offs2e, m2e, HAS_Z)
                    u = tl.load(u_ptr + offs2e, mask=m2e, other=0.0).to(tl.float32)
                    du = dt * gB
                    if HAS_D:
                        du += Dv[:, None] * dy
                        dD_acc += tl.sum(dy * u, axis=1)
                    tl.store(du_ptr + offs2e, du.to(du_ptr.dtype.element_ty), mask=m2e)
                    ddt = u * gB + gxA * _LN2
                    if SOFTPLUS:
                        raw, _ = _load_dt(delta_ptr, offs2e, m2e, bias_e, HAS_BIAS, False)
                        ddt = ddt * _sigmoid(raw)
                    ddt = tl.where(m2e, ddt, 0.0)
                    dbias_acc += tl.sum(ddt, axis=1)
                    tl.store(ddelta_ptr + offs2e, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2e)
                    if HAS_Z:
                        if HAS_D:
                            y += Dv[:, None] * u
                        dout = tl.load(dout_ptr + offs2e, mask=m2e, other=0.0).to(tl.float32)
                        zv = tl.load(z_ptr + offs2e, mask=m2e, other=0.0).to(tl.float32)
                        sig_z = _sigmoid(zv)
                        dz = dout * y * sig_z * (1.0 + zv * (1.0 - sig_z))
                        tl.store(dz_ptr + offs2e, dz.to(dz_ptr.dtype.element_ty), mask=m2e)

        small_row = (pid_s * batch + pid_b).to(tl.int64) * dim + offs_de
        if LOCAL:
            # Every state split has the same sum of dt; warp 0 writes it.
            tl.store(dtsum_ptr + (pid_b * n_splits + pid_s).to(tl.int64) * dim + offs_d, dt_sum,
                     mask=mask_d & (ks == 0))
        else:
            if HAS_D:
                tl.store(dD_part_ptr + small_row, dD_acc, mask=mask_de)
            if HAS_BIAS:
                tl.store(dbias_part_ptr + small_row, dbias_acc, mask=mask_de)


def default_chunk_size(N: int) -> int:
    """Time steps between two checkpoints for state size N: the fewest that keep them <= 8 bytes per step.

    The checkpoints are (batch, dim, L / chunk, N) fp32: 4 N / chunk bytes per element of u, at most
    8 (the size of four bf16 inputs) with chunk = the power of two >= N / 2, at least 8 (one bf16
    tile).  Shorter chunks are cheaper: the backward re-walks (tiles_per_chunk - 1) / tiles_per_chunk
    of the time steps to rebuild tile starts, so at N <= 16 (8-step chunks, one bf16 tile each) it
    re-walks nothing; N = 128 keeps 64 steps (7/8 re-walked), N = 256 128 steps.

    The price is memory saved for the backward: at N = 16, 8 bytes per step (1 with 64-step chunks).
    PREDICTION (the design-time sketch, now removed; see bench/README.md): 64-step chunks at N <= 16 would give 1.17x
    mamba_ssm's fwd+bwd at N = 16 instead of 1.07x, 16-step ones 1.13x (4 bytes per step), and
    N = 128 / N = 12 7.9x / 8.2x instead of 8.6x.
    """
    return max(8, triton.next_power_of_2(max(1, -(-N // 2))))


def tile_config(u_dtype, bc_dtype, chunk_size: int, dim_per_group: int, block_d: int | None = None):
    """(BLOCK_T, BLOCK_D, num_warps): a thread owns BLOCK_T consecutive steps of one channel.

    BLOCK_T is one 16-byte load of the widest of u's and B's dtypes (8 steps of bf16, 4 of fp32), so
    that Triton's coalescing gives every thread whole time runs: the scans along time then run inside
    a thread, with no shuffles (reverse scans too).  BLOCK_D: 32 channels per warp (one per thread),
    one warp per program, unless ``block_d`` says otherwise (64: two channels per thread).
    """
    widest = max(torch.empty((), dtype=u_dtype).element_size(), torch.empty((), dtype=bc_dtype).element_size())
    block_t = min(chunk_size, 16 // widest)
    if block_d is None:
        block_d = min(32 * _NUM_WARPS, triton.next_power_of_2(max(dim_per_group, 1)))
    assert block_d >= 1 and block_d & (block_d - 1) == 0, f"block_d must be a power of two, got {block_d}"
    num_warps = max(1, min(_NUM_WARPS, block_d // 32))
    return block_t, block_d, num_warps


def _sm_count(device) -> int:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100 / H200: what the launch plan is sized for when no GPU says otherwise


def _time_splits(programs: int, num_warps: int, n_units: int, device, n_splits: int | None, cap: int | None = None,
                 resident: int | None = None):
    """(n_splits, units_per_split): split time only as far as ``programs`` cannot fill the GPU.

    A unit is a tile (forward) or a chunk (backward).  ``cap`` bounds the splits (scratch memory).
    The least splits that reach the target warps per SM, or, given ``resident`` (blocks an SM holds
    at once), the split count up to twice that many which wastes the least on partial waves: equal
    programs run in waves of ``resident`` per SM, and the last, partial, wave takes a whole wave's
    time once it holds fewer than 4 warps per scheduler (latency-bound).  E.g. 768 one-warp programs
    on 132 SMs: 6 splits give 35 per SM, a wave of 28 and a tail of 7 (44 waves' worth of program
    time for 35 programs' work); 8 splits give 47 per SM, 28 + 19, nearly no tail.
    """
    n_units = max(n_units, 1)
    if n_splits is None:
        sms = _sm_count(device)
        target = sms * _WARPS_PER_SM // num_warps
        n_splits = -(-target // max(programs, 1))
        if cap is not None:
            n_splits = min(n_splits, cap)
        if resident is not None:
            hide = 4 * 4  # warps per SM below which a wave runs latency-bound (4 schedulers x 4)

            def cost(s):  # the busiest SM's program-time, in units of one unit of work
                per_sm = -(-programs * s // sms)
                full, tail = divmod(per_sm, resident)
                wave = max(resident, hide // num_warps)
                return (full * wave + (max(tail, hide // num_warps) if tail else 0)) * -(-n_units // s)

            top = min(2 * n_splits, n_units, cap if cap is not None else n_units)
            n_splits = min(range(max(1, min(n_splits, top)), max(1, top) + 1), key=cost)
    n_splits = max(1, min(n_splits, n_units))
    per = -(-n_units // n_splits)
    return -(-n_units // per), per


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
    assert C.shape == B.shape and C.dtype == B.dtype, f"C {tuple(C.shape)} {C.dtype} != B {tuple(B.shape)} {B.dtype}"
    ngroups = B.shape[1]
    assert ngroups >= 1 and dim % ngroups == 0, f"dim={dim} is not a multiple of ngroups={ngroups}"
    assert chunk_size >= 1 and chunk_size & (chunk_size - 1) == 0, (
        f"chunk_size must be a power of two, got {chunk_size}"
    )
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


def _A2t(A):
    """A^T log2(e), (N, dim) fp32 contiguous: exp(dt A) = exp2(dt A2), one row load per state."""
    return (A.float() * LOG2E).t().contiguous()


def _flags(D, z, delta_bias, delta_softplus, N, BLOCK_D, BLOCK_T, num_warps, state_splits=1):
    # State splits: one warp each (the rows of ``_rows``), N_PER states per warp.
    return dict(N=N, BLOCK_D=BLOCK_D, BLOCK_T=BLOCK_T, KS=state_splits, N_PER=-(-N // state_splits),
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(delta_softplus), num_warps=num_warps * state_splits)


def _check_state_splits(n_state_splits, N):
    assert n_state_splits >= 1 and n_state_splits & (n_state_splits - 1) == 0, (
        f"n_state_splits must be a power of two, got {n_state_splits}"
    )
    assert n_state_splits <= max(1, N), f"n_state_splits={n_state_splits} exceeds N={N}"
    return n_state_splits


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk_size: int | None = None,
                       *, block_d: int | None = None, n_splits: int | None = None, n_state_splits: int = 1,
                       poison: bool | None = None):
    """Forward selective scan.

    Args:
        u, delta, z: (batch, dim, L) contiguous, one dtype (fp32 / fp16 / bf16); z may be None.
        A: (dim, N) fp32, 1 <= N <= 256.
        B, C: (batch, G, N, L) contiguous, in u's dtype or fp32; channel d uses group d // (dim // G).
        D, delta_bias: (dim,) fp32 or None.
        delta_softplus: apply softplus to delta + delta_bias.
        chunk_size: time steps between two checkpoints (a power of two); None: ``default_chunk_size(N)``.
        block_d: channels per program (power of two); None: 32, or dim // G rounded up if fewer.
        n_splits: time splits run in parallel (chunked scan with a carry pass); None: as many as
            needed to fill the GPU (1 when batch x channel blocks already do).
        n_state_splits: warps per program, each scanning ceil(N / n_state_splits) of the states of the
            same channels (a power of two <= N); y is summed over them once per tile.  1 by default:
            time splits already fill the GPU in the forward.
        poison: fill the outputs with NaN before launching (debug); None reads COMPRESSM_MAMBA_POISON.

    Returns:
        (out, last_state, checkpoints): out (batch, dim, L) in u.dtype; last_state (batch, dim, N) fp32;
        checkpoints (batch, dim, ceil(L / chunk_size), N) fp32, the state h at the start of each chunk,
        from which the backward recomputes states.
    """
    N = A.shape[1] if A.dim() == 2 else 0
    chunk_size = default_chunk_size(N) if chunk_size is None else chunk_size
    batch, dim, L, N, ngroups = _check_args(u, delta, A, B, C, D, z, delta_bias, chunk_size)
    poison = _want_poison(poison)
    dim_per_group = dim // ngroups
    n_chunks = math.ceil(L / chunk_size)
    BLOCK_T, BLOCK_D, num_warps = tile_config(u.dtype, B.dtype, chunk_size, dim_per_group, block_d)
    tiles_per_chunk = chunk_size // BLOCK_T
    n_tiles = math.ceil(L / BLOCK_T)
    blocks_per_group = triton.cdiv(dim_per_group, BLOCK_D)
    # Splits are whole chunks, so that every checkpoint is written by the pass that owns its chunk.
    splits, chunks_per_split = _time_splits(batch * ngroups * blocks_per_group, num_warps * n_state_splits, n_chunks,
                                            u.device, n_splits,
                                            resident=_resident_blocks(_FWD_MAXNREG, num_warps * n_state_splits))
    tiles_per_split = chunks_per_split * tiles_per_chunk

    out = _empty((batch, dim, L), u.dtype, u.device, poison)
    checkpoints = _empty((batch, dim, n_chunks, N), torch.float32, u.device, poison)
    if batch == 0 or dim == 0 or L == 0:
        return out, torch.zeros(batch, dim, N, dtype=torch.float32, device=u.device), checkpoints

    A2t = _A2t(A)
    carry = torch.zeros((batch, splits, N, dim), dtype=torch.float32, device=u.device)
    flags = _flags(D, z, delta_bias, delta_softplus, N, BLOCK_D, BLOCK_T, num_warps,
                   _check_state_splits(n_state_splits, N))
    args = (u, delta, A2t, B, C, D if D is not None else A2t, z if z is not None else u,
            delta_bias if delta_bias is not None else A2t, out, checkpoints, carry)
    sizes = (dim, L, ngroups, dim_per_group, blocks_per_group, n_tiles, tiles_per_split, tiles_per_chunk, n_chunks)
    grid = (ngroups * blocks_per_group, batch, splits)
    if splits > 1:
        dtsum = _empty((batch, splits, dim), torch.float32, u.device, poison)
        _scan_fwd_kernel[grid](*args, dtsum, *sizes, LOCAL=True, maxnreg=_FWD_LOCAL_MAXNREG, **flags)
        # Carry pass: the state at split s's start from split s-1's local end state and its total
        # decay exp2(A2 * sum of dt); carry[:, s] becomes that start.
        decay = torch.exp2(A2t[None, None] * dtsum[:, :, None, :])  # (batch, splits, N, dim)
        local_end = carry.clone()
        carry[:, 0] = 0.0
        for s in range(1, splits):
            carry[:, s] = local_end[:, s - 1] + decay[:, s - 1] * carry[:, s - 1]
    _scan_fwd_kernel[grid](*args, carry, *sizes, LOCAL=False, maxnreg=_FWD_MAXNREG, **flags)
    last_state = carry[:, splits - 1].transpose(1, 2).contiguous()
    return out, last_state, checkpoints


def backward_plan(batch, dim, L, N, ngroups, u_dtype, bc_dtype, chunk_size, input_bytes, device, *,
                  block_d=None, n_splits=None, d_splits=None, n_state_splits=None, maxnreg=_BWD_MAXNREG):
    """The backward's launch plan, a dict (tile sizes, channel splits P, time splits, state splits, scratch bytes).

    P (channel splits, each with its own fp32 dB/dC partial, 8 batch G P N L bytes) is the most
    whose partials fit in ``input_bytes``; time splits then make up the programs the GPU needs, as
    far as the tile-start scratch (4 batch splits G P BLOCK_D tiles_per_chunk N bytes) fits in half
    of ``input_bytes``.  When the scratch bound leaves fewer warps than the GPU wants (large N), state
    splits (KS warps per program, each ceil(N / KS) states of the same channels) make up the rest,
    at most 4 and only while each warp keeps >= 16 states (its per-tile work is repeated per warp);
    they need no memory: the sums over states meet in the program, once per tile.
    """
    dim_per_group = dim // ngroups
    n_chunks = math.ceil(L / chunk_size)
    if block_d is None:
        block_d = min(_BWD_BLOCK_D, triton.next_power_of_2(max(dim_per_group, 1)))
    BLOCK_T, BLOCK_D, num_warps = tile_config(u_dtype, bc_dtype, chunk_size, dim_per_group, block_d)
    tiles_per_chunk = chunk_size // BLOCK_T
    blocks_per_group = triton.cdiv(dim_per_group, BLOCK_D)
    if d_splits is None:
        d_splits = input_bytes // max(1, 8 * batch * ngroups * N * L)
    d_splits = max(1, min(d_splits, blocks_per_group))
    per_p = triton.cdiv(blocks_per_group, d_splits)
    d_splits = triton.cdiv(blocks_per_group, per_p)
    # One-tile chunks start every tile at a checkpoint: no re-walk, no scratch.
    scratch_per_split = 4 * batch * ngroups * d_splits * BLOCK_D * tiles_per_chunk * N
    if tiles_per_chunk == 1:
        scratch_per_split = 0
    cap = max(1, (input_bytes // 2) // max(1, scratch_per_split))
    splits, chunks_per_split = _time_splits(batch * ngroups * d_splits, num_warps, n_chunks, device, n_splits, cap,
                                            resident=_resident_blocks(maxnreg or _BWD_UNCAPPED_REGS, num_warps))
    if n_state_splits is None:
        want = _sm_count(device) * _WARPS_PER_SM / max(1, batch * ngroups * d_splits * splits * num_warps)
        n_state_splits = 1
        while n_state_splits < min(4, want) and N >= 32 * n_state_splits:
            n_state_splits *= 2
    n_state_splits = _check_state_splits(n_state_splits, N)
    if n_state_splits > 1:
        maxnreg = None  # spills under the cap (see _BWD_MAXNREG_NO_D)
    return dict(BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=num_warps, n_state_splits=n_state_splits, maxnreg=maxnreg,
                tiles_per_chunk=tiles_per_chunk,
                blocks_per_group=blocks_per_group, d_splits=d_splits, blocks_per_psplit=per_p, n_splits=splits,
                chunks_per_split=chunks_per_split, partial_bytes=8 * batch * ngroups * d_splits * N * L,
                scratch_bytes=splits * scratch_per_split)


def selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, checkpoints,
                       chunk_size: int | None = None, *, block_d: int | None = None, n_splits: int | None = None,
                       d_splits: int | None = None, n_state_splits: int | None = None, poison: bool | None = None):
    """Gradients of the scalar sum(out * dout) of ``selective_scan_fwd``.

    Args:
        dout: (batch, dim, L) contiguous, u's dtype.
        u, delta, A, B, C, D, z, delta_bias, delta_softplus: as given to ``selective_scan_fwd``.
        checkpoints: (batch, dim, ceil(L / chunk_size), N) fp32 contiguous from ``selective_scan_fwd``
            with the same chunk_size.
        block_d: channels per program (power of two); None: 32 (one per thread), or dim // G rounded
            up if fewer.
        n_splits: as in ``selective_scan_fwd`` (need not match the forward's).
        d_splits: channel splits with their own dB/dC partial; None: the most whose partials fit in
            the size of the inputs.
        n_state_splits: warps per program, each scanning ceil(N / n_state_splits) states of the same
            channels (a power of two <= N); None: ``backward_plan``'s choice (1 unless N >= 32 and the
            other splits leave the GPU short of warps).
        poison: as in ``selective_scan_fwd``.

    Returns:
        (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias): du, ddelta, dz (batch, dim, L) in the dtype of
        u / delta / z, dz None when z is None; dA (dim, N) fp32; dB, dC with B's / C's shape and dtype;
        dD, ddelta_bias (dim,) fp32, None when D / delta_bias are None.  ddelta is with respect to
        the raw delta (before bias and softplus).
    """
    N = A.shape[1] if A.dim() == 2 else 0
    chunk_size = default_chunk_size(N) if chunk_size is None else chunk_size
    batch, dim, L, N, ngroups = _check_args(u, delta, A, B, C, D, z, delta_bias, chunk_size)
    assert dout.shape == u.shape and dout.is_contiguous(), "dout must be contiguous with u's shape"
    poison = _want_poison(poison)
    n_chunks = math.ceil(L / chunk_size)
    assert checkpoints.shape == (batch, dim, n_chunks, N) and checkpoints.dtype == torch.float32, (
        f"checkpoints must be (batch, dim, {n_chunks}, N) fp32, got {tuple(checkpoints.shape)} {checkpoints.dtype}"
    )
    assert checkpoints.is_contiguous(), "checkpoints must be contiguous"
    input_bytes = sum(t.numel() * t.element_size() for t in (dout, u, delta, z, B, C) if t is not None)
    plan = backward_plan(batch, dim, L, N, ngroups, u.dtype, B.dtype, chunk_size, input_bytes, u.device,
                         block_d=block_d, n_splits=n_splits, d_splits=d_splits, n_state_splits=n_state_splits,
                         maxnreg=_BWD_MAXNREG if D is not None else _BWD_MAXNREG_NO_D)
    BLOCK_T, BLOCK_D, P, splits = plan["BLOCK_T"], plan["BLOCK_D"], plan["d_splits"], plan["n_splits"]
    dev = u.device
    f32 = torch.float32

    du = _empty(u.shape, u.dtype, dev, poison)
    ddelta = _empty(delta.shape, delta.dtype, dev, poison)
    dz = _empty(z.shape, z.dtype, dev, poison) if z is not None else None
    dA_part = torch.zeros((splits, batch, N, dim), dtype=f32, device=dev)
    dBC_part = _empty((2, batch, ngroups, P, N, L), f32, dev, poison)
    dD_part = _empty((splits, batch, dim), f32, dev, poison) if D is not None else None
    dbias_part = _empty((splits, batch, dim), f32, dev, poison) if delta_bias is not None else None
    gcarry = torch.zeros((batch, splits, N, dim), dtype=f32, device=dev)

    if batch > 0 and dim > 0 and L > 0:
        A2t = _A2t(A)
        flags = _flags(D, z, delta_bias, delta_softplus, N, BLOCK_D, BLOCK_T, plan["num_warps"], plan["n_state_splits"])
        grid = (ngroups * P, batch, splits)
        scratch = _empty((max(1, plan["scratch_bytes"] // 4),), f32, dev, poison)
        dtsum = _empty((batch, splits, dim), f32, dev, poison) if splits > 1 else gcarry

        def launch(local):
            _scan_bwd_kernel[grid](
                dout, u, delta, A2t, B, C, D if D is not None else A2t, z if z is not None else u,
                delta_bias if delta_bias is not None else A2t, checkpoints, gcarry, scratch,
                du, ddelta, dz if dz is not None else du, dA_part, dBC_part,
                dD_part if dD_part is not None else dA_part, dbias_part if dbias_part is not None else dA_part,
                dtsum,
                batch, dim, L, ngroups, dim // ngroups, plan["blocks_per_group"], plan["blocks_per_psplit"], P,
                math.ceil(L / BLOCK_T), plan["tiles_per_chunk"], n_chunks, plan["chunks_per_split"],
                dBC_part[1].storage_offset(),
                LOCAL=local, ONE_TILE_CHUNKS=plan["tiles_per_chunk"] == 1, **flags,
                # The local pass needs far fewer registers (61-121); the cap is the full pass's.
                **({} if local or plan["maxnreg"] is None else {"maxnreg": plan["maxnreg"]}),
            )

        if splits > 1:
            launch(True)
            # Carry pass, last split first: q = a dL/dh at the step after split s = the local q at
            # split s+1's start plus split s+1's total decay times q after split s+1.
            decay = torch.exp2(A2t[None, None] * dtsum[:, :, None, :])  # (batch, splits, N, dim)
            g_local = gcarry.clone()
            gcarry[:, splits - 1] = 0.0
            for s in range(splits - 2, -1, -1):
                gcarry[:, s] = g_local[:, s + 1] + decay[:, s + 1] * gcarry[:, s + 1]
        launch(False)
    else:
        # No program runs: every sum is empty.
        for t in (du, ddelta, dz, dBC_part, dD_part, dbias_part):
            if t is not None:
                t.zero_()

    dA = dA_part.sum((0, 1)).t()
    dB = dBC_part[0].sum(2).to(B.dtype)
    dC = dBC_part[1].sum(2).to(C.dtype)
    dD = dD_part.sum((0, 1)) if dD_part is not None else None
    ddelta_bias = dbias_part.sum((0, 1)) if dbias_part is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias
