"""The reproduction experiment: does compressing during training beat training small from scratch?

    python bench/fidelity.py --quick        # a smoke-sized run (minutes on 2 CPU cores)
    python bench/fidelity.py                # the full run: both tasks, Mamba1 and Mamba2, 3 seeds

For each task (``lm``: byte-level language modelling of CPython's standard library, contexts of
``--seq-len`` bytes, metric bits per byte on held-out bytes, lower is better; ``digits``: sklearn
digits read pixel by pixel, metric test accuracy) and each architecture, with the same model, data
and step budget, every variant is trained from the same seed:

  a         N=128 throughout
  b-tau     in-training compression, tolerance tau, attempts inside the first 10 % of steps
  b-rank    in-training compression to rank 12
  c-tau     trained from scratch at the per-layer N that b-tau ended with
  c-rank    trained from scratch at N=12
  d         the model of (a), cut once after training to rank 12 with the same selection, not retrained
  e-random  as b-rank, keeping random states      e-smallest  as b-rank, keeping the least important
  f-stable  as b-rank with schedule="stable" (cut once the kept set stops moving)

The table (mean ± std over seeds, wall time per run) and a PNG (metric vs wall time) go to
bench/results/fidelity_<mode>.{csv,md,png} with the machine it ran on.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, environment  # noqa: E402

from compressm_mamba import CompressConfig, CompreSSMCallback, compress_  # noqa: E402
from compressm_mamba.data import DIGITS_CLASS0, DIGITS_VOCAB, byte_lm_dataset, digits_dataset, stdlib_bytes  # noqa: E402
from compressm_mamba.mixers import find_mixers  # noqa: E402
from compressm_mamba.state_sizes import resize_to_  # noqa: E402
from compressm_mamba.train import TimingCallback, build_model  # noqa: E402

VARIANTS = ("a", "b-tau", "b-rank", "c-tau", "c-rank", "d", "e-random", "e-smallest", "f-stable")
MODES = {
    "quick": dict(tasks=("lm", "digits"), archs=("mamba", "mamba2"), seeds=(0,), steps=40, seq_len=128,
                  train_bytes=200_000, eval_bytes=16_384, batch=4),
    "full": dict(tasks=("lm", "digits"), archs=("mamba", "mamba2"), seeds=(0, 1, 2), steps=400, seq_len=512,
                 train_bytes=2_000_000, eval_bytes=131_072, batch=4),
}


def datasets_for(task, cfg):
    if task == "lm":
        train = byte_lm_dataset(stdlib_bytes(cfg["train_bytes"]), cfg["seq_len"])
        held_out = byte_lm_dataset(stdlib_bytes(cfg["eval_bytes"], offset=cfg["train_bytes"]), cfg["seq_len"])
        return train, held_out, 256
    return digits_dataset("train"), digits_dataset("test"), DIGITS_VOCAB


@torch.no_grad()
def evaluate(model, task, held_out, batch=8):
    """Bits per byte (lm) or accuracy (digits) on the held-out set."""
    model.eval()
    ids = torch.tensor(held_out["input_ids"])
    if task == "lm":
        losses = [float(model(ids[i : i + batch], labels=ids[i : i + batch]).loss) for i in range(0, len(ids), batch)]
        return sum(losses) / len(losses) / math.log(2)
    correct = 0
    for i in range(0, len(ids), batch):
        chunk = ids[i : i + batch]
        logits = model(chunk[:, :-1]).logits[:, -1, DIGITS_CLASS0 : DIGITS_CLASS0 + 10]
        correct += int((logits.argmax(-1) + DIGITS_CLASS0 == chunk[:, -1]).sum())
    return correct / len(ids)


def train(model, train_set, cfg, seed, config=None):
    """Train in place; returns (wall seconds, the compression callback or None)."""
    from transformers import Trainer, TrainingArguments, logging as hf_logging

    from compressm_mamba import replace_mixers_

    hf_logging.set_verbosity_error()
    try:
        replace_mixers_(model, backend="auto")
    except TypeError:
        pass  # Mamba2 keeps transformers' SSD scan
    callbacks = [TimingCallback(cfg["batch"] * len(train_set[0]["input_ids"]))]
    compressor = CompreSSMCallback(config) if config is not None else None
    if compressor:
        callbacks.insert(0, compressor)
    args = TrainingArguments(
        output_dir=os.path.join("/tmp", "compressm_fidelity"), max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch"], learning_rate=3e-3, lr_scheduler_type="cosine",
        warmup_steps=max(1, cfg["steps"] // 10), logging_steps=10, report_to=[], save_strategy="no",
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=seed, data_seed=seed,
    )
    t0 = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=train_set, callbacks=callbacks).train()
    return time.perf_counter() - t0, compressor


def run_cell(task, arch, seed, cfg, estimator, tau, variants):
    """All variants for one (task, arch, seed); returns result rows."""
    train_set, held_out, vocab = datasets_for(task, cfg)
    base = dict(mode="rank", rank=12, estimator=estimator, calibration_batches=4, attempts=4, seed=seed)
    rows, models = [], {}

    def record(variant, model, wall, note=""):
        sizes = [a.state_size for a in find_mixers(model)]
        metric = evaluate(model, task, held_out)
        rows.append(dict(task=task, arch=arch, seed=seed, variant=variant, metric=round(metric, 4),
                         final_N="/".join(map(str, sizes)), wall_s=round(wall, 1), note=note))
        print(f"{task:6} {arch:6} seed {seed} {variant:10} metric {metric:.4f}  N {rows[-1]['final_N']:>8}  "
              f"{wall:6.1f} s {note}", flush=True)

    def fresh(N=None):
        return build_model("demo", vocab, arch=arch, seed=seed, state_size=N)

    if "a" in variants or "d" in variants:
        model = fresh()
        wall, _ = train(model, train_set, cfg, seed)
        models["a"] = model
        record("a", model, wall)
    compressed = {
        "b-tau": dict(base, mode="tolerance", tau=tau), "b-rank": base,
        "e-random": dict(base, keep="random"), "e-smallest": dict(base, keep="smallest"),
        "f-stable": dict(base, schedule="stable", stable_jaccard=0.9, stable_latest_fraction=0.5),
    }
    final_sizes = {}
    for variant, kw in compressed.items():
        if variant not in variants:
            continue
        model = fresh()
        wall, cb = train(model, train_set, cfg, seed, CompressConfig(**kw))
        final_sizes[variant] = {a.name: a.state_size for a in find_mixers(model)}
        cut = cb.reports[0].step if cb.reports else None
        record(variant, model, wall, note=f"cut at step {cut}" if cut else "no cut")
    for variant, source in (("c-tau", "b-tau"), ("c-rank", "b-rank")):
        if variant in variants and source in final_sizes:
            model = fresh()
            resize_to_(model, final_sizes[source])  # the first r states of a fresh init = a fresh small init
            wall, _ = train(model, train_set, cfg, seed)
            record(variant, model, wall)
    if "d" in variants:
        model = copy.deepcopy(models["a"])
        ids = torch.tensor(train_set["input_ids"][: 4 * cfg["batch"]])
        t0 = time.perf_counter()
        compress_(model, CompressConfig(**base), [{"input_ids": ids[i : i + cfg["batch"]]}
                                                  for i in range(0, len(ids), cfg["batch"])])
        record("d", model, rows[0]["wall_s"] + time.perf_counter() - t0, note="post-hoc cut of (a)")
    return rows


def summarise(rows):
    """Mean ± std per (task, arch, variant)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["arch"], r["variant"]), []).append(r)
    table = []
    for (task, arch, variant), rs in groups.items():
        metrics = [r["metric"] for r in rs]
        walls = [r["wall_s"] for r in rs]
        table.append(dict(task=task, arch=arch, variant=variant, seeds=len(rs),
                          metric_mean=round(statistics.mean(metrics), 4),
                          metric_std=round(statistics.stdev(metrics), 4) if len(rs) > 1 else 0.0,
                          wall_s_mean=round(statistics.mean(walls), 1), final_N=rs[0]["final_N"]))
    return table


def plot(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["task"], r["arch"]) for r in table})
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.6), squeeze=False)
    for ax, (task, arch) in zip(axes[0], cells):
        for r in (r for r in table if (r["task"], r["arch"]) == (task, arch)):
            ax.errorbar(r["wall_s_mean"], r["metric_mean"], yerr=r["metric_std"], fmt="o")
            ax.annotate(r["variant"], (r["wall_s_mean"], r["metric_mean"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_title(f"{task} / {arch}", fontsize=9)
        ax.set_xlabel("wall time per run (s)")
        ax.set_ylabel("bits per byte (lower is better)" if task == "lm" else "test accuracy")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", default=None, help="comma list: lm,digits")
    parser.add_argument("--archs", default=None, help="comma list: mamba,mamba2")
    parser.add_argument("--seeds", default=None, help="comma list of seeds")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--estimator", default="mean_lti",
                        help="Gramian estimator (default mean_lti, the paper's surrogate: cheap at N=128 on a CPU)")
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.steps:
        cfg["steps"] = args.steps
    tasks = args.tasks.split(",") if args.tasks else cfg["tasks"]
    archs = args.archs.split(",") if args.archs else cfg["archs"]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else cfg["seeds"]
    variants = set(args.variants.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    print(f"fidelity ({mode}): {env['device']}, git {env['git']}, steps {cfg['steps']}, estimator {args.estimator}")

    rows = []
    for task in tasks:
        for arch in archs:
            for seed in seeds:
                rows += run_cell(task, arch, seed, cfg, args.estimator, args.tau, variants)
    table = summarise(rows)
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"fidelity_{mode}")
    import csv

    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) + list(env.keys()))
        writer.writeheader()
        writer.writerows({**r, **env} for r in rows)
    with open(stem + ".md", "w") as f:
        f.write(f"# fidelity ({mode}) — {env['device']}, git {env['git']}, {env['date']}\n\n")
        f.write(f"steps {cfg['steps']}, seq_len {cfg['seq_len']}, batch {cfg['batch']}, estimator {args.estimator}, "
                f"tau {args.tau}, seeds {list(seeds)}. lm: bits per byte (lower is better); digits: accuracy.\n\n")
        f.write("| task | arch | variant | seeds | metric (mean ± std) | final N | wall s / run |\n|---|---|---|---|---|---|---|\n")
        for r in table:
            f.write(f"| {r['task']} | {r['arch']} | {r['variant']} | {r['seeds']} | {r['metric_mean']:.4f} ± "
                    f"{r['metric_std']:.4f} | {r['final_N']} | {r['wall_s_mean']} |\n")
    plot(table, stem + ".png")
    print(open(stem + ".md").read())
    print(f"wrote {stem}.csv/.md/.png")


if __name__ == "__main__":
    main()
