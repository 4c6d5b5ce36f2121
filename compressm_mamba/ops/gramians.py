"""``ops.gramians``: Gramian estimates of selective SSM blocks — validation and backend choice.

Backends: ``reference`` (loops over tokens; the spec), ``torch`` (chunked, vectorised), ``triton``
(compressm_mamba.kernels.gramians: tiled over the N×N output, batched over (batch, dim); the
weighted-Gram matrix-product form when A's rows are constant, as for Mamba2 heads), ``cuda`` (the
compiled extension, when built), ``auto`` (the fastest available for the device).

``mean_lti`` (token means of e, b and c) has its own kernel, ``kernels.mean_lti_sums`` (one pass
over the inputs, the sums kept in registers), chosen by ``auto`` on a CUDA device where Triton is
usable and by ``backend="triton"``; elsewhere it runs in torch (``torch_backend.gramians.mean_lti_sums``:
no (batch, dim, N, L) intermediates).  There is no CUDA C++ kernel for it: ``backend="cuda"`` runs
the Triton kernel when Triton is usable on the device (else torch), as ``auto`` does.  float64
inputs (which ask for float64 sums) run in torch on ``auto``; the Triton kernel computes in fp32.
"""

from __future__ import annotations

import torch

from .. import _optional
from ..checks import check_gramian_inputs
from ..reference.gramians import ESTIMATORS, GramianStatistics, gramian_statistics, gramians_from_statistics
from ..torch_backend.gramians import gramian_sums_chunked, mean_lti_sums
from .selective_scan import BACKENDS, resolve_backend

__all__ = ["gramian_sums", "gramians"]


def gramian_sums(
    delta, A, B, C, *, estimator: str = "ltv", delta_bias=None, delta_softplus: bool = False, mask=None,
    backend: str = "auto",
) -> GramianStatistics:
    """Token sums of one batch (``reference.gramian_statistics``'s contract), on the chosen backend.

    delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, ngroups, N, L); delta_bias:
    (dim,); mask: (batch, L), padding tokens False.  Sums are (dim, N, N) float32 (float64 for float64
    inputs on the reference/torch backends); they add across batches.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    N = check_gramian_inputs(delta, A, B, C, delta_bias, mask)
    kw = dict(delta_bias=delta_bias, delta_softplus=delta_softplus, mask=mask)
    if estimator == "mean_lti":
        chosen = _mean_lti_backend(backend, delta, N)
        if chosen == "reference":
            return gramian_statistics(delta, A, B, C, estimator=estimator, **kw)
        if chosen == "torch":
            return mean_lti_sums(delta, A, B, C, **kw)
        return _triton_mean_lti(delta, A, B, C, **kw)
    chosen = resolve_backend(backend, delta.device, N, op="gramian_sums")
    if chosen == "reference":
        return gramian_statistics(delta, A, B, C, estimator=estimator, **kw)
    if chosen == "torch":
        return gramian_sums_chunked(delta, A, B, C, estimator=estimator, **kw)
    if chosen == "triton":
        from ..kernels.gramians import gramian_sums as triton_sums

        B4 = (B if B.dim() == 4 else B.unsqueeze(1)).contiguous()
        C4 = (C if C.dim() == 4 else C.unsqueeze(1)).contiguous()
        P, Q = triton_sums(
            delta.contiguous(), A.float().contiguous(), B4, C4, estimator=estimator,
            delta_bias=None if delta_bias is None else delta_bias.float().contiguous(), delta_softplus=delta_softplus,
            mask=None if mask is None else mask.bool().contiguous(), constant_rows=_constant_rows(A),
        )
        count = _token_count(delta, mask)
        return GramianStatistics(estimator, count, {"P": P, "Q": Q})
    from ._cuda import gramian_sums_cuda

    P, Q = gramian_sums_cuda(
        delta, A, B, C, estimator=estimator, delta_bias=delta_bias, delta_softplus=delta_softplus, mask=mask,
        constant_rows=_constant_rows(A),
    )
    count = _token_count(delta, mask)
    return GramianStatistics(estimator, count, {"P": P, "Q": Q})


def _constant_rows(A) -> bool:
    """Whether every row of A (dim, N) is constant (Mamba2 heads): the kernels' cheaper form."""
    return bool((A == A[:, :1]).all())


def _token_count(delta, mask) -> int:
    """Real tokens behind the sums: batch * L of delta (batch, dim, L), or the True entries of mask."""
    return delta.shape[0] * delta.shape[2] if mask is None else int(mask.bool().sum())


def _mean_lti_backend(backend: str, delta, N: int) -> str:
    """reference | torch | triton for the mean_lti sums (see the module docstring)."""
    if backend in ("reference", "torch"):
        return backend
    if backend == "triton":
        resolve_backend("triton", delta.device, N, op="mean_lti_sums")  # raises if Triton cannot run here
        if delta.dtype == torch.float64:
            raise ValueError("backend='triton' computes mean_lti sums in float32; float64 inputs need "
                             "backend='torch' (or 'auto')")
        return "triton"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    # auto, and cuda (no CUDA C++ kernel computes these sums): by device and availability only.
    usable = delta.device.type == "cuda" and _optional.triton_usable(delta.device)
    return "triton" if usable and delta.dtype != torch.float64 else "torch"


def _triton_mean_lti(delta, A, B, C, *, delta_bias=None, delta_softplus=False, mask=None) -> GramianStatistics:
    from ..kernels.mean_lti_sums import mean_lti_sums as triton_mean_lti_sums

    e, b, c = triton_mean_lti_sums(
        delta, A.float(), B, C, delta_bias=None if delta_bias is None else delta_bias.float(),
        delta_softplus=delta_softplus, mask=None if mask is None else mask.bool(),
        constant_rows=_constant_rows(A),
    )
    count = _token_count(delta, mask)
    return GramianStatistics("mean_lti", count, {"e": e, "b": b, "c": c})


def gramians(delta, A, B, C, *, estimator: str = "ltv", delta_bias=None, delta_softplus: bool = False, mask=None,
             backend: str = "auto"):
    """(P, Q), each (dim, N, N): the batch-and-time averages of ``gramian_sums``."""
    return gramians_from_statistics(
        gramian_sums(delta, A, B, C, estimator=estimator, delta_bias=delta_bias, delta_softplus=delta_softplus,
                     mask=mask, backend=backend)
    )
