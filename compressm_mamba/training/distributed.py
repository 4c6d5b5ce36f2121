"""Data-parallel training: every rank must cut the same states, and DDP must follow the new parameters.

METHOD.md §7: under DDP each rank sees a different shard of the calibration data, so each rank's
Gramian sums differ.  ``all_reduce_statistics`` sums every ``GramianStatistics`` tensor and token
count over the ranks (one collective for all layers) before ranks are chosen; ``broadcast_decisions_``
then makes rank 0's choice everyone's (identical sums give identical choices on identical software,
but an eigensolver is not bound to give bit-identical results on different machines, and a near-tie
must not split the ranks).  ``keep="random"`` draws from a generator seeded by ``config.seed`` on
every rank, and is broadcast as well.

``DistributedDataParallel`` builds its gradient buckets and autograd hooks for the parameters it
saw at construction.  After a cut the model holds NEW parameters: with ``find_unused_parameters=True``
(the Trainer's default for models without activation checkpointing) the old, now unused, parameters
are all-reduced and the new ones silently are not — every rank trains its own model; with
``find_unused_parameters=False`` the next forward raises "Expected to have finished reduction in the
prior iteration".  ``rebuild_ddp_`` rebuilds the reducer of the very same DDP object in place (what
DDP itself does after unpickling), so the Trainer's ``model_wrapped`` and its training loop's local
reference stay valid.

Everything here is a no-op in a single process.
"""

from __future__ import annotations

import gc
import weakref

import torch
import torch.nn as nn

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "all_reduce_statistics",
    "broadcast_decisions_",
    "any_rank",
    "broadcast_flag",
    "mean_over_ranks",
    "find_ddp",
    "rebuild_ddp_",
    "check_supported_wrapping",
]


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def _comm_device() -> torch.device:
    """Where collective tensors live: the current CUDA device for NCCL, the CPU otherwise (gloo)."""
    backend = str(_dist().get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sum_keys(estimator: str) -> tuple:
    return ("e", "b", "c") if estimator == "mean_lti" else ("P", "Q")


def _sum_shape(adapter, key: str) -> tuple:
    N = adapter.state_size
    return (adapter.channels, N) if key in ("e", "b", "c") else (adapter.channels, N, N)


def all_reduce_statistics(stats: dict, adapters: list, estimator: str) -> dict:
    """Sum each layer's ``GramianStatistics`` (every sum tensor and the token count) over all ranks.

    stats: {layer name: GramianStatistics} of this rank (a layer this rank saw no token of may be
    missing: it contributes zeros).  Returns a new dict with the global sums, in float64, on the
    devices the local sums were on; layers no rank saw are left out (``GramianCollector.gramians``
    then names them).  Every rank must call this at the same point: it is one collective.
    """
    from ..reference.gramians import GramianStatistics

    if not is_distributed():
        return dict(stats)
    keys = _sum_keys(estimator)
    comm = _comm_device()
    pieces, layout = [], []
    for adapter in adapters:
        local = stats.get(adapter.name)
        if local is not None and local.estimator != estimator:
            raise ValueError(f"{adapter.name}: statistics are {local.estimator!r}, expected {estimator!r}")
        shapes = []
        for key in keys:
            shape = _sum_shape(adapter, key)
            if local is not None and tuple(local.sums[key].shape) != shape:
                raise ValueError(
                    f"{adapter.name}: statistic {key!r} is {tuple(local.sums[key].shape)}, the layer needs {shape}; "
                    "were they collected before a cut?"
                )
            value = local.sums[key] if local is not None else torch.zeros(shape, dtype=torch.float64)
            pieces.append(value.detach().to(device=comm, dtype=torch.float64).reshape(-1))
            shapes.append(shape)
        # Token counts are integers far below 2**53: exact in float64.
        pieces.append(torch.tensor([0.0 if local is None else float(local.count)], dtype=torch.float64, device=comm))
        layout.append((adapter, shapes, None if local is None else local.sums[keys[0]].device))
    flat = torch.cat(pieces)
    _dist().all_reduce(flat)
    out, offset = {}, 0
    for adapter, shapes, device in layout:
        sums = {}
        for key, shape in zip(keys, shapes):
            n = int(torch.Size(shape).numel())
            sums[key] = flat[offset:offset + n].reshape(shape).clone()
            offset += n
        count = int(round(float(flat[offset].item())))
        offset += 1
        if count > 0:
            target = device or torch.device("cpu")
            out[adapter.name] = GramianStatistics(estimator, count, {k: v.to(target) for k, v in sums.items()})
    return out


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    moved = tensor.to(_comm_device())
    _dist().broadcast(moved, src=0)
    return moved.cpu()


def broadcast_decisions_(decisions: list) -> list:
    """Make rank 0's decisions (state sizes, kept indices, balancing maps) every rank's, in place.

    Importances and HSVs stay local (they come from the same all-reduced sums).  Returns ``decisions``.
    """
    if not is_distributed() or not decisions:
        return decisions
    header = torch.tensor(
        [[d.state_after, d.kept.shape[0], d.kept.shape[1], d.maps is not None] for d in decisions], dtype=torch.int64
    )
    header = _broadcast(header)
    kept_shapes = [(int(h[1]), int(h[2])) for h in header]
    kept = torch.zeros(sum(g * r for g, r in kept_shapes), dtype=torch.int64)
    if rank() == 0:
        kept = torch.cat([d.kept.reshape(-1).to(torch.int64).cpu() for d in decisions])
    kept = _broadcast(kept)
    offset = 0
    for d, h, (g, r) in zip(decisions, header.tolist(), kept_shapes):
        d.state_after = int(h[0])
        d.kept = kept[offset:offset + g * r].reshape(g, r).clone()
        offset += g * r
    with_maps = [d for d, h in zip(decisions, header.tolist()) if h[3]]
    if with_maps:
        # maps are (G, r, N_full): the sizes are rank 0's (state_after, and N_full of the layer)
        shapes = torch.tensor([list(d.maps[0].shape) if d.maps is not None else [0, 0, 0] for d in with_maps],
                              dtype=torch.int64)
        shapes = _broadcast(shapes)
        total = int(2 * shapes.prod(1).sum())
        flat = torch.zeros(total, dtype=torch.float64)
        if rank() == 0:
            flat = torch.cat([m.reshape(-1).double().cpu() for d in with_maps for m in d.maps])
        flat = _broadcast(flat)
        offset = 0
        for d, shape in zip(with_maps, shapes.tolist()):
            n = shape[0] * shape[1] * shape[2]
            B_map = flat[offset:offset + n].reshape(shape).clone()
            C_map = flat[offset + n:offset + 2 * n].reshape(shape).clone()
            offset += 2 * n
            d.maps = (B_map, C_map)
    for d, h in zip(decisions, header.tolist()):
        if not h[3]:
            d.maps = None
    return decisions


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (a collective)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=_comm_device())
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a collective); ``flag`` itself in a single process."""
    if not is_distributed():
        return bool(flag)
    return bool(_broadcast(torch.tensor([1 if flag else 0], dtype=torch.int64)).item())


def mean_over_ranks(value: float) -> float:
    """The mean of ``value`` over the ranks (a collective); ``value`` itself in a single process."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    _dist().all_reduce(t)
    return float(t.item()) / world_size()


def _ddp_class():
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


_FOUND: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def find_ddp(model: nn.Module):
    """The ``DistributedDataParallel`` object wrapping ``model`` (directly), or None.

    The Trainer does not hand its ``model_wrapped`` to callbacks; the wrapper is found among the
    live objects (once: the result is cached for the model).
    """
    if not is_distributed():
        return None
    ddp_cls = _ddp_class()
    cached = _FOUND.get(model)
    if cached is not None:
        ddp = cached()
        if ddp is not None and ddp.module is model:
            return ddp
    for obj in gc.get_objects():
        try:
            if isinstance(obj, ddp_cls) and obj.module is model:
                _FOUND[model] = weakref.ref(obj)
                return obj
        except ReferenceError:  # a dead weak proxy
            continue
    return None


def check_supported_wrapping(model: nn.Module) -> None:
    """Refuse wrappers whose parameters cannot change shape mid-run (FSDP, DeepSpeed), naming why."""
    fsdp_types = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp_types.append(FullyShardedDataParallel)
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (fully_shard)

        fsdp_types.append(FSDPModule)
    except ImportError:
        pass
    sharded = any(isinstance(m, tuple(fsdp_types)) for m in model.modules()) if fsdp_types else False
    flat = any(type(p).__name__ in ("FlatParameter", "DTensor") for p in model.parameters())
    if sharded or flat:
        raise NotImplementedError(
            "CompreSSMCallback does not support FSDP yet: FSDP shards the parameters (FSDP1 flattens each "
            "wrapped unit into one FlatParameter, FSDP2 turns them into DTensors sharded on dim 0), so a cut "
            "cannot replace a mixer's A_log / x_proj / in_proj / conv1d by smaller Parameters without "
            "re-sharding the unit and its optimizer state. Use DDP (see README, 'Distributed training')."
        )
    if type(model).__name__ == "DeepSpeedEngine" or any(hasattr(p, "ds_id") for p in model.parameters()):
        raise NotImplementedError("CompreSSMCallback does not support DeepSpeed: its engine owns flat parameter "
                                  "(and optimizer) partitions that a cut cannot resize; use DDP")


def rebuild_ddp_(ddp) -> None:
    """Rebuild ``ddp``'s reducer (buckets, autograd hooks, buffer list) for the module's current parameters.

    The same object stays in place, so every reference to it (the Trainer's ``model_wrapped``, its
    training loop, accelerate's model list) keeps working.  Collective: every rank calls it at the
    same step; the parameter shapes are verified to agree across ranks.  Registered communication
    hooks are registered again on the new reducer.
    """
    from torch.distributed.utils import _verify_param_shape_across_processes

    if ddp is None:
        return
    if getattr(ddp, "mixed_precision", None) is not None:
        raise NotImplementedError("rebuild_ddp_: DDP's native mixed_precision is not supported after a cut")
    if getattr(ddp, "_delay_all_reduce_params", None):
        raise NotImplementedError("rebuild_ddp_: DDP with delay_all_reduce_named_params is not supported after a cut")
    if getattr(ddp, "_use_python_reducer", False):
        raise NotImplementedError("rebuild_ddp_: the compiled-autograd (python reducer) DDP mode is not supported")
    old = getattr(ddp, "reducer", None)
    if old is not None:
        old._remove_autograd_hooks()
    ddp._module_parameters = [p for n, p in ddp.module.named_parameters() if n not in ddp.parameters_to_ignore]
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()  # also refreshes the buffer list
    _verify_param_shape_across_processes(ddp.process_group, parameters)
    param_to_name_mapping = ddp._build_debug_param_to_name_mapping(parameters)
    hooks = list(getattr(ddp, "_comm_hooks", []))
    ddp._ddp_init_helper(parameters, expect_sparse_gradient, param_to_name_mapping, ddp.static_graph)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
    ddp._has_rebuilt_buckets = False
    ddp._comm_hooks = []
    for hook, state in hooks:
        ddp.register_comm_hook(state, hook)
