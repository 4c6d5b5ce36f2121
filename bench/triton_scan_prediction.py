"""PREDICTION (not a measurement) of the Triton selective scan's time at (batch 8, dim 3072, L 2048), bf16 with z.

Without a GPU the launchers of kernels/selective_scan.py were compiled for sm_90 (Triton 3.7.1, a
stand-in driver reporting GPUTarget("cuda", 90, 32), as shared/gpu_audit/triton_aot.py does),
disassembled with Triton's nvdisasm, and the instructions of every loop counted: per pass, the
state loop's body (instructions per state per warp tile) and the tile loop's body outside it
(bench/static/ on its branch automates this).  Counts are per 256 element-steps (32 channels x 8
steps); the backward's 64-channel tiles are halved.  The machine model is
shared/gpu_audit/perf_model.py's: 4 warp-instructions per SM per clock (132 SMs, 1.98 GHz), an
efficiency of 0.50-0.70 forward and 0.40-0.60 backward, and memory traffic the scan does not hide
(dB/dC partials written and summed, checkpoints written and read) added at 4 TB/s.  The mamba_ssm
2.3.2 anchor (3.6-4.7 ms at N = 16) comes from the same model (shared/gpu_audit/perf_model.txt).

Work per 256 element-steps = sum over passes of N * state + tile: forward full + local (with time
splits); backward full + re-walk * (tiles_per_chunk - 1) / tiles_per_chunk + local.  The launch
plan (chunk, time splits, channel splits P) is the launchers' own (``default_chunk_size``,
``backward_plan``), evaluated for a 132-SM GPU without one.

usage: python bench/triton_scan_prediction.py
"""

from __future__ import annotations

import math

import torch

from compressm_mamba.kernels import selective_scan as ss

SM, SCHED, CLK = 132, 4, 1.98e9
RATE = SM * SCHED * CLK  # warp-instructions per second
BATCH, DIM, L = 8, 3072, 2048
TILES = BATCH * DIM * L / 256
MAMBA_SSM_N16_MS = (3.6, 4.7)
EFF_FWD, EFF_BWD = (0.7, 0.5), (0.6, 0.4)
BYTES_PER_S = 4e12

# (per state, per tile outside the state loop), sm_90 SASS, bf16 with z, D, delta_bias, softplus.
FIRST_ROUND = dict(ff=(101, 623), fl=(66, 441), bf=(411, 1020), br=(76, 439), bl=(74, 568))
SMALL_N = dict(ff=(101, 623), fl=(66, 441), bf=(303, 1017.5), br=(74.5, 426.5), bl=(75.5, 568.5))
LARGE_N = dict(ff=(101, 623), fl=(66, 441), bf=(308.5, 1011), br=(74.5, 426.5), bl=(75.5, 559))
DESIGNS = {
    # The first redesign: 32-channel backward blocks, 64-step chunks for every N <= 128.
    "first round": (lambda N: FIRST_ROUND, lambda N: 64, 32),
    # This one: 64-channel backward blocks, default_chunk_size (8 at N <= 16).
    "current": (lambda N: SMALL_N if ss.default_chunk_size(N) == 8 else LARGE_N, ss.default_chunk_size, None),
}


def predict(N, counts, chunk, bwd_block_d):
    """(fwd (lo, hi) ms, bwd (lo, hi) ms, plan dict) at the reference shape."""
    inputs = 4 * BATCH * DIM * L * 2 + 2 * BATCH * N * L * 2  # dout, u, delta, z; B, C (bf16)
    fwd_splits, _ = ss._time_splits(BATCH * DIM // 32, 1, math.ceil(L / chunk), "cpu", None)
    plan = ss.backward_plan(BATCH, DIM, L, N, 1, torch.bfloat16, torch.bfloat16, chunk, inputs, "cpu",
                            block_d=bwd_block_d)
    tiles_per_chunk = chunk // plan["BLOCK_T"]

    def work(key):
        per_state, per_tile = counts[key]
        return N * per_state + per_tile

    fwd = work("ff") + (work("fl") if fwd_splits > 1 else 0)
    bwd = work("bf") + (tiles_per_chunk - 1) / tiles_per_chunk * work("br") + (work("bl") if plan["n_splits"] > 1 else 0)
    ckpt = 4 * BATCH * DIM * N * math.ceil(L / chunk)
    fwd_mem = ckpt / BYTES_PER_S
    bwd_mem = (2 * plan["partial_bytes"] + ckpt) / BYTES_PER_S
    f = tuple(1e3 * (fwd * TILES / RATE / e + fwd_mem) for e in EFF_FWD)
    b = tuple(1e3 * (bwd * TILES / RATE / e + bwd_mem) for e in EFF_BWD)
    plan = dict(plan, chunk=chunk, fwd_splits=fwd_splits, fwd_ginstr=fwd * TILES / 1e9, bwd_ginstr=bwd * TILES / 1e9,
                ckpt_bytes=ckpt)
    return f, b, plan


def main():
    for name, (counts_of, chunk_of, bwd_block_d) in DESIGNS.items():
        mid = {}
        for N in (12, 16, 128):
            f, b, p = predict(N, counts_of(N), chunk_of(N), bwd_block_d)
            mid[N] = (f[0] + b[0] + f[1] + b[1]) / 2
            print(f"PREDICTION {name:11s} N={N:3d}: chunk {p['chunk']:3d} fwd {p['fwd_ginstr']:5.2f} G warp-instr "
                  f"{f[0]:5.2f}-{f[1]:5.2f} ms | bwd {p['bwd_ginstr']:5.2f} G {b[0]:5.2f}-{b[1]:5.2f} ms | fwd+bwd "
                  f"{f[0] + b[0]:5.2f}-{f[1] + b[1]:5.2f} ms | P={p['d_splits']} time splits fwd {p['fwd_splits']} "
                  f"bwd {p['n_splits']} | partials {p['partial_bytes'] / 1e6:.0f} MB checkpoints "
                  f"{p['ckpt_bytes'] / 1e6:.0f} MB")
        anchor = sum(MAMBA_SSM_N16_MS) / 2
        print(f"PREDICTION {name:11s}: N=128/N=12 = {mid[128] / mid[12]:.2f}x ; N=16 / mamba_ssm = "
              f"{mid[16] / anchor:.2f}x (mid-points)")


if __name__ == "__main__":
    main()
