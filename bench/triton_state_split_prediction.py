"""PREDICTION (no GPU ran), bench/static/perf_model.predict (issue rate scaled by resident warps per scheduler, partial
waves idle): Triton backward at (batch 8, dim 3072, L 2048) bf16, H200, before / after state splits.
Counts: SASS instructions per warp of the loop bodies (sm_90, Triton 3.7.1 through a stand-in driver as in
bench/static/triton_aot.py, nvdisasm), per state per 64 ch x 8 step tile | the rest per tile; KS warps each
run the per-tile part.  Run: PYTHONPATH=. python bench/triton_state_split_prediction.py
Rows: bench/results/triton_scan_static_prediction.txt (state-split section)."""
import sys, os
sys.path.insert(0, os.getcwd())
from bench.static.perf_model import KernelWork, predict
B_, dim, L = 8, 3072, 2048
tiles64 = B_ * dim * L / 512        # 64-channel x 8-step tiles
def bwd(N, ks, full, rewalk, local, progs, regs_full=255, smem=32):
    tpc = max(8, 1 << (max(1, -(-N // 2)) - 1).bit_length()) // 8
    rw = (tpc - 1) / tpc
    Wf = tiles64 * ks * ((N / ks) * full[0] + full[1] + rw * ((N / ks) * rewalk[0] + rewalk[1]))
    Wl = tiles64 * ks * ((N / ks) * local[0] + local[1])
    pf = predict(KernelWork("triton", "bwd", "bwd", progs, 32 * ks, Wf, 0, regs_full, smem))
    pl = predict(KernelWork("triton", "bwd local", "bwd", progs, 32 * ks, Wl, 0, 121, 0))
    return pf, pl, (pf.ms[0] + pl.ms[0], pf.ms[1] + pl.ms[1])
rows = [
    ("N=12  KS=1 (unchanged)", 12, 1, (606, 2036), (0, 0), (152, 1138), 8 * 48 * 11, 32),
    ("N=128 KS=1 (before)   ", 128, 1, (617, 2022), (150, 854), (152, 1118), 8 * 24 * 4, 32),
    ("N=128 KS=4 (after)    ", 128, 4, (632, 2147), (143, 851), (143, 1107), 8 * 24 * 4, 8192),
]
tiles32 = B_ * dim * L / 256
def fwd(N):
    progs = 8 * 96 * 6
    Wf = tiles32 * (N * 101 + 623); Wl = tiles32 * (N * 66 + 441)
    a = predict(KernelWork("triton", "fwd", "fwd", progs, 32, Wf, 0, 72, 0)); b = predict(KernelWork("triton", "fwd local", "fwd", progs, 32, Wl, 0, 56, 0))
    return (a.ms[0] + b.ms[0], a.ms[1] + b.ms[1])
tot = {}
for lab, N, ks, full, rewalk, local, progs, smem in rows:
    pf, pl, ms = bwd(N, ks, full, rewalk, local, progs, smem=smem)
    print(f"PREDICTION bwd {lab}: {progs} programs x {ks} warps, {pf.blocks_per_sm} blocks/SM, "
          f"{pf.warps_per_scheduler:.2f} warps/scheduler: {ms[0]:6.2f}-{ms[1]:6.2f} ms (full {pf.ms[0]:.2f}-{pf.ms[1]:.2f}, local {pl.ms[0]:.2f}-{pl.ms[1]:.2f})")
    f = fwd(N); tot[lab] = (f[0] + ms[0] + f[1] + ms[1]) / 2
    print(f"PREDICTION fwd N={N} (unchanged, KS=1): {f[0]:.2f}-{f[1]:.2f} ms; fwd+bwd {f[0]+ms[0]:.2f}-{f[1]+ms[1]:.2f} ms")
k = list(tot)
print(f"PREDICTION N=128/N=12 fwd+bwd (mid-points): before {tot[k[1]]/tot[k[0]]:.1f}x, after {tot[k[2]]/tot[k[0]]:.1f}x")
