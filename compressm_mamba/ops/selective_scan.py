"""``ops.selective_scan``: the public selective scan — validation, dtype policy, backend choice.

Backends (a visible argument, HOUSE_STYLE rule 3):
    ``reference`` — the float64-capable specification (a Python loop over time; slow, exact).
    ``torch``     — chunked and vectorised plain PyTorch (any device; gradients through autograd).
    ``triton``    — compressm_mamba.kernels.selective_scan, forward and backward kernels, any N up to 256.
    ``cuda``      — the compiled extension compressm_mamba._C (not built yet: see the CUDA issue).
    ``auto``      — the fastest available for the inputs' device: cuda > triton on a GPU, torch on a CPU.
An explicitly requested backend that is missing raises an error that says how to get it.

``last_call`` records, per process, the backend and state size N of the latest call — how a test
(or a curious user) sees which kernel specialisation a mixer ran after a cut.
"""

from __future__ import annotations

import torch

from .. import _optional
from ..checks import check_scan_inputs
from ..reference import selective_scan as _reference_scan
from ..torch_backend.selective_scan import selective_scan_torch

__all__ = ["selective_scan", "BACKENDS", "resolve_backend", "last_call"]

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
MAX_TRITON_STATE = 256

last_call: dict = {}


def _cuda_extension():
    try:
        from .. import _C  # noqa: F401
    except ImportError:
        return None
    return _C


def resolve_backend(backend: str, device: torch.device, N: int, op: str = "selective_scan") -> str:
    """The concrete backend for ``backend`` on ``device``; raises if an explicit one is unavailable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and _cuda_extension() is not None and hasattr(_cuda_extension(), op):
            return "cuda"
        if device.type == "cuda" and _optional.triton_usable(device) and N <= MAX_TRITON_STATE:
            return "triton"
        return "torch"
    if backend == "triton":
        if _optional.triton() is None:
            raise RuntimeError("backend='triton' needs triton: pip install triton (it comes with CUDA builds of torch)")
        if not _optional.triton_usable(device):
            raise RuntimeError(
                f"backend='triton' cannot run on {device}: it needs a CUDA device, or TRITON_INTERPRET=1 set "
                "before compressm_mamba.kernels is imported (slow; for tests)"
            )
        if N > MAX_TRITON_STATE:
            raise ValueError(f"backend='triton' supports state sizes up to {MAX_TRITON_STATE}, got N={N}")
    if backend == "cuda" and (_cuda_extension() is None or not hasattr(_cuda_extension(), op)):
        raise RuntimeError(
            "backend='cuda' needs the compiled extension compressm_mamba._C with this op; build it on a machine "
            "with a CUDA torch and nvcc: COMPRESSM_MAMBA_FORCE_CUDA_BUILD=1 pip install --no-build-isolation -e ."
        )
    return backend


class _TritonSelectiveScan(torch.autograd.Function):
    """Triton forward and backward kernels; the state is recomputed chunk by chunk in the backward.

    chunk_size None lets the kernels pick the checkpoint interval for N (kernels.default_chunk_size);
    the backward receives the same value, so its chunks match the forward's checkpoints.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):
        from ..kernels.selective_scan import selective_scan_fwd

        out, last_state, checkpoints = selective_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size=chunk_size
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints)
        ctx.delta_softplus, ctx.chunk_size = delta_softplus, chunk_size
        ctx.mark_non_differentiable(last_state)
        return out, last_state

    @staticmethod
    def backward(ctx, dout, _dlast):
        from ..kernels.selective_scan import selective_scan_bwd

        u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
        grads = selective_scan_bwd(
            dout.contiguous(), u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, checkpoints,
            chunk_size=ctx.chunk_size,
        )
        return (*grads, None, None)


def _triton_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Contiguous, kernel-ready inputs: B/C as (batch, G, N, L), fp32 A/D/bias."""
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    as32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    out, last = _TritonSelectiveScan.apply(
        u.contiguous(), delta.to(u.dtype).contiguous(), A.float().contiguous(), B4.contiguous(), C4.contiguous(),
        as32(D), None if z is None else z.to(u.dtype).contiguous(), as32(delta_bias), delta_softplus, None,
    )
    return out, last


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    backend: str = "auto",
):
    """Mamba1 selective scan with mamba_ssm ``selective_scan_fn``'s signature and layouts.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, ngroups, N, L);
    D, delta_bias: (dim,).  Returns out (batch, dim, L) in u's dtype [and the last state
    (batch, dim, N) in float32, not differentiable].  Differentiable in u, delta, A, B, C, D, z and
    delta_bias on every backend.  ``backend``: see the module docstring.

    Where it differs from ``selective_scan_fn``: B and C must vary over time.  mamba_ssm also
    accepts a time-invariant (dim, N) B or C; every backend here refuses it with a ValueError
    (validation runs before the backend is chosen) — the same system is
    ``B[None, :, :, None].expand(batch, dim, N, L)`` (ngroups = dim).  A is real: complex A (and
    complex B/C, mamba_ssm's S4D-complex variant) is out of scope: a complex tensor is refused
    with a TypeError naming the argument.
    The last state is the state after the final step, as mamba_ssm returns it; there is no initial
    state argument (a cached continuation goes through ``ops.selective_state_update``).
    """
    N = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    chosen = resolve_backend(backend, u.device, N)
    last_call.update(backend=chosen, state_size=N, seqlen=u.shape[-1])
    if chosen == "reference":
        return _reference_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if chosen == "torch":
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if chosen == "triton":
        out, last = _triton_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return (out, last) if return_last_state else out
    from ._cuda import selective_scan_cuda

    out, last = selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out
