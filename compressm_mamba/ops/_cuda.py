"""The Python side of the CUDA extension ``compressm_mamba._C``: fake kernels, autograd, dtype policy.

The extension (csrc/bindings.cpp) registers three dispatcher ops, for CUDA tensors:

    torch.ops.compressm_mamba.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        -> (out, last_state, checkpoints)
    torch.ops.compressm_mamba.selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias,
        delta_softplus, checkpoints) -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)
    torch.ops.compressm_mamba.gramian_sums(delta, A, B, C, delta_bias, delta_softplus, mask, estimator,
        constant_rows) -> (P_sum, Q_sum)

This module registers their fake (meta) implementations, so that ``torch.library.opcheck``,
FakeTensor and ``torch.compile`` can trace them, and offers ``selective_scan_cuda`` (differentiable)
and ``gramian_sums_cuda``.  Importing it needs only torch: the extension is imported on the first
call of a function that runs a kernel, and the fakes are registered then (torch needs the ops to
exist first), or at import when the extension is already loaded (bindings.cpp names this module
with ``set_python_module``, so torch imports it when it needs a fake and finds none).

Kernel dtypes are float32, float16 and bfloat16; u, delta, z, B and C (delta, B and C for the
Gramians) go to the kernel in one dtype.  When they already share one of those dtypes it is used;
otherwise they are all computed in float32 (exact for half-precision inputs; float64 inputs are
rounded to float32, like the Triton backend does — use backend="torch" or "reference" for float64
arithmetic).  Outputs come back in u's (delta's) dtype; the last state and the Gramian sums are float32.
"""

from __future__ import annotations

import torch

__all__ = ["selective_scan_cuda", "gramian_sums_cuda", "CHECKPOINT_CHUNK", "KERNEL_DTYPES"]

# Steps between two state checkpoints of the forward (csrc/selective_scan/selective_scan.h, kScanChunk).
CHECKPOINT_CHUNK = 64
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NS = "compressm_mamba"


def _ops():
    """torch.ops.compressm_mamba, after loading the extension that defines it and registering the fakes."""
    from .. import _C  # noqa: F401  (loading the library registers the ops)

    _register_fakes()
    return getattr(torch.ops, _NS)


def _extension_loaded() -> bool:
    """Whether the ops exist already (looks them up by name: loads nothing, never touches CUDA)."""
    return hasattr(getattr(torch.ops, _NS), "selective_scan_fwd")


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes, dtypes and devices of the outputs, nothing computed.
# ---------------------------------------------------------------------------------------------


def _selective_scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, L = u.shape
    N = A.shape[1]
    n_chunks = (L + CHECKPOINT_CHUNK - 1) // CHECKPOINT_CHUNK
    out = u.new_empty((batch, dim, L))
    last_state = u.new_empty((batch, dim, N), dtype=torch.float32)
    checkpoints = u.new_empty((batch, dim, n_chunks, N), dtype=torch.float32)
    return out, last_state, checkpoints


def _selective_scan_bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, checkpoints):
    f32 = torch.float32
    du = u.new_empty(u.shape)
    ddelta = delta.new_empty(delta.shape)
    dA = A.new_empty(A.shape, dtype=f32)
    dB = B.new_empty(B.shape)
    dC = C.new_empty(C.shape)
    dD = u.new_empty((u.shape[1],) if D is not None else (0,), dtype=f32)
    dz = z.new_empty(z.shape) if z is not None else u.new_empty((0,))
    ddelta_bias = u.new_empty((u.shape[1],) if delta_bias is not None else (0,), dtype=f32)
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias


def _gramian_sums_fake(delta, A, B, C, delta_bias, delta_softplus, mask, estimator, constant_rows):
    dim, N = A.shape
    P = delta.new_empty((dim, N, N), dtype=torch.float32)
    return P, P.new_empty((dim, N, N))


_FAKES = {
    "selective_scan_fwd": _selective_scan_fwd_fake,
    "selective_scan_bwd": _selective_scan_bwd_fake,
    "gramian_sums": _gramian_sums_fake,
}
_fakes_registered = False


def _register_fakes() -> None:
    """Register the fakes once; the ops must exist (torch.library attaches them as Meta kernels)."""
    global _fakes_registered
    if _fakes_registered:
        return
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{_NS}::{name}")(fake)
    _fakes_registered = True


if _extension_loaded():
    _register_fakes()


# ---------------------------------------------------------------------------------------------
# Python entry points.
# ---------------------------------------------------------------------------------------------


def _kernel_dtype(*tensors) -> torch.dtype:
    """The one dtype the kernel sees: the tensors' common dtype when it has a kernel, else float32."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) == 1:
        (dtype,) = dtypes
        if dtype in KERNEL_DTYPES:
            return dtype
    return torch.float32


def _as(t, dtype):
    return None if t is None else t.to(dtype).contiguous()


def _groups(BC: torch.Tensor) -> torch.Tensor:
    """(batch, N, L) -> (batch, 1, N, L); (batch, G, N, L) unchanged."""
    return BC if BC.dim() == 4 else BC.unsqueeze(1)


class _SelectiveScanCuda(torch.autograd.Function):
    """Forward and backward CUDA kernels; the backward recomputes states from the forward's checkpoints.

    The backward is deterministic (no atomics: dB / dC are summed through per-block partials in a
    fixed order), so repeated runs give bit-identical gradients.  Design: csrc/README.md.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        out, last_state, checkpoints = _ops().selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                                                                 delta_softplus)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints)
        ctx.delta_softplus = delta_softplus
        ctx.mark_non_differentiable(last_state)
        return out, last_state

    @staticmethod
    def backward(ctx, dout, _dlast_state):
        u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = _ops().selective_scan_bwd(
            dout.to(u.dtype).contiguous(), u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, checkpoints
        )
        return (
            du, ddelta, dA, dB, dC,
            dD if D is not None else None,
            dz if z is not None else None,
            ddelta_bias if delta_bias is not None else None,
            None,
        )


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False):
    """Mamba1 selective scan on the CUDA extension: (out, last_state).

    u, delta, z: (batch, dim, L); A: (dim, N), 1 <= N <= 256; B, C: (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (dim,).  All on one CUDA device; validated by ``ops.selective_scan``.  Returns out
    (batch, dim, L) in u's dtype and last_state (batch, dim, N) float32 (not differentiable).
    Differentiable in u, delta, A, B, C, D, z and delta_bias; gradients come back in each input's dtype.
    """
    kt = _kernel_dtype(u, delta, z, B, C)
    f32 = torch.float32
    out, last_state = _SelectiveScanCuda.apply(
        _as(u, kt), _as(delta, kt), _as(A, f32), _as(_groups(B), kt), _as(_groups(C), kt),
        _as(D, f32), _as(z, kt), _as(delta_bias, f32), bool(delta_softplus),
    )
    return out.to(u.dtype), last_state


def gramian_sums_cuda(delta, A, B, C, *, estimator: str, delta_bias=None, delta_softplus: bool = False, mask=None,
                      constant_rows: bool = False):
    """Token sums of the ``frozen`` or ``ltv`` Gramian terms on the CUDA extension: (P_sum, Q_sum).

    delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L); delta_bias: (dim,);
    mask: (batch, L), False = padding.  ``constant_rows`` promises that every row of A is constant
    (only A[:, 0] is then read).  One kernel launch, no host synchronisation.  Returns two (dim, N, N)
    float32 tensors: ``kernels/gramians.py gramian_sums``' contract.
    """
    if estimator not in ("frozen", "ltv"):
        raise ValueError(f"estimator must be 'frozen' or 'ltv' here, got {estimator!r}")
    kt = _kernel_dtype(delta, B, C)
    f32 = torch.float32
    return _ops().gramian_sums(
        _as(delta, kt), _as(A, f32), _as(_groups(B), kt), _as(_groups(C), kt), _as(delta_bias, f32),
        bool(delta_softplus), None if mask is None else mask.to(torch.bool).contiguous(), estimator,
        bool(constant_rows),
    )
