"""The reproduction experiment: does compressing during training beat training small from scratch?

    python bench/fidelity.py --quick        # a smoke-sized run (minutes on 2 CPU cores)
    python bench/fidelity.py                # the full run: both tasks, Mamba1 and Mamba2, 3 seeds

For each task (``mqar``, on request: associative recall, see bench/recall.py; ``lm``: byte-level language modelling of CPython's standard library, contexts of
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
from compressm_mamba.app.mqar import MQARSpec, mqar_accuracy, mqar_splits  # noqa: E402
from compressm_mamba.app.data import DIGITS_CLASS0, DIGITS_VOCAB, byte_lm_dataset, digits_dataset, stdlib_bytes  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402
from compressm_mamba.cut.state_sizes import resize_to_  # noqa: E402
from compressm_mamba.app.train import TimingCallback, build_model  # noqa: E402

VARIANTS = ("a", "b-tau", "b-rank", "c-tau", "c-rank", "d", "e-random", "e-smallest", "f-stable")
# lr 1e-2 with a 2.5 % warm-up: the byte LM is well below its unigram entropy (~3.4-3.5 bits per byte
# against ~4.3) by step 40 = 10 % of the full run, so the cuts rank states of a model that has
# learned something (METHOD.md §8); at lr 3e-3 with a 10 % warm-up it was still at ~4.2 there.
MODES = {
    "quick": dict(tasks=("lm", "digits"), archs=("mamba", "mamba2"), seeds=(0,), steps=40, seq_len=128,
                  train_bytes=200_000, eval_bytes=16_384, batch=dict(lm=4, digits=8, mqar=16), lr=1e-2, warmup=0.025),
    "full": dict(tasks=("lm", "digits"), archs=("mamba", "mamba2"), seeds=(0, 1, 2), steps=400, seq_len=512,
                 train_bytes=2_000_000, eval_bytes=131_072, batch=dict(lm=4, digits=8, mqar=16), lr=1e-2, warmup=0.025),
}
# Ablations of b-rank's choices, run only when asked for (--variants): the investigation of why (b)
# does or does not beat (c).  balanced: Mamba2 only.
EXTRA_VARIANTS = {"b-rank-direct": dict(rank_path="direct"), "b-rank-ltv": dict(estimator="ltv"),
                  "b-rank-diagonal": dict(importance="diagonal"), "b-rank-balanced": dict(reduction="balanced")}
# Columns that describe the run (the same for every row of a task), so merged CSVs keep their set-up.
SETUP = ("steps", "seq_len", "batch", "lr", "estimator", "tau", "threads")


# MQAR (--tasks mqar): 6 key-value pairs in 48 tokens, vocabulary 32 (bench/recall.py's set-up); the
# training set holds steps × batch fresh sequences, the held-out 512 come from another seed.
MQAR_TASK = dict(pairs=6, seq_len=48, vocab=32, n_test=512)


def datasets_for(task, cfg, seed=0):
    if task == "mqar":
        spec = MQARSpec(MQAR_TASK["pairs"], MQAR_TASK["seq_len"], MQAR_TASK["vocab"])
        train, held_out = mqar_splits(cfg["steps"] * cfg["batch"]["mqar"], MQAR_TASK["n_test"], spec, seed)
        return train, held_out, spec.vocab
    if task == "lm":
        train = byte_lm_dataset(stdlib_bytes(cfg["train_bytes"]), cfg["seq_len"])
        held_out = byte_lm_dataset(stdlib_bytes(cfg["eval_bytes"], offset=cfg["train_bytes"]), cfg["seq_len"])
        return train, held_out, 256
    return digits_dataset("train"), digits_dataset("test"), DIGITS_VOCAB


@torch.no_grad()
def evaluate(model, task, held_out, batch=8):
    """Bits per byte (lm) or accuracy (digits; mqar: at the answer positions) on the held-out set."""
    if task == "mqar":
        return mqar_accuracy(model, held_out, batch=32)[0]
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


def train(model, train_set, cfg, seed, batch, config=None, extra_callbacks=()):
    """Train in place; returns (wall seconds, the compression callback or None, the training loss of
    the last log window that ends at 10 % of the steps — see ``write_report``)."""
    from transformers import PrinterCallback, Trainer, TrainingArguments, logging as hf_logging

    from compressm_mamba import replace_mixers_

    hf_logging.set_verbosity_error()
    try:
        replace_mixers_(model, backend="auto")
    except TypeError:
        pass  # Mamba2 keeps transformers' SSD scan
    callbacks = [TimingCallback(batch * len(train_set[0]["input_ids"])), *extra_callbacks]
    compressor = CompreSSMCallback(config) if config is not None else None
    if compressor:
        callbacks.insert(0, compressor)
    tenth = max(1, cfg["steps"] // 10)
    args = TrainingArguments(
        output_dir=os.path.join("/tmp", "compressm_fidelity"), max_steps=cfg["steps"],
        per_device_train_batch_size=batch, learning_rate=cfg["lr"], lr_scheduler_type="cosine",
        warmup_steps=max(1, round(cfg["warmup"] * cfg["steps"])), logging_steps=tenth, report_to=[],
        save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=seed, data_seed=seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # one line per run from us instead of a dict per log step
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    at_tenth = [e["loss"] for e in trainer.state.log_history if e.get("step") == tenth and "loss" in e]
    return wall, compressor, (at_tenth[0] if at_tenth else float("nan"))


def run_cell(task, arch, seed, cfg, estimator, tau, variants, emit):
    """All variants for one (task, arch, seed); ``emit(row)`` is called as each run finishes."""
    train_set, held_out, vocab = datasets_for(task, cfg, seed)
    batch = cfg["batch"][task]
    setup = dict(steps=cfg["steps"], seq_len=len(train_set[0]["input_ids"]), batch=batch, lr=cfg["lr"],
                 estimator=estimator, tau=tau, threads=torch.get_num_threads())
    base = dict(mode="rank", rank=12, estimator=estimator, calibration_batches=4, attempts=4, seed=seed)
    models, walls = {}, {}

    def record(variant, model, wall, loss_tenth, note=""):
        sizes = [a.state_size for a in find_mixers(model)]
        metric = evaluate(model, task, held_out)
        walls[variant] = wall
        row = dict(task=task, arch=arch, seed=seed, variant=variant, metric=round(metric, 4),
                   final_N="/".join(map(str, sizes)), wall_s=round(wall, 1),
                   train_loss_at_10pct=round(loss_tenth, 4), note=note, **setup)
        emit(row)
        print(f"{task:6} {arch:6} seed {seed} {variant:10} metric {metric:.4f}  N {row['final_N']:>8}  "
              f"{wall:6.1f} s  loss@10% {loss_tenth:.3f} {note}", flush=True)

    def fresh(N=None):
        return build_model("demo", vocab, arch=arch, seed=seed, state_size=N)

    if "a" in variants or "d" in variants:
        model = fresh()
        wall, _, loss_tenth = train(model, train_set, cfg, seed, batch)
        models["a"] = model
        record("a", model, wall, loss_tenth)
    compressed = {
        "b-tau": dict(base, mode="tolerance", tau=tau), "b-rank": base,
        "e-random": dict(base, keep="random"), "e-smallest": dict(base, keep="smallest"),
        "f-stable": dict(base, schedule="stable", stable_jaccard=0.9, stable_latest_fraction=0.5),
        **{name: dict(base, **kw) for name, kw in EXTRA_VARIANTS.items()},
    }
    final_sizes = {}
    for variant, kw in compressed.items():
        if variant not in variants:
            continue
        model = fresh()
        wall, cb, loss_tenth = train(model, train_set, cfg, seed, batch, CompressConfig(**kw))
        final_sizes[variant] = {a.name: a.state_size for a in find_mixers(model)}
        cuts = ",".join(str(r.step) for r in cb.reports)
        record(variant, model, wall, loss_tenth, note=f"cuts at steps {cuts}" if cuts else "no cut")
    for variant, source in (("c-tau", "b-tau"), ("c-rank", "b-rank")):
        if variant in variants and source in final_sizes:
            model = fresh()
            resize_to_(model, final_sizes[source])  # the first r states of a fresh init = a fresh small init
            wall, _, loss_tenth = train(model, train_set, cfg, seed, batch)
            record(variant, model, wall, loss_tenth)
    if "d" in variants:
        model = copy.deepcopy(models["a"])
        ids = torch.tensor(train_set["input_ids"][: 4 * batch])
        t0 = time.perf_counter()
        compress_(model, CompressConfig(**base), [{"input_ids": ids[i : i + batch]} for i in range(0, len(ids), batch)])
        record("d", model, walls["a"] + time.perf_counter() - t0, float("nan"), note="post-hoc cut of (a)")


def summarise(rows):
    """Mean ± std per (task, arch, variant)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["arch"], r["variant"]), []).append(r)
    table = []
    for (task, arch, variant), rs in groups.items():
        metrics = [float(r["metric"]) for r in rs]
        walls = [float(r["wall_s"]) for r in rs]
        losses = [float(r["train_loss_at_10pct"]) for r in rs if not math.isnan(float(r["train_loss_at_10pct"]))]
        table.append(dict(task=task, arch=arch, variant=variant, seeds=len(rs),
                          metric_mean=round(statistics.mean(metrics), 4),
                          metric_std=round(statistics.stdev(metrics), 4) if len(rs) > 1 else 0.0,
                          wall_s_mean=round(statistics.mean(walls), 1),
                          final_N="; ".join(dict.fromkeys(r["final_N"] for r in rs)),
                          loss_10pct=round(statistics.mean(losses), 3) if losses else None))
    return table


# Paired comparisons (same seed = same init and data order), the questions the experiment asks.
PAIRS = (("b-rank", "c-rank", "compress in training vs small from scratch"),
         ("b-tau", "c-tau", "the same at tolerance tau"),
         ("b-rank", "a", "compressed vs never compressed"),
         ("b-rank", "e-random", "HSV-largest vs random states"),
         ("b-rank", "e-smallest", "HSV-largest vs least important"),
         ("f-stable", "b-rank", "stable schedule vs warm-up cuts"),
         ("b-rank", "d", "in training vs post-hoc cut, no retraining"),
         *((name, "c-rank", f"ablation {name} vs small from scratch") for name in EXTRA_VARIANTS))


def paired(rows):
    """Per (task, arch) and pair (x, y): per-seed differences x − y, signed so that > 0 means x is better."""
    by = {(r["task"], r["arch"], r["variant"], int(r["seed"])): float(r["metric"]) for r in rows}
    out = []
    for task, arch in dict.fromkeys((r["task"], r["arch"]) for r in rows):
        sign = -1.0 if task == "lm" else 1.0  # bits per byte: lower is better
        for x, y, question in PAIRS:
            seeds = sorted(s for (t, a, v, s) in by if (t, a, v) == (task, arch, x) and (task, arch, y, s) in by)
            if not seeds:
                continue
            diffs = [sign * (by[(task, arch, x, s)] - by[(task, arch, y, s)]) for s in seeds]
            out.append(dict(task=task, arch=arch, x=x, y=y, question=question, seeds=len(seeds),
                            mean=statistics.mean(diffs), std=statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                            wins=sum(d > 0 for d in diffs)))
    return out


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


def write_report(rows, stem, title):
    """The table (markdown) and the plot for ``rows`` (from one run or merged CSVs)."""
    table = summarise(rows)
    first = rows[0]
    with open(stem + ".md", "w") as f:
        f.write(f"# fidelity ({title}) — {first['device']}, git {first['git']}, {first['date']}\n\n")
        for task in dict.fromkeys(r["task"] for r in rows):
            r = next(r for r in rows if r["task"] == task)
            seeds = sorted({int(x["seed"]) for x in rows if x["task"] == task})
            f.write(f"- {task}: " + ", ".join(f"{k} {r[k]}" for k in SETUP) + f", seeds {seeds}\n")
        f.write("\nlm: held-out bits per byte (lower is better); digits: test accuracy. `loss@10%`: the training loss "
                "(nats per token) of the last log window ending at 10 % of the steps — the Trainer logs every 10 % and "
                "the callback at each cut, so it is the mean over the last quarter of the warm-up (steps 31–40 of 400) "
                "for variants cut in the warm-up and over the whole first 10 % for the others.\n\n")
        f.write("| task | arch | variant | seeds | metric (mean ± std) | final N | loss@10% | wall s / run |\n"
                "|---|---|---|---|---|---|---|---|\n")
        for r in table:
            f.write(f"| {r['task']} | {r['arch']} | {r['variant']} | {r['seeds']} | {r['metric_mean']:.4f} ± "
                    f"{r['metric_std']:.4f} | {r['final_N']} | {r['loss_10pct'] if r['loss_10pct'] is not None else ''} "
                    f"| {r['wall_s_mean']} |\n")
        f.write("\nPaired by seed: x − y per seed, signed so that > 0 means x is better (lower bits per byte, "
                "higher accuracy); `wins`: seeds where x is better.\n\n"
                "| task | arch | x vs y | question | x − y (mean ± std) | wins |\n|---|---|---|---|---|---|\n")
        for p in paired(rows):
            f.write(f"| {p['task']} | {p['arch']} | {p['x']} vs {p['y']} | {p['question']} | "
                    f"{p['mean']:+.4f} ± {p['std']:.4f} | {p['wins']}/{p['seeds']} |\n")
    plot(table, stem + ".png")
    print(open(stem + ".md").read())
    print(f"wrote {stem}.md/.png")


class RowWriter:
    """Appends each finished run to a CSV at once, so a run that is cut off keeps what it measured."""

    def __init__(self, path, env):
        self.path, self.env, self.rows, self._writer = path, env, [], None
        self._file = open(path, "w", newline="")

    def __call__(self, row):
        import csv

        full = {**row, **self.env}
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=list(full))
            self._writer.writeheader()
        self._writer.writerow(full)
        self._file.flush()
        self.rows.append(full)


def read_rows(paths):
    import csv

    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", default=None, help="comma list: lm,digits,mqar (mqar: associative recall, "
                        "accuracy at the answer positions; bench/recall.py runs the full MQAR study)")
    parser.add_argument("--archs", default=None, help="comma list: mamba,mamba2")
    parser.add_argument("--seeds", default=None, help="comma list of seeds")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--estimator", default="mean_lti",
                        help="Gramian estimator (default mean_lti, the paper's surrogate: cheap at N=128 on a CPU)")
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list (default: all of a-f); ablations: {','.join(EXTRA_VARIANTS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="output stem (default bench/results/fidelity_<mode>)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="CSV",
                        help="train nothing: write the combined table and plot of these CSVs to --out")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    stem = args.out or os.path.join(RESULTS, f"fidelity_{mode}")
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    if args.merge:
        rows = read_rows(args.merge)
        if os.path.abspath(stem + ".csv") not in map(os.path.abspath, args.merge):
            writer = RowWriter(stem + ".csv", {})
            for row in rows:
                writer(row)
        write_report(rows, stem, mode)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(MODES[mode])
    if args.steps:
        cfg["steps"] = args.steps
    tasks = args.tasks.split(",") if args.tasks else cfg["tasks"]
    archs = args.archs.split(",") if args.archs else cfg["archs"]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else cfg["seeds"]
    variants = set(args.variants.split(","))
    unknown = variants - set(VARIANTS) - set(EXTRA_VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS + tuple(EXTRA_VARIANTS))}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    print(f"fidelity ({mode}): {env['device']}, git {env['git']}, steps {cfg['steps']}, estimator {args.estimator}, "
          f"{torch.get_num_threads()} threads", flush=True)
    emit = RowWriter(stem + ".csv", env)
    for task in tasks:
        for arch in archs:
            for seed in seeds:
                run_cell(task, arch, seed, cfg, args.estimator, args.tau, variants, emit)
    write_report(emit.rows, stem, mode)


if __name__ == "__main__":
    main()
