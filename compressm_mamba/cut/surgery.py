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

from ..models.base import CutPlan

__all__ = ["apply_cuts", "AppliedCuts", "unwrap_optimizer"]


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


_MISSING = object()


class AppliedCuts:
    """What ``apply_cuts`` changed, with ``undo()`` to put back the very same objects.

    ``mapping``: {old parameter: new parameter}.  ``undo()`` restores the old parameter objects,
    attributes, buffers and the optimizer's groups and state exactly (nothing is copied or
    recomputed), as long as nothing else has modified them since.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.mapping = {}
        self._params = []  # (module, attr, old parameter)
        self._attrs = []  # (module, attr, previous value)
        self._buffers = []  # (module, name, previous tensor or _MISSING, was persistent)
        self._groups = None
        self._state = None

    def undo(self) -> None:
        for module, name, previous, was_persistent in reversed(self._buffers):
            if previous is _MISSING:
                del module._buffers[name]
                module._non_persistent_buffers_set.discard(name)
            else:
                module._buffers[name] = previous
                if was_persistent:
                    module._non_persistent_buffers_set.discard(name)
                else:
                    module._non_persistent_buffers_set.add(name)
        for module, attr, previous in reversed(self._attrs):
            setattr(module, attr, previous)
        for module, attr, old in reversed(self._params):
            setattr(module, attr, old)
        if self._groups is not None:
            for group, params in zip(self.optimizer.param_groups, self._groups):
                group["params"] = params
            for new in self.mapping.values():
                self.optimizer.state.pop(new, None)
            self.optimizer.state.update(self._state)
        self._buffers, self._attrs, self._params, self._groups = [], [], [], None


def apply_cuts(plans: list, optimizer=None) -> AppliedCuts:
    """Apply every plan in ``plans`` (one per layer) and re-key ``optimizer``; all or nothing.

    Returns an ``AppliedCuts`` (old -> new parameters, and ``undo()``).  On any error the model and
    the optimizer are exactly as before the call.
    """
    optimizer = unwrap_optimizer(optimizer)
    # 1. Prepare: new tensors and optimizer states; nothing is modified yet.
    staged = []  # (module, attr, old, new_param, new_opt_state)
    for plan in plans:
        if not isinstance(plan, CutPlan):
            raise TypeError(f"expected CutPlan, got {type(plan).__name__}")
        for cut in plan.params:
            old = cut.old
            with torch.no_grad():
                data = cut.index(old.detach())
            new = nn.Parameter(data, requires_grad=old.requires_grad)
            staged.append((cut.module, cut.attr, old, new, _prepare_optimizer_state(optimizer, old, cut.index,
                                                                                   f"{plan.name}: {cut.attr}")))

    # 2. Commit: only assignments, recorded as they happen so that they can be undone.
    applied = AppliedCuts(optimizer)
    try:
        for module, attr, old, new, _ in staged:
            setattr(module, attr, new)
            applied._params.append((module, attr, old))
            applied.mapping[old] = new
        for plan in plans:
            for module, attr, value in plan.attrs:
                previous = getattr(module, attr)
                setattr(module, attr, value)
                applied._attrs.append((module, attr, previous))
            for module, name, tensor, *persistent in plan.buffers:
                previous = module._buffers.get(name, _MISSING)
                was_persistent = name not in module._non_persistent_buffers_set
                module.register_buffer(name, tensor, persistent=persistent[0] if persistent else True)
                applied._buffers.append((module, name, previous, was_persistent))
        if optimizer is not None:
            applied._groups = [list(group["params"]) for group in optimizer.param_groups]
            applied._state = {old: optimizer.state[old] for _, _, old, _, _ in staged if old in optimizer.state}
            for group in optimizer.param_groups:
                group["params"] = [applied.mapping.get(p, p) for p in group["params"]]
            for _, _, old, new, new_state in staged:
                optimizer.state.pop(old, None)
                if new_state is not None:
                    optimizer.state[new] = new_state
    except BaseException:
        applied.undo()
        raise
    return applied
