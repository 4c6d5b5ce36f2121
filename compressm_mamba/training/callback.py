"""``CompreSSMCallback``: in-training compression for the Hugging Face Trainer (METHOD.md §6–7).

Timeline for ``schedule="warmup"`` (the paper's): ``attempts`` reduction attempts equally spaced
inside the first ``warmup_fraction`` of ``max_steps``; Gramians are accumulated over the last
``calibration_batches`` training steps before each attempt (the training forward passes themselves
feed the collector, so calibration costs no extra forward).  At an attempt the callback chooses
ranks, cuts every layer at once, re-keys the optimizer (moments sliced, step counts and the LR
schedule untouched) and logs the per-layer state sizes into ``state.log_history``.

``schedule="stable"``: attempts continue at the same spacing until the kept set stops moving
(the smallest per-layer Jaccard index between consecutive attempts' kept sets reaches
``stable_jaccard``), and happen once; at ``stable_latest_fraction`` of ``max_steps`` the cut is made
whatever the Jaccard index says.

``mode="pragmatic"``: before each cut the validation metric (``metric_fn(model)``, lower is better;
by default the mean loss over ``eval_data``, or over the Trainer's evaluation dataloader once it has
evaluated) is measured, the cut is made and measured
again; if the metric worsened by more than ``rollback_tolerance`` (relative), the cut is undone —
the very same parameter objects and optimizer state come back, bit for bit — and reducing stops.

Failures: an attempt that raises (choosing ranks, surgery, rebuilding DDP) leaves the model and the
optimizer exactly as they were before it, is recorded in ``callback.failures`` and in
``state.log_history`` as ``{"compressm/failed": 1, "compressm/error": ...}``, and training goes on
(later attempts may still cut); ``on_error="raise"`` re-raises instead.

Data parallelism (DDP, METHOD.md §7): the Gramian sums are all-reduced over the ranks before ranks
are chosen, rank 0's choice is broadcast, every yes/no (stable schedule's readiness, pragmatic
rollback via the rank-mean metric, failure) is agreed by all ranks, and the Trainer's DDP wrapper is
rebuilt in place for the new parameters (``distributed.rebuild_ddp_``).  FSDP and DeepSpeed are
refused with the reason (README, "Distributed training").

Resuming (``trainer.train(resume_from_checkpoint=...)``): the callback makes the model's
``load_state_dict`` cut the mixers to the checkpoint's sizes first (``state_sizes.resize_on_load``,
installed when the Trainer is built), so the weights and then the optimizer state fit.  Attempts at
or before the checkpoint's step are not repeated; a stable schedule that already cut, or a pragmatic
run that rolled back, stays stopped (read back from ``state.log_history``); a calibration window
that straddles the checkpoint and the stable schedule's previous kept sets are restored from
``compressm_state.safetensors``, which ``on_save`` writes (atomically) into the checkpoint.

Never silent: every attempt logs one line (step, Gramians over how many batches) and one line per
layer saying whether it was cut and why (``LayerDecision.reason``), on the ``compressm_mamba`` logger
(shown on stderr at INFO unless the application configured logging itself); an attempt that saw
fewer calibration batches than ``calibration_batches`` logs a warning.  ``config.compressm`` (the
per-layer state sizes) is written at the start of training and after every attempt, cut or not.

Fast by default: ``fast_scan=True`` swaps transformers' Mamba1 mixers for the drop-in mixer when
training begins (``models.drop_in.replace_mixers_``: same parameters, our scan kernels).
transformers' own CPU path is a Python loop over time: a training step was 13–66x slower in
``bench/bench_selective_scan.py``'s CPU rows.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from transformers import TrainerCallback

from . import distributed
from ..cut.collect import GramianCollector
from ..cut.compress import CompressionReport, LayerDecision, decide_cuts, plans_for
from ..config import CompressConfig
from ..models.registry import find_mixers
from ..persistence import save_tensors_atomic, write_json_atomic
from ..cut.state_sizes import record_state_sizes, resize_on_load
from ..cut.surgery import apply_cuts

__all__ = ["CompreSSMCallback", "attempt_steps", "STATE_FILE", "REPORTS_FILE"]

logger = logging.getLogger(__name__)


def _visible_logs() -> None:
    """Show the package's INFO lines on stderr when the application has not configured logging."""
    package = logging.getLogger("compressm_mamba")
    if package.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[compressm_mamba] %(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False  # the handler above prints it; a root handler added later would print it twice

STATE_FILE = "compressm_state.safetensors"  # written into each Trainer checkpoint by on_save
REPORTS_FILE = "compressm_reports.json"


def attempt_steps(config: CompressConfig, max_steps: int) -> list:
    """Optimizer steps after which a reduction is attempted (1-based, increasing, unique).

    warmup: k · warmup_fraction · max_steps / attempts for k = 1..attempts.  stable: the same spacing,
    continued up to stable_latest_fraction · max_steps (the last one is the backstop).
    """
    if max_steps <= 0:
        raise ValueError("CompreSSMCallback needs a known max_steps (set max_steps or num_train_epochs)")
    spacing = config.warmup_fraction * max_steps / config.attempts
    if config.schedule == "warmup":
        raw = [k * spacing for k in range(1, config.attempts + 1)]
    else:
        latest = config.stable_latest_fraction * max_steps
        raw = [k * spacing for k in range(1, int(latest / spacing + 1e-9) + 1)] or [latest]
    steps = sorted({min(max(1, round(s)), max_steps) for s in raw})
    return steps


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over groups of |a_g ∩ b_g| / |a_g ∪ b_g| for kept-index tensors (ngroups, r)."""
    scores = []
    for ga, gb in zip(a.tolist(), b.tolist()):
        sa, sb = set(ga), set(gb)
        scores.append(len(sa & sb) / len(sa | sb))
    return sum(scores) / len(scores)


def _weyl_margin(now, before) -> float:
    """Half the gap at the cut minus the largest move of any importance, relative to the largest one.

    Weyl's inequality bounds how far each sorted eigenvalue moves by the size of the perturbation:
    while every value moved less than half the gap between the r-th and (r+1)-th, the top-r set
    cannot have changed order across the cut.  Positive: the cut is settled by this criterion.
    """
    a = torch.sort(now.importance.sum(0), descending=True).values
    b = torch.sort(before.importance.sum(0), descending=True).values
    r = now.state_after
    if r >= a.numel() or a.shape != b.shape:
        return float("inf")
    scale = float(a[0]) or 1.0
    return (0.5 * float(a[r - 1] - a[r]) - float((a - b).abs().max())) / scale


class _AttemptFailed(Exception):
    """An attempt failed on this rank or another; the model and optimizer are as before it."""

    def __init__(self, stage: str, error: BaseException | None):
        self.stage = stage
        self.error = error
        what = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
        super().__init__(f"{stage}: {what}")


class CompreSSMCallback(TrainerCallback):
    """Compress the Mamba mixers of the model being trained, early in training.

    Args:
        config: ``CompressConfig``.
        metric_fn: for ``mode="pragmatic"``: ``metric_fn(model) -> float``, lower is better.  Default:
            mean loss over at most ``eval_batches`` batches of ``eval_data``.
        eval_data: for the default metric: an iterable of batches (dicts with ``labels``), e.g.
            ``trainer.get_eval_dataloader()``; the Trainer's own evaluation dataloader is used when
            this is None and the Trainer has evaluated before.
        eval_batches: cap for the default metric (default 16).
        on_error: ``"continue"`` (default): an attempt that raises is recorded in ``failures`` and
            ``state.log_history`` and training continues on the unchanged model; ``"raise"``: re-raise.
        fast_scan: swap transformers' Mamba1 mixers for the drop-in mixer running our scan kernels
            when training begins (default True; same parameters and state_dict keys).  Mamba2 keeps
            transformers' SSD scan either way.

    After training, ``reports`` holds one ``CompressionReport`` per attempt that cut (``step`` set),
    ``jaccard`` and ``weyl`` the stable schedule's measurements between consecutive attempts (the
    smallest per-layer Jaccard index of the kept sets, and the Weyl margin of the importance
    spectrum at the cut — see ``_weyl_margin``), ``rolled_back`` the steps whose cut was undone,
    ``failures`` one dict (step, stage, error) per attempt that raised.
    """

    def __init__(self, config: CompressConfig, *, metric_fn=None, eval_data=None, eval_batches: int = 16,
                 on_error: str = "continue", fast_scan: bool = True):
        if not isinstance(config, CompressConfig):
            raise TypeError(f"config must be a CompressConfig, got {type(config).__name__}")
        if on_error not in ("continue", "raise"):
            raise ValueError(f"on_error must be 'continue' or 'raise', got {on_error!r}")
        self.config = config
        self.on_error = on_error
        self.metric_fn = metric_fn
        self.eval_data = eval_data
        self.eval_batches = eval_batches
        self.fast_scan = fast_scan
        self.reports: list = []
        self.jaccard: list = []  # (step, smallest per-layer Jaccard vs the previous attempt)
        self.weyl: list = []  # (step, smallest per-layer Weyl margin vs the previous attempt)
        self.rolled_back: list = []
        self.steps: list = []
        self.stopped = False
        self.failures: list = []
        self._adapters = None
        self._collector = None
        self._window = None  # the attempt step the collector's current statistics are for
        self._previous = None  # previous attempt's decisions (stable schedule)
        self._ddp = None
        self._resume_hook = None

    # ---- Trainer events ----------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # Resuming from a checkpoint saved after a cut: the Trainer loads its weights into the model
        # with load_state_dict before building the optimizer; cut the mixers to fit first.
        if model is None or self._resume_hook is not None:
            return
        try:
            find_mixers(model)
        except TypeError:
            return  # on_train_begin names the problem
        self._resume_hook = resize_on_load(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        distributed.check_supported_wrapping(model)
        _visible_logs()
        self._adapters = find_mixers(model, self.config.layers)  # TypeError for a model without supported mixers
        if self.fast_scan:
            self._use_fast_scan(model)
        self._collector = GramianCollector(self._adapters, self.config.estimator,
                                           ghost=self.config.importance == "ghost")
        self._window = None
        self.steps = attempt_steps(self.config, state.max_steps)
        if self.config.mode == "pragmatic" and self.metric_fn is None and self.eval_data is None:
            raise ValueError(
                "CompressConfig.mode='pragmatic' needs a validation metric: pass metric_fn= or eval_data= "
                "(e.g. trainer.get_eval_dataloader()) to CompreSSMCallback"
            )
        self._ddp = None
        if distributed.is_distributed() and self.config.importance == "ghost":
            raise NotImplementedError("CompreSSMCallback: importance='ghost' is not supported under data "
                                      "parallelism yet (its per-state sums are not all-reduced)")
        if distributed.is_distributed():
            self._ddp = distributed.find_ddp(model)
            if self._ddp is None:
                raise RuntimeError(
                    "CompreSSMCallback: a process group of several ranks is initialised but the model is not "
                    "wrapped in DistributedDataParallel; only DDP is supported for data-parallel compression "
                    "(FSDP and DeepSpeed own the parameters' storage, which a cut must replace)"
                )
        # A resumed run: attempts scheduled at or before the checkpoint's step are not repeated.
        self.steps = [s for s in self.steps if s > state.global_step]
        if state.global_step > 0:
            self._restore(args, state)
        record_state_sizes(model, self._adapters)  # config.compressm exists whatever happens next
        logger.info("CompreSSMCallback: %d reduction attempt%s at step%s %s of %d (%s, %s Gramians over %d batches each)",
                    len(self.steps), "" if len(self.steps) == 1 else "s", "" if len(self.steps) == 1 else "s",
                    ", ".join(map(str, self.steps)) or "-", state.max_steps, self.config.mode, self.config.estimator,
                    self.config.calibration_batches)

    @property
    def collecting(self) -> bool:
        """Whether the current step feeds the Gramian collector (its time is not a plain training step)."""
        return self._collector is not None and self._collector.active

    def on_step_begin(self, args, state, control, **kwargs):
        upcoming = self._next_attempt(state.global_step)
        if upcoming is None or self._collector is None:
            return
        # The step about to run is global_step + 1; collect over the K steps ending at the attempt.
        if upcoming - (state.global_step + 1) < self.config.calibration_batches and not self._collector.active:
            if self._window != upcoming:  # a new window (a restored one keeps its statistics)
                self._collector.reset()
                self._window = upcoming
            self._collector.start()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._collector is None or state.global_step not in self.steps or self.stopped:
            return
        self._collector.stop()
        try:
            self._attempt(model, optimizer, state, control, self.eval_data or kwargs.get("eval_dataloader"))
        except _AttemptFailed as failure:
            self._record_failure(state, control, failure)
            if self.on_error == "raise":
                raise (failure.error or failure) from None
        finally:
            self._collector.reset()
            self._window = None

    def on_save(self, args, state, control, **kwargs):
        """Write what a resumed run needs beyond the Trainer's own checkpoint (a calibration window in
        progress, the stable schedule's previous kept sets) and the reports, atomically."""
        if self._collector is None:
            return
        stats = self._collector.stats
        if distributed.is_distributed():
            stats = distributed.all_reduce_statistics(stats, self._adapters, self.config.estimator)  # collective
            if distributed.rank() != 0:
                return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            return
        tensors, metadata = self._collector.state_tensors(stats)
        metadata.update({"step": str(state.global_step), "window": str(self._window or 0),
                         "schedule": self.config.schedule})
        if self._previous is not None:
            for d in self._previous:
                tensors[f"previous/{d.name}/kept"] = d.kept.to(torch.int64).contiguous()
                tensors[f"previous/{d.name}/importance"] = d.importance.to(torch.float64).cpu().contiguous()
                tensors[f"previous/{d.name}/hsv"] = d.hsv.to(torch.float64).cpu().contiguous()
                metadata[f"previous/{d.name}"] = f"{d.kind},{d.state_before},{d.state_after}"
        save_tensors_atomic(tensors, os.path.join(folder, STATE_FILE), metadata=metadata)
        if self.reports or self.failures:
            write_json_atomic({"reports": [r.to_dict() for r in self.reports], "failures": self.failures},
                              os.path.join(folder, REPORTS_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if self._collector is not None:
            self._collector.stop()

    # ---- internals -----------------------------------------------------------------------------

    def _use_fast_scan(self, model) -> None:
        from ..models.drop_in import replace_mixers_

        mamba1 = [a for a in self._adapters if a.kind == "mamba1"]
        if not mamba1 or all(hasattr(a.module, "scan_backend") for a in mamba1):
            return  # nothing to swap, or already swapped (keep the backend the user chose)
        try:
            names = replace_mixers_(model)
        except TypeError:  # no transformers / mamba_ssm Mamba1 mixer (e.g. a custom one): keep it
            return
        self._adapters = find_mixers(model, self.config.layers)
        logger.info("CompreSSMCallback: %d Mamba1 mixer%s now run compressm_mamba's scan kernels (fast_scan=True; "
                    "same parameters)", len(names), "" if len(names) == 1 else "s")

    def _next_attempt(self, global_step: int):
        if self.stopped:
            return None
        return next((s for s in self.steps if s > global_step), None)

    def _restore(self, args, state) -> None:
        """Bring a resumed run's bookkeeping to where the checkpoint's run was."""
        history = [e for e in state.log_history if e.get("step", 0) <= state.global_step]
        cut_steps = [e["step"] for e in history if "compressm/mean_state_size" in e]
        self.rolled_back = [e["step"] for e in history if e.get("compressm/rolled_back")]
        self.failures = [{"step": e["step"], "stage": e.get("compressm/stage", ""), "error": e.get("compressm/error", "")}
                         for e in history if e.get("compressm/failed")]
        if self.rolled_back or (self.config.schedule == "stable" and cut_steps):
            self.stopped = True
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if not os.path.isfile(path):
            upcoming = self._next_attempt(state.global_step)
            if upcoming is not None and upcoming - state.global_step < self.config.calibration_batches:
                logger.warning("CompreSSMCallback: %s not found; the calibration window for the attempt at step %d "
                               "restarts (fewer batches than calibration_batches)", path, upcoming)
            return
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("step") != str(state.global_step):
            return
        window = int(metadata.get("window", 0))
        if window and window in self.steps and not self.stopped and distributed.rank() == 0:
            # Under DDP only rank 0 carries the (already all-reduced) partial sums: the next
            # all-reduce adds the other ranks' new batches to them.
            self._collector.load_state_tensors({k: v for k, v in tensors.items() if k.startswith(("stats/", "ghost/"))}, metadata)
            self._window = window
        elif window and window in self.steps and not self.stopped:
            self._window = window
        previous = []
        for a in self._adapters:
            record = metadata.get(f"previous/{a.name}")
            if record is None:
                previous = []
                break
            kind, before, after = record.split(",")
            previous.append(LayerDecision(a.name, kind, int(before), int(after), tensors[f"previous/{a.name}/kept"],
                                          tensors[f"previous/{a.name}/importance"], tensors[f"previous/{a.name}/hsv"]))
        self._previous = previous or None

    def _agree(self, error: BaseException | None, stage: str) -> None:
        """Raise _AttemptFailed on every rank if ``error`` happened on any (a collective under DDP)."""
        if distributed.any_rank(error is not None):
            raise _AttemptFailed(stage, error)

    def _attempt(self, model, optimizer, state, control, eval_dataloader):
        decisions, error = None, None
        number = len([s for s in self.steps if s <= state.global_step])
        seen = self._collector.batches
        logger.info("CompreSSMCallback: attempt at step %d (%d of %d): %s Gramians over %d batch%s", state.global_step,
                    number, len(self.steps), self.config.estimator, seen, "" if seen == 1 else "es")
        if seen < self.config.calibration_batches:
            logger.warning("CompreSSMCallback: the attempt at step %d saw %d calibration batch%s, fewer than the %d asked "
                           "(calibration_batches): the window reaches back only to the start of training or the previous "
                           "attempt, so the ranking rests on less data (more steps or fewer attempts give full windows)",
                           state.global_step, seen, "" if seen == 1 else "es", self.config.calibration_batches)
        try:
            self._collector.all_reduce()  # METHOD.md §7: sum the Gramian statistics over the ranks
            ghost = self._collector.ghost_scores() if self.config.importance == "ghost" else None
            decisions = decide_cuts(self._adapters, self._collector.gramians(), self.config,
                                    self._rank_targets(state.global_step), ghost=ghost)
        except Exception as err:  # noqa: BLE001 - any failure of an attempt is recorded, training goes on
            error = err
        self._agree(error, "choosing ranks")
        decisions = distributed.broadcast_decisions_(decisions)  # every rank cuts rank 0's states

        if self.config.schedule == "stable":
            backstop = state.global_step == self.steps[-1]
            ready = False
            if self._previous is not None and [p.name for p in self._previous] == [d.name for d in decisions]:
                score = min(_jaccard(d.kept, p.kept) for d, p in zip(decisions, self._previous))
                self.jaccard.append((state.global_step, score))
                self.weyl.append((state.global_step, min(_weyl_margin(d, p) for d, p in zip(decisions, self._previous))))
                ready = score >= self.config.stable_jaccard
            self._previous = decisions
            if not distributed.broadcast_flag(ready or backstop):
                logger.info("CompreSSMCallback: step %d: the kept states are still moving (smallest Jaccard %s < %s); "
                            "not cutting yet", state.global_step,
                            f"{self.jaccard[-1][1]:.2f}" if self.jaccard and self.jaccard[-1][0] == state.global_step
                            else "-", self.config.stable_jaccard)
                return

        for d in decisions:
            logger.info("CompreSSMCallback:   %s: %s", d.name, d.reason)
        if not any(d.cut for d in decisions):
            record_state_sizes(model, self._adapters)
            logger.info("CompreSSMCallback: step %d: no layer cut", state.global_step)
            return
        self._cut(model, optimizer, decisions, state, control, eval_dataloader)
        if self.config.schedule == "stable":
            self.stopped = True  # the stable schedule cuts once

    def _rank_targets(self, global_step: int) -> dict | None:
        """Per-layer sizes for this attempt on the geometric path to ``rank`` (None: cut to ``rank``).

        With R' attempts left (this one included), a layer at N goes to N·(rank/N)^(1/R'): a constant
        factor per attempt, depending only on the current sizes, so a resumed run continues the path.
        """
        c = self.config
        if c.mode != "rank" or c.schedule != "warmup" or c.rank_path != "geometric":
            return None
        left = sum(1 for s in self.steps if s >= global_step)
        if left <= 1:
            return None
        return {a.name: min(a.state_size, max(c.rank, round(a.state_size * (c.rank / a.state_size) ** (1 / left))))
                for a in self._adapters}

    def _record_failure(self, state, control, failure: _AttemptFailed) -> None:
        error = failure.error
        message = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
        self.failures.append({"step": state.global_step, "stage": failure.stage, "error": message})
        state.log_history.append({"step": state.global_step, "compressm/failed": 1, "compressm/stage": failure.stage,
                                  "compressm/error": message})
        control.should_log = True
        logger.warning("CompreSSMCallback: the reduction attempt at step %d failed while %s (%s); the model and "
                       "optimizer are unchanged and training continues", state.global_step, failure.stage, message)

    def _cut(self, model, optimizer, decisions, state, control, eval_dataloader):
        pragmatic = self.config.mode == "pragmatic"
        before = self._agreed_metric(model, eval_dataloader, "measuring the metric before the cut") if pragmatic else None
        applied, error = None, None
        try:
            plans = plans_for(self._adapters, decisions)
            applied = apply_cuts(plans, optimizer)  # all layers or none
        except Exception as err:  # noqa: BLE001 - recorded by on_step_end, training goes on
            error = err
        try:
            self._agree(error, "cutting the layers")
        except _AttemptFailed:
            if applied is not None:  # it failed on another rank: undo ours too
                applied.undo()
            raise
        try:
            distributed.rebuild_ddp_(self._ddp)
        except Exception as err:  # noqa: BLE001
            self._undo(applied)
            raise _AttemptFailed("rebuilding DistributedDataParallel", err) from None
        if pragmatic:
            try:
                after = self._agreed_metric(model, eval_dataloader, "measuring the metric after the cut")
            except _AttemptFailed:
                self._undo(applied)
                raise
            if after - before > self.config.rollback_tolerance * abs(before):
                logger.info("CompreSSMCallback: step %d: the metric went %.4g -> %.4g (more than rollback_tolerance "
                            "%g worse): cut undone, reducing stops", state.global_step, before, after,
                            self.config.rollback_tolerance)
                self._undo(applied)
                self.stopped = True
                self.rolled_back.append(state.global_step)
                state.log_history.append(
                    {"step": state.global_step, "compressm/rolled_back": 1.0, "compressm/metric_before": before,
                     "compressm/metric_after": after}
                )
                return
        record_state_sizes(model, self._adapters)
        report = CompressionReport(decisions, self.config, step=state.global_step)
        self.reports.append(report)
        entry = {"step": state.global_step}
        entry.update({f"compressm/state_size/{d.name}": d.state_after for d in decisions})
        entry["compressm/mean_state_size"] = sum(d.state_after for d in decisions) / len(decisions)
        if pragmatic:
            entry.update({"compressm/metric_before": before, "compressm/metric_after": after})
        state.log_history.append(entry)
        control.should_log = True

    def _undo(self, applied) -> None:
        """Put the very same parameters and optimizer state back, and DDP's reducer on them."""
        applied.undo()
        try:
            distributed.rebuild_ddp_(self._ddp)
        except Exception:  # noqa: BLE001 - the error that made us undo is the one to report
            logger.exception("CompreSSMCallback: rebuilding DistributedDataParallel after an undo failed")

    def _agreed_metric(self, model, eval_dataloader, stage: str) -> float:
        """The validation metric averaged over the ranks; _AttemptFailed (on every rank) if it fails anywhere."""
        value, error = float("nan"), None
        try:
            value = self._metric(model, eval_dataloader)
        except Exception as err:  # noqa: BLE001
            error = err
        self._agree(error, stage)
        return distributed.mean_over_ranks(value)

    @torch.no_grad()
    def _metric(self, model, eval_dataloader) -> float:
        """This rank's validation metric (lower is better)."""
        was_training = model.training
        model.eval()
        try:
            if self.metric_fn is not None:
                value = float(self.metric_fn(model))
            else:
                if eval_dataloader is None:
                    raise ValueError("no evaluation data: no metric for mode='pragmatic'")
                device = next(model.parameters()).device
                losses = []
                for i, batch in enumerate(eval_dataloader):
                    if i >= self.eval_batches:
                        break
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    losses.append(float(model(**batch).loss))
                if not losses:
                    raise ValueError("the evaluation dataloader is empty: no metric for mode='pragmatic'")
                value = sum(losses) / len(losses)
            if not math.isfinite(value):
                raise ValueError(f"validation metric is {value}: cannot judge a cut")
            return value
        finally:
            model.train(was_training)
