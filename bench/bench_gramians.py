"""Gramian-estimator benchmark: backends side by side, N = 12 vs 16 vs 128, Mamba1 and Mamba2 layouts.

    python bench/bench_gramians.py                 # CPU preset, appends CSV rows
    python bench/bench_gramians.py --preset gpu    # real shapes (dim 1536-5120, L 2048)
    python bench/bench_gramians.py --preset compass --relative-to-scan   # (8, 3072, 2048) bf16, vs one scan

Every backend is timed by default; one that is not available here is reported and left out.
``--relative-to-scan`` also times one forward ``ops.selective_scan`` of the same shape on the same
backend and reports each estimator's collection time as a multiple of it (column ``vs_scan_fwd``):
what collecting Gramians costs in units of the forward pass it rides on.  ``mean_lti`` (the paper's
surrogate, a Lyapunov solve of the mean system) does not depend on the backend: one row, backend ``any``.

Each row: one backend computing the token sums of one batch (``ops.gramian_sums``), correctness-gated
against the float64 reference on the first channels of the same inputs.  ``layout=mamba2`` uses A
with constant rows (one scalar per head), which the Triton backend turns into a weighted Gram
product.  Rows go to bench/results/gramians.csv.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth_gbs, csv_sink, environment, gate, print_table, time_ms  # noqa: E402

from compressm_mamba import ops  # noqa: E402
from compressm_mamba.reference import gramian_statistics  # noqa: E402
from compressm_mamba.reference.gramians import ESTIMATORS  # noqa: E402

PRESETS = {
    # (batch, channels, seqlen); channels = d_inner (mamba1) or heads (mamba2)
    "cpu": {"shapes": [(2, 32, 128)], "states": [12, 16, 128], "dtype": "float32"},
    "gpu": {"shapes": [(4, 1536, 2048), (2, 5120, 2048)], "states": [12, 16, 128], "dtype": "bfloat16"},
    "compass": {"shapes": [(8, 3072, 2048)], "states": [12, 16, 128], "dtype": "bfloat16"},
}


def make_inputs(batch, channels, L, N, layout, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = -torch.exp(torch.randn(channels, 1 if layout == "mamba2" else N, generator=g) * 0.5)
    return dict(
        delta=(torch.randn(batch, channels, L, generator=g) * 0.5 - 1).to(device, dtype),
        A=A.expand(channels, N).contiguous().to(device),
        B=torch.randn(batch, N, L, generator=g).to(device, dtype),
        C=torch.randn(batch, N, L, generator=g).to(device, dtype),
        delta_bias=(torch.randn(channels, generator=g) * 0.1).to(device),
    )


def scan_forward_ms(x, backend, device, reps) -> float | None:
    """One forward ``ops.selective_scan`` (no grad) on the Gramian inputs' shape, with u and z made up."""
    u = torch.randn_like(x["delta"])
    try:
        run = lambda: ops.selective_scan(u, x["delta"], x["A"], x["B"], x["C"], None, u, x["delta_bias"], True,  # noqa: E731
                                         backend=backend)
        with torch.no_grad():
            return time_ms(run, device, warmup=1, reps=reps)
    except (RuntimeError, ValueError) as err:
        print(f"no scan timing on {backend}: {err}")
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--backends", default="reference,torch,triton,cuda")
    parser.add_argument("--relative-to-scan", action="store_true", help="also time one forward scan per shape")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    dtype = getattr(torch, preset["dtype"])
    backends = [b for b in args.backends.split(",") if b]
    if device.type == "cpu" and "triton" in backends and os.environ.get("TRITON_INTERPRET") != "1":
        backends.remove("triton")
    env = environment(device)
    peak = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  git {env['git']}")

    sink = csv_sink("gramians.csv", env, enabled=not args.no_csv)
    rows = []
    for batch, channels, L in preset["shapes"]:
        for N in preset["states"]:
            scan_ms = {}
            for layout in ("mamba1", "mamba2"):
                x = make_inputs(batch, channels, L, N, layout, dtype, device)
                head = {k: (v[:, :4] if k == "delta" else v[:4] if k in ("A", "delta_bias") else v) for k, v in x.items()}
                for estimator in ESTIMATORS:
                    expected = gramian_statistics(**{k: v.double().cpu() for k, v in head.items()},
                                                  estimator=estimator, delta_softplus=True)
                    # mean_lti never reaches a backend: time it once
                    for backend in (backends[:1] if estimator == "mean_lti" else backends):
                        if backend == "reference" and (L > 256 or N > 16) and estimator != "mean_lti":
                            continue  # loops over tokens: the smallest shapes only
                        try:
                            got = ops.gramian_sums(**head, estimator=estimator, delta_softplus=True, backend=backend)
                        except (RuntimeError, ValueError) as err:
                            print(f"skip {backend}: {err}")
                            continue
                        err = max(gate(f"{backend} {estimator} N={N} {k}", got.sums[k].cpu(), expected.sums[k], 1e-3)
                                  for k in expected.sums)  # P, Q (mean_lti: the mean system's e, b, c)
                        ms = time_ms(lambda: ops.gramian_sums(**x, estimator=estimator, delta_softplus=True,
                                                              backend=backend), device, warmup=1, reps=args.reps)
                        elt = torch.finfo(dtype).bits // 8
                        moved = (batch * channels * L + 2 * batch * N * L) * elt + 2 * channels * N * N * 4
                        gbs = moved / (ms * 1e-3) / 1e9
                        scan_backend = backends[0] if estimator == "mean_lti" else backend
                        if args.relative_to_scan and scan_backend not in scan_ms and scan_backend != "reference":
                            scan_ms[scan_backend] = scan_forward_ms(x, scan_backend, device, args.reps)
                        scan = scan_ms.get(scan_backend)
                        rows.append(dict(
                            backend="any" if estimator == "mean_lti" else backend, estimator=estimator, layout=layout,
                            batch=batch, channels=channels, seqlen=L, N=N, dtype=preset["dtype"], ms=round(ms, 3),
                            tokens_per_s=round(batch * L / (ms * 1e-3)), gbs=round(gbs, 3),
                            pct_peak="" if peak is None else round(100 * gbs / peak, 1), max_rel_err=f"{err:.1e}",
                            scan_fwd_ms="" if scan is None else round(scan, 3),
                            vs_scan_fwd="" if scan is None else round(ms / scan, 2),
                        ))
                        sink(rows[-1])
    print_table(rows, ["backend", "estimator", "layout", "batch", "channels", "seqlen", "N", "dtype", "ms",
                       "tokens_per_s", "gbs", "pct_peak", "max_rel_err", "vs_scan_fwd"])
    by_key = {(r["backend"], r["estimator"], r["layout"], r["batch"], r["channels"], r["seqlen"], r["N"]): r
              for r in rows}
    for key, r in sorted(by_key.items()):
        if key[-1] == 12 and key[:-1] + (128,) in by_key:
            print(f"{' '.join(map(str, key[:3]))}: N=128 / N=12 time {by_key[key[:-1] + (128,)]['ms'] / r['ms']:.1f}x")
        if key[0] == "torch" and ("reference",) + key[1:] in by_key:
            print(f"{' '.join(map(str, key[1:]))}: torch backend {by_key[('reference',) + key[1:]]['ms'] / r['ms']:.1f}x "
                  "faster than the reference")
    if not args.no_csv:
        print(f"appended {len(rows)} rows to bench/results/gramians.csv")


if __name__ == "__main__":
    main()
