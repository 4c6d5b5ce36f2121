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
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from .collect import GramianCollector
from .compress import CompressionReport, decide_cuts, plans_for
from .config import CompressConfig
from .mixers import find_mixers
from .state_sizes import record_state_sizes
from .surgery import apply_cuts

__all__ = ["CompreSSMCallback", "attempt_steps"]


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

    After training, ``reports`` holds one ``CompressionReport`` per attempt that cut (``step`` set),
    ``jaccard`` and ``weyl`` the stable schedule's measurements between consecutive attempts (the
    smallest per-layer Jaccard index of the kept sets, and the Weyl margin of the importance
    spectrum at the cut — see ``_weyl_margin``), ``rolled_back`` the steps whose cut was undone.
    """

    def __init__(self, config: CompressConfig, *, metric_fn=None, eval_data=None, eval_batches: int = 16):
        if not isinstance(config, CompressConfig):
            raise TypeError(f"config must be a CompressConfig, got {type(config).__name__}")
        self.config = config
        self.metric_fn = metric_fn
        self.eval_data = eval_data
        self.eval_batches = eval_batches
        self.reports: list = []
        self.jaccard: list = []  # (step, smallest per-layer Jaccard vs the previous attempt)
        self.weyl: list = []  # (step, smallest per-layer Weyl margin vs the previous attempt)
        self.rolled_back: list = []
        self.steps: list = []
        self.stopped = False
        self._adapters = None
        self._collector = None
        self._previous = None  # previous attempt's decisions (stable schedule)

    # ---- Trainer events ----------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._adapters = find_mixers(model)  # TypeError for a model without supported mixers
        self._collector = GramianCollector(self._adapters, self.config.estimator)
        self.steps = attempt_steps(self.config, state.max_steps)
        if self.config.mode == "pragmatic" and self.metric_fn is None and self.eval_data is None:
            raise ValueError(
                "CompressConfig.mode='pragmatic' needs a validation metric: pass metric_fn= or eval_data= "
                "(e.g. trainer.get_eval_dataloader()) to CompreSSMCallback"
            )
        # A resumed run: attempts scheduled at or before the checkpoint's step are not repeated.
        self.steps = [s for s in self.steps if s > state.global_step]

    def on_step_begin(self, args, state, control, **kwargs):
        upcoming = self._next_attempt(state.global_step)
        if upcoming is None or self._collector is None:
            return
        # The step about to run is global_step + 1; collect over the K steps ending at the attempt.
        if upcoming - (state.global_step + 1) < self.config.calibration_batches and not self._collector.active:
            self._collector.reset()
            self._collector.start()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._collector is None or state.global_step not in self.steps or self.stopped:
            return
        self._collector.stop()
        gramians = self._collector.gramians()
        self._collector.reset()
        decisions = decide_cuts(self._adapters, gramians, self.config)

        if self.config.schedule == "stable":
            backstop = state.global_step == self.steps[-1]
            if self._previous is not None:
                score = min(_jaccard(d.kept, p.kept) for d, p in zip(decisions, self._previous))
                self.jaccard.append((state.global_step, score))
                self.weyl.append((state.global_step, min(_weyl_margin(d, p) for d, p in zip(decisions, self._previous))))
                ready = score >= self.config.stable_jaccard
            else:
                ready = False
            self._previous = decisions
            if not (ready or backstop):
                return

        if not any(d.cut for d in decisions):
            return
        self._cut(model, optimizer, decisions, state, control, self.eval_data or kwargs.get("eval_dataloader"))
        if self.config.schedule == "stable":
            self.stopped = True  # the stable schedule cuts once

    def on_train_end(self, args, state, control, **kwargs):
        if self._collector is not None:
            self._collector.stop()

    # ---- internals -----------------------------------------------------------------------------

    def _next_attempt(self, global_step: int):
        if self.stopped:
            return None
        return next((s for s in self.steps if s > global_step), None)

    def _cut(self, model, optimizer, decisions, state, control, eval_dataloader):
        plans = plans_for(self._adapters, decisions)
        pragmatic = self.config.mode == "pragmatic"
        before = self._metric(model, eval_dataloader) if pragmatic else None
        applied = apply_cuts(plans, optimizer)
        if pragmatic:
            after = self._metric(model, eval_dataloader)
            if after - before > self.config.rollback_tolerance * abs(before):
                applied.undo()
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

    @torch.no_grad()
    def _metric(self, model, eval_dataloader) -> float:
        was_training = model.training
        model.eval()
        try:
            if self.metric_fn is not None:
                return float(self.metric_fn(model))
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
                raise ValueError(f"validation loss is {value}: cannot judge a cut")
            return value
        finally:
            model.train(was_training)
