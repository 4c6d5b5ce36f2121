"""Does compressing during training beat training small from scratch where the state size matters?

Multi-query associative recall (MQAR, ``compressm_mamba.app.mqar``): accuracy rises with the state
size N at a fixed width, so the big model (a) has something to keep.  Every arm is trained with the
same seed (init, data order, held-out set) and step budget through the project's own callback
(``CompreSSMCallback`` via ``bench/fidelity.py``'s ``train``):

  a           N = n_big throughout
  c           N = r from scratch
  b-10, b-20, b-30   compressed in training to r: 4 attempts (geometric path n_big → r) inside the
              first 10 / 20 / 30 % of the steps (``warmup_fraction``)
  b-stable    the stable schedule: cut once the kept set stops moving (Jaccard ≥ 0.9), at 50 % at the latest
  e-10 … e-stable    as b-*, keeping random states (the control for "trained longer at the big N")
  e-smallest-10 … e-smallest-stable   as b-*, keeping the *least* important states by the same HSV
              ranking (``keep="smallest"``): if the ranking carries information this is the worst case,
              below random
  e-match     random states, one cut at the step where b-stable cut for the same seed (--match-steps):
              e-stable is no timing control, because a random kept set never moves between attempts, so
              the stable schedule cuts it at its second attempt
  g-30        as b-30, ranking states by GHOST's forward-pass score (importance="ghost")
  d-hsv, d-ghost, d-random   the model of (a) cut post hoc to r (no retraining); run right after a

    python bench/recall.py --arch mamba2 --seeds 0,1,2,3,4 --arms a,c,b-10 --out bench/results/recall_mamba2_p0
    python bench/recall.py --merge bench/results/recall_mamba2_p*.csv --out bench/results/recall

``--merge ... --pilots CSV --note MD`` adds the pilot table (arms a and c of the set-ups tried) and a
text; ``--speed`` times training steps at n_big and rank, ``--speed --speed-baseline REV`` a Mamba1
step with this tree's CPU scan against git revision REV's (a backend change, before/after).

Rows are appended to ``<out>.csv`` as each run finishes (a cut-off run keeps what it measured);
``--merge`` writes the table (mean ± std, paired differences per seed, wall time) and a PNG.
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
from common import RESULTS, environment  # noqa: E402
from fidelity import read_rows, train  # noqa: E402

from compressm_mamba import CompressConfig, compress_  # noqa: E402
from compressm_mamba.app.mqar import MQARSpec, mqar_accuracy, mqar_splits  # noqa: E402
from compressm_mamba.app.train import build_model  # noqa: E402
from compressm_mamba.cut.state_sizes import resize_to_  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402

TIMINGS = {"10": dict(warmup_fraction=0.1), "20": dict(warmup_fraction=0.2), "30": dict(warmup_fraction=0.3),
           "stable": dict(warmup_fraction=0.1, schedule="stable", stable_jaccard=0.9, stable_latest_fraction=0.5)}
ARMS = ("a", "c", *(f"b-{t}" for t in TIMINGS), *(f"e-{t}" for t in TIMINGS), "e-match",
        *(f"e-smallest-{t}" for t in TIMINGS), "g-30", "d-hsv", "d-ghost", "d-random")
# The set-up: 2 layers, d_model 64; N 64 -> 8.  MQAR with 6 pairs in 48 tokens, 31 tokens (15 keys,
# 16 values: chance 1/16).  Sized so that a run is ~1 minute on one free CPU thread.
DEFAULTS = dict(hidden=64, layers=2, n_big=64, rank=8, pairs=6, seq_len=48, vocab=32, steps=400, batch=16,
                lr=1e-2, warmup=0.1, n_test=512, estimator="mean_lti", calibration_batches=8)


class AppendWriter:
    """Appends each finished run to ``path`` at once (header only for a new file): a cut-off run keeps what it
    measured, and a restarted one (same --out) continues after the rows already there."""

    def __init__(self, path, env, also_done=()):
        self.path, self.env = path, env
        self._new = not (os.path.exists(path) and os.path.getsize(path) > 0)
        done_in = [p for p in (path, *also_done) if os.path.exists(p) and os.path.getsize(p) > 0]
        self.done = {(int(r["seed"]), r["variant"]) for r in read_rows(done_in)}

    def __call__(self, row):
        import csv

        full = {**row, **self.env}
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(full))
            if self._new:
                writer.writeheader()
                self._new = False
            writer.writerow(full)


def claim(folder, arch, seed, arm) -> bool:
    """True if this process may run the job: no ``folder``, or it created the job's claim file first."""
    if folder is None:
        return True
    os.makedirs(folder, exist_ok=True)
    try:
        os.close(os.open(os.path.join(folder, f"{arch}_{seed}_{arm}"), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def arm_config(arm: str, cfg: dict, seed: int) -> CompressConfig | None:
    """The CompressConfig of an in-training arm (None for a and c)."""
    if arm in ("a", "c") or arm.startswith("d-"):
        return None
    if arm == "e-match":  # one random cut straight to r at the step b-stable cut at for this seed
        step = cfg["match_steps"][seed]
        return CompressConfig(mode="rank", rank=cfg["rank"], estimator=cfg["estimator"], attempts=1, keep="random",
                              calibration_batches=cfg["calibration_batches"], seed=seed,
                              warmup_fraction=step / cfg["steps"])
    letter, timing = arm.rsplit("-", 1)
    kw = dict(mode="rank", rank=cfg["rank"], estimator=cfg["estimator"], attempts=4,
              calibration_batches=cfg["calibration_batches"], seed=seed, **TIMINGS[timing])
    if letter == "e":
        kw["keep"] = "random"
    if letter == "e-smallest":
        kw["keep"] = "smallest"
    if letter == "g":
        kw["importance"] = "ghost"
    return CompressConfig(**kw)


def run(arch: str, seed: int, arms: list, cfg: dict, emit) -> None:
    """Train ``arms`` (in this order) for one seed; d-* arms cut the model of arm a (needs a in ``arms``)."""
    spec = MQARSpec(cfg["pairs"], cfg["seq_len"], cfg["vocab"])
    train_set, held_out = mqar_splits(cfg["steps"] * cfg["batch"], cfg["n_test"], spec, seed)
    tcfg = dict(steps=cfg["steps"], lr=cfg["lr"], warmup=cfg["warmup"])
    setup = {k: cfg[k] for k in ("hidden", "layers", "n_big", "rank", "pairs", "seq_len", "vocab", "steps", "batch",
                                 "lr", "estimator")}
    setup["threads"] = torch.get_num_threads()

    def fresh(N):
        return build_model("demo", spec.vocab, arch=arch, seed=seed, state_size=N, hidden_size=cfg["hidden"],
                           num_hidden_layers=cfg["layers"])

    def record(arm, model, wall, loss_tenth, note=""):
        acc, loss = mqar_accuracy(model, held_out)
        sizes = "/".join(str(a.state_size) for a in find_mixers(model))
        emit(dict(task="mqar", arch=arch, seed=seed, variant=arm, metric=round(acc, 4), held_out_loss=round(loss, 4),
                  final_N=sizes, wall_s=round(wall, 1), train_loss_at_10pct=round(loss_tenth, 4), note=note, **setup))
        print(f"{arch} seed {seed} {arm:9} acc {acc:.4f} loss {loss:.3f} N {sizes} {wall:6.1f} s {note}", flush=True)

    big = None
    for arm in arms:
        if arm.startswith("d-"):
            continue
        config = arm_config(arm, cfg, seed)
        model = fresh(cfg["rank"] if arm == "c" else cfg["n_big"])
        if arm == "c":  # the first r states of a fresh init = a fresh small init (fidelity.py's c)
            resize_to_(model, {a.name: cfg["rank"] for a in find_mixers(model)})
        wall, cb, loss_tenth = train(model, train_set, tcfg, seed, cfg["batch"], config)
        note = ""
        if cb is not None:
            note = "cuts at steps " + ",".join(str(r.step) for r in cb.reports) if cb.reports else "no cut"
            if cb.failures:
                note += f"; {len(cb.failures)} failed attempts"
        record(arm, model, wall, loss_tenth, note)
        if arm == "a":
            big = (model, wall)
    posthoc = [a for a in arms if a.startswith("d-")]
    if posthoc and big is None:
        raise SystemExit("d-* arms need arm a in the same run")
    calib = torch.tensor(train_set["input_ids"][: cfg["calibration_batches"] * cfg["batch"]])
    batches = [{"input_ids": calib[i : i + cfg["batch"]]} for i in range(0, len(calib), cfg["batch"])]
    for arm in posthoc:
        model = copy.deepcopy(big[0])
        kw = dict(mode="rank", rank=cfg["rank"], estimator=cfg["estimator"], seed=seed)
        kw.update({"d-hsv": {}, "d-ghost": dict(importance="ghost"), "d-random": dict(keep="random")}[arm])
        t0 = time.perf_counter()
        compress_(model, CompressConfig(**kw), batches)
        record(arm, model, big[1] + time.perf_counter() - t0, float("nan"), note="post-hoc cut of (a), no retraining")


# Paired questions: x − y per seed (> 0: x better).
PAIRS = (("a", "c", "the gap: N_big throughout vs N=r from scratch"),
         *((f"b-{t}", "c", f"compressed in training ({t}) vs small from scratch") for t in TIMINGS),
         *((f"b-{t}", f"e-{t}", f"HSV-ranked vs random states, same timing ({t})") for t in TIMINGS),
         *((f"e-{t}", "c", f"random states ({t}) vs small from scratch") for t in TIMINGS),
         *((f"b-{t}", f"e-smallest-{t}", f"HSV: most vs least important states, same timing ({t})") for t in TIMINGS),
         *((f"e-{t}", f"e-smallest-{t}", f"random vs least-important states, same timing ({t})") for t in TIMINGS),
         *((f"e-smallest-{t}", "c", f"least-important states ({t}) vs small from scratch") for t in TIMINGS),
         ("b-30", "b-10", "cut over 30 % vs over 10 %"), ("b-stable", "b-10", "stable vs 10 %"),
         ("b-stable", "e-match", "HSV vs random, one cut at b-stable's step"), ("e-match", "c", "random at b-stable's step vs scratch"),
         ("g-30", "b-30", "GHOST vs HSV in training (30 %)"), ("g-30", "c", "GHOST in training vs from scratch"),
         ("d-hsv", "d-random", "post hoc: HSV vs random"), ("d-ghost", "d-hsv", "post hoc: GHOST vs HSV"),
         ("b-10", "a", "compressed (10 %) vs never compressed"), ("b-30", "a", "compressed (30 %) vs never compressed"))


def summarise(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["arch"], r["variant"]), []).append(r)
    order = {a: i for i, a in enumerate(ARMS)}
    out = []
    for (arch, arm), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        m = [float(r["metric"]) for r in rs]
        w = [float(r["wall_s"]) for r in rs]
        out.append(dict(arch=arch, arm=arm, seeds=len(rs), mean=statistics.mean(m),
                        std=statistics.stdev(m) if len(m) > 1 else 0.0, wall=statistics.mean(w),
                        wall_std=statistics.stdev(w) if len(w) > 1 else 0.0,
                        final_N="; ".join(dict.fromkeys(r["final_N"] for r in rs)),
                        cuts="; ".join(dict.fromkeys(r["note"] for r in rs if r["note"]))[:60]))
    return out


def paired(rows):
    by = {(r["arch"], r["variant"], int(r["seed"])): float(r["metric"]) for r in rows}
    out = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for x, y, q in PAIRS:
            seeds = sorted(s for (a, v, s) in by if (a, v) == (arch, x) and (arch, y, s) in by)
            if not seeds:
                continue
            d = [by[(arch, x, s)] - by[(arch, y, s)] for s in seeds]
            out.append(dict(arch=arch, x=x, y=y, q=q, n=len(d), mean=statistics.mean(d),
                            std=statistics.stdev(d) if len(d) > 1 else 0.0, wins=sum(v > 0 for v in d),
                            per_seed=" ".join(f"{v:+.2f}" for v in d)))
    return out


CONFIG_KEYS = ("hidden", "layers", "n_big", "rank", "pairs", "seq_len", "vocab", "steps", "batch", "lr")


def label_setups(rows):
    """Rows of an arch trained at more than one set-up get the set-up in their arch label
    ("mamba 4p/32t/2000st"), so that the tables never pool runs of different set-ups."""
    setups = {}
    for r in rows:
        setups.setdefault(r["arch"], set()).add(tuple(r[k] for k in CONFIG_KEYS))
    for r in rows:
        if len(setups[r["arch"]]) > 1:
            r["arch"] = f"{r['arch']} {r['pairs']}p/{r['seq_len']}t/{r['steps']}st"
    return rows


def pilot_table(rows) -> str:
    """Markdown: for each configuration tried as a pilot (arms a and c), the accuracies per seed and a − c."""
    configs = {}
    for r in rows:
        configs.setdefault((r["arch"], *(r[k] for k in CONFIG_KEYS)), {}).setdefault(int(r["seed"]), {})[r["variant"]] = r
    out = ["| arch | d_model × layers | N → r | pairs / len / vocab | steps × batch | lr | seed | a | c | a − c | "
           "wall a s | wall c s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, seeds in configs.items():
        arch, hidden, layers, n_big, rank, pairs, seq_len, vocab, steps, batch, lr = key
        for seed, arms in sorted(seeds.items()):
            a, c = arms.get("a"), arms.get("c")
            acc = lambda r: f"{float(r['metric']):.3f}" if r else "—"
            wall = lambda r: f"{float(r['wall_s']):.0f}" if r else "—"
            gap = f"{float(a['metric']) - float(c['metric']):+.3f}" if a and c else "—"
            out.append(f"| {arch} | {hidden} × {layers} | {n_big} → {rank} | {pairs} / {seq_len} / {vocab} | {steps} × "
                       f"{batch} | {lr} | {seed} | {acc(a)} | {acc(c)} | {gap} | {wall(a)} | {wall(c)} |")
    return "\n".join(out) + "\n"


def write_report(rows, stem, pilots=(), note=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, pairs = summarise(rows), paired(rows)
    first = rows[0]
    with open(stem + ".md", "w") as f:
        commits = ", ".join(dict.fromkeys(r["git"] for r in rows))
        dates = sorted(r["date"] for r in rows)
        f.write(f"# recall (MQAR) — {first['device']}, git {commits}, {dates[0]} – {dates[-1]}\n\n"
                "`python bench/recall.py --arch mamba2` and `--arch mamba` with the set-ups below (per arch, two "
                "processes side by side at nice 5, rows merged with `--merge`); the commits differ in the script's "
                "job handling and arms and in the speed of the CPU scan, not in what a run computes.\n\n")
        for arch in dict.fromkeys(r["arch"] for r in rows):
            r = next(r for r in rows if r["arch"] == arch)
            f.write(f"- {arch}: d_model {r['hidden']}, {r['layers']} layers, N {r['n_big']} → {r['rank']}; MQAR "
                    f"{r['pairs']} pairs in {r['seq_len']} tokens, vocab {r['vocab']} (chance "
                    f"{1 / (int(r['vocab']) - 1 - (int(r['vocab']) - 1) // 2):.3f}); {r['steps']} steps × "
                    f"{r['batch']}, lr {r['lr']} cosine, Gramians {r['estimator']}; {r['threads']} thread(s)\n")
        f.write("\nHeld-out accuracy at the answer positions (512 sequences from another seed). `wall s`: "
                "training time per run (post-hoc arms: (a)'s time plus the cut), measured while other jobs shared "
                "the 2 cores: compare walls within this table only.\n\n"
                "| arch | arm | seeds | accuracy (mean ± std) | final N | wall s / run (± std) | cuts |\n"
                "|---|---|---|---|---|---|---|\n")
        for t in table:
            f.write(f"| {t['arch']} | {t['arm']} | {t['seeds']} | {t['mean']:.3f} ± {t['std']:.3f} | {t['final_N']} "
                    f"| {t['wall']:.0f} ± {t['wall_std']:.0f} | {t['cuts']} |\n")
        f.write("\nPaired by seed (same init, data and held-out set): x − y in accuracy, > 0 means x is better.\n\n"
                "| arch | x vs y | question | seeds | x − y (mean ± std) | wins | per seed |\n"
                "|---|---|---|---|---|---|---|\n")
        for p in pairs:
            f.write(f"| {p['arch']} | {p['x']} vs {p['y']} | {p['q']} | {p['n']} | {p['mean']:+.3f} ± {p['std']:.3f} "
                    f"| {p['wins']}/{p['n']} | {p['per_seed']} |\n")
        if note:
            f.write("\n" + note.strip() + "\n")
        if pilots:
            f.write("\n## Pilots (configurations tried to find one where N matters; arms a and c only)\n\n"
                    + pilot_table(pilots))
    archs = list(dict.fromkeys(t["arch"] for t in table))
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for t in (t for t in table if t["arch"] == arch):
            ax.errorbar(t["wall"], t["mean"], yerr=t["std"], fmt="o")
            ax.annotate(t["arm"], (t["wall"], t["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"MQAR / {arch}", fontsize=9)
        ax.set_xlabel("wall time per run (s)")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    plt.close(fig)
    print(open(stem + ".md").read())


def speed(arch: str, cfg: dict, reps: int = 20) -> dict:
    """Seconds per training step (forward + backward + AdamW) at N = n_big and N = rank, measured interleaved
    (one step of each in turn, median of ``reps``) so that load from other jobs hits both alike."""
    spec = MQARSpec(cfg["pairs"], cfg["seq_len"], cfg["vocab"])
    ids, labels = mqar_splits(cfg["batch"], 1, spec, 0)[0][:].values()
    ids, labels = torch.tensor(ids), torch.tensor(labels)
    models = {}
    for N in (cfg["n_big"], cfg["rank"]):
        model = build_model("demo", spec.vocab, arch=arch, seed=0, state_size=N, hidden_size=cfg["hidden"],
                            num_hidden_layers=cfg["layers"])
        try:
            from compressm_mamba import replace_mixers_

            replace_mixers_(model, backend="auto")  # as in training (Mamba1: the drop-in mixer)
        except TypeError:
            pass
        models[N] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    times = {N: [] for N in models}
    for _ in range(reps + 2):
        for N, (model, opt) in models.items():
            t0 = time.perf_counter()
            model(ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
            times[N].append(time.perf_counter() - t0)
    return {N: statistics.median(t[2:]) for N, t in times.items()}


def speed_vs_revision(cfg: dict, rev: str, reps: int = 20) -> dict:
    """Seconds per Mamba1 training step at N = n_big with the torch scan core of this tree vs that of
    git revision ``rev`` (its ``_TimeMajorScan`` swapped in; the wrapper around it is this tree's),
    one step of each in turn, median of ``reps``: a before/after of a backend change, side by side."""
    import importlib.util
    import subprocess
    import tempfile

    from compressm_mamba import replace_mixers_
    from compressm_mamba.torch_backend import selective_scan as current

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "show", f"{rev}:compressm_mamba/torch_backend/selective_scan.py"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec_ = importlib.util.spec_from_file_location("compressm_mamba.torch_backend._baseline_scan", f.name)
    baseline = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(baseline)
    os.unlink(f.name)
    cores = {"this tree": current._TimeMajorScan, rev: baseline._TimeMajorScan}
    spec = MQARSpec(cfg["pairs"], cfg["seq_len"], cfg["vocab"])
    ids, labels = mqar_splits(cfg["batch"], 1, spec, 0)[0][:].values()
    ids, labels = torch.tensor(ids), torch.tensor(labels)
    model = build_model("demo", spec.vocab, arch="mamba", seed=0, state_size=cfg["n_big"], hidden_size=cfg["hidden"],
                        num_hidden_layers=cfg["layers"])
    replace_mixers_(model, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step's cost, not a moving model
    times = {k: [] for k in cores}
    try:
        for _ in range(reps + 2):
            for key, core in cores.items():
                current._TimeMajorScan = core
                t0 = time.perf_counter()
                model(ids, labels=labels).loss.backward()
                opt.step()
                opt.zero_grad()
                times[key].append(time.perf_counter() - t0)
    finally:
        current._TimeMajorScan = cores["this tree"]
    return {k: statistics.median(t[2:]) for k, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="mamba2")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", default="0/1", help="k/n: run every n-th job from the k-th (two processes: 0/2, 1/2)")
    p.add_argument("--out", default=os.path.join(RESULTS, "recall"))
    p.add_argument("--merge", nargs="+", default=None, metavar="CSV")
    p.add_argument("--pilots", nargs="*", default=None, metavar="CSV", help="with --merge: pilot runs (a, c) to list")
    p.add_argument("--note", default=None, metavar="MD", help="with --merge: a markdown file appended after the tables")
    p.add_argument("--speed", action="store_true", help="only time training steps at n_big and rank, interleaved")
    p.add_argument("--speed-baseline", default=None, metavar="REV",
                   help="with --speed: Mamba1 step time with this tree's torch scan vs that of git revision REV")
    p.add_argument("--match-steps", default="", help="e-match: SEED:STEP,... (b-stable's cut step per seed)")
    p.add_argument("--order", default="arm", help="arm: every seed of an arm first | seed: every arm of a seed first")
    p.add_argument("--claim-dir", default=None,
                   help="processes sharing this folder each take the next job nobody has claimed (use --shard 0/1)")
    p.add_argument("--skip-done-in", nargs="*", default=[], metavar="CSV",
                   help="also skip the (seed, arm) runs these CSVs hold (a restart with another order or sharding)")
    for key, value in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    args = p.parse_args(argv)
    if args.merge:
        note = open(args.note).read() if args.note else ""
        write_report(label_setups(read_rows(args.merge)), args.out, read_rows(args.pilots) if args.pilots else (), note)
        return
    torch.set_num_threads(args.threads)
    if args.speed:
        cfg = {k: getattr(args, k) for k in DEFAULTS}
        env = environment(torch.device("cpu"))
        with open(args.out + "_speed.md", "a") as f:
            if args.speed_baseline:
                t = speed_vs_revision(cfg, args.speed_baseline)
                old, new = t[args.speed_baseline], t["this tree"]
                line = (f"- mamba torch scan, this tree vs {args.speed_baseline}: s per training step at N={cfg['n_big']} "
                        f"(batch {cfg['batch']} × {cfg['seq_len']}, d_model {cfg['hidden']}), interleaved, median of 20: "
                        f"{args.speed_baseline} {old:.4f}, this tree {new:.4f}, speed-up {old / new:.2f}x — "
                        f"{env['device']}, git {env['git']}, {env['date']}\n")
                print(line, end="")
                f.write(line)
                return
            for arch in args.arch.split(","):
                t = speed(arch, cfg)
                line = (f"- {arch}: s per training step (batch {cfg['batch']} × {cfg['seq_len']}), interleaved, median of "
                        f"20: N={cfg['n_big']} {t[cfg['n_big']]:.4f}, N={cfg['rank']} {t[cfg['rank']]:.4f}, ratio "
                        f"{t[cfg['n_big']] / t[cfg['rank']]:.2f}x — {env['device']}, git {env['git']}, {env['date']}\n")
                print(line, end="")
                f.write(line)
        return
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        p.error(f"unknown arms {sorted(unknown)}; known: {', '.join(ARMS)}")
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    cfg["match_steps"] = {int(k): int(v) for k, v in (x.split(":") for x in args.match_steps.split(",") if x)}
    emit = AppendWriter(args.out + ".csv", environment(torch.device("cpu")), args.skip_done_in)
    # Arm-major order by default (every seed of an arm before the next arm), so that a run cut off by
    # the clock leaves whole arms; d-* arms follow a at once (they cut its model).  --shard k/n: every n-th job.
    seeds = [int(s) for s in args.seeds.split(",")]
    trained = [a for a in arms if not a.startswith("d-")]
    jobs = ([(seed, arm) for arm in trained for seed in seeds] if args.order == "arm"
            else [(seed, arm) for seed in seeds for arm in trained])
    k, n = (int(v) for v in args.shard.split("/"))
    for seed, arm in jobs[k::n]:
        if (seed, arm) in emit.done or not claim(args.claim_dir, args.arch, seed, arm):
            continue
        run(args.arch, seed, [arm] + ([a for a in arms if a.startswith("d-")] if arm == "a" else []), cfg, emit)


if __name__ == "__main__":
    main()
