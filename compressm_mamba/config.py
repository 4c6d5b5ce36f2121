"""``CompressConfig``: what to cut, how to rank, and when (METHOD.md §5–6)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .reference.gramians import ESTIMATORS
from .reference.selection import IMPORTANCE_RULES, KEEP_RULES

__all__ = ["CompressConfig", "MODES", "RANK_PATHS", "REDUCTIONS", "ROUNDINGS", "SCHEDULES"]

MODES = ("tolerance", "fixed", "rank", "pragmatic")
REDUCTIONS = ("select", "balanced")
SCHEDULES = ("warmup", "stable")
RANK_PATHS = ("geometric", "direct")
ROUNDINGS = ("auto", "exact", "multiple16", "pow2")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class CompressConfig:
    """How a model is compressed.  Frozen and validated: a bad value raises ValueError naming the field.

    Rank choice (per layer):
        mode: ``"tolerance"`` keep the smallest r holding (1 − tau) of the importance (plain sums);
            ``"fixed"`` cut ``fraction`` of the current N per attempt; ``"rank"`` cut to ``rank``;
            ``"pragmatic"`` like ``"fixed"``, but each cut is evaluated and rolled back (and reducing
            stops) when the validation metric worsens by more than ``rollback_tolerance``.
        tau: tolerance in (0, 1) for ``"tolerance"`` (default 0.01).
        fraction: in (0, 1) for ``"fixed"`` / ``"pragmatic"`` (default 0.1).
        rank: target state size >= 1 for ``"rank"``.
        rank_path: how the callback's warmup schedule reaches ``rank`` (``"rank"`` mode only):
            ``"geometric"`` (default) — attempt k of R cuts to N·(rank/N)^(1/(R−k+1)) of the current N,
            so the sizes shrink by a constant factor and the last attempt lands on ``rank``
            (128 → 71 → 39 → 22 → 12 over 4 attempts); ``"direct"`` — the first attempt cuts to
            ``rank``.  Geometric steps let the model train between cuts, so the final states are
            ranked on a model that has learned more (the first attempt comes at 2.5 % of training).
            One-shot ``compress_`` always cuts straight to ``rank``.
        gate: a layer is cut only if r < gate · N (default 0.95).
        min_state: never fewer states than this (default 1).
    Ranking:
        estimator: Gramian estimator, ``"mean_lti"`` (default: ranks states as well as ``"ltv"`` on the
            byte LM and costs no scan; docs/DEFAULTS.md) | ``"frozen"`` | ``"ltv"``.
        importance: ``"balanced"`` (default) | ``"diagonal"`` | ``"ghost"`` (GHOST's forward-pass
            controllability × observability score, Menezes & Kyrillidis 2026: Σ_t h_t² c_t² per state;
            costs one extra scan per calibration batch; ``reduction="select"`` only).
        keep: ``"largest"`` (the method) | ``"smallest"`` | ``"random"`` (ablations).
        reduction: ``"select"`` (keep state indices; all models) | ``"balanced"`` (project onto the
            r leading balanced directions; Mamba2 only).
    Schedule (the callback):
        warmup_fraction: attempts happen inside the first this fraction of max_steps (default 0.3: cuts
            inside the paper's 10 % land before the state ranking has settled; docs/DEFAULTS.md).
        attempts: number of reduction attempts (default 4), equally spaced.
        calibration_batches: Gramians are accumulated over this many batches before each attempt (8).
        schedule: ``"warmup"`` — cut at every attempt; ``"stable"`` — cut once the kept set has stopped
            moving between attempts (Jaccard >= ``stable_jaccard``), at ``stable_latest_fraction`` of
            max_steps at the latest.
        rollback_tolerance: for ``"pragmatic"``: allowed relative worsening of the metric (0.01).
        seed: seeds ``keep="random"``.
    Which layers, and ranks the kernels can use:
        layers: None (every SSM layer, default), or a regex / tuple of regexes: a layer is cut when one
            of them ``re.search``-matches its module name (``compress_`` also takes a ``filter_fn``).
            A pattern that matches no SSM layer is an error.  Other layers are never touched.
        rounding: how a chosen r is rounded UP (never above the layer's N) to a size the scan kernel
            computes anyway: ``"auto"`` (default) — to what the layer's scan runs at on its device
            (exact for PyTorch scans on a CPU and mamba_ssm's Mamba1 scan; max(next power of two, 16)
            for mamba_ssm's Mamba2 SSD kernels; the next compiled size for our CUDA scan; exact for our
            Triton scan, which loops over the states); ``"exact"``; ``"multiple16"``; ``"pow2"``.
    """

    mode: str = "tolerance"
    tau: float = 0.01
    fraction: float = 0.1
    rank: int | None = None
    rank_path: str = "geometric"
    estimator: str = "mean_lti"
    importance: str = "balanced"
    keep: str = "largest"
    reduction: str = "select"
    warmup_fraction: float = 0.3
    attempts: int = 4
    calibration_batches: int = 8
    min_state: int = 1
    gate: float = 0.95
    rollback_tolerance: float = 0.01
    schedule: str = "warmup"
    stable_jaccard: float = 0.9
    stable_latest_fraction: float = 0.5
    seed: int = 0
    layers: tuple | None = None
    rounding: str = "auto"

    def __post_init__(self):
        def choice(name, options):
            value = getattr(self, name)
            if value not in options:
                raise ValueError(f"CompressConfig.{name} must be one of {options}, got {value!r}")

        def open_unit(name, lo_closed=False, hi_closed=False):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (value >= 0 if lo_closed else value > 0) and (value <= 1 if hi_closed else value < 1)
            if not ok:
                interval = ("[" if lo_closed else "(") + "0, 1" + ("]" if hi_closed else ")")
                raise ValueError(f"CompressConfig.{name} must be in {interval}, got {value!r}")

        def positive_int(name, allow_none=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not (_is_int(value) and value >= 1):
                raise ValueError(f"CompressConfig.{name} must be an integer >= 1, got {value!r}")

        choice("mode", MODES)
        choice("estimator", ESTIMATORS)
        choice("importance", IMPORTANCE_RULES)
        choice("keep", KEEP_RULES)
        choice("reduction", REDUCTIONS)
        choice("schedule", SCHEDULES)
        choice("rank_path", RANK_PATHS)
        choice("rounding", ROUNDINGS)
        self._check_layers()
        open_unit("tau")
        open_unit("fraction")
        open_unit("warmup_fraction", hi_closed=True)
        open_unit("gate", hi_closed=True)
        open_unit("stable_jaccard", hi_closed=True)
        open_unit("stable_latest_fraction", hi_closed=True)
        if not (isinstance(self.rollback_tolerance, (int, float)) and self.rollback_tolerance >= 0):
            raise ValueError(f"CompressConfig.rollback_tolerance must be >= 0, got {self.rollback_tolerance!r}")
        positive_int("rank", allow_none=True)
        positive_int("attempts")
        positive_int("calibration_batches")
        positive_int("min_state")
        if not _is_int(self.seed):
            raise ValueError(f"CompressConfig.seed must be an integer, got {self.seed!r}")
        if self.importance == "ghost" and self.reduction == "balanced":
            raise ValueError("CompressConfig.importance='ghost' ranks state indices; it cannot drive "
                             "reduction='balanced' (balanced directions are ranked by their HSVs)")
        if self.mode == "rank" and self.rank is None:
            raise ValueError("CompressConfig.rank must be set when mode='rank'")
        if self.mode == "rank" and self.rank < self.min_state:
            raise ValueError(f"CompressConfig.rank={self.rank} is below min_state={self.min_state}")

    def _check_layers(self):
        import re

        layers = self.layers
        if layers is None:
            return
        patterns = (layers,) if isinstance(layers, str) else layers
        if not isinstance(patterns, (tuple, list)) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"CompressConfig.layers must be None, a regex or a non-empty tuple of regexes, got {layers!r}")
        for p in patterns:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"CompressConfig.layers: {p!r} is not a regular expression ({err})") from None
        object.__setattr__(self, "layers", tuple(patterns))

    @property
    def rank_mode(self) -> str:
        """The reference ``choose_rank`` mode: pragmatic cuts a fixed fraction per attempt."""
        return "fixed" if self.mode == "pragmatic" else self.mode

    def replace(self, **changes) -> "CompressConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
