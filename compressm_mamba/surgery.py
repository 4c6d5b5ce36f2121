"""Apply cut plans to a model and its optimizer: all layers or none (METHOD.md §7).

Cut parameters become NEW ``nn.Parameter`` objects: resizing ``.data`` in place would leave autograd
(and the optimizer) holding the old shapes.  The optimizer is re-keyed to the new parameters and
each state tensor shaped like the parameter (Adam/AdamW ``exp_avg``, ``exp_avg_sq``, SGD momentum)
is sliced with the same indices — exact for selection; scalar state (``step``) is kept, so the
learning-rate schedule and bias correction continue.  Old gradients are dropped.

Everything that can fail (slicing, checking the optimizer) happens before the first module is
touched; the commit itself only assigns attributes, and is undone if it is interrupted.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .mixers import CutPlan

__all__ = ["apply_cuts", "unwrap_optimizer"]


def unwrap_optimizer(optimizer):
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _prepare_optimizer_state(optimizer, old: nn.Parameter, index, where: str) -> dict | None:
    """The sliced copy of ``old``'s optimizer state, or None when it has none."""
    if optimizer is None or old not in optimizer.state:
        return None
    new_state = {}
    for key, value in optimizer.state[old].items():
        if torch.is_tensor(value) and value.shape == old.shape:
            new_state[key] = index(value)
        elif torch.is_tensor(value) and value.dim() > 0:
            raise ValueError(
                f"{where}: optimizer state {key!r} has shape {tuple(value.shape)}, neither the parameter's "
                f"{tuple(old.shape)} nor a scalar; {type(optimizer).__name__} cannot be re-sliced after a cut "
                "(Adam, AdamW and SGD can)"
            )
        else:
            new_state[key] = value
    return new_state


def apply_cuts(plans: list, optimizer=None) -> dict:
    """Apply every plan in ``plans`` (one per layer) and re-key ``optimizer``; all or nothing.

    Returns {old parameter: new parameter}.  On any error the model and the optimizer are exactly as
    before the call.
    """
    optimizer = unwrap_optimizer(optimizer)
    # 1. Prepare: new tensors and optimizer states; nothing is modified yet.
    staged = []  # (module, attr, old, new_param, new_opt_state)
    for plan in plans:
        if not isinstance(plan, CutPlan):
            raise TypeError(f"expected CutPlan, got {type(plan).__name__}")
        for cut in plan.params:
            old = cut.old
            where = f"{plan.name}: {cut.attr}"
            with torch.no_grad():
                data = cut.index(old.detach())
            new = nn.Parameter(data, requires_grad=old.requires_grad)
            staged.append((cut.module, cut.attr, old, new, _prepare_optimizer_state(optimizer, old, cut.index, where)))
    attr_updates = [(module, attr, value, getattr(module, attr)) for plan in plans for module, attr, value in plan.attrs]

    # 2. Commit: only assignments.  Undo what was done if anything goes wrong midway.
    done_params, done_attrs = [], []
    try:
        for module, attr, old, new, _ in staged:
            setattr(module, attr, new)
            done_params.append((module, attr, old))
        for module, attr, value, previous in attr_updates:
            setattr(module, attr, value)
            done_attrs.append((module, attr, previous))
        if optimizer is not None:
            _rekey_optimizer(optimizer, staged)
    except BaseException:
        for module, attr, previous in reversed(done_attrs):
            setattr(module, attr, previous)
        for module, attr, old in reversed(done_params):
            setattr(module, attr, old)
        raise
    return {old: new for _, _, old, new, _ in staged}


def _rekey_optimizer(optimizer, staged) -> None:
    """Swap old parameters for new ones in ``param_groups`` and move their (sliced) state."""
    mapping = {id(old): new for _, _, old, new, _ in staged}
    saved_groups = [list(group["params"]) for group in optimizer.param_groups]
    saved_state = {old: optimizer.state[old] for _, _, old, _, _ in staged if old in optimizer.state}
    try:
        for group in optimizer.param_groups:
            group["params"] = [mapping.get(id(p), p) for p in group["params"]]
        for _, _, old, new, new_state in staged:
            if old in optimizer.state:
                del optimizer.state[old]
            if new_state is not None:
                optimizer.state[new] = new_state
    except BaseException:
        for group, params in zip(optimizer.param_groups, saved_groups):
            group["params"] = params
        for _, _, _, new, _ in staged:
            optimizer.state.pop(new, None)
        optimizer.state.update(saved_state)
        raise
