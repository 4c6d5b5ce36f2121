"""Which Gramian estimator / importance rule picks the states that matter, and how early?

    python bench/ranking_study.py --arch mamba2            # byte LM, N=128, 400 steps, one seed
    python bench/ranking_study.py --arch mamba --estimators mean_lti,ltv

The fidelity experiment (bench/fidelity.py) cuts inside the first 10 % of training.  Whether that
can beat training small from scratch depends on two things this script measures separately, on one
model (a) trained at N=128 with the fidelity set-up and snapshotted along the way:

- *settling*: the Jaccard index between the top-r states chosen from a snapshot at step s and those
  chosen from the final model (same estimator and rule), averaged over layers and groups;
- *quality*: the final model cut to r with the states chosen at step s, evaluated without retraining
  (held-out bits per byte) — does an early ranking name states the trained model needs?  Reference
  points: the uncut model, and the final model cut to random / least important states.

For each snapshot and estimator the Gramians are collected once over the same calibration batches
(the first ``--calibration-batches`` training batches); both importance rules reuse them.  Rows go to
bench/results/ranking_study_<arch>.{csv,md}.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, environment  # noqa: E402
from fidelity import MODES, datasets_for, evaluate, train  # noqa: E402

from compressm_mamba import CompressConfig, replace_mixers_  # noqa: E402
from compressm_mamba.cut.collect import GramianCollector  # noqa: E402
from compressm_mamba.cut.compress import decide_cuts, run_calibration  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402
from compressm_mamba.cut.surgery import apply_cuts  # noqa: E402
from compressm_mamba.app.train import build_model  # noqa: E402


def snapshotter(steps):
    """A TrainerCallback keeping a copy of the weights after each of ``steps``."""
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        taken = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in steps:
                self.taken[state.global_step] = copy.deepcopy(model.state_dict())

    return Snapshots()


def model_from(weights, arch, seed):
    model = build_model("demo", 256, arch=arch, seed=seed)
    try:
        replace_mixers_(model, backend="auto")
    except TypeError:
        pass
    model.load_state_dict(weights)
    return model


def kept_sets(model, calibration, estimator, rank, choices):
    """{label: {layer: (G, r) kept indices}} from one Gramian collection on ``model``.

    choices: {label: CompressConfig fields beyond mode/rank/estimator}, e.g. {"diagonal":
    {"importance": "diagonal"}, "random 0": {"keep": "random", "seed": 0}}.
    """
    adapters = find_mixers(model)
    collector = GramianCollector(adapters, estimator)
    run_calibration(model, calibration, collector)
    gramians = collector.gramians()
    return {label: {d.name: d.kept for d in decide_cuts(adapters, gramians, CompressConfig(
                mode="rank", rank=rank, estimator=estimator, **fields))}
            for label, fields in choices.items()}


def jaccard(a, b):
    scores = []
    for name in a:
        for x, y in zip(a[name].tolist(), b[name].tolist()):
            scores.append(len(set(x) & set(y)) / len(set(x) | set(y)))
    return statistics.mean(scores)


def cut_copy(model, kept):
    small = copy.deepcopy(model)
    apply_cuts([a.plan_select(kept[a.name]) for a in find_mixers(small)])
    return small


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mamba2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--snapshots", default="10,20,40,100,200", help="steps to rank at (the final step is added)")
    parser.add_argument("--estimators", default="mean_lti,ltv",
                        help="comma list of mean_lti, ltv, frozen (frozen solves a Lyapunov equation per token: "
                             "O(N³), tens of minutes at N=128 on a CPU)")
    parser.add_argument("--rules", default="balanced,diagonal")
    parser.add_argument("--rank", type=int, default=12)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--eval-bytes", type=int, default=32_768)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="output stem (default bench/results/ranking_study_<arch>)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(MODES["full"], steps=args.steps, eval_bytes=args.eval_bytes)
    train_set, held_out, _ = datasets_for("lm", cfg)
    batch = cfg["batch"]["lm"]
    steps = sorted({int(s) for s in args.snapshots.split(",")} | {args.steps})
    estimators, rules = args.estimators.split(","), args.rules.split(",")
    env = environment(torch.device("cpu"))
    print(f"ranking study: {args.arch}, seed {args.seed}, {env['device']}, git {env['git']}", flush=True)

    snaps = snapshotter(set(steps))
    model = build_model("demo", 256, arch=args.arch, seed=args.seed)
    train(model, train_set, cfg, args.seed, batch, extra_callbacks=[snaps])
    final = model_from(snaps.taken[args.steps], args.arch, args.seed)
    ids = torch.tensor(train_set["input_ids"][: args.calibration_batches * batch])
    calibration = [{"input_ids": ids[i : i + batch]} for i in range(0, len(ids), batch)]

    rows = [dict(estimator="-", rule="uncut", step="-", jaccard_vs_final="-",
                 bpb_final_cut=round(evaluate(final, "lm", held_out), 4))]
    print(rows[-1], flush=True)
    for estimator in estimators:
        rule_choices = {rule: dict(importance=rule) for rule in rules}
        chosen = {s: kept_sets(model_from(snaps.taken[s], args.arch, args.seed), calibration, estimator, args.rank,
                               rule_choices) for s in steps}
        for rule in rules:
            for s in steps:
                bpb = evaluate(cut_copy(final, chosen[s][rule]), "lm", held_out)
                rows.append(dict(estimator=estimator, rule=rule, step=s,
                                 jaccard_vs_final=round(jaccard(chosen[s][rule], chosen[args.steps][rule]), 3),
                                 bpb_final_cut=round(bpb, 4)))
                print(rows[-1], flush=True)
    # Ablations on the final model: random states (3 draws) and the least important (first estimator).
    draws = [args.seed + k for k in range(3)]
    ablations = kept_sets(final, calibration, estimators[0], args.rank,
                          {"smallest": dict(keep="smallest"), **{f"random {k}": dict(keep="random", seed=k) for k in draws}})
    random_bpb = [evaluate(cut_copy(final, ablations[f"random {k}"]), "lm", held_out) for k in draws]
    rows.append(dict(estimator="-", rule="random (3 draws)", step=args.steps, jaccard_vs_final="-",
                     bpb_final_cut=f"{statistics.mean(random_bpb):.4f} ± {statistics.stdev(random_bpb):.4f}"))
    rows.append(dict(estimator=estimators[0], rule="smallest", step=args.steps, jaccard_vs_final="-",
                     bpb_final_cut=round(evaluate(cut_copy(final, ablations["smallest"]), "lm", held_out), 4)))

    stem = args.out or os.path.join(RESULTS, f"ranking_study_{args.arch}")
    import csv

    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + list(env))
        writer.writeheader()
        writer.writerows({**r, **env} for r in rows)
    with open(stem + ".md", "w") as f:
        f.write(f"# ranking study — {args.arch}, byte LM, N=128 → r={args.rank}, seed {args.seed}; "
                f"{env['device']}, git {env['git']}, {env['date']}\n\n"
                f"`python bench/ranking_study.py --arch {args.arch}`: model (a) of bench/fidelity.py (steps "
                f"{args.steps}, seq_len {cfg['seq_len']}, batch {batch}, lr {cfg['lr']}) snapshotted at steps "
                f"{steps}; {args.calibration_batches} calibration batches; held-out {args.eval_bytes} bytes.\n"
                "`bpb final cut`: the final model cut to r with the states ranked at `step`, no retraining.\n\n"
                "| estimator | rule | step | Jaccard vs final | bpb final cut |\n|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['estimator']} | {r['rule']} | {r['step']} | {r['jaccard_vs_final']} | {r['bpb_final_cut']} |\n")
    print(open(stem + ".md").read())


if __name__ == "__main__":
    main()
