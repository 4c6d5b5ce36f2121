"""``ops.selective_state_update``: one decode step of the Mamba1 scan — validation, dtype policy, backend.

The one-token counterpart of ``ops.selective_scan`` (mamba_ssm's ``selective_state_update``
signature, Mamba1 layout): the cached state (batch, dim, N) is advanced by one token in place and
the token's output returned.  A prefill by ``selective_scan(..., return_last_state=True)`` followed
by these steps equals one scan over the whole sequence.

Backends (``backend=``, as for the scan):
    ``reference`` — the float64-capable specification (``reference.selective_state_update``).
    ``torch``     — a few in-place tensor ops (any device); differentiable in every input but the state.
    ``triton``    — ``compressm_mamba.kernels.selective_state_update``: the whole step in one launch.
                    Not differentiable: a call that needs gradients raises (use ``torch``).
    ``cuda``      — there is no CUDA C++ state-update kernel: requesting it raises and says to use
                    ``triton`` (``auto`` never picks it).
    ``auto``      — triton on a CUDA device (N <= 256), torch otherwise.
"""

from __future__ import annotations

import torch

from .. import _optional
from ..checks import check_state_update_inputs
from ..reference.selective_state_update import selective_state_update as _reference_update
from ..torch_backend.selective_state_update import selective_state_update_torch
from .selective_scan import BACKENDS, MAX_TRITON_STATE, resolve_backend

__all__ = ["selective_state_update", "resolve_state_update_backend", "last_update_call"]

last_update_call: dict = {}


def resolve_state_update_backend(backend: str, device: torch.device, N: int) -> str:
    """The concrete backend for one decode step; ``cuda`` is refused (no such kernel), ``auto`` never picks it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda":
        raise RuntimeError(
            "backend='cuda' has no selective_state_update kernel (the CUDA extension implements the scan only); "
            "use backend='triton' (or 'auto') for the decode step"
        )
    if backend == "auto":
        if device.type == "cuda" and _optional.triton_usable(device) and N <= MAX_TRITON_STATE:
            return "triton"
        return "torch"
    return resolve_backend(backend, device, N, op="selective_state_update")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Advance ``state`` by one token in place and return the token's output.

    state: (batch, dim, N), any float dtype (written back in its dtype; float32 keeps the scan's
    precision); x, dt, z: (batch, dim); A: (dim, N); B, C: (batch, N) or (batch, ngroups, N);
    D, dt_bias: (dim,).  Computes in float32 (float64 for float64 x on reference/torch); returns out
    (batch, dim) in x's dtype.  Math: ``reference.selective_state_update``.
    """
    N = check_state_update_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    chosen = resolve_state_update_backend(backend, x.device, N)
    last_update_call.update(backend=chosen, state_size=N)
    if chosen == "reference":
        out, new_state = _reference_update(state.clone(), x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        state.copy_(new_state.detach())
        return out
    if chosen == "torch":
        return selective_state_update_torch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if _needs_grad(x, dt, A, B, C, D, z, dt_bias):
        raise RuntimeError("backend='triton' selective_state_update has no backward; use backend='torch' "
                           "for a decode step that needs gradients")
    from ..kernels.selective_state_update import selective_state_update_fwd

    as32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    B3 = B if B.dim() == 3 else B.unsqueeze(1)
    C3 = C if C.dim() == 3 else C.unsqueeze(1)
    return selective_state_update_fwd(
        state, x.contiguous(), dt.to(x.dtype).contiguous(), A.float().contiguous(), B3.contiguous(),
        C3.contiguous(), as32(D), None if z is None else z.to(x.dtype).contiguous(), as32(dt_bias), dt_softplus,
    )
