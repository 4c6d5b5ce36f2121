"""Reference selective scans: the specification every scan kernel is checked against.

Plain PyTorch, a Python loop over time, vectorised over (batch, channel, state).  Any device, any
float dtype; half-precision inputs are computed in float32, float64 inputs in float64.

Two layouts:

- ``selective_scan``: mamba_ssm's ``selective_scan_fn`` layout (Mamba1).  Channel d of ``dim``:

      h_t = exp(delta_t[d] * A[d]) * h_{t-1} + delta_t[d] * B_t * u_t[d]      (h_t in R^N)
      y_t[d] = <C_t, h_t> + D[d] * u_t[d],   out = y * silu(z) when z is given.

- ``selective_scan_mamba2``: mamba_ssm's Mamba2 / SSD layout.  Head h has one scalar A[h] and a
  state of N x headdim; it equals ``selective_scan`` with ``dim = nheads * headdim``, A's rows
  constant within a head and dt repeated over the head's channels (a test pins this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_scan_inputs

__all__ = ["selective_scan", "selective_scan_mamba2", "expand_groups", "discretize_delta", "skip_and_gate"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything narrower is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def discretize_delta(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool
) -> torch.Tensor:
    """Apply the optional per-channel bias and softplus to delta.

    delta: (batch, dim, L); delta_bias: (dim,) or None.  Returns a tensor of delta's shape.
    """
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def expand_groups(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """Give every channel its B (or C): (batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L).

    With G groups, channel d uses group d // (dim // G) (mamba_ssm's convention).
    """
    if BC.dim() == 3:
        return BC.unsqueeze(1).expand(BC.shape[0], dim, BC.shape[1], BC.shape[2])
    if BC.dim() != 4:
        raise ValueError(f"B/C must be (batch, N, L) or (batch, ngroups, N, L), got shape {tuple(BC.shape)}")
    ngroups = BC.shape[1]
    if dim % ngroups != 0:
        raise ValueError(f"dim={dim} is not a multiple of ngroups={ngroups}")
    return BC.repeat_interleave(dim // ngroups, dim=1)


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
):
    """Mamba1 selective scan in ``selective_scan_fn``'s layout.

    Args:
        u: (batch, dim, L) input.
        delta: (batch, dim, L) step sizes (before bias / softplus).
        A: (dim, N) real, negative for a stable system.
        B, C: (batch, N, L) or (batch, ngroups, N, L); channel d uses group d // (dim // ngroups).
        D: (dim,) skip connection, optional.
        z: (batch, dim, L) gate, optional: out = y * silu(z).
        delta_bias: (dim,), optional, added to delta before softplus.
        delta_softplus: apply softplus to delta.
        return_last_state: also return h_L, (batch, dim, N).

    Returns:
        out (batch, dim, L) in u's dtype, and the last state (batch, dim, N) in the compute dtype
        when ``return_last_state``.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    cdt = _compute_dtype(dtype_in)
    batch, dim, L = u.shape
    u_c, A_c = u.to(cdt), A.to(cdt)
    delta_c = discretize_delta(delta.to(cdt), None if delta_bias is None else delta_bias.to(cdt), delta_softplus)
    B_c = expand_groups(B.to(cdt), dim)  # (batch, dim, N, L)
    C_c = expand_groups(C.to(cdt), dim)

    deltaA = torch.exp(delta_c.unsqueeze(2) * A_c[None, :, :, None])  # (batch, dim, N, L)
    deltaB_u = (delta_c * u_c).unsqueeze(2) * B_c  # (batch, dim, N, L)

    h = u_c.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        h = deltaA[..., t] * h + deltaB_u[..., t]
        ys.append((h * C_c[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if L > 0 else u_c.new_zeros(batch, dim, 0)

    out = skip_and_gate(y, u_c, D, z).to(dtype_in)
    return (out, h) if return_last_state else out


def skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """y + D u, then times silu(z): the scan's output stage, in y's dtype.  y, u, z: (batch, dim, L)."""
    out = y if D is None else y + u * D.to(y.dtype)[:, None]
    return out if z is None else out * F.silu(z.to(y.dtype))


def selective_scan_mamba2(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    return_last_state: bool = False,
):
    """Mamba2 (SSD) selective scan in mamba_ssm's Mamba2 layout.

    Head h, group g = h // (nheads // ngroups):
        H_t = exp(dt_t[h] * A[h]) * H_{t-1} + dt_t[h] * B_t[g] x_t[h]^T      (H_t: N x headdim)
        y_t[h] = C_t[g]^T H_t + D[h] * x_t[h],   out = y * silu(z) when z is given.

    Args:
        x: (batch, L, nheads, headdim).
        dt: (batch, L, nheads) (before bias / softplus).
        A: (nheads,) one scalar per head.
        B, C: (batch, L, ngroups, N).
        D: (nheads,) or (nheads, headdim), optional.
        z: (batch, L, nheads, headdim), optional gate.
        dt_bias: (nheads,), optional.
        dt_softplus: apply softplus to dt (after the bias).
        return_last_state: also return the last state, (batch, nheads, headdim, N).

    Returns:
        out (batch, L, nheads, headdim) in x's dtype [, last state in the compute dtype].
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, L, nheads, headdim), got shape {tuple(x.shape)}")
    batch, L, nheads, headdim = x.shape
    if dt.shape != (batch, L, nheads):
        raise ValueError(f"dt must be (batch={batch}, L={L}, nheads={nheads}), got {tuple(dt.shape)}")
    if A.shape != (nheads,):
        raise ValueError(f"A must be (nheads={nheads},), got shape {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, L) or C.shape != B.shape:
        raise ValueError(
            f"B and C must both be (batch={batch}, L={L}, ngroups, N), got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    ngroups, N = B.shape[2], B.shape[3]
    if nheads % ngroups != 0:
        raise ValueError(f"nheads={nheads} is not a multiple of ngroups={ngroups}")
    if D is not None and D.shape not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"D must be (nheads,) or (nheads, headdim), got shape {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (nheads,):
        raise ValueError(f"dt_bias must be (nheads={nheads},), got shape {tuple(dt_bias.shape)}")

    dtype_in = x.dtype
    cdt = _compute_dtype(dtype_in)
    x_c, A_c = x.to(cdt), A.to(cdt)
    dt_c = dt.to(cdt)
    if dt_bias is not None:
        dt_c = dt_c + dt_bias.to(cdt)
    if dt_softplus:
        dt_c = F.softplus(dt_c)
    heads_per_group = nheads // ngroups
    B_h = B.to(cdt).repeat_interleave(heads_per_group, dim=2)  # (batch, L, nheads, N)
    C_h = C.to(cdt).repeat_interleave(heads_per_group, dim=2)

    decay = torch.exp(dt_c * A_c)  # (batch, L, nheads)
    H = x_c.new_zeros(batch, nheads, headdim, N)
    ys = []
    for t in range(L):
        # (batch, nheads, headdim, N): outer product of x_t (per head) and dt_t * B_t.
        inject = x_c[:, t, :, :, None] * (dt_c[:, t, :, None] * B_h[:, t])[:, :, None, :]
        H = decay[:, t, :, None, None] * H + inject
        ys.append((H * C_h[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if L > 0 else x_c.new_zeros(batch, 0, nheads, headdim)

    if D is not None:
        D_c = D.to(cdt)
        y = y + x_c * (D_c[:, None] if D_c.dim() == 1 else D_c)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(dtype_in)
    return (out, H) if return_last_state else out
