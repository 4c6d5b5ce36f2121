"""Decide and apply a cut: from per-layer Gramians to kept states, and the one-shot ``compress_``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..models.balanced_mamba2 import group_balancing_maps, group_gramians
from .collect import GramianCollector
from ..config import CompressConfig
from ..models.base import next_power_of_two
from ..models.registry import find_mixers
from ..reference.balancing import hankel_singular_values
from ..reference.selection import choose_rank, select_states, state_importance
from .state_sizes import record_state_sizes
from .surgery import apply_cuts

logger = logging.getLogger(__name__)

__all__ = [
    "LayerDecision",
    "CompressionReport",
    "decide_cuts",
    "plans_for",
    "cut_model_",
    "compress_",
    "run_calibration",
]


@dataclass
class LayerDecision:
    """What was (or would be) done to one layer.

    kept: (ngroups, r) int64 kept state indices per group (all of them when not cut); for a
        balanced reduction, the leading r balanced directions (0..r-1).
    importance: (ngroups, N) float64 per-state importance (balanced reduction: the group HSVs);
    hsv: (channels, N) float64 per-channel (per-head) HSVs.
    maps: balanced reduction only: (B_map, C_map), each (ngroups, r, N) float64.
    reason: one sentence saying why the layer was (or was not) cut — what the logs print.
    """

    name: str
    kind: str
    state_before: int
    state_after: int
    kept: torch.Tensor
    importance: torch.Tensor
    hsv: torch.Tensor
    maps: tuple | None = None
    reason: str = ""
    kernel_state: int | None = None  # the N the layer's scan computes after the decision

    @property
    def kernel_state_after(self) -> int:
        return self.state_after if self.kernel_state is None else self.kernel_state

    @property
    def reduction(self) -> str:
        return "select" if self.maps is None else "balanced"

    @property
    def cut(self) -> bool:
        return self.state_after < self.state_before

    @property
    def energy_kept(self) -> float:
        """Fraction of the layer's total importance held by the kept states."""
        total = float(self.importance.sum())
        if total <= 0:
            return 1.0
        return float(torch.gather(self.importance, 1, self.kept).sum()) / total


@dataclass
class CompressionReport:
    """Per-layer outcome of a compression; ``str(report)`` is a table."""

    layers: list = field(default_factory=list)
    config: CompressConfig | None = None
    step: int | None = None

    @property
    def changed(self) -> bool:
        return any(layer.cut for layer in self.layers)

    @property
    def state_sizes(self) -> dict:
        return {layer.name: layer.state_after for layer in self.layers}

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "config": None if self.config is None else self.config.to_dict(),
            "layers": [
                {
                    "name": d.name,
                    "kind": d.kind,
                    "state_before": d.state_before,
                    "state_after": d.state_after,
                    "energy_kept": d.energy_kept,
                    "kernel_state": d.kernel_state_after,
                    "kept": d.kept.tolist(),
                    "importance": d.importance.tolist(),
                    "hsv_mean": d.hsv.mean(0).tolist(),
                }
                for d in self.layers
            ],
        }

    def save(self, path: str) -> str:
        """Write ``to_dict()`` as JSON, atomically (a crash leaves any previous file intact)."""
        from ..persistence import write_json_atomic

        return write_json_atomic(self.to_dict(), path)

    def __str__(self) -> str:
        head = (f"{'layer':<32} {'kind':<6} {'N':>5} {'-> N':>5} {'kernel N':>8} {'energy kept':>11}  "
                "top importances")
        lines = [head, "-" * len(head)]
        for d in self.layers:
            top = torch.sort(d.importance.sum(0), descending=True).values[:4]
            spectrum = " ".join(f"{v:.2e}" for v in top.tolist())
            lines.append(
                f"{d.name:<32} {d.kind:<6} {d.state_before:>5} {d.state_after:>5} {d.kernel_state_after:>8} "
                f"{d.energy_kept:>11.4f}  {spectrum}"
            )
        if self.layers and not self.changed:
            lines.append("nothing was cut: every layer is already at (or within the gate of) the size asked for; "
                         "the model is unchanged")
        return "\n".join(lines)


def decide_cuts(adapters: list, gramians: dict, config: CompressConfig, targets: dict | None = None,
                ghost: dict | None = None) -> list:
    """Choose, per layer, how many and which states to keep (METHOD.md §5–6).

    gramians: {layer name: (P, Q)}, each (channels, N, N).  Groups (Mamba2) get one spectrum each;
    r is the largest of the groups' ranks, so that all groups keep the same number.  With
    ``reduction="balanced"`` (Mamba2) the spectrum is the HSVs of the group's summed Gramians and the
    kept states are its r leading balanced directions.  Raises ValueError naming the layer for
    non-finite Gramians or an impossible rank.  ``targets`` ({layer name: r}, ``mode="rank"`` only)
    overrides ``config.rank`` per layer — the callback's geometric path to ``rank``.  ``ghost``
    ({layer name: (channels, N)} GHOST sums, ``GramianCollector.ghost_scores()``) is needed for
    ``importance="ghost"``.
    """
    if config.importance == "ghost" and ghost is None:
        raise ValueError("importance='ghost' needs the GHOST sums of a forward scan: collect with "
                         "GramianCollector(..., ghost=True) and pass ghost=collector.ghost_scores()")
    generator = torch.Generator().manual_seed(config.seed)
    decisions = []
    for adapter in adapters:
        balanced = config.reduction == "balanced"
        if balanced and adapter.kind != "mamba2":
            raise ValueError(f"{adapter.name}: reduction='balanced' needs a Mamba2 mixer (Mamba1 keeps states by selection)")
        if balanced:
            adapter.maps()  # raises, naming the layer, where the family has no balanced mixer
        P, Q = gramians[adapter.name]
        N, G = adapter.state_size, adapter.ngroups
        if P.shape != (adapter.channels, N, N):
            raise ValueError(
                f"{adapter.name}: Gramians are {tuple(P.shape)}, the layer needs ({adapter.channels}, {N}, {N}); "
                "were they collected before a cut?"
            )
        hsv = hankel_singular_values(P, Q, name=adapter.name)
        if balanced:
            P_g, Q_g = group_gramians(P, Q, G)
            importance = hankel_singular_values(P_g, Q_g, name=adapter.name)
        else:
            per_group = adapter.channels // G
            groups = [slice(g * per_group, (g + 1) * per_group) for g in range(G)]
            importance = torch.stack(
                [state_importance(P[grp], Q[grp], config.importance, name=adapter.name,
                                  ghost=None if ghost is None else ghost[adapter.name][grp]) for grp in groups]
            )
        try:
            r = max(
                choose_rank(importance[g], config.rank_mode, tau=config.tau, fraction=config.fraction,
                            rank=targets.get(adapter.name, config.rank) if targets else config.rank, gate=config.gate, min_state=config.min_state)
                for g in range(G)
            )
        except ValueError as err:
            raise ValueError(f"{adapter.name}: {err}") from None
        rounded = round_rank(r, N, config.rounding, adapter)
        reason = _reason(importance, r, N, config, targets.get(adapter.name) if targets else None)
        if rounded != r:
            reason += f"; rounded up to {rounded} (rounding={config.rounding!r}: the scan computes " \
                      f"{adapter.kernel_state_size(rounded)} states)"
        r = rounded
        maps = None
        if r < N and balanced:
            kept = torch.arange(r).expand(G, r).clone()
            maps = group_balancing_maps(P_g, Q_g, r, name=adapter.name)
        elif r < N:
            kept = torch.stack([select_states(importance[g], r, config.keep, generator) for g in range(G)])
        else:
            kept = torch.arange(N).expand(G, N).clone()
        decisions.append(LayerDecision(adapter.name, adapter.kind, N, r, kept, importance, hsv, maps, reason,
                                       kernel_state=adapter.kernel_state_size(r)))
    return decisions


def _reason(importance: torch.Tensor, r: int, N: int, config: CompressConfig, target: int | None) -> str:
    """Why a layer goes from N to r: the rule, what it asked for, and the gate when it stopped a cut.

    importance: (ngroups, N); the rank the rule asks for before the gate is recomputed with gate=1.
    """
    c = config
    if c.rank_mode == "tolerance":
        asked = max(choose_rank(g, "tolerance", tau=c.tau, gate=1.0, min_state=c.min_state) for g in importance)
        rule = f"tolerance tau={c.tau}: {asked} of {N} states hold {1 - c.tau:.2%} of the importance"
    elif c.rank_mode == "fixed":
        asked = max(choose_rank(g, "fixed", fraction=c.fraction, gate=1.0, min_state=c.min_state) for g in importance)
        rule = f"{c.mode} cuts {c.fraction:.0%} of N: {asked} of {N}"
    else:
        asked = min(N, target if target is not None else c.rank)
        rule = f"rank {c.rank}" + (f" (this attempt's step on the geometric path: {target})" if target else "") + f": {asked} of {N}"
    if r < N:
        return f"cut {N} -> {r}: {rule}"
    if asked >= N:
        return f"not cut (stays {N}): {rule}, nothing to remove"
    return f"not cut (stays {N}): {rule}, which is not below the gate {c.gate} x {N} = {c.gate * N:g}"


def round_rank(r: int, N: int, rounding: str, adapter) -> int:
    """r rounded up for the kernels (``CompressConfig.rounding``), never above the layer's N."""
    if rounding == "exact" or r >= N:
        return r
    if rounding == "auto":
        rounded = adapter.kernel_state_size(r)
    elif rounding == "multiple16":
        rounded = -(-r // 16) * 16
    elif rounding == "pow2":
        rounded = next_power_of_two(r)
    else:
        raise ValueError(f"CompressConfig.rounding must be one of auto, exact, multiple16, pow2; got {rounding!r}")
    return min(max(r, rounded), N)


def plans_for(adapters: list, decisions: list) -> list:
    """Cut plans for the decisions that cut (selection, or balancing maps composed with the layer's own)."""
    by_name = {a.name: a for a in adapters}
    plans = []
    for d in decisions:
        if not d.cut:
            continue
        adapter = by_name[d.name]
        if d.maps is None:
            plans.append(adapter.plan_select(d.kept))
        else:
            B_now, C_now = adapter.maps()
            plans.append(adapter.plan_maps(d.maps[0] @ B_now, d.maps[1] @ C_now))
    return plans


def cut_model_(model: nn.Module, adapters: list, decisions: list, optimizer=None) -> None:
    """Apply ``decisions`` to the model (and optimizer), all layers or none, and record the new sizes."""
    plans = plans_for(adapters, decisions)
    if plans:
        apply_cuts(plans, optimizer)
    record_state_sizes(model, adapters)


def run_calibration(model: nn.Module, calibration, collector: GramianCollector) -> int:
    """Run ``calibration`` batches through ``model`` with ``collector`` on; returns the batch count.

    A batch is a dict of model inputs (``input_ids``, ``attention_mask``, …) or a tensor of input ids
    (hidden states for a bare mixer module).  The model's training flag is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = 0
    try:
        with torch.no_grad(), collector:
            for i, batch in enumerate(calibration):
                if torch.is_tensor(batch):  # input ids (or, for a bare mixer, its hidden states)
                    model(batch.to(device))
                elif isinstance(batch, dict):
                    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
                              if k not in ("labels",)}
                    if "input_ids" in inputs:
                        _check_ids(inputs["input_ids"], f"calibration batch {i}: input_ids")
                        mask = inputs.get("attention_mask")
                        if mask is not None and (not torch.is_tensor(mask) or mask.shape != inputs["input_ids"].shape):
                            raise ValueError(f"calibration batch {i}: attention_mask must have input_ids' shape "
                                             f"{tuple(inputs['input_ids'].shape)}, got {tuple(getattr(mask, 'shape', ()))}")
                    model(**inputs)
                else:
                    raise TypeError(f"calibration batches must be dicts of model inputs or tensors, got {type(batch).__name__}")
                batches += 1
    finally:
        model.train(was_training)
    return batches


def _check_ids(ids, what: str) -> None:
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{what} must be a (batch, L) tensor of integer token ids, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")


def compress_(model: nn.Module, config: CompressConfig, calibration, *, optimizer=None,
              filter_fn=None) -> CompressionReport:
    """One-shot compression in place: calibrate, choose ranks, cut every supported mixer.

    Args:
        model: a model holding supported Mamba mixers (``models.registry.supported_types()``), of any
            family in ``compressm_mamba/models``; attention, MLP and MoE layers are never touched.
        config: ``CompressConfig``.
        calibration: an iterable of batches (dicts of model inputs, or input-id tensors).
        optimizer: optional; re-keyed and sliced alongside the parameters.
        filter_fn: optional ``(module name, module) -> bool`` choosing the SSM layers to cut
            (torchao-style); otherwise ``config.layers`` (regexes) or every SSM layer.

    Returns:
        a ``CompressionReport``.  On any error (unsupported model, empty calibration, diverged
        Gramians, impossible rank) the model is left exactly as it was.  Asking again for a size a
        layer already has cuts nothing (``report.changed`` is False and the report says so); asking
        for more states than a layer has left raises ValueError naming the layer.  Padding tokens of
        dict batches (``attention_mask``) never enter the Gramians.
    """
    if not isinstance(config, CompressConfig):
        raise TypeError(f"config must be a CompressConfig, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (name, module) -> bool, got {type(filter_fn).__name__}")
    adapters = find_mixers(model, filter_fn if filter_fn is not None else config.layers)
    collector = GramianCollector(adapters, config.estimator, ghost=config.importance == "ghost")
    if run_calibration(model, calibration, collector) == 0:
        raise ValueError("calibration is empty: compress_ needs at least one batch")
    decisions = decide_cuts(adapters, collector.gramians(), config,
                            ghost=collector.ghost_scores() if collector.ghost else None)
    cut_model_(model, adapters, decisions, optimizer)
    logger.info("compress_: %s Gramians over %d calibration batches", config.estimator, collector.batches)
    for d in decisions:
        logger.info("compress_:   %s: %s", d.name, d.reason)
    return CompressionReport(decisions, config)
