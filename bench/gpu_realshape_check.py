"""Real-shape forward+backward checks of the kernels in fp32 / fp16 / bf16 against the float64 reference.

    python bench/gpu_realshape_check.py                 # CUDA: (8, 3072, 2048), every available backend
    python bench/gpu_realshape_check.py --tiny          # any device: tiny shapes (bench/gpu_check.sh's dry run)

Not a benchmark and not a unit test: the unit tests check the kernels at small odd shapes; this runs
them once at the shape of a real Mamba layer (grids, int64 offsets, long sequences, bf16 — which the
Triton interpreter gets wrong, so it has never been checked without a GPU).

How a full-shape run is compared with a float64 reference that cannot hold the full shape: the scan's
channels are independent, so the reference runs on a few channels spread over ``dim`` (first, last,
a few between), and the upstream gradient is zero on every other channel.  Then the kernel's
gradients of B and C (sums over channels) hold exactly those channels' contributions, and every
gradient is comparable.  Gramian sums (no backward) are per channel too.

Inputs are rounded to the dtype first; the reference sees the same rounded values in float64.  Errors
are max |kernel - reference| / max |reference| per tensor, against tolerances declared per dtype.
Rows go to the CSV given by --csv (bench/gpu_check.sh packs it into $OUT); exit status 1 if any fails.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment  # noqa: E402

from compressm_mamba import ops  # noqa: E402
from compressm_mamba.reference import gramian_statistics  # noqa: E402
from compressm_mamba.reference import selective_scan as reference_scan  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Declared, not tuned: (forward, gradients) max error relative to the reference's max magnitude.
# fp32 kernels accumulate in fp32 over L=2048 steps; half inputs and outputs round at 2^-11 / 2^-8.
TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (5e-3, 1e-2), "bf16": (3e-2, 5e-2)}
GRAMIAN_TOLERANCE = 1e-3  # sums accumulate in fp32 whatever the input dtype; inputs rounded first
BACKENDS = ("torch", "triton", "cuda")
FULL = dict(batch=8, dim=3072, seqlen=2048, states=(12, 128), checked_channels=8)
TINY = dict(batch=2, dim=8, seqlen=33, states=(12,), checked_channels=3)


def checked_channels(dim: int, count: int) -> torch.Tensor:
    """``count`` channels spread over [0, dim), always including the first and the last."""
    return torch.linspace(0, dim - 1, count).round().long().unique()


def scan_inputs(batch, dim, L, N, dtype, device, seed=0):
    """Inputs as a real Mamba layer feeds them (delta before softplus, D/z/bias present), rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = dict(
        u=rnd(batch, dim, L), delta=rnd(batch, dim, L) * 0.5 - 1, A=-torch.exp(rnd(dim, N) * 0.5),
        B=rnd(batch, N, L), C=rnd(batch, N, L), D=rnd(dim), z=rnd(batch, dim, L), delta_bias=rnd(dim) * 0.1,
    )
    # u, delta, B, C, z in the dtype (the activations); A, D, bias stay fp32 (parameters), as in Mamba.
    return {k: v.to(device, dtype if v.dim() == 3 else torch.float32) for k, v in x.items()}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def usable(backend: str, device: torch.device, N: int, dtype_name: str) -> str | None:
    """None when ``backend`` runs here, else why not."""
    try:
        ops.resolve_backend(backend, device, N)
    except (RuntimeError, ValueError) as err:
        return str(err).split(":")[0]
    if backend == "triton" and device.type != "cuda" and dtype_name == "bf16":
        return "the Triton interpreter computes bf16 wrongly (docs/ENV.md)"
    return None


def check_scan(shape, N, dtype_name, device, backends):
    dtype = DTYPES[dtype_name]
    x = scan_inputs(shape["batch"], shape["dim"], shape["seqlen"], N, dtype, device)
    idx = checked_channels(shape["dim"], shape["checked_channels"]).to(device)
    g = torch.Generator().manual_seed(1)
    dout = torch.zeros(shape["batch"], shape["dim"], shape["seqlen"], dtype=dtype, device=device)
    dout[:, idx] = torch.randn(shape["batch"], len(idx), shape["seqlen"], generator=g).to(device, dtype)

    # Reference on the checked channels, float64, from the same rounded inputs.
    ref_in = {k: v.detach().double() for k, v in x.items()}
    for k in ("u", "delta", "z"):
        ref_in[k] = ref_in[k][:, idx]
    for k in ("A", "D", "delta_bias"):
        ref_in[k] = ref_in[k][idx]
    ref_in = {k: v.requires_grad_() for k, v in ref_in.items()}
    ref_out = reference_scan(**ref_in, delta_softplus=True)
    ref_out.backward(dout[:, idx].double())
    expected = {"out": ref_out.detach(), **{f"d{k}": v.grad for k, v in ref_in.items()}}

    rows = []
    fwd_tol, bwd_tol = TOLERANCES[dtype_name]
    for backend in backends:
        why = usable(backend, device, N, dtype_name)
        if why is not None:
            rows.append(dict(op="selective_scan", backend=backend, dtype=dtype_name, N=N, quantity="-",
                             max_rel_err="", tol="", status=f"skipped: {why}"))
            continue
        leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        try:
            out = ops.selective_scan(**leaves, delta_softplus=True, backend=backend)
            out.backward(dout)
        except Exception as err:  # a crash is a result here: record it and go on with the next backend
            rows.append(dict(op="selective_scan", backend=backend, dtype=dtype_name, N=N, quantity="-",
                             max_rel_err="", tol="", status=f"FAIL: {type(err).__name__}: {err}"[:300]))
            continue
        got = {"out": out.detach()[:, idx], "du": leaves["u"].grad[:, idx], "ddelta": leaves["delta"].grad[:, idx],
               "dz": leaves["z"].grad[:, idx], "dA": leaves["A"].grad[idx], "dD": leaves["D"].grad[idx],
               "ddelta_bias": leaves["delta_bias"].grad[idx], "dB": leaves["B"].grad, "dC": leaves["C"].grad}
        for name, value in got.items():
            tol = fwd_tol if name == "out" else bwd_tol
            err = rel_error(value, expected[name])
            rows.append(dict(op="selective_scan", backend=backend, dtype=dtype_name, N=N, quantity=name,
                             max_rel_err=f"{err:.2e}", tol=f"{tol:.0e}", status="ok" if err <= tol else "FAIL"))
    return rows


def check_gramians(shape, N, dtype_name, device, backends):
    dtype = DTYPES[dtype_name]
    x = scan_inputs(shape["batch"], shape["dim"], shape["seqlen"], N, dtype, device)
    x = {k: x[k] for k in ("delta", "A", "B", "C", "delta_bias")}
    idx = checked_channels(shape["dim"], shape["checked_channels"]).to(device)
    rows = []
    for estimator in ("frozen", "ltv"):
        ref_in = {k: v.double() for k, v in x.items()}
        ref_in["delta"], ref_in["A"], ref_in["delta_bias"] = ref_in["delta"][:, idx], ref_in["A"][idx], \
            ref_in["delta_bias"][idx]
        expected = gramian_statistics(**ref_in, estimator=estimator, delta_softplus=True).sums
        for backend in backends:
            why = usable(backend, device, N, dtype_name)
            if why is not None:
                rows.append(dict(op=f"gramian_sums/{estimator}", backend=backend, dtype=dtype_name, N=N,
                                 quantity="-", max_rel_err="", tol="", status=f"skipped: {why}"))
                continue
            try:
                sums = ops.gramian_sums(**x, estimator=estimator, delta_softplus=True, backend=backend).sums
            except Exception as err:
                rows.append(dict(op=f"gramian_sums/{estimator}", backend=backend, dtype=dtype_name, N=N,
                                 quantity="-", max_rel_err="", tol="", status=f"FAIL: {type(err).__name__}: {err}"[:300]))
                continue
            for name in ("P", "Q"):
                err = rel_error(sums[name][idx], expected[name])
                rows.append(dict(op=f"gramian_sums/{estimator}", backend=backend, dtype=dtype_name, N=N, quantity=name,
                                 max_rel_err=f"{err:.2e}", tol=f"{GRAMIAN_TOLERANCE:.0e}",
                                 status="ok" if err <= GRAMIAN_TOLERANCE else "FAIL"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (any device): the script's own check")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--csv", default=None, help="append the rows to this CSV file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if args.tiny else FULL
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("gpu_realshape_check: no CUDA device (use --tiny for the tiny-shape check)")
    backends = [b for b in args.backends.split(",") if b]
    env = environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  git {env['git']}  "
          f"shape (batch, dim, L) = ({shape['batch']}, {shape['dim']}, {shape['seqlen']})", flush=True)
    shape_cols = dict(batch=shape["batch"], dim=shape["dim"], seqlen=shape["seqlen"])
    fields = [*env, *shape_cols, "op", "backend", "dtype", "N", "quantity", "max_rel_err", "tol", "status"]
    rows = []
    for N in shape["states"]:
        for dtype_name in args.dtypes.split(","):
            for check in (check_scan, check_gramians):
                new = check(shape, N, dtype_name, device, backends)
                for r in new:
                    print(f"{r['op']:>22} {r['backend']:>6} {r['dtype']:>4} N={r['N']:<4} {r['quantity']:>12} "
                          f"err {r['max_rel_err'] or '-':>9} tol {r['tol'] or '-':>6}  {r['status']}", flush=True)
                if args.csv:  # row by row: a run cut short by its timeout keeps what it checked
                    new_file = not os.path.exists(args.csv)
                    with open(args.csv, "a", newline="") as f:
                        writer = csv.DictWriter(f, fieldnames=fields)
                        if new_file:
                            writer.writeheader()
                        writer.writerows({**env, **shape_cols, **r} for r in new)
                rows += new
    failed = [r for r in rows if r["status"].startswith("FAIL")]
    ran = [r for r in rows if r["status"] == "ok"]
    print(f"{len(ran)} checks passed, {len(failed)} failed, "
          f"{sum(r['status'].startswith('skipped') for r in rows)} backend/dtype pairs skipped")
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
