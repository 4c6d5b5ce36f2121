"""``compressm-mamba``: the command line.

    compressm-mamba finetune --data stdlib --preset demo --out outputs/demo      # train + cut in training
    compressm-mamba finetune --checkpoint CKPT --data notes.txt --out run        # fine-tune a checkpoint
    compressm-mamba compress CHECKPOINT --out SMALLER --mode rank --rank 12     # one-shot cut
    compressm-mamba analyze CHECKPOINT --out spectra.png                        # spectra, no changes
    compressm-mamba bench                                                       # the benchmark scripts

Text is tokenized with the checkpoint's own tokenizer (or --tokenizer); models built from a preset
use UTF-8 bytes.  Every folder written is a complete checkpoint (weights, config, tokenizer,
generation config).  An existing non-empty --out is refused unless --overwrite; the input never is
overwritten.  Errors (missing paths, unknown presets, unsupported models, bad settings, vocabulary
mismatches) are one line on stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time

__all__ = ["main", "build_parser"]

_HELP = {
    "mode": "how many states to keep: tolerance (tau) | fixed (fraction per attempt) | rank (--rank) | pragmatic",
    "tau": "tolerance mode: keep the fewest states holding (1 - tau) of each layer's Hankel energy",
    "rank": "rank mode: the state size N every layer is cut to (at most the layers' N)",
    "fraction": "fixed / pragmatic mode: fraction of N cut per attempt",
    "estimator": "Gramian estimator: mean_lti (cheap) | frozen | ltv (docs/METHOD.md §3)",
    "importance": "per-state importance: balanced | diagonal | ghost (GHOST's forward-pass score)",
    "keep": "which states: largest (the method) | smallest | random (ablations)",
    "reduction": "select (keep state indices) | balanced (Mamba2: balanced truncation)",
    "gate": "a layer is cut only if the new N < gate x N",
    "seed": "seed (training, keep=random)",
    "warmup_fraction": "attempts happen inside this first fraction of the steps",
    "attempts": "number of reduction attempts",
    "calibration_batches": "training batches whose Gramians each attempt uses",
    "schedule": "warmup (cut at every attempt) | stable (cut once the kept set stops moving)",
    "rank_path": "rank mode: geometric (shrink at every attempt) | direct (first attempt cuts to --rank)",
}


def _defaults():
    """CompressConfig's defaults: the one place they are set (the CLI shows them, never repeats them)."""
    from ..config import CompressConfig

    return {f.name: f.default for f in dataclasses.fields(CompressConfig)}


def _config_args(parser, *, schedule: bool = False):
    d = _defaults()
    for name, kind in (("mode", str), ("tau", float), ("rank", int), ("fraction", float), ("estimator", str),
                       ("importance", str), ("keep", str), ("reduction", str), ("gate", float)):
        parser.add_argument(f"--{name}", type=kind, default=d[name], help=_HELP[name])
    if schedule:
        for name, kind in (("warmup_fraction", float), ("attempts", int), ("calibration_batches", int),
                           ("schedule", str), ("rank_path", str)):
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=d[name], help=_HELP[name])
    parser.add_argument("--seed", type=int, default=d["seed"], help=_HELP["seed"])


def _config(args, **extra):
    from ..config import CompressConfig

    return CompressConfig(mode=args.mode, tau=args.tau, rank=args.rank, fraction=args.fraction,
                          estimator=args.estimator, importance=args.importance, keep=args.keep,
                          reduction=args.reduction, gate=args.gate, seed=args.seed, **extra)


def _data_args(parser, *, default_data: str):
    parser.add_argument("--data", default=default_data,
                        help="stdlib | digits | mqar (associative recall, --mqar-*) | a text file (any name) | .json/.jsonl/.csv/.parquet file | a dataset "
                             "folder (save_to_disk, or data files)")
    parser.add_argument("--text-column", default=None, help="the column holding the text (default: 'text', or the "
                                                            "only string column)")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer folder, or 'bytes' (default: the checkpoint's own; bytes for presets)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")


def _check_rank(model, config) -> None:
    """--rank larger than a layer's N: an error before any calibration (which may take minutes)."""
    from ..models.registry import find_mixers

    if config.mode != "rank":
        return
    for a in find_mixers(model):
        if config.rank > a.state_size:
            raise ValueError(f"--rank {config.rank} is larger than {a.name}'s state size N={a.state_size}")


def _calibration(args, checkpoint, say):
    """Calibration batches from --data with the checkpoint's tokenizer (or --tokenizer), and that tokenizer."""
    from tqdm import tqdm

    from .data import load_dataset_spec
    from .train import resolve_tokenizer

    tokenizer = resolve_tokenizer(args.tokenizer, checkpoint, args.data)
    dataset = load_dataset_spec(args.data, args.seq_len, tokenizer=tokenizer, text_column=args.text_column)
    say(dataset.summary)
    batches = dataset.batches(args.batch_size, args.batches)
    if len(batches) < args.batches:
        print(f"compressm-mamba: warning: the data gives {len(batches)} calibration batch"
              f"{'' if len(batches) == 1 else 'es'} of {args.batch_size}, fewer than --batches {args.batches}",
              file=sys.stderr)
    return tqdm(batches, desc="calibration", unit="batch"), dataset, tokenizer


def cmd_finetune(args) -> int:
    from .train import finetune

    config = None if args.no_compress else _config(
        args, warmup_fraction=args.warmup_fraction, attempts=args.attempts, calibration_batches=args.calibration_batches,
        schedule=args.schedule, rank_path=args.rank_path)
    result = finetune(
        args.out, data=args.data, preset=None if args.checkpoint else args.preset, checkpoint=args.checkpoint,
        arch=args.arch, config=config, seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, seed=args.seed, backend=args.backend, tokenizer=args.tokenizer,
        text_column=args.text_column, overwrite=args.overwrite,
        mqar=dict(pairs=args.mqar_pairs, vocab=args.mqar_vocab, n=args.mqar_train) if args.data == "mqar" else None,
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

    if report.get("mqar_accuracy") is not None:
        lines.append(f"MQAR held-out accuracy {report['mqar_accuracy']:.3f} (answer positions, another seed)")
    if report["cut_step"] is not None:
        lines += [
            f"cut at step{'s' if len(report['cut_steps']) > 1 else ''} "
            f"{', '.join(map(str, report['cut_steps']))} of {report['max_steps']}",
            f"training loss      before the first cut {fmt(report['loss_before_cut'], '.3f')}   after the last "
            f"{fmt(report['loss_after_cut'], '.3f')}   (last 10 % of steps: {fmt(report['final_loss'], '.3f')})",
            f"training tokens/s  before the first cut {fmt(report['tokens_per_s_before_cut'], '.0f')}   after the "
            f"last {fmt(report['tokens_per_s_after_cut'], '.0f')}   (steps feeding Gramian collection left out)",
        ]
        before, after = report["tokens_per_s_before_cut"], report["tokens_per_s_after_cut"]
        if before and after:
            lines.append(f"speed-up after the cut: {after / before:.1f}x (measured in this run)")
    else:
        attempts = (report.get("config") or {}).get("attempts")
        why = "no cut (--no-compress)" if report.get("config") is None else \
            f"no cut in {attempts} attempt{'s' if attempts != 1 else ''} (the log says why, per layer)"
        lines.append(f"{why}; final training loss {fmt(report['final_loss'], '.3f')}, "
                     f"{fmt(report['tokens_per_s'], '.0f')} tokens/s")
    lines.append(f"checkpoint: {os.path.join(out, 'model')}   report: {os.path.join(out, 'report.json')}")
    if plots:
        lines.append("plots: " + "  ".join(plots))
    return "\n".join(lines)


def _load_checked(args):
    """The checkpoint, after the cheap checks (settings, --out, --rank vs N) that must not wait for calibration."""
    from ..cut.state_sizes import from_pretrained

    config = _config(args)
    model = from_pretrained(args.checkpoint)
    _check_rank(model, config)
    return model, config


def cmd_compress(args) -> int:
    from ..cut.compress import compress_
    from ..persistence import check_output_dir, save_pretrained_atomic, write_json_atomic

    check_output_dir(args.out, overwrite=args.overwrite, inputs=[args.checkpoint])
    model, config = _load_checked(args)
    calibration, _, tokenizer = _calibration(args, args.checkpoint, print)
    report = compress_(model, config, calibration)
    print(report)
    for d in report.layers:
        print(f"{d.name}: {d.reason}")
    # weights + config (per-layer sizes) + the input's tokenizer and generation config: a complete checkpoint
    from .data import has_tokenizer

    save_pretrained_atomic(model, args.out, carry_from=args.checkpoint,
                           tokenizer=None if has_tokenizer(args.checkpoint) and args.tokenizer is None else tokenizer)
    write_json_atomic(report.to_dict(), os.path.join(args.out, "compressm_report.json"))
    print(f"wrote {args.out} (with {'the cut' if report.changed else 'no cut: the same model'}; report "
          f"{os.path.join(args.out, 'compressm_report.json')})")
    return 0


def cmd_analyze(args) -> int:
    from ..cut.collect import GramianCollector
    from ..cut.compress import decide_cuts, run_calibration
    from ..models.registry import find_mixers
    from ..persistence import check_output_dir
    from .plots import plot_spectra_table

    check_output_dir(args.out, overwrite=args.overwrite, inputs=[args.checkpoint], kind="file")
    model, config = _load_checked(args)
    adapters = find_mixers(model)
    collector = GramianCollector(adapters, args.estimator)
    calibration, _, _ = _calibration(args, args.checkpoint, print)
    run_calibration(model, calibration, collector)
    decisions = decide_cuts(adapters, collector.gramians(), config)
    print(f"{'layer':<28} {'N':>4} {'r (' + args.mode + ')':>10} {'energy kept':>11}  top importances")
    for d in decisions:
        top = " ".join(f"{v:.2e}" for v in sorted(d.importance.sum(0).tolist(), reverse=True)[:5])
        print(f"{d.name:<28} {d.state_before:>4} {d.state_after:>10} {d.energy_kept:>11.4f}  {top}")
        print(f"{'':<28} {d.reason}")
    path = plot_spectra_table([(d.name, d.importance.sum(0).tolist(), d.state_after) for d in decisions], args.out,
                              f"{args.checkpoint}: state importance ({args.estimator}, {args.importance})")
    print(f"spectra: {path} (the model was not changed)")
    return 0


def cmd_bench(args) -> int:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    scripts = [name if name.endswith(".py") else os.path.join(here, "bench", f"bench_{name}.py") for name in args.which]
    missing = [s for s in scripts if not os.path.exists(s)]
    if missing:
        raise FileNotFoundError(f"benchmark scripts not found: {', '.join(missing)} (run from a source checkout)")
    status = 0
    for i, script in enumerate(scripts, 1):
        print(f"[{i}/{len(scripts)}] {os.path.relpath(script)}: running (its table prints when it finishes)", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-u", script, *args.script_args])
        while True:
            try:
                code = proc.wait(timeout=args.heartbeat)
                break
            except subprocess.TimeoutExpired:
                print(f"[{i}/{len(scripts)}] {os.path.basename(script)}: still running, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
        print(f"[{i}/{len(scripts)}] {os.path.basename(script)}: {'done' if code == 0 else f'exit status {code}'} in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        status |= code
    return status


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default that is a value; leaves out None and False (flags and "see the help" defaults)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    formatter = _DefaultsFormatter
    parser = argparse.ArgumentParser(prog="compressm-mamba", description=__doc__.split("\n\n")[0],
                                     formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="train or fine-tune with in-training compression", formatter_class=formatter)
    _data_args(p, default_data="stdlib")
    p.add_argument("--preset", default="demo", help="model size built from config: tiny | demo | small | base")
    p.add_argument("--checkpoint", default=None, help="fine-tune this local checkpoint instead of a preset")
    p.add_argument("--arch", default="mamba", help="mamba | mamba2 (presets only)")
    p.add_argument("--out", default="outputs/finetune",
                   help="run folder: model/ (a complete checkpoint), report.json, loss.png, hsv.png")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine schedule)")
    p.add_argument("--backend", default="auto", help="Mamba1 scan backend: auto | torch | triton | reference")
    p.add_argument("--no-compress", action="store_true", help="train without the callback (a baseline)")
    p.add_argument("--mqar-pairs", type=int, default=8, help="--data mqar: key-value pairs per sequence")
    p.add_argument("--mqar-vocab", type=int, default=64, help="--data mqar: vocabulary (keys and values split it)")
    p.add_argument("--mqar-train", type=int, default=4096, help="--data mqar: training sequences of --seq-len")
    _config_args(p, schedule=True)
    p.set_defaults(func=cmd_finetune)

    for name, func, help_text in (("compress", cmd_compress, "one-shot compression of a checkpoint"),
                                  ("analyze", cmd_analyze, "HSV / importance spectra of a checkpoint, no changes")):
        p = sub.add_parser(name, help=help_text, formatter_class=formatter)
        p.add_argument("checkpoint", help="a local checkpoint folder (config.json + safetensors)")
        _data_args(p, default_data="stdlib")
        p.add_argument("--batches", type=int, default=8, help="calibration batches")
        p.add_argument("--batch-size", type=int, default=4, help="sequences per calibration batch")
        if name == "compress":
            p.add_argument("--out", required=True, help="a new folder for the compressed checkpoint")
        else:
            p.add_argument("--out", default="spectra.png", help="the PNG of the spectra")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out (never the checkpoint)")
        _config_args(p)
        p.set_defaults(func=func)

    p = sub.add_parser("bench", help="run the benchmark scripts (bench/)", formatter_class=formatter)
    p.add_argument("which", nargs="*", default=["selective_scan", "gramians"], help="NAME runs bench/bench_NAME.py; a .py path runs that script")
    p.add_argument("--heartbeat", type=float, default=15.0, help="seconds between progress lines")
    p.add_argument("--script-args", nargs=argparse.REMAINDER, default=[],
                   help="arguments passed to every script (e.g. --script-args --reps 1 --no-csv)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "checkpoint", None) and not os.path.isdir(args.checkpoint):
        print(f"compressm-mamba: error: checkpoint {args.checkpoint!r} is not a directory", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (OSError, ValueError, TypeError, ImportError) as err:
        print(f"compressm-mamba: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
