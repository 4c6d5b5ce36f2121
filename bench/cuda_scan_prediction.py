"""PREDICTION (not a measurement) of the CUDA selective scan's time at (batch 8, dim 3072, L 2048), bf16 with z.

Without a GPU the kernels were compiled for sm_90 (nvcc 13, the flags of tests/ops/test_cuda_compile.py,
``-Xptxas -v``), disassembled (nvdisasm) and the instructions of every loop of each kernel counted
(the loop bodies named below; a loop's count is its static size, which includes the element-wise
scalar edge paths a vectorised row never takes, so these are upper bounds).  The machine model is
shared/gpu_audit/perf_model.py's: an H200 issues 4 warp-instructions per SM per clock (132 SMs,
1.98 GHz); a kernel takes (warp-instructions / issue rate) / efficiency, the efficiency range set by
occupancy (the audit's ranges: <= 12 resident warps per SM 0.45-0.65 forward, 0.40-0.60 backward;
the N = 128 forward has ~48 warps per SM: 0.60-0.75).  Memory traffic that the scan does not hide
(the dB / dC partials, the carries between chunks) is added at 4 TB/s.  The mamba_ssm 2.3.2 anchor (3.6-4.7 ms at N = 16) comes
from the same model (shared/gpu_audit/perf_model.txt).

Loop counts (instructions per iteration; per thread):
  fwd: own = the tile loop's own instructions; stage = dt / dt u staging per 4-element vector;
       bc = B / C staging per vector; compute = the step loop body (unrolled 4 steps);
       writeback = output per vector.
  bwd: chunk_own / chunk_stage = a (chunk, slice) iteration and its dt / dt u staging per vector;
       p1_own, p1_bc = pass 1 (checkpoint sweep) per sub-tile and its B staging per vector;
       p2_own, p2_bc, p2_dbdc = pass 2 per sub-tile (recompute, reverse steps, write-back of one
       vector per thread), its B / C staging per vector, its dB / dC row sums per (step, state).

usage: python bench/cuda_scan_prediction.py
"""

from __future__ import annotations

import math

SM, SCHED, CLK = 132, 4, 1.98e9
RATE = SM * SCHED * CLK  # warp-instructions per second
BATCH, DIM, L = 8, 3072, 2048
CHUNK, THREADS = 64, 128
MAMBA_SSM_N16_MS = (3.6, 4.7)
BEFORE = {12: ((0.91, 1.31), (3.82, 5.73)), 16: ((1.05, 1.52), (4.14, 6.21)), 128: ((6.82, 8.53), (33.10, 44.13))}

# sm_90 SASS loop sizes of the bf16, z instantiations (csrc at this commit).
COUNTS = {
    12: dict(fwd=dict(kT=32, own=116, stage=296, bc=92, compute=174, writeback=210),
             bwd=dict(kT=8, chunk_own=295, chunk_stage=288, p1_own=338, p1_bc=122, p2_own=2137, p2_bc=98,
                      p2_dbdc=106)),
    16: dict(fwd=dict(kT=32, own=122, stage=296, bc=90, compute=206, writeback=212),
             bwd=dict(kT=8, chunk_own=343, chunk_stage=290, p1_own=393, p1_bc=119, p2_own=2353, p2_bc=95,
                      p2_dbdc=108)),
    128: dict(fwd=dict(kT=16, own=134, stage=303, bc=91, compute=235, writeback=207),
              bwd=dict(kT=8, chunk_own=356, chunk_stage=289, p1_own=395, p1_bc=120, p2_own=2335, p2_bc=95,
                       p2_dbdc=109)),
}
EFF_FWD = {12: (0.45, 0.65), 16: (0.45, 0.65), 128: (0.60, 0.75)}
EFF_BWD = (0.40, 0.60)


def lanes_per_channel(n: int) -> int:
    """selective_scan.h scan_lanes_per_channel."""
    lanes = 2
    while lanes < 32 and n % (2 * lanes) == 0 and n // (2 * lanes) >= 6:
        lanes *= 2
    return lanes


def avg_iters(m: int) -> float:
    """Iterations of ``for (i = threadIdx.x; i < m; i += 128)``, averaged over a block's 4 warps (issue is per warp)."""
    return sum(max(0, math.ceil((m - 32 * w) / THREADS)) for w in range(THREADS // 32)) / (THREADS // 32)


def ms(warp_instr: float, eff: float) -> float:
    return warp_instr / RATE / eff * 1e3


def predict(N: int) -> dict:
    c = COUNTS[N]
    lanes = lanes_per_channel(N)
    states, chans = N // lanes, THREADS // lanes
    threads = BATCH * DIM * lanes
    f = c["fwd"]
    T = f["kT"]
    fwd_tile = (f["own"] + (f["stage"] + f["writeback"]) * avg_iters(chans * T // 4) + f["bc"] * avg_iters(N * T // 4)
                + f["compute"] * T / 4)
    fwd_step = fwd_tile / T
    b = c["bwd"]
    T = b["kT"]
    sub = CHUNK // T
    bwd_chunk = (b["chunk_own"] + b["chunk_stage"] * avg_iters(chans * CHUNK // 4)
                 + (sub - 1) * (b["p1_own"] + b["p1_bc"] * avg_iters(N * T // 4))
                 + sub * (b["p2_own"] + b["p2_bc"] * avg_iters(N * T // 4) + b["p2_dbdc"] * avg_iters(T * N)))
    bwd_step = bwd_chunk / CHUNK
    fwd_wi = threads * L * fwd_step / 32
    bwd_wi = threads * L * bwd_step / 32

    # DRAM traffic the scan does not hide: the dB / dC partials (bindings.cpp's slot bound) are
    # stored once and read once by the caller's sum; the read-add-writes of a slot's later slices
    # stay within the current chunk's 64 x N window (<= 64 KiB per block), assumed to hit L2; each
    # slice's gradient carry and dA sums (batch, dim, N) are written and read back once per chunk.
    n_slices = -(-DIM // chans)
    inputs = 4 * BATCH * DIM * L * 2 + BATCH * DIM * (L // CHUNK) * N * 4 + 2 * BATCH * N * L * 2 + DIM * N * 4
    slot_bytes = 2 * BATCH * L * N * 4
    n_slots = min(n_slices, max(1, inputs // slot_bytes))
    per_slot = -(-n_slices // n_slots)
    traffic = 2 * n_slots * slot_bytes + (L // CHUNK) * BATCH * DIM * N * 4 * 2 * 2
    extra = traffic / 4.0e12 * 1e3

    ef = EFF_FWD[N]
    fwd = (ms(fwd_wi, ef[1]), ms(fwd_wi, ef[0]))
    bwd = (ms(bwd_wi, EFF_BWD[1]) + extra, ms(bwd_wi, EFF_BWD[0]) + extra)
    return dict(lanes=lanes, states=states, fwd_step=fwd_step, bwd_step=bwd_step, fwd_wi=fwd_wi, bwd_wi=bwd_wi,
                fwd=fwd, bwd=bwd, total=(fwd[0] + bwd[0], fwd[1] + bwd[1]), n_slots=n_slots,
                slices_per_slot=per_slot, partial_ms=extra)


def mid(r):
    return (r[0] + r[1]) / 2


def main() -> None:
    print("PREDICTION (static SASS counts + issue-rate model; not measured). (8, 3072, 2048) bf16 with z, H200.")
    res = {}
    for N in COUNTS:
        p = res[N] = predict(N)
        bf, bb = BEFORE[N]
        print(f"N={N:3d} {p['lanes']:2d} lanes x {p['states']} states | instr per element-state: "
              f"fwd {p['fwd_step'] / p['states']:5.1f}, bwd {p['bwd_step'] / p['states']:5.1f} | "
              f"fwd {p['fwd'][0]:5.2f}-{p['fwd'][1]:5.2f} ms (before {bf[0]}-{bf[1]}), "
              f"bwd {p['bwd'][0]:5.2f}-{p['bwd'][1]:5.2f} ms (before {bb[0]}-{bb[1]}; memory "
              f"{p['partial_ms']:.2f} ms, {p['n_slots']} slots x {p['slices_per_slot']} slices), "
              f"fwd+bwd {p['total'][0]:5.2f}-{p['total'][1]:5.2f} ms")
    print(f"PREDICTION N=16 fwd+bwd / mamba_ssm 2.3.2 = {mid(res[16]['total']) / mid(MAMBA_SSM_N16_MS):.2f}x "
          f"(mid-points; target <= 1.0x)")
    print(f"PREDICTION N=128 / N=12 = {mid(res[128]['total']) / mid(res[12]['total']):.2f}x (mid-points; target >= 8x)")


if __name__ == "__main__":
    main()
