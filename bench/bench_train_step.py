"""Training-step benchmark: tokens/s and peak memory at N=128, after a cut to ~12, and at a fixed N=16.

    python bench/bench_train_step.py            # CPU preset (a small Mamba), rows to bench/results/train_step.csv
    python bench/bench_train_step.py --preset gpu   # d_model 768, 24 layers, L 2048
    python bench/bench_train_step.py --preset compass --backends cuda,triton,torch,transformers --in-process --no-collector

Configurations, the same model otherwise: ``N=128``; ``cut->12`` (built at 128, cut to 12 by
``compress_`` with the ``rank`` mode, as the callback does mid-run); ``N=16`` (built small) — each
with the Gramian collector off and on (its overhead), for each available scan backend.  Backend
``transformers`` is transformers' own MambaMixer path (its torch fallback, or mamba_ssm's kernels where
transformers binds them: see compat.hf_bound_kernels), the model left as transformers builds it.  Each
configuration runs in a fresh subprocess so that its peak memory (CUDA: max allocated; CPU: the
process's peak RSS) is its own; ``--in-process`` (CUDA only: the allocator's peak is reset between
configurations) saves the start-up of each.  Decode tokens/s (generate at N=128 vs the cut model) is
measured with the first backend.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import csv_sink, environment, print_table, time_ms  # noqa: E402

PRESETS = {
    "cpu": dict(hidden=32, layers=2, seq_len=256, batch=4, steps=3, decode_tokens=32),
    "gpu": dict(hidden=768, layers=24, seq_len=2048, batch=4, steps=5, decode_tokens=128),
    # The compass: a 2-layer d_model-768 Mamba, the state size the only difference.
    "compass": dict(hidden=768, layers=2, seq_len=2048, batch=8, steps=3, decode_tokens=64),
}
# A scan backend of ops.selective_scan, or transformers' own mixer path.
BACKENDS = ("cuda", "triton", "torch", "transformers")


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM"))
    return int(hwm.split()[1]) / 1024


def single(args) -> dict:
    """One configuration, in this process."""
    from compressm_mamba import CompressConfig, compress_, replace_mixers_
    from compressm_mamba.cut.collect import GramianCollector
    from compressm_mamba.models.registry import find_mixers

    p = PRESETS[args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    N = 16 if args.config == "N=16" else 128
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = _sized(p, N).to(device)
    if args.backend != "transformers":
        replace_mixers_(model, backend=args.backend)
    ids = torch.randint(0, 256, (p["batch"], p["seq_len"]), device=device)
    if args.config == "cut->12":
        compress_(model, CompressConfig(mode="rank", rank=12, estimator="mean_lti"), [ids[:1]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    collector = GramianCollector(find_mixers(model), "mean_lti") if args.collector else None

    def step():
        if collector is not None:
            collector.start()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if collector is not None:
            collector.stop()

    model.train()
    ms = time_ms(step, device, warmup=1, reps=p["steps"])
    result = dict(config=args.config, backend=args.backend, collector="on" if args.collector else "off",
                  N="/".join(str(a.state_size) for a in find_mixers(model)[:1]),
                  step_ms=round(ms, 1), tokens_per_s=round(p["batch"] * p["seq_len"] / (ms * 1e-3)),
                  peak_mb=round(peak_memory_mb(device), 1))
    if args.decode:
        model.eval()
        prompt = ids[:1, :16]
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=p["decode_tokens"], do_sample=False)
        result["decode_tokens_per_s"] = round(p["decode_tokens"] / (time.perf_counter() - t0), 1)
    return result


def _sized(p, N):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(hidden_size=p["hidden"], num_hidden_layers=p["layers"], state_size=N,
                                        vocab_size=256))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--backends", default=None, help="default: torch on CPU, triton,torch on CUDA")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="N=128", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--collector", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true", help="CUDA: every configuration in this process")
    parser.add_argument("--no-collector", action="store_true", help="leave out the collector-on configurations")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    if args.single:
        print(json.dumps(single(args)))
        return
    backends = (args.backends or ("triton,torch" if device.type == "cuda" else "torch")).split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"--backends: unknown {unknown}; choose from {BACKENDS}")
    if args.in_process and device.type != "cuda":
        raise SystemExit("--in-process needs CUDA (peak memory on a CPU is the process's: one process per configuration)")
    env = environment(device)
    print(f"device: {env['device']}  git {env['git']}  preset {args.preset}")
    sink = csv_sink("train_step.csv", {**env, "preset": args.preset}, enabled=not args.no_csv)
    rows = []
    for backend in list(backends):
        if backend in ("cuda", "triton"):
            from compressm_mamba import ops

            try:
                ops.resolve_backend(backend, device, 128)
            except (RuntimeError, ValueError) as err:
                print(f"skip {backend}: {err}")
                backends.remove(backend)
                continue
        for config in ("N=128", "cut->12", "N=16"):
            for collector in (False,) if args.no_collector else (False, True):
                decode = not collector and config != "N=16" and backend == backends[0]
                if args.in_process:
                    one = argparse.Namespace(preset=args.preset, config=config, backend=backend,
                                             collector=collector, decode=decode)
                    rows.append({"decode_tokens_per_s": "", **single(one)})
                else:
                    cmd = [sys.executable, os.path.abspath(__file__), "--single", "--preset", args.preset,
                           "--config", config, "--backend", backend]
                    cmd += ["--collector"] if collector else []
                    cmd += ["--decode"] if decode else []
                    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if out.returncode != 0:
                        raise SystemExit(f"{config} {backend}: failed\n{out.stderr[-2000:]}")
                    rows.append({"decode_tokens_per_s": "", **json.loads(out.stdout.strip().splitlines()[-1])})
                sink(rows[-1])
                print(rows[-1], flush=True)
    print_table(rows, ["config", "backend", "collector", "N", "step_ms", "tokens_per_s", "peak_mb",
                       "decode_tokens_per_s"])
    by = {(r["config"], r["backend"], r["collector"]): r for r in rows}
    for backend in backends:
        full, cut = by[("N=128", backend, "off")], by[("cut->12", backend, "off")]
        line = f"{backend}: training tokens/s after the cut / at N=128: {cut['tokens_per_s'] / full['tokens_per_s']:.1f}x"
        if ("N=128", backend, "on") in by:
            line += f"; collector overhead at N=128: {by[('N=128', backend, 'on')]['step_ms'] / full['step_ms'] - 1:+.0%}"
        if full["decode_tokens_per_s"] != "":
            line += f"; decode: {cut['decode_tokens_per_s'] / full['decode_tokens_per_s']:.1f}x"
        print(line)
    if not args.no_csv:
        print(f"appended {len(rows)} rows to bench/results/train_step.csv")


if __name__ == "__main__":
    main()
