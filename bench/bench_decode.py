"""Decode benchmark: tokens/s of cached generation, the drop-in mixer against transformers' own path.

    python bench/bench_decode.py                 # CPU preset, rows appended to bench/results/decode.csv
    python bench/bench_decode.py --preset gpu    # d_model 768, 24 layers (a mamba-130m-sized model)

Same weights, same prompt, same greedy tokens, measured side by side in one run (repetitions of
the two paths interleaved, median of each):

- ``model`` rows: a prefill with ``use_cache=True``, then ``--tokens`` one-token forwards with the
  cache (greedy), timed from the first decode step to the last.  ``transformers`` is the model as
  transformers builds it (its per-token torch step, or mamba_ssm/causal_conv1d kernels where it
  finds them); ``drop-in`` is the same model after ``replace_mixers_`` (conv step + our
  ``ops.selective_state_update``: its torch backend on a CPU, the Triton kernel on a GPU).
  Configurations: built at N=16, built at N=128, and the N=128 model cut to 12 by ``compress_``.
  A correctness gate refuses to time a pair whose greedy tokens differ.
- ``op`` rows: one layer's state update alone at the model's shapes — transformers'
  ``mamba_selective_state_update`` against ours (each available backend), microseconds per call:
  the launch/dispatch overhead that dominates a decode step at small batch.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_rows, environment, gate, print_table, synchronize, time_ms  # noqa: E402

PRESETS = {
    "cpu": dict(hidden=128, layers=4, vocab=512, batch=1, prompt=32, tokens=48, reps=5),
    "gpu": dict(hidden=768, layers=24, vocab=50280, batch=1, prompt=128, tokens=128, reps=5),
}


def build(p, N, device, seed=0):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    config = MambaConfig(hidden_size=p["hidden"], state_size=N, num_hidden_layers=p["layers"], vocab_size=p["vocab"])
    return MambaForCausalLM(config).eval().to(device)


@torch.no_grad()
def decode_run(model, ids, tokens, device):
    """(seconds for ``tokens`` cached one-token steps after a prefill, the greedy tokens)."""
    out = model(ids, use_cache=True)
    cache, tok = out.cache_params, out.logits[:, -1:].argmax(-1)
    generated = [tok]
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(tokens):
        out = model(tok, cache_params=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        generated.append(tok)
    synchronize(device)
    return time.perf_counter() - t0, torch.cat(generated, 1)


def model_rows(p, device, config, hf, ids):
    from compressm_mamba import replace_mixers_

    ours = copy.deepcopy(hf)
    replace_mixers_(ours)
    N = hf.backbone.layers[0].mixer.A_log.shape[1]
    # Warm up both (and check they agree) before timing.
    _, want = decode_run(hf, ids, p["tokens"], device)
    _, got = decode_run(ours, ids, p["tokens"], device)
    if not torch.equal(got, want):
        raise SystemExit(f"correctness gate failed ({config}): the drop-in's greedy tokens differ from transformers'")
    times = {"transformers": [], "drop-in": []}
    for _ in range(p["reps"]):  # interleaved, so background load hits both alike
        times["transformers"].append(decode_run(hf, ids, p["tokens"], device)[0])
        times["drop-in"].append(decode_run(ours, ids, p["tokens"], device)[0])
    from compressm_mamba.ops.selective_state_update import last_update_call

    rows = []
    base = None
    for path in ("transformers", "drop-in"):
        sec = statistics.median(times[path])
        tps = ids.shape[0] * p["tokens"] / sec
        base = tps if base is None else base
        rows.append(dict(kind="model", config=config, N=N, batch=ids.shape[0], d_inner=2 * p["hidden"],
                         layers=p["layers"], path=path,
                         backend=last_update_call.get("backend", "-") if path == "drop-in" else "hf",
                         us_per_call=f"{sec / p['tokens'] * 1e6:.0f}", tokens_per_s=f"{tps:.1f}",
                         ratio_vs_transformers=f"{tps / base:.2f}"))
    return rows


def op_rows(p, device, config, N, backends):
    """One layer's state update at the model's shapes: transformers' function vs ours."""
    from transformers.models.mamba import modeling_mamba

    from compressm_mamba.ops import selective_state_update

    batch, dim = p["batch"], 2 * p["hidden"]
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    state0, x, dt, A, B, C, D, z, bias = (r(batch, dim, N), r(batch, dim), r(batch, dim), -torch.rand(dim, N).to(device),
                                          r(batch, N), r(batch, N), r(dim), r(batch, dim), r(dim))
    hf_fn = modeling_mamba.mamba_selective_state_update  # as transformers' mixer calls it
    calls = {"transformers": lambda s: hf_fn(s, x, dt, A, B, C, D, dt_bias=bias, dt_softplus=True, z=z)}
    for b in backends:
        calls[f"ours:{b}"] = lambda s, b=b: selective_state_update(s, x, dt, A, B, C, D, z, bias, True, backend=b)
    want_state = state0.clone()
    want = calls["transformers"](want_state)
    timings = {}
    for name, fn in calls.items():
        s = state0.clone()
        gate(name, fn(s), want, 1e-4)
        gate(name + " state", s, want_state, 1e-4)
        s = state0.clone()
        timings[name] = time_ms(lambda fn=fn: fn(s), device, warmup=20, reps=100) * 1e3
    rows = []
    for name, us in timings.items():
        rows.append(dict(kind="op", config=config, N=N, batch=batch, d_inner=dim, layers=1, path=name.split(":")[0],
                         backend=name.split(":")[1] if ":" in name else "hf", us_per_call=f"{us:.1f}",
                         tokens_per_s="", ratio_vs_transformers=f"{timings['transformers'] / us:.2f}"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--tokens", type=int, default=None, help="decode steps per run (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on a CPU: a one-token step's tensors hold a few "
                             "thousand elements, where a second thread adds only wake-up waits — on a loaded "
                             "shared machine tens of milliseconds per op)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to bench/results")
    args = parser.parse_args(argv)
    p = dict(PRESETS[args.preset])
    if args.tokens:
        p["tokens"] = args.tokens
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])

    from compressm_mamba import CompressConfig, compress_

    ids = torch.randint(0, p["vocab"], (p["batch"], p["prompt"]), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    rows = []
    for config in ("N=16", "N=128", "cut->12"):
        hf = build(p, 16 if config == "N=16" else 128, device)
        if config == "cut->12":
            compress_(hf, CompressConfig(mode="rank", rank=12, estimator="mean_lti"), [ids])
        N = hf.backbone.layers[0].mixer.A_log.shape[1]
        rows += model_rows(p, device, config, hf, ids)
        rows += op_rows(p, device, config, N, backends)
    env = environment(device)
    rows = [{**env, "preset": args.preset, "prompt": p["prompt"], "tokens": p["tokens"], **r} for r in rows]
    print(f"{env['device']}  torch {env['torch']}  transformers {env['transformers']}  git {env['git']}")
    print_table(rows, ["kind", "config", "N", "path", "backend", "us_per_call", "tokens_per_s", "ratio_vs_transformers"])
    if not args.no_save:
        print("appended to", append_rows("decode.csv", rows))


if __name__ == "__main__":
    main()
