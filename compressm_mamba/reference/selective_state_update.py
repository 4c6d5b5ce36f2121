"""Reference one-token selective state update: the specification the decode kernels are checked against.

One step of the Mamba1 recurrence of ``reference.selective_scan`` (the scan's loop body), for a
cached state h of every channel d of ``dim``:

    dt = softplus(dt + dt_bias)                          (each optional)
    h  <- exp(dt[d] * A[d]) * h + dt[d] * x[d] * B        (h in R^N)
    y[d] = <C, h> + D[d] * x[d],   out = y * silu(z) when z is given.

Running it L times from a zero state reproduces ``selective_scan`` on L steps exactly (a test pins
this), which is what makes prefill-by-scan then decode-by-update equal to one long scan.

Plain PyTorch, any device; float64 inputs are computed in float64, everything else in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_state_update_inputs
from .selective_scan import _compute_dtype

__all__ = ["selective_state_update", "expand_state_groups"]


def expand_state_groups(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """Give every channel its B (or C): (batch, N) or (batch, ngroups, N) -> (batch, dim, N).

    With G groups, channel d uses group d // (dim // G) (mamba_ssm's convention, as in the scan).
    """
    if BC.dim() == 2:
        return BC.unsqueeze(1).expand(BC.shape[0], dim, BC.shape[1])
    return BC.repeat_interleave(dim // BC.shape[1], dim=1)


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
):
    """One decode step of the Mamba1 selective scan; pure (``state`` is not modified).

    Args:
        state: (batch, dim, N) the state before the step (any float dtype).
        x: (batch, dim) the step's input u_t.
        dt: (batch, dim) step sizes (before bias / softplus).
        A: (dim, N).
        B, C: (batch, N) or (batch, ngroups, N).
        D: (dim,) skip, optional.   z: (batch, dim) gate, optional.   dt_bias: (dim,), optional.
        dt_softplus: apply softplus to dt (after the bias).

    Returns:
        (out, new_state): out (batch, dim) in x's dtype, new_state (batch, dim, N) in the compute
        dtype (float64 for float64 x, float32 otherwise).
    """
    check_state_update_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    cdt = _compute_dtype(x.dtype)
    dim = x.shape[1]
    x_c = x.to(cdt)
    dt_c = dt.to(cdt) if dt_bias is None else dt.to(cdt) + dt_bias.to(cdt)
    if dt_softplus:
        dt_c = F.softplus(dt_c)
    B_c, C_c = expand_state_groups(B.to(cdt), dim), expand_state_groups(C.to(cdt), dim)
    h = torch.exp(dt_c[..., None] * A.to(cdt)) * state.to(cdt) + (dt_c * x_c)[..., None] * B_c
    y = (h * C_c).sum(-1)
    if D is not None:
        y = y + D.to(cdt) * x_c
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype), h
