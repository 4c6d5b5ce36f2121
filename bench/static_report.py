"""Static kernel report: resource tables and PREDICTED times, compiled for the GPU on a CPU machine.

    python bench/static_report.py                 # everything below (Triton matrix at the CI level)
    python bench/static_report.py --level full    # the full Triton matrix (N 1..256 x dtype x options)
    python bench/static_report.py --skip-tables   # predictions only

1. Resource tables (NOT timings), rows appended with date, git sha and versions:
   bench/results/static_resources_triton.csv  every chosen Triton binary for sm_90 and sm_80:
       registers, spills, stack, shared memory, resident blocks per SM, compile errors;
   bench/results/static_resources_cuda.csv    every csrc/ kernel instantiation for sm_90 (nvcc
       -Xptxas -v) and the mamba_ssm anchor's scan kernels.
2. Predicted fwd+bwd times of the selective scan at (batch 8, dim 3072, L 2048) bf16 for N in
   {12, 16, 128}: our Triton and CUDA scans and mamba_ssm 2.3.2's CUDA scan (from its sdist,
   cached in bench/.cache/), the N=128 / N=12 ratio, the ratio to mamba_ssm at N=16, and the
   Gramian collection pass at N=128 in forward-scan units: ltv (Triton kernel) and mean_lti (the
   default estimator: its Triton kernel, what runs on a GPU, from its SASS; and the torch
   backend's ops, modelled as memory-bound).  Rows go to
   bench/results/static_predictions.csv, every one labelled PREDICTION with the model's
   assumptions, with a ``measured_ms`` column filled from any GPU rows of bench/results/*.csv at
   the same (backend, batch, dim, seqlen, N, dtype), so the model's error is read off one table.

Nothing runs on a GPU; see bench/static/perf_model.py for the model.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import append_rows, environment  # noqa: E402
from static import cuda_ptxas, perf_model, predictions, triton_aot  # noqa: E402
from static.perf_model import ModelError  # noqa: E402

SCAN_NS = (12, 16, 128)
GRAM_N = 128
CACHE = HERE / ".cache"
RESULTS = HERE / "results"


def _env():
    import torch

    env = environment(torch.device("cpu"))
    return {"date": env["date"], "git": env["git"], "torch": env["torch"], "triton": env["triton"],
            "compiled_on": env["device"]}


def triton_table(level: str, workers: int, env: dict) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="static_triton_") as work:
        for arch in (90, 80):
            start = time.perf_counter()
            res = triton_aot.run_level(arch, level, workers, work)
            print(f"triton sm_{arch} ({level}): {len(res['rows'])} binaries in {time.perf_counter() - start:.0f} s")
            rows += [{"kind": "resources (not a timing)", **env, "level": level, **r} for r in res["rows"]]
    return rows


def cuda_table(workers: int, fast: bool, env: dict, with_mamba: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="static_cuda_") as work:
        start = time.perf_counter()
        jobs = cuda_ptxas.project_sources(Path(work), 90, fast=fast)
        if with_mamba:
            jobs += cuda_ptxas.mamba_ssm_sources(CACHE, Path(work), 90)
        results = cuda_ptxas.run_jobs(jobs, workers)
        print(f"nvcc sm_90: {len(jobs)} sources in {time.perf_counter() - start:.0f} s")
        for r in cuda_ptxas.resource_rows(results):
            r.pop("mangled", None)
            rows.append({"kind": "resources (not a timing)", **env, "instantiations": "fast" if fast else "all", **r})
    return rows


def _mid(p):
    return (p.ms[0] + p.ms[1]) / 2


def _pred_row(env, backend, section, N, shape, preds, note=""):
    lo = sum(p.ms[0] for p in preds)
    hi = sum(p.ms[1] for p in preds)
    return {"kind": "PREDICTION", "prediction": True, **env, "backend": backend, "section": section,
            "batch": shape["batch"], "dim": shape["dim"], "seqlen": shape["L"], "N": N, "dtype": shape["dtype"],
            "kernels": " + ".join(p.work.kernel for p in preds),
            "warp_instr_G": round(sum(p.work.warp_instr for p in preds) / 1e9, 3),
            "bytes_GB": round(sum(p.work.bytes for p in preds) / 1e9, 3),
            "blocks_per_sm": "/".join(str(p.blocks_per_sm) for p in preds),
            "pred_ms_lo": round(lo, 3), "pred_ms_hi": round(hi, 3), "pred_ms": round((lo + hi) / 2, 3),
            "measured_ms": "", "measured_device": "", "measured_over_pred": "", "note": note,
            "assumptions": perf_model.ASSUMPTIONS}


def prediction_rows(env: dict, workers: int, with_mamba: bool, work_dir: str | None = None) -> list[dict]:
    shape = predictions.REFERENCE
    b, d, L, dt = shape["batch"], shape["dim"], shape["L"], shape["dtype"]
    rows = []

    def add(backend, N, works, note=""):
        preds = [perf_model.predict(w) for w in works]
        for direction in ("fwd", "bwd"):
            part = [p for p in preds if p.work.direction == direction]
            if part:
                rows.append(_pred_row(env, backend, f"scan {direction}", N, shape, part))
        rows.append(_pred_row(env, backend, "scan fwd+bwd", N, shape, preds, note))

    for N in SCAN_NS:
        try:
            add("triton", N, predictions.triton_scan_work(N, b, d, L, dt))
        except ModelError as e:
            print(f"triton N={N}: no prediction: {e}")
    with tempfile.TemporaryDirectory(prefix="static_pred_") as tmp:
        work = work_dir or tmp
        reuse = work_dir is not None
        try:
            results = predictions.compile_our_cuda(work, dt, workers=workers, reuse=reuse)
            functions = predictions._cuda_functions(results, work)
            ptxas_rows = cuda_ptxas.resource_rows(results)
            for N in SCAN_NS:
                add("cuda", N, predictions.our_cuda_work(functions, ptxas_rows, N, b, d, L, dt))
        except (ModelError, StopIteration, FileNotFoundError) as e:
            print(f"cuda: no prediction: {e}")
        if with_mamba:
            try:
                results = predictions.compile_mamba_ssm(CACHE, work, workers=workers, reuse=reuse)
                functions = predictions._cuda_functions(results, work)
                ptxas_rows = cuda_ptxas.resource_rows(results)
                add("mamba_ssm", 16, predictions.mamba_ssm_work(functions, ptxas_rows, CACHE, 16, b, d, L, dt),
                    note="mamba_ssm 2.3.2.post1 sdist, its flags (--use_fast_math), 128 threads x 16 items")
            except (ModelError, StopIteration, FileNotFoundError, OSError) as e:
                print(f"mamba_ssm: no prediction: {e}")
    try:
        preds = [perf_model.predict(w) for w in predictions.triton_gram_work(GRAM_N, b, d, L, dt)]
        rows.append(_pred_row(env, "triton", "gramian ltv (collection pass)", GRAM_N, shape, preds,
                              note="general A (Mamba1), no mask; P and Q sums"))
    except ModelError as e:
        print(f"triton gramians: no prediction: {e}")
    try:
        preds = [perf_model.predict(w) for w in predictions.triton_mean_lti_work(GRAM_N, b, d, L, dt)]
        rows.append(_pred_row(env, "triton", "gramian mean_lti (collection pass)", GRAM_N, shape, preds,
                              note="kernels/mean_lti_sums.py, what ops.gramian_sums runs on a GPU; general A "
                              "(Mamba1), no mask, delta after bias/softplus as the collector passes it"))
    except ModelError as e:
        print(f"triton mean_lti: no prediction: {e}")
    preds = [perf_model.predict(w) for w in predictions.mean_lti_torch_work(GRAM_N, b, d, L, dt)]
    rows.append(_pred_row(env, "torch", "gramian mean_lti (collection pass)", GRAM_N, shape, preds,
                          note="analytic: torch ops of torch_backend.gramians.mean_lti_sums, memory-bound; "
                          "the (batch, dim, N, L) system made one time chunk at a time"))
    return rows


def join_measured(rows: list[dict], results_dir: Path = RESULTS) -> None:
    """Fill measured_ms from GPU rows of ``results_dir``/*.csv (bench/gpu_check.sh's benchmarks:
    columns backend, batch, dim, seqlen, N, dtype, device and fwd_ms / fwd_bwd_ms) with the same
    shape, backend, N and dtype; the latest such row wins."""
    measured = {}
    for path in sorted(glob.glob(str(Path(results_dir) / "*.csv"))):
        if Path(path).name.startswith("static_"):
            continue
        with open(path) as f:
            for r in csv.DictReader(f):
                device = r.get("device", "")
                if not device or "thread" in device or "cpu" in device.lower():
                    continue  # CPU rows: not comparable
                try:
                    key = (r["backend"], int(r["batch"]), int(r["dim"]), int(r["seqlen"]), int(r["N"]), r["dtype"])
                except (KeyError, ValueError):
                    continue
                for section, column in (("scan fwd+bwd", "fwd_bwd_ms"), ("scan fwd", "fwd_ms")):
                    if r.get(column):
                        measured[(section, *key)] = (float(r[column]), device)
    for row in rows:
        key = (row["section"], row["backend"], row["batch"], row["dim"], row["seqlen"], row["N"], row["dtype"])
        if key in measured:
            ms, device = measured[key]
            row.update(measured_ms=ms, measured_device=device, measured_over_pred=round(ms / row["pred_ms"], 2))


def print_predictions(rows: list[dict]) -> None:
    print("\nPREDICTION (no GPU ran): fwd+bwd at (batch 8, dim 3072, L 2048) bf16, H200 issue-rate model")
    print(f"{'backend':10s} {'section':32s} {'N':>4s} {'pred ms (range)':>20s} {'measured':>9s}")
    for r in rows:
        meas = f"{r['measured_ms']:.2f}" if r["measured_ms"] != "" else "-"
        print(f"{r['backend']:10s} {r['section']:32s} {r['N']:4d} {r['pred_ms']:8.2f} ({r['pred_ms_lo']:.2f}-"
              f"{r['pred_ms_hi']:.2f}) {meas:>9s}")
    get = {(r["backend"], r["section"], r["N"]): r["pred_ms"] for r in rows}
    print()
    for be in ("triton", "cuda"):
        a, b12 = get.get((be, "scan fwd+bwd", 128)), get.get((be, "scan fwd+bwd", 12))
        if a and b12:
            print(f"PREDICTION {be}: N=128 / N=12 fwd+bwd = {a / b12:.2f}x (target >= 8x)")
        x, m = get.get((be, "scan fwd+bwd", 16)), get.get(("mamba_ssm", "scan fwd+bwd", 16))
        if x and m:
            target = "1.0" if be == "cuda" else "1.25"
            print(f"PREDICTION {be}: N=16 fwd+bwd / mamba_ssm = {x / m:.2f}x (target <= {target}x)")
    for gram in (("triton", "gramian ltv (collection pass)"), ("torch", "gramian mean_lti (collection pass)")):
        for be in ("triton", "cuda"):
            g, f = get.get((*gram, GRAM_N)), get.get((be, "scan fwd", GRAM_N))
            if g and f:
                print(f"PREDICTION {gram[1]} at N={GRAM_N} = {g / f:.1f} {be} forward scans (target <= 2)")
    # The mean_lti pass as it runs on a GPU (kernels/mean_lti_sums.py); the torch line above is the CPU path.
    g = get.get(("triton", "gramian mean_lti (collection pass)", GRAM_N))
    for be in ("triton", "cuda"):
        f = get.get((be, "scan fwd", GRAM_N))
        if g and f:
            print(f"PREDICTION gramian mean_lti (Triton kernel) at N={GRAM_N} = {g / f:.2f} {be} forward scans "
                  "(target <= 2)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level", choices=("ci", "full"), default="ci", help="Triton configuration matrix")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--fast-cuda", action="store_true", help="reduced CUDA instantiation list (as CI)")
    parser.add_argument("--skip-tables", action="store_true", help="predictions only")
    parser.add_argument("--skip-predictions", action="store_true", help="resource tables only")
    parser.add_argument("--no-mamba-ssm", action="store_true", help="leave out the mamba_ssm anchor")
    parser.add_argument("--no-save", action="store_true", help="print, do not append rows")
    parser.add_argument("--work-dir", help="keep the predictions' nvcc objects here and reuse them on the next run "
                        "(sources must be unchanged)")
    args = parser.parse_args(argv)
    env = _env()
    with_mamba = not args.no_mamba_ssm
    if not args.skip_tables:
        tri = triton_table(args.level, args.workers, env)
        cu = cuda_table(args.workers, args.fast_cuda, env, with_mamba)
        if not args.no_save:
            print("wrote", append_rows("static_resources_triton.csv", tri))
            print("wrote", append_rows("static_resources_cuda.csv", cu))
    if not args.skip_predictions:
        if args.work_dir:
            os.makedirs(args.work_dir, exist_ok=True)
        rows = prediction_rows(env, args.workers, with_mamba, args.work_dir)
        join_measured(rows)
        print_predictions(rows)
        if not args.no_save:
            print("wrote", append_rows("static_predictions.csv", rows))


if __name__ == "__main__":
    main()
