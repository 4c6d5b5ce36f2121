"""Selective-scan benchmark: backends side by side, N = 12 vs 16 vs 128, and a Mamba training step.

    python bench/bench_selective_scan.py                 # CPU preset (small shapes), appends CSV rows
    python bench/bench_selective_scan.py --preset gpu    # real Mamba shapes (dim 1536-5120, L 2048)
    python bench/bench_selective_scan.py --preset compass  # the issue's question: (8, 3072, 2048) bf16

Every backend is timed by default; one that is not available here is reported and left out.

Section ``op``: ops.selective_scan per backend, forward and forward+backward, correctness-gated
against the float64 reference on a slice of the same inputs.  Ratios printed are measured in this
run.  Section ``mixer`` (CPU): a small HF MambaForCausalLM training step, transformers' own PyTorch
fallback vs the same weights after ``replace_mixers_`` (ops backend ``torch``), loss-gated.
Rows go to bench/results/selective_scan.csv.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth_gbs, csv_sink, environment, gate, print_table, time_ms  # noqa: E402

from compressm_mamba import ops  # noqa: E402
from compressm_mamba.reference import selective_scan as reference_scan  # noqa: E402

PRESETS = {
    # (batch, dim, seqlen)
    "cpu": {"shapes": [(2, 128, 256), (4, 256, 256)], "states": [12, 16, 128], "dtype": "float32"},
    "gpu": {"shapes": [(4, 1536, 2048), (2, 5120, 2048)], "states": [12, 16, 128], "dtype": "bfloat16"},
    # What does N=128 cost against N=12 (and N=16, mamba_ssm's size) at a real layer's shape?
    "compass": {"shapes": [(8, 3072, 2048)], "states": [12, 16, 128], "dtype": "bfloat16"},
}


def make_inputs(batch, dim, L, N, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        u=rnd(batch, dim, L).to(device, dtype),
        delta=(rnd(batch, dim, L) * 0.5 - 1).to(device, dtype),
        A=(-torch.exp(rnd(dim, N) * 0.5)).to(device),
        B=rnd(batch, N, L).to(device, dtype),
        C=rnd(batch, N, L).to(device, dtype),
        D=rnd(dim).to(device),
        z=rnd(batch, dim, L).to(device, dtype),
        delta_bias=(rnd(dim) * 0.1).to(device),
    )


def slice_inputs(x, channels=4, length=128):
    """The first batch element, a few channels, a prefix: small enough for the float64 reference."""
    out = {}
    for k, v in x.items():
        if k in ("u", "delta", "z"):
            out[k] = v[:1, :channels, :length]
        elif k in ("B", "C"):
            out[k] = v[:1, :, :length]
        elif k == "A":
            out[k] = v[:channels]
        else:
            out[k] = v[:channels]
    return out


def bench_op(preset, device, backends, reps, sink=lambda row: None):
    dtype = getattr(torch, preset["dtype"])
    peak = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    rows = []
    for batch, dim, L in preset["shapes"]:
        for N in preset["states"]:
            x = make_inputs(batch, dim, L, N, dtype, device)
            small = slice_inputs(x)
            expected = reference_scan(**{k: v.double().cpu() for k, v in small.items()}, delta_softplus=True)
            for backend in backends:
                if backend == "reference" and batch * dim * L > 2e5:
                    continue  # a Python loop over time: only at the smallest shape
                try:
                    got = ops.selective_scan(**small, delta_softplus=True, backend=backend)
                except (RuntimeError, ValueError) as err:
                    print(f"skip {backend}: {err}")
                    continue
                err = gate(f"{backend} N={N}", got.float().cpu(), expected, 2e-2 if dtype != torch.float32 else 1e-4)
                leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in x.items()}

                def fwd():
                    with torch.no_grad():
                        ops.selective_scan(**x, delta_softplus=True, backend=backend)

                def fwd_bwd():
                    out = ops.selective_scan(**leaves, delta_softplus=True, backend=backend)
                    out.float().sum().backward()

                fwd_ms = time_ms(fwd, device, reps=reps)
                fb_ms = time_ms(fwd_bwd, device, warmup=1, reps=max(1, reps // 2))
                elt = torch.finfo(dtype).bits // 8
                moved = (4 * batch * dim * L + 2 * batch * N * L) * elt  # u, delta, z, out; B, C
                gbs = moved / (fwd_ms * 1e-3) / 1e9
                rows.append(dict(
                    section="op", backend=backend, batch=batch, dim=dim, seqlen=L, N=N, dtype=preset["dtype"],
                    fwd_ms=round(fwd_ms, 3), fwd_bwd_ms=round(fb_ms, 3),
                    tokens_per_s=round(batch * L / (fwd_ms * 1e-3)), gbs=round(gbs, 2),
                    pct_peak="" if peak is None else round(100 * gbs / peak, 1), max_rel_err=f"{err:.1e}", note="",
                ))
                sink(rows[-1])
    return rows


def bench_mixer(device, reps, hidden=64, N=16, L=256, batch=8, layers=2):
    """One optimizer-free training step (forward + backward) of a small MambaForCausalLM."""
    from transformers import MambaConfig, MambaForCausalLM

    from compressm_mamba import replace_mixers_

    torch.manual_seed(0)
    hf = MambaForCausalLM(MambaConfig(hidden_size=hidden, state_size=N, num_hidden_layers=layers,
                                      vocab_size=256)).to(device).train()
    ours = copy.deepcopy(hf)
    replace_mixers_(ours, backend="torch")
    ids = torch.randint(0, 256, (batch, L), device=device)

    def step(model):
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    gate("mixer loss", step(ours).reshape(1), step(hf).reshape(1), 1e-4)
    rows, times = [], {}
    for label, model in (("transformers-fallback", hf), ("ours-torch", ours)):
        times[label] = time_ms(lambda m=model: step(m), device, warmup=1, reps=reps)
        rows.append(dict(
            section="mixer-train-step", backend=label, batch=batch, dim=2 * hidden, seqlen=L, N=N, dtype="float32",
            fwd_ms="", fwd_bwd_ms=round(times[label], 2), tokens_per_s=round(batch * L / (times[label] * 1e-3)),
            gbs="", pct_peak="", max_rel_err="", note=f"{layers} layers, hidden {hidden}",
        ))
    ratio = times["transformers-fallback"] / times["ours-torch"]
    rows[-1]["note"] += f"; {ratio:.1f}x faster than transformers' fallback (same run)"
    return rows, ratio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA, else cpu")
    parser.add_argument("--backends", default="reference,torch,triton,cuda")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    backends = [b for b in args.backends.split(",") if b]
    if device.type == "cpu" and "triton" in backends and os.environ.get("TRITON_INTERPRET") != "1":
        backends.remove("triton")  # Triton needs a GPU (the interpreter is for tests, ~1000x slower)

    env = environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  git {env['git']}")
    sink = csv_sink("selective_scan.csv", env, enabled=not args.no_csv)
    rows = bench_op(preset, device, backends, args.reps, sink)
    if device.type == "cpu":
        mixer_rows, ratios = [], []
        for hidden, N, L in ((32, 16, 256), (64, 16, 512)):
            more, ratio = bench_mixer(device, reps=max(2, args.reps // 2), hidden=hidden, N=N, L=L)
            mixer_rows += more
            ratios.append(f"hidden {hidden}, N={N}, L={L}: {ratio:.1f}x")
        rows += mixer_rows
        for row in mixer_rows:
            sink(row)
    columns = ["section", "backend", "batch", "dim", "seqlen", "N", "dtype", "fwd_ms", "fwd_bwd_ms",
               "tokens_per_s", "gbs", "pct_peak", "max_rel_err"]
    print_table(rows, columns)
    for backend in {r["backend"] for r in rows if r["section"] == "op"}:
        by_n = {(r["batch"], r["dim"], r["seqlen"], r["N"]): r for r in rows
                if r["section"] == "op" and r["backend"] == backend}
        for (b, d, L, n), r in sorted(by_n.items()):
            if n == 12 and (b, d, L, 128) in by_n:
                big = by_n[(b, d, L, 128)]
                print(f"{backend} {b}x{d}x{L}: N=128 / N=12 time: fwd {big['fwd_ms'] / r['fwd_ms']:.1f}x, "
                      f"fwd+bwd {big['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x")
    if device.type == "cpu":
        print("training step, ours (torch backend) vs transformers' fallback: " + "; ".join(ratios))
    if not args.no_csv:
        print(f"appended {len(rows)} rows to bench/results/selective_scan.csv")


if __name__ == "__main__":
    main()
