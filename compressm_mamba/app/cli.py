"""``compressm-mamba``: the command line.

    compressm-mamba finetune --data stdlib --preset demo --out outputs/demo      # train + cut in training
    compressm-mamba compress CHECKPOINT --out SMALLER --mode rank --rank 12     # one-shot cut
    compressm-mamba analyze CHECKPOINT --out spectra.png                        # spectra, no changes
    compressm-mamba bench                                                       # the benchmark scripts

Errors (missing paths, unknown presets, unsupported models, bad settings) are one line on stderr and
exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

__all__ = ["main"]


def _config_args(parser):
    parser.add_argument("--mode", default="tolerance", help="tolerance | fixed | rank | pragmatic")
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--estimator", default="ltv", help="mean_lti | frozen | ltv")
    parser.add_argument("--importance", default="balanced", help="balanced | diagonal")
    parser.add_argument("--keep", default="largest", help="largest | smallest | random")
    parser.add_argument("--reduction", default="select", help="select | balanced (Mamba2)")
    parser.add_argument("--seed", type=int, default=0)


def _config(args, **extra):
    from ..config import CompressConfig

    return CompressConfig(mode=args.mode, tau=args.tau, rank=args.rank, fraction=args.fraction,
                          estimator=args.estimator, importance=args.importance, keep=args.keep,
                          reduction=args.reduction, seed=args.seed, **extra)


def _calibration(data: str, seq_len: int, batches: int, batch_size: int):
    """Calibration batches (dicts of input_ids) from a data spec, with a progress bar."""
    from tqdm import tqdm

    from .data import load_dataset_spec

    dataset = load_dataset_spec(data, seq_len)
    import torch

    n = min(len(dataset), batches * batch_size)
    ids = torch.tensor(dataset[:n]["input_ids"])
    return tqdm([{"input_ids": ids[i : i + batch_size]} for i in range(0, n, batch_size)], desc="calibration")


def cmd_finetune(args) -> int:
    from .train import finetune

    config = None if args.no_compress else _config(
        args, warmup_fraction=args.warmup_fraction, attempts=args.attempts, calibration_batches=args.calibration_batches,
        schedule=args.schedule, rank_path=args.rank_path)
    result = finetune(
        args.out, data=args.data, preset=None if args.checkpoint else args.preset, checkpoint=args.checkpoint,
        arch=args.arch, config=config, seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, seed=args.seed, backend=args.backend,
    )
    print(summary(result.report, result.plots, args.out))
    return 0


def summary(report: dict, plots: list, out: str) -> str:
    """The lines a finetune run ends with: per-layer N, loss and tokens/s around the cut, where things are."""
    lines = ["", f"{'layer':<28} {'N before':>8} {'N after':>8}"]
    for name, before in report["state_sizes_before"].items():
        lines.append(f"{name:<28} {before:>8} {report['state_sizes_after'][name]:>8}")

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    if report["cut_step"] is not None:
        lines += [
            f"cut at step{'s' if len(report['cut_steps']) > 1 else ''} "
            f"{', '.join(map(str, report['cut_steps']))} of {report['max_steps']}",
            f"training loss      before the first cut {fmt(report['loss_before_cut'], '.3f')}   after the last "
            f"{fmt(report['loss_after_cut'], '.3f')}   (last 10 % of steps: {fmt(report['final_loss'], '.3f')})",
            f"training tokens/s  before the first cut {fmt(report['tokens_per_s_before_cut'], '.0f')}   after the "
            f"last {fmt(report['tokens_per_s_after_cut'], '.0f')}",
        ]
        before, after = report["tokens_per_s_before_cut"], report["tokens_per_s_after_cut"]
        if before and after:
            lines.append(f"speed-up after the cut: {after / before:.1f}x (measured in this run)")
    else:
        lines.append(f"no cut; final training loss {fmt(report['final_loss'], '.3f')}, "
                     f"{fmt(report['tokens_per_s'], '.0f')} tokens/s")
    lines.append(f"checkpoint: {os.path.join(out, 'model')}   report: {os.path.join(out, 'report.json')}")
    if plots:
        lines.append("plots: " + "  ".join(plots))
    return "\n".join(lines)


def cmd_compress(args) -> int:
    from ..cut.compress import compress_
    from ..cut.state_sizes import from_pretrained

    model = from_pretrained(args.checkpoint)
    report = compress_(model, _config(args), _calibration(args.data, args.seq_len, args.batches, args.batch_size))
    from ..persistence import save_pretrained_atomic

    print(report)
    save_pretrained_atomic(model, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_analyze(args) -> int:
    from ..cut.collect import GramianCollector
    from ..cut.compress import decide_cuts, run_calibration
    from ..models.adapters import find_mixers
    from .plots import plot_spectra_table
    from ..cut.state_sizes import from_pretrained

    model = from_pretrained(args.checkpoint)
    adapters = find_mixers(model)
    collector = GramianCollector(adapters, args.estimator)
    run_calibration(model, _calibration(args.data, args.seq_len, args.batches, args.batch_size), collector)
    decisions = decide_cuts(adapters, collector.gramians(), _config(args))
    print(f"{'layer':<28} {'N':>4} {'r (' + args.mode + ')':>10} {'energy kept':>11}  top importances")
    for d in decisions:
        top = " ".join(f"{v:.2e}" for v in sorted(d.importance.sum(0).tolist(), reverse=True)[:5])
        print(f"{d.name:<28} {d.state_before:>4} {d.state_after:>10} {d.energy_kept:>11.4f}  {top}")
    path = plot_spectra_table([(d.name, d.importance.sum(0).tolist(), d.state_after) for d in decisions], args.out,
                              f"{args.checkpoint}: state importance ({args.estimator}, {args.importance})")
    print(f"spectra: {path} (the model was not changed)")
    return 0


def cmd_bench(args) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scripts = [os.path.join(here, "bench", f"bench_{name}.py") for name in args.which]
    missing = [s for s in scripts if not os.path.exists(s)]
    if missing:
        raise FileNotFoundError(f"benchmark scripts not found: {', '.join(missing)} (run from a source checkout)")
    status = 0
    for script in scripts:
        status |= subprocess.call([sys.executable, script])
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compressm-mamba", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="train or fine-tune with in-training compression")
    p.add_argument("--data", default="stdlib", help="stdlib | digits | a .txt/.json/.jsonl file | a saved dataset dir")
    p.add_argument("--preset", default="demo", help="model size built from config: tiny | demo | small | base")
    p.add_argument("--checkpoint", default=None, help="fine-tune this local checkpoint instead of a preset")
    p.add_argument("--arch", default="mamba", help="mamba | mamba2 (presets only)")
    p.add_argument("--out", default="outputs/finetune")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--backend", default="auto", help="scan backend: auto | torch | triton | reference")
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--attempts", type=int, default=4)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--schedule", default="warmup", help="warmup | stable")
    p.add_argument("--rank-path", default="geometric", help="--mode rank: geometric (shrink at every attempt) | direct")
    p.add_argument("--no-compress", action="store_true", help="train without the callback (a baseline)")
    _config_args(p)
    p.set_defaults(func=cmd_finetune)

    for name, func, help_text in (("compress", cmd_compress, "one-shot compression of a checkpoint"),
                                  ("analyze", cmd_analyze, "HSV / importance spectra of a checkpoint, no changes")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("checkpoint")
        p.add_argument("--data", default="stdlib")
        p.add_argument("--seq-len", type=int, default=256)
        p.add_argument("--batches", type=int, default=8)
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--out", required=name == "compress", default="spectra.png" if name == "analyze" else None)
        _config_args(p)
        p.set_defaults(func=func)

    p = sub.add_parser("bench", help="run the benchmark scripts (bench/)")
    p.add_argument("which", nargs="*", default=["selective_scan", "gramians"])
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "checkpoint", None) and not os.path.isdir(args.checkpoint):
        print(f"compressm-mamba: error: checkpoint {args.checkpoint!r} is not a directory", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as err:
        print(f"compressm-mamba: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
